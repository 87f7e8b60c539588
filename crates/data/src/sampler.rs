//! Which samples each optimizer step trains on.
//!
//! Step `k` of a run with `batch_size * accum` samples per step reads the global sample
//! positions `k * per_step ..`; position `g` is sample `epoch_order(n, seed, e)[g % n]` of epoch
//! `e = g / n`. The batches of a step are therefore a pure function of (seed, step): a resumed
//! run continues exactly, without replaying data.

use std::collections::HashMap;

use burn::tensor::Device;

use crate::{MaskVocab, MaskingConfig, MlmBatch, SplitReader, collate, epoch_order, mask_tokens};

/// The micro-batches of one optimizer step.
pub struct StepBatches {
    /// Non-empty micro-batches, in order (fewer than `accum` only if a split is empty).
    pub batches: Vec<MlmBatch>,
    /// Tokens (before padding) read for this step.
    pub tokens: usize,
    /// Masked tokens over all micro-batches (0: the step has nothing to learn from).
    pub masked: usize,
}

/// Draws the masked micro-batches of each step from a training split.
pub struct StepSampler {
    n: usize,
    batch_size: usize,
    accum: usize,
    seed: u64,
    /// Shuffled orders of the epochs the current step reaches into.
    orders: HashMap<u64, Vec<usize>>,
}

impl StepSampler {
    /// A sampler over `n` examples, `batch_size * accum` samples per step.
    pub fn new(n: usize, batch_size: usize, accum: usize, seed: u64) -> Self {
        Self {
            n,
            batch_size,
            accum,
            seed,
            orders: HashMap::new(),
        }
    }

    /// The masked micro-batches of optimizer step `step` (0-based).
    pub fn step(
        &mut self,
        step: usize,
        split: &SplitReader,
        vocab: &MaskVocab,
        masking: &MaskingConfig,
        device: &Device,
    ) -> StepBatches {
        let mut out = StepBatches {
            batches: Vec::with_capacity(self.accum),
            tokens: 0,
            masked: 0,
        };
        if self.n == 0 {
            return out;
        }
        let n = self.n as u64;
        let per_step = (self.batch_size * self.accum) as u64;
        // Orders of epochs before this step's first sample are no longer needed.
        let first_epoch = step as u64 * per_step / n;
        self.orders.retain(|&e, _| e >= first_epoch);
        for micro in 0..self.accum {
            let start = step as u64 * per_step + (micro * self.batch_size) as u64;
            let mut examples = Vec::with_capacity(self.batch_size);
            for g in start..start + self.batch_size as u64 {
                let epoch = g / n;
                let (seed, len) = (self.seed, self.n);
                let order = self
                    .orders
                    .entry(epoch)
                    .or_insert_with(|| epoch_order(len, seed, epoch));
                let index = order[(g % n) as usize];
                let Some(sample) = split.get(index) else {
                    continue;
                };
                out.tokens += sample.len();
                examples.push(mask_tokens(
                    &sample,
                    vocab,
                    masking,
                    self.seed,
                    epoch,
                    index as u64,
                ));
            }
            if let Some(batch) = collate(&examples, vocab.pad_id, device) {
                out.masked += batch.masked;
                out.batches.push(batch);
            }
        }
        out
    }
}
