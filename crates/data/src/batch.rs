//! Masked examples to burn batch tensors.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{DataError, MaskVocab, MaskedExample, MaskingConfig, SplitReader, mask_tokens};

/// A padded batch of masked examples.
#[derive(Debug, Clone)]
pub struct MlmBatch {
    /// `[batch, seq]` token ids after masking, right-padded with the pad id.
    pub input_ids: Tensor<2, Int>,
    /// `[batch, seq]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[masked]` flat positions `row * seq + column` of the tokens to predict.
    pub positions: Tensor<1, Int>,
    /// `[masked]` the original ids at those positions.
    pub labels: Tensor<1, Int>,
    /// Number of predicted tokens (the loss's denominator).
    pub masked: usize,
}

/// Pads examples to the longest one and flattens their masked positions.
///
/// Returns `None` for an empty list of examples.
pub fn collate(examples: &[MaskedExample], pad_id: u32, device: &Device) -> Option<MlmBatch> {
    let seq = examples.iter().map(|e| e.input_ids.len()).max()?;
    let batch = examples.len();
    let mut ids = vec![pad_id as i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    for (row, example) in examples.iter().enumerate() {
        let offset = row * seq;
        for (i, &t) in example.input_ids.iter().enumerate() {
            ids[offset + i] = t as i64;
            mask[offset + i] = 1;
        }
        positions.extend(
            example
                .positions
                .iter()
                .map(|&p| (offset + p as usize) as i64),
        );
        labels.extend(example.labels.iter().map(|&l| l as i64));
    }
    let masked = positions.len();
    Some(MlmBatch {
        input_ids: Tensor::from_data(TensorData::new(ids, [batch, seq]), device),
        attention_mask: Tensor::from_data(TensorData::new(mask, [batch, seq]), device),
        positions: Tensor::from_data(TensorData::new(positions, [masked]), device),
        labels: Tensor::from_data(TensorData::new(labels, [masked]), device),
        masked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_flattens_positions() {
        let device = Device::flex();
        let examples = [
            MaskedExample {
                input_ids: vec![0, 4, 9, 2],
                positions: vec![1],
                labels: vec![7],
            },
            MaskedExample {
                input_ids: vec![0, 4, 2],
                positions: vec![1],
                labels: vec![8],
            },
        ];
        let batch = collate(&examples, 1, &device).unwrap();
        let ids: Vec<i64> = batch
            .input_ids
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        assert_eq!(ids, vec![0, 4, 9, 2, 0, 4, 2, 1]);
        let mask: Vec<i64> = batch
            .attention_mask
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 1, 1, 0]);
        let positions: Vec<i64> = batch
            .positions
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        assert_eq!(positions, vec![1, 5]);
        assert!(collate(&[], 1, &device).is_none());
    }

    #[test]
    fn epoch_order_is_a_keyed_permutation() {
        let a = epoch_order(1000, 3, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 3, 0));
        assert_ne!(a, epoch_order(1000, 3, 1));
        assert_ne!(a, epoch_order(1000, 4, 0));
    }
}

/// One example of a split: its index (which keys its masks) and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub index: u64,
    pub tokens: Vec<u32>,
}

/// A burn [`Dataset`] over one split of a token cache.
#[derive(Clone)]
pub struct MlmDataset {
    split: Arc<SplitReader>,
}

impl MlmDataset {
    pub fn new(split: Arc<SplitReader>) -> Self {
        Self { split }
    }
}

impl Dataset<Sample, DataError> for MlmDataset {
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let tokens = self.split.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.split.len(),
        })?;
        Ok(Sample {
            index: index as u64,
            tokens,
        })
    }

    fn len(&self) -> usize {
        self.split.len()
    }
}

/// The order in which an epoch visits `n` examples: a Fisher-Yates shuffle keyed by
/// (seed, epoch), so that step k of epoch e is the same batch in every run.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"masklm-shuffle\0\0");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order
}

/// A burn [`Batcher`] that masks samples (keyed by seed, epoch and sample index) and pads them.
#[derive(Debug, Clone)]
pub struct MlmBatcher {
    pub vocab: MaskVocab,
    pub config: MaskingConfig,
    pub seed: u64,
    pub epoch: u64,
}

impl MlmBatcher {
    /// Masks and collates `samples`.
    pub fn collate(&self, samples: &[Sample], device: &Device) -> Option<MlmBatch> {
        let examples: Vec<MaskedExample> = samples
            .iter()
            .map(|s| {
                mask_tokens(
                    &s.tokens,
                    &self.vocab,
                    &self.config,
                    self.seed,
                    self.epoch,
                    s.index,
                )
            })
            .collect();
        collate(&examples, self.vocab.pad_id, device)
    }
}

impl Batcher<Sample, MlmBatch> for MlmBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> MlmBatch {
        self.collate(&items, device)
            .unwrap_or_else(|| MlmBatch::empty(device))
    }
}

impl MlmBatch {
    /// A batch with no rows (what an empty list of samples collates to).
    pub fn empty(device: &Device) -> Self {
        Self {
            input_ids: Tensor::from_data(TensorData::new(Vec::<i64>::new(), [0, 0]), device),
            attention_mask: Tensor::from_data(TensorData::new(Vec::<i64>::new(), [0, 0]), device),
            positions: Tensor::from_data(TensorData::new(Vec::<i64>::new(), [0]), device),
            labels: Tensor::from_data(TensorData::new(Vec::<i64>::new(), [0]), device),
            masked: 0,
        }
    }
}
