//! The vocabulary distribution at masked positions: what `fill-mask`, the knowledge probes and
//! the server rank.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use masklm_data::MlmTokenizer;
use masklm_model::MaskedLm;

use crate::InferError;

/// Probabilities over the vocabulary at `masks[i]` of each sequence `i`, as one padded batch:
/// `out[i][m]` is the distribution at the `m`-th mask of sequence `i`.
///
/// Padding is masked out of attention, so a sequence's scores do not depend on what it is
/// batched with (up to float rounding).
pub fn mask_probabilities(
    model: &MaskedLm,
    sequences: &[&[u32]],
    masks: &[Vec<usize>],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<Vec<f32>>>, InferError> {
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
        .map_err(|e| InferError::Config {
            key: "model".to_string(),
            reason: format!("reading the model's output: {e:?}"),
        })?;
    if probs.iter().any(|p| !p.is_finite()) {
        return Err(InferError::Config {
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
) -> Result<Option<u32>, InferError> {
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

/// Why a text cannot be filled. Each names what to change; the server answers them as 4xx.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The text is empty or blank.
    #[error("empty text: give a sentence with {mask}")]
    Empty { mask: String },
    /// The text has no mask token.
    #[error("no mask token in {text}: write {mask} where a word should be predicted")]
    NoMask { text: String, mask: String },
    /// The text is longer than the model's position embeddings.
    #[error("{text} is {tokens} tokens long; this model takes at most {max}")]
    TooLong {
        text: String,
        tokens: usize,
        max: usize,
    },
    /// A `targets` word has no token at all.
    #[error("target {word:?} does not map to any token")]
    Target { word: String },
    /// The tokenizer failed on the text.
    #[error(transparent)]
    Data(#[from] masklm_data::DataError),
}

/// `text` quoted for a message, cut to its first 60 characters: a 1 MB input must not be
/// echoed whole.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
        None => format!("{text:?}"),
    }
}

/// A text encoded for fill-mask: its token ids (with `<s>`/`</s>`) and where its masks are.
#[derive(Debug, Clone)]
pub struct FillText {
    pub ids: Vec<u32>,
    pub masks: Vec<usize>,
}

/// Encodes `text` and checks it can be filled: not blank, at least one mask token, at most
/// `max_len` tokens.
pub fn encode_for_fill(
    tokenizer: &MlmTokenizer,
    text: &str,
    max_len: usize,
) -> Result<FillText, FillError> {
    if text.trim().is_empty() {
        return Err(FillError::Empty {
            mask: tokenizer.mask_token.clone(),
        });
    }
    let ids = tokenizer.encode(text)?;
    let masks: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == tokenizer.mask_id)
        .collect();
    if masks.is_empty() {
        return Err(FillError::NoMask {
            text: excerpt(text),
            mask: tokenizer.mask_token.clone(),
        });
    }
    if ids.len() > max_len {
        return Err(FillError::TooLong {
            text: excerpt(text),
            tokens: ids.len(),
            max: max_len,
        });
    }
    Ok(FillText { ids, masks })
}

/// The pipeline's `targets` handling (`FillMaskPipeline.get_target_ids`): a word that is a
/// vocabulary entry is that token; otherwise the first token of its encoding (without
/// specials), with a notice like the pipeline's warning. Duplicates collapse.
pub fn target_ids(
    tokenizer: &MlmTokenizer,
    words: &[String],
) -> Result<(Vec<u32>, Vec<String>), FillError> {
    let mut ids = Vec::new();
    let mut notices = Vec::new();
    for word in words {
        let id = match tokenizer.tokenizer.token_to_id(word) {
            Some(id) => id,
            None => {
                let id = tokenizer
                    .tokenizer
                    .encode(word.as_str(), false)
                    .ok()
                    .and_then(|enc| enc.get_ids().first().copied())
                    .ok_or_else(|| FillError::Target { word: word.clone() })?;
                notices.push(format!(
                    "target {word:?} is not a single token of the vocabulary; using its first \
                     piece {:?} (as transformers' pipeline does)",
                    tokenizer.id_to_token(id).unwrap_or_default()
                ));
                id
            }
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok((ids, notices))
}

/// The `top_k` most probable tokens of `row` (or of `targets` only), best first.
pub fn top_candidates(row: &[f32], top_k: usize, targets: Option<&[u32]>) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = match targets {
        Some(t) => t.to_vec(),
        None => (0..row.len() as u32).collect(),
    };
    // Best first; ties keep the lower id first, as a stable sort of the ids would.
    let better = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    // Partition out the top k in linear time, then sort only those: the server ranks a
    // 50k-entry vocabulary per mask.
    if top_k < order.len() {
        order.select_nth_unstable_by(top_k, better);
        order.truncate(top_k);
    }
    order.sort_by(better);
    order
        .into_iter()
        .take(top_k)
        .map(|id| (id, row[id as usize]))
        .collect()
}

/// What `pipeline("fill-mask")` returns for one text, from the distributions at its masks:
/// `[{score, token, token_str, sequence}, ...]` for one mask, a list of such lists for several.
pub fn pipeline_output(
    tokenizer: &MlmTokenizer,
    text: &FillText,
    rows: &[Vec<f32>],
    top_k: usize,
    targets: Option<&[u32]>,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let single = text.masks.len() == 1;
    let lists: Vec<Value> = rows
        .iter()
        .zip(&text.masks)
        .map(|(row, &position)| {
            let items = top_candidates(row, top_k, targets)
                .into_iter()
                .map(|(id, score)| {
                    let mut filled = text.ids.clone();
                    filled[position] = id;
                    // As the pipeline: specials are dropped only when there is one mask; with
                    // several, the other masks (and <s>, </s>) stay in the text.
                    let sequence = tokenizer.tokenizer.decode(&filled, single).unwrap_or_default();
                    let token_str = tokenizer.tokenizer.decode(&[id], false).unwrap_or_default();
                    json!({"score": score, "token": id, "token_str": token_str, "sequence": sequence})
                })
                .collect();
            Value::Array(items)
        })
        .collect();
    match <[Value; 1]>::try_from(lists) {
        Ok([one]) => one,
        Err(lists) => Value::Array(lists),
    }
}
