//! Held-out perplexity: exp of the mean cross-entropy over every masked token of a split.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int};
use masklm_data::{MaskVocab, MaskingConfig, MlmBatcher, Sample, SplitReader};
use masklm_model::RobertaForMaskedLM;
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
    model: &RobertaForMaskedLM,
    split: &SplitReader,
    vocab: &MaskVocab,
    settings: &EvalSettings,
    device: &Device,
) -> EvalResult {
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
    let batches = split.len().div_ceil(batch_size);
    let batches = if max_batches > 0 {
        batches.min(max_batches)
    } else {
        batches
    };
    for b in 0..batches {
        let samples: Vec<Sample> = (b * batch_size..((b + 1) * batch_size).min(split.len()))
            .filter_map(|i| {
                split.get(i).map(|tokens| Sample {
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
