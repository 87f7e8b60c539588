//! The vocabulary distribution at masked positions: what `fill-mask`, the knowledge probes and
//! the server rank.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use masklm_data::MlmTokenizer;
use masklm_model::RobertaForMaskedLM;

use crate::TrainError;

/// Probabilities over the vocabulary at `masks[i]` of each sequence `i`, as one padded batch:
/// `out[i][m]` is the distribution at the `m`-th mask of sequence `i`.
///
/// Padding is masked out of attention, so a sequence's scores do not depend on what it is
/// batched with (up to float rounding).
pub fn mask_probabilities(
    model: &RobertaForMaskedLM,
    sequences: &[&[u32]],
    masks: &[Vec<usize>],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<Vec<f32>>>, TrainError> {
    let batch = sequences.len();
    let seq = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
    let total: usize = masks.iter().map(Vec::len).sum();
    if batch == 0 || seq == 0 || total == 0 {
        return Ok(masks.iter().map(|m| vec![Vec::new(); m.len()]).collect());
    }
    let mut ids = vec![pad_id as i64; batch * seq];
    let mut attention = vec![0i64; batch * seq];
    let mut positions = Vec::with_capacity(total);
    for (b, (tokens, at)) in sequences.iter().zip(masks).enumerate() {
        for (i, &t) in tokens.iter().enumerate() {
            ids[b * seq + i] = t as i64;
            attention[b * seq + i] = 1;
        }
        positions.extend(at.iter().map(|&p| (b * seq + p) as i64));
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
    let attention = Tensor::<2, Int>::from_data(TensorData::new(attention, [batch, seq]), device);
    let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [total]), device);
    // [masked, vocab]
    let probs = softmax(model.forward_at(ids, attention, positions), 1);
    let [_, vocab] = probs.dims();
    let probs: Vec<f32> = probs
        .into_data()
        .try_to_vec()
        .map_err(|e| TrainError::Config {
            key: "model".to_string(),
            reason: format!("reading the model's output: {e:?}"),
        })?;
    if probs.iter().any(|p| !p.is_finite()) {
        return Err(TrainError::Config {
            key: "model".to_string(),
            reason: "the model's scores are not finite (NaN/inf): its weights are broken, e.g. \
                     saved from a diverged run; use an earlier checkpoint"
                .to_string(),
        });
    }
    let mut rows = probs.chunks_exact(vocab).map(<[f32]>::to_vec);
    Ok(masks
        .iter()
        .map(|at| at.iter().filter_map(|_| rows.next()).collect())
        .collect())
}

/// 1-based rank of `id` in `row` (ties ranked below: a candidate must beat every other).
pub fn rank_of(row: &[f32], id: u32) -> usize {
    let p = row[id as usize];
    1 + row.iter().filter(|&&q| q > p).count()
}

/// The token that fills a mask with `word` in `text`: encodes `text` with its (single) mask
/// token replaced by `word` and returns the one token that took the mask's place, or `None`
/// when `word` is not exactly one token there. Asking the tokenizer in context gets the form a
/// word takes in running text (RoBERTa's `Ġword` after a space, BERT's `word`), which a bare
/// vocabulary lookup of `word` does not.
pub fn token_in_context(
    tokenizer: &MlmTokenizer,
    text: &str,
    word: &str,
) -> Result<Option<u32>, TrainError> {
    let masked = tokenizer.encode(text)?;
    let Some(at) = masked.iter().position(|&t| t == tokenizer.mask_id) else {
        return Ok(None);
    };
    let filled = tokenizer.encode(&text.replacen(&tokenizer.mask_token, word, 1))?;
    // The mask token strips the space before it (`lstrip`), a word does not: compare the
    // sequences around the mask, which must be unchanged.
    if filled.len() != masked.len()
        || filled[..at] != masked[..at]
        || filled[at + 1..] != masked[at + 1..]
    {
        return Ok(None);
    }
    Ok(Some(filled[at]))
}
