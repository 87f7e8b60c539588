//! What each token of a batch may attend to: one sequence per row (right-padded), or several
//! documents packed into each row that do not see each other (packing without padding).
//!
//! Packed rows are what ModernBERT's unpadded training and transformers'
//! `DataCollatorWithFlattening` feed a model: each document keeps its own special tokens, its
//! positions restart at its first token (absolute position ids and rotary angles alike), and
//! attention is block-diagonal, so a packed row gives each document the logits it gets alone.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};

/// The attention mask of a batch, with the packing of its rows.
///
/// A `[batch, seq]` mask converts into one (`From`), so `forward(ids, mask)` keeps working
/// with HF's `attention_mask` tensor.
#[derive(Debug, Clone)]
pub struct BatchMask {
    /// `[batch, seq]`: 1 for tokens, 0 for padding (HF's `attention_mask`).
    pub attention_mask: Tensor<2, Int>,
    /// Packed rows: per row, the lengths of its documents, laid out from column 0 one after
    /// the other; the rest of the row is padding. `None`: one sequence per row.
    documents: Option<Arc<Vec<Vec<usize>>>>,
}

impl From<Tensor<2, Int>> for BatchMask {
    fn from(attention_mask: Tensor<2, Int>) -> Self {
        Self {
            attention_mask,
            documents: None,
        }
    }
}

impl BatchMask {
    /// Rows of `seq` columns holding `documents[row]` (lengths, from column 0), padded after
    /// the last. `None` when a row's documents overflow `seq`, or a document is empty.
    pub fn packed(documents: Vec<Vec<usize>>, seq: usize, device: &Device) -> Option<Self> {
        let fits = documents
            .iter()
            .all(|row| row.iter().all(|&n| n > 0) && row.iter().sum::<usize>() <= seq);
        if !fits {
            return None;
        }
        let batch = documents.len();
        let mut mask = vec![0i64; batch * seq];
        for (row, lens) in documents.iter().enumerate() {
            let used: usize = lens.iter().sum();
            mask[row * seq..][..used].fill(1);
        }
        Some(Self {
            attention_mask: Tensor::from_data(TensorData::new(mask, [batch, seq]), device),
            documents: Some(Arc::new(documents)),
        })
    }

    /// Whether rows hold packed documents.
    pub fn is_packed(&self) -> bool {
        self.documents.is_some()
    }

    /// `[batch, seq]`
    pub fn dims(&self) -> [usize; 2] {
        self.attention_mask.dims()
    }

    /// Packed rows: each document as `(first token, length)` on the flattened `[batch * seq]`
    /// token axis.
    pub fn runs(&self) -> Option<Vec<(usize, usize)>> {
        let [_, seq] = self.dims();
        let documents = self.documents.as_ref()?;
        let mut runs = Vec::new();
        for (row, lens) in documents.iter().enumerate() {
            let mut first = row * seq;
            for &n in lens {
                runs.push((first, n));
                first += n;
            }
        }
        Some(runs)
    }

    /// Packed rows: each token's position in its document plus `offset`, and `pad` for padding
    /// (RoBERTa: `offset = pad = padding_idx`, then + 1 for tokens; BERT and rotary: 0).
    ///
    /// # Shapes
    /// - output: `[batch, seq]`
    pub fn document_positions(&self, offset: i64, pad: i64) -> Option<Tensor<2, Int>> {
        let [batch, seq] = self.dims();
        let documents = self.documents.as_ref()?;
        let mut positions = vec![pad; batch * seq];
        for (row, lens) in documents.iter().enumerate() {
            let mut column = row * seq;
            for &n in lens {
                for (i, p) in positions[column..][..n].iter_mut().enumerate() {
                    *p = offset + i as i64;
                }
                column += n;
            }
        }
        Some(Tensor::from_data(
            TensorData::new(positions, [batch, seq]),
            &self.attention_mask.device(),
        ))
    }

    /// Packed rows: `[batch, 1, seq, seq]`, `true` where query `i` and key `j` are in the same
    /// document (or both padding, so that every query has a visible key).
    pub fn same_document(&self) -> Option<Tensor<4, burn::tensor::Bool>> {
        let [batch, seq] = self.dims();
        let documents = self.documents.as_ref()?;
        // Document number per token, 1-based; 0 for padding.
        let mut segment = vec![0i64; batch * seq];
        for (row, lens) in documents.iter().enumerate() {
            let mut column = row * seq;
            for (d, &n) in lens.iter().enumerate() {
                segment[column..][..n].fill(d as i64 + 1);
                column += n;
            }
        }
        let segment = Tensor::<2, Int>::from_data(
            TensorData::new(segment, [batch, seq]),
            &self.attention_mask.device(),
        );
        let query = segment
            .clone()
            .reshape([batch, 1, seq, 1])
            .expand([batch, 1, seq, seq]);
        let key = segment
            .reshape([batch, 1, 1, seq])
            .expand([batch, 1, seq, seq]);
        Some(query.equal(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_give_runs_positions_and_a_block_diagonal_mask() {
        let device = Device::flex();
        assert!(BatchMask::packed(vec![vec![3, 3]], 5, &device).is_none());
        assert!(BatchMask::packed(vec![vec![3, 0]], 5, &device).is_none());
        let mask = BatchMask::packed(vec![vec![2, 1], vec![4]], 4, &device).expect("fits");
        let ints = |t: Tensor<2, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        assert_eq!(ints(mask.attention_mask.clone()), [1, 1, 1, 0, 1, 1, 1, 1]);
        assert_eq!(mask.runs(), Some(vec![(0, 2), (2, 1), (4, 4)]));
        let positions = mask.document_positions(2, 1).expect("packed");
        assert_eq!(ints(positions), [2, 3, 2, 1, 2, 3, 4, 5]);
        let same = mask.same_document().expect("packed");
        let same: Vec<bool> = same.into_data().try_to_vec().unwrap();
        #[rustfmt::skip]
        let want = [
            true, true, false, false,  true, true, false, false,
            false, false, true, false,  false, false, false, true,
            true, true, true, true,  true, true, true, true,
            true, true, true, true,  true, true, true, true,
        ];
        assert_eq!(same, want);
        let unpacked = BatchMask::from(Tensor::<2, Int>::ones([1, 3], &device));
        assert!(unpacked.runs().is_none() && unpacked.same_document().is_none());
    }
}
