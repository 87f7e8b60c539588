//! Masked examples to burn batch tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{MaskVocab, MaskedExample, MaskingConfig, mask_tokens};

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
    /// Packed rows (`[data] packing = "documents"`): per row, the lengths of its documents
    /// from column 0, each to attend only within itself. `None`: one example per row.
    pub documents: Option<Vec<Vec<usize>>>,
}

/// Pads examples to the longest one and flattens their masked positions.
///
/// Returns `None` for an empty list of examples.
pub fn collate(examples: &[MaskedExample], pad_id: u32, device: &Device) -> Option<MlmBatch> {
    let rows: Vec<&[MaskedExample]> = examples.iter().map(std::slice::from_ref).collect();
    pad_rows(&rows, pad_id, device)
}

/// Packs rows of several examples each (documents placed one after the other from column 0)
/// into a batch as wide as the fullest row, with their lengths in [`MlmBatch::documents`].
/// Masked positions and labels are those of each example, moved to its place in its row.
///
/// Returns `None` when no row holds an example.
pub fn collate_packed(
    rows: &[Vec<MaskedExample>],
    pad_id: u32,
    device: &Device,
) -> Option<MlmBatch> {
    let rows: Vec<&[MaskedExample]> = rows
        .iter()
        .filter(|r| !r.is_empty())
        .map(Vec::as_slice)
        .collect();
    let mut batch = pad_rows(&rows, pad_id, device)?;
    batch.documents = Some(
        rows.iter()
            .map(|row| row.iter().map(|e| e.input_ids.len()).collect())
            .collect(),
    );
    Some(batch)
}

/// Rows of examples laid out one after the other from column 0, right-padded to the widest
/// row, with the masked positions flattened (`row * seq + column`); `documents` unset.
fn pad_rows(rows: &[&[MaskedExample]], pad_id: u32, device: &Device) -> Option<MlmBatch> {
    let width = |row: &[MaskedExample]| row.iter().map(|e| e.input_ids.len()).sum::<usize>();
    let seq = rows.iter().map(|r| width(r)).max()?;
    let batch = rows.len();
    let mut ids = vec![pad_id as i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    let (mut positions, mut labels) = (Vec::new(), Vec::new());
    for (r, row) in rows.iter().enumerate() {
        let mut column = r * seq;
        for example in row.iter() {
            for (i, &t) in example.input_ids.iter().enumerate() {
                ids[column + i] = t as i64;
                mask[column + i] = 1;
            }
            positions.extend(
                example
                    .positions
                    .iter()
                    .map(|&p| (column + p as usize) as i64),
            );
            labels.extend(example.labels.iter().map(|&l| l as i64));
            column += example.input_ids.len();
        }
    }
    let masked = positions.len();
    Some(MlmBatch {
        input_ids: Tensor::from_data(TensorData::new(ids, [batch, seq]), device),
        attention_mask: Tensor::from_data(TensorData::new(mask, [batch, seq]), device),
        positions: Tensor::from_data(TensorData::new(positions, [masked]), device),
        labels: Tensor::from_data(TensorData::new(labels, [masked]), device),
        masked,
        documents: None,
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
    fn length_grouping_sorts_each_mega_batch_and_keeps_the_permutation() {
        // 1,000 examples of lengths 1..=200 in batches of 5: mega-batches of
        // min(1000 / 20, 50) = 50 batches = 250 examples, as transformers computes them.
        let order = epoch_order(1000, 3, 0);
        let mut lengths: Vec<usize> = (0..1000).map(|i| 1 + (i * 37) % 200).collect();
        // One longest example, in the last mega-batch of the shuffled order.
        lengths[order[900]] = 500;
        let grouped = length_grouped(order.clone(), 5, |i| lengths[i]);
        let mut sorted = grouped.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // The longest example of all leads: it was swapped with the first of the mega-batch
        // that held it. Undo that swap, then every mega-batch holds the shuffled order's
        // examples of that stretch, longest first.
        assert_eq!(grouped[0], order[900]);
        let mut unswapped = grouped.clone();
        unswapped.swap(0, 750);
        for (k, chunk) in unswapped.chunks(250).enumerate() {
            let mut want: Vec<usize> = order[k * 250..(k + 1) * 250].to_vec();
            let mut got = chunk.to_vec();
            want.sort();
            got.sort();
            assert_eq!(got, want, "mega-batch {k}");
            let lens: Vec<usize> = chunk.iter().map(|&i| lengths[i]).collect();
            assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{k}: {lens:?}");
        }
        // Less padding: sum over batches of (longest in batch) * batch size.
        let padded = |o: &[usize]| -> usize {
            o.chunks(5)
                .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap_or(0) * b.len())
                .sum()
        };
        assert!(
            padded(&grouped) * 3 < padded(&order) * 2,
            "{} vs {}",
            padded(&grouped),
            padded(&order)
        );
        assert_eq!(grouped, length_grouped(order, 5, |i| lengths[i]));
        // A split smaller than 4 batches is one mega-batch.
        assert_eq!(length_grouped(vec![2, 0, 1], 8, |i| i), vec![2, 1, 0]);
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

/// `order` regrouped so that each batch of `batch_size` holds examples of similar length (less
/// padding), as transformers' `LengthGroupedSampler` (`get_length_grouped_indices`): the
/// shuffled order is cut into mega-batches of `min(n / (4 * batch_size), 50)` batches (at least
/// one), each sorted longest first (stable), and the longest example overall is moved to the
/// front so that a batch too large for memory fails on the first step, not hours in.
/// A pure function of its inputs, so an order built from `epoch_order` stays keyed by
/// (seed, epoch) and a resumed run sees the same batches.
pub fn length_grouped(
    order: Vec<usize>,
    batch_size: usize,
    length: impl Fn(usize) -> usize,
) -> Vec<usize> {
    let batch_size = batch_size.max(1);
    let mega = (order.len() / (4 * batch_size)).clamp(1, 50) * batch_size;
    let mut grouped = order;
    for chunk in grouped.chunks_mut(mega) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(length(i)));
    }
    // Each chunk's longest is its first; swap the longest of all into position 0.
    if let Some(longest) = (0..grouped.len())
        .step_by(mega)
        .max_by_key(|&start| (length(grouped[start]), std::cmp::Reverse(start)))
    {
        grouped.swap(0, longest);
    }
    grouped
}

/// Masks samples (keyed by seed, epoch and sample index) and pads them into a batch.
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
