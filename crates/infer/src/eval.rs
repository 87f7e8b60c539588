//! Held-out perplexity: exp of the mean cross-entropy over every masked token of a split
//! (what a run evaluates and `masklm eval` reports), and pseudo-perplexity (each token masked
//! in turn: what the server's `/v1/score` and `masklm eval --pseudo-perplexity` compute).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use masklm_data::{MaskVocab, MaskingConfig, MlmBatcher, Sample, SplitReader};
use masklm_model::MaskedLm;
use serde::{Deserialize, Serialize};

/// Result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy per masked token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Share of masked tokens whose top prediction is the original token.
    pub accuracy: f64,
    /// Masked tokens evaluated.
    pub tokens: u64,
}

/// How to evaluate: masks keyed by `seed` (epoch 0, example index), `batch_size` examples at
/// a time, at most `max_batches` batches (0: the whole split).
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub masking: MaskingConfig,
    pub seed: u64,
    pub batch_size: usize,
    pub max_batches: usize,
}

/// Evaluates `model` on `split`, in order.
///
/// Only the masked positions are projected onto the vocabulary, one batch at a time, so
/// memory stays at one batch's `[masked, vocab]` logits.
pub fn evaluate(
    model: &MaskedLm,
    split: &SplitReader,
    vocab: &MaskVocab,
    settings: &EvalSettings,
    device: &Device,
) -> EvalResult {
    evaluate_splits(model, &[split], vocab, settings, device)
}

/// Evaluates `model` on the examples of `splits` one after the other, as one set (the
/// validation splits of several `[data] sources`); masks are keyed by the running index.
pub fn evaluate_splits(
    model: &MaskedLm,
    splits: &[&SplitReader],
    vocab: &MaskVocab,
    settings: &EvalSettings,
    device: &Device,
) -> EvalResult {
    let total: usize = splits.iter().map(|s| s.len()).sum();
    let get = |mut i: usize| {
        for split in splits {
            if i < split.len() {
                return split.get(i);
            }
            i -= split.len();
        }
        None
    };
    let batch_size = settings.batch_size.max(1);
    let max_batches = settings.max_batches;
    let batcher = MlmBatcher {
        vocab: vocab.clone(),
        config: settings.masking.clone(),
        seed: settings.seed,
        epoch: 0,
    };
    let mut nll = 0.0f64;
    let mut correct = 0u64;
    let mut tokens = 0u64;
    let batches = total.div_ceil(batch_size);
    let batches = if max_batches > 0 {
        batches.min(max_batches)
    } else {
        batches
    };
    for b in 0..batches {
        let samples: Vec<Sample> = (b * batch_size..((b + 1) * batch_size).min(total))
            .filter_map(|i| {
                get(i).map(|tokens| Sample {
                    index: i as u64,
                    tokens,
                })
            })
            .collect();
        let Some(batch) = batcher.collate(&samples, device) else {
            continue;
        };
        if batch.masked == 0 {
            continue;
        }
        let logits = model.forward_at(batch.input_ids, batch.attention_mask, batch.positions);
        let labels = batch.labels.reshape([batch.masked, 1]);
        let log_probs = log_softmax(logits, 1);
        let predicted: burn::tensor::Tensor<2, Int> = log_probs.clone().argmax(1);
        let picked = log_probs.gather(1, labels.clone());
        nll -= picked.sum().into_scalar::<f32>() as f64;
        correct += predicted.equal(labels).int().sum().into_scalar::<i64>() as u64;
        tokens += batch.masked as u64;
    }
    let loss = if tokens > 0 {
        nll / tokens as f64
    } else {
        f64::NAN
    };
    EvalResult {
        loss,
        perplexity: loss.exp(),
        accuracy: if tokens > 0 {
            correct as f64 / tokens as f64
        } else {
            f64::NAN
        },
        tokens,
    }
}

/// Pseudo-perplexity figures of a split (see [`pseudo_perplexity`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PseudoPerplexity {
    /// `exp(-PLL / tokens)`: Salazar et al.'s figure, what transformers users compute.
    pub per_token: f64,
    /// `exp(-PLL / words)`: the same log-likelihood spread over the words of the text, so
    /// that two tokenizers that split text into the same words (a model before and after
    /// `masklm vocab extend`) can be compared on the same text, which per-token figures
    /// cannot (fewer, longer tokens each carry more of the text).
    pub per_word: f64,
    /// Tokens scored (each masked once).
    pub tokens: u64,
    /// Words among them ([`count_words`]).
    pub words: u64,
}

/// Pseudo-perplexity (Salazar et al. 2020): exp of the mean of -log p(token | all other
/// tokens), masking each non-special token of each example once, `batch_size` masked copies at
/// a time; per token and per word. `continuous`: the examples are consecutive blocks of one
/// token stream (`packing = "full"`), so a block may start inside a word. `None` when no
/// example has a maskable token.
pub fn pseudo_perplexity(
    model: &MaskedLm,
    split: &SplitReader,
    vocab: &MaskVocab,
    batch_size: usize,
    continuous: bool,
    device: &Device,
) -> Option<PseudoPerplexity> {
    let mut nll = 0.0f64;
    let (mut tokens, mut words) = (0u64, 0u64);
    let mut after_special = true;
    for i in 0..split.len() {
        let Some(example) = split.get(i) else {
            continue;
        };
        let (log_likelihood, n) = pseudo_log_likelihood(model, &example, vocab, batch_size, device);
        nll -= log_likelihood;
        tokens += n;
        let (w, ends_in_special) = count_words(&example, vocab, after_special || !continuous);
        words += w;
        after_special = ends_in_special;
    }
    (tokens > 0).then(|| PseudoPerplexity {
        per_token: (nll / tokens as f64).exp(),
        per_word: (nll / words.max(1) as f64).exp(),
        tokens,
        words,
    })
}

/// The words of one example framed as `<s> ... </s>`: its non-special tokens that begin a word
/// by the tokenizer's own marks (`Ġ`/`▁` start one, `##` continues one: [`MaskVocab::starts_word`])
/// or that follow a special token (a document's first word has no leading space; `</s>`
/// separates packed documents). `after_special`: whether the token before this example's
/// content was special (true for its first example, or for one document per example).
/// Returns the count and whether the content ends in a special token, for the next block.
///
/// For byte-level BPE this counts whitespace-separated words exactly (punctuation and digits
/// inside a word carry no `Ġ`); WordPiece counts punctuation as words, so compare per-word
/// figures only between tokenizers of one family.
pub fn count_words(tokens: &[u32], vocab: &MaskVocab, mut after_special: bool) -> (u64, bool) {
    // The frame: `<s>` first and `</s>` last are not part of the text.
    let content = match tokens {
        [first, inner @ .., last] if vocab.is_special(*first) && vocab.is_special(*last) => inner,
        _ => tokens,
    };
    let mut words = 0;
    for &t in content {
        if vocab.is_special(t) {
            after_special = true;
            continue;
        }
        if after_special || vocab.starts_word(t) {
            words += 1;
        }
        after_special = false;
    }
    (words, after_special)
}

/// Pseudo-log-likelihood of one sequence (with its specials): the sum of log p(token | all
/// other tokens) over its non-special tokens, each masked once, `batch_size` masked copies per
/// forward; and how many tokens were scored.
pub fn pseudo_log_likelihood(
    model: &MaskedLm,
    tokens: &[u32],
    vocab: &MaskVocab,
    batch_size: usize,
    device: &Device,
) -> (f64, u64) {
    pseudo_log_likelihood_passes(model, tokens, vocab, batch_size, device)
        .fold((0.0, 0), |(sum, n), (ll, k)| (sum + ll, n + k))
}

/// The terms of [`pseudo_log_likelihood`], one forward pass each: (log-likelihood, tokens
/// scored) of up to `batch_size` masked copies. A pass runs only when the iterator is
/// advanced, so a caller can stop between passes: the server does, for a client that has left
/// (a 512-token text is 512 masked copies).
pub fn pseudo_log_likelihood_passes<'a>(
    model: &'a MaskedLm,
    tokens: &'a [u32],
    vocab: &'a MaskVocab,
    batch_size: usize,
    device: &'a Device,
) -> impl Iterator<Item = (f64, u64)> + 'a {
    let seq = tokens.len();
    let targets: Vec<usize> = (0..seq).filter(|&p| !vocab.is_special(tokens[p])).collect();
    let batch_size = batch_size.max(1);
    (0..targets.len()).step_by(batch_size).map(move |start| {
        let chunk = &targets[start..(start + batch_size).min(targets.len())];
        let rows = chunk.len();
        let mut ids = Vec::with_capacity(rows * seq);
        for &p in chunk {
            ids.extend(tokens.iter().enumerate().map(|(j, &t)| {
                if j == p {
                    vocab.mask_id as i64
                } else {
                    t as i64
                }
            }));
        }
        let positions: Vec<i64> = chunk
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * seq + p) as i64)
            .collect();
        let labels: Vec<i64> = chunk.iter().map(|&p| tokens[p] as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, seq]), device);
        let attention = Tensor::<2, Int>::ones([rows, seq], device);
        let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [rows]), device);
        let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [rows, 1]), device);
        let log_probs = log_softmax(model.forward_at(input, attention, positions), 1);
        let log_likelihood = log_probs.gather(1, labels).sum().into_scalar::<f32>() as f64;
        (log_likelihood, rows as u64)
    })
}
