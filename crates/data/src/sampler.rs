//! Which samples each optimizer step trains on.
//!
//! Step `k` of a run with `batch_size * accum` samples per step fills the global sample
//! positions `k * per_step ..`. With one source, position `g` is sample
//! `epoch_order(n, seed, e)[g % n]` of epoch `e = g / n`.
//!
//! With several sources mixed by weight (`[data] sources`), position `g` goes to the source
//! furthest behind its share: the one maximising `w_s * (g + 1) - taken_s` (ties to the first),
//! as Megatron-LM's `BlendableDataset` builds its index. Every prefix of the run then holds each
//! source within one sample of its share, and the `j`-th sample a source gives is its
//! position `j` in its own shuffled epochs (its own seed, so two sources never share an order).
//!
//! With length grouping (`[training] group_by_length`, transformers' `group_by_length`), each
//! (source, epoch) order is regrouped by [`length_grouped`] so that a batch holds examples of
//! similar length and pads less; with several sources the batches mix them, so grouping helps
//! less there.
//!
//! Either way the batches of a step are a pure function of (seed, step): a resumed run
//! continues exactly, without replaying data.

use std::collections::HashMap;

use burn::tensor::Device;

use crate::{
    MaskVocab, MaskingConfig, MlmBatch, SplitReader, collate, epoch_order, length_grouped,
    mask_tokens,
};

/// The micro-batches of one optimizer step.
pub struct StepBatches {
    /// Non-empty micro-batches, in order (fewer than `accum` only if a split is empty).
    pub batches: Vec<MlmBatch>,
    /// Tokens (before padding) read for this step.
    pub tokens: usize,
    /// Tokens read from each source for this step.
    pub source_tokens: Vec<u64>,
    /// Masked tokens over all micro-batches (0: the step has nothing to learn from).
    pub masked: usize,
}

/// Draws the masked micro-batches of each step from one or more training splits.
pub struct StepSampler {
    sizes: Vec<usize>,
    /// Weights normalised to sum to 1.
    weights: Vec<f64>,
    batch_size: usize,
    accum: usize,
    seed: u64,
    /// Regroup each epoch's order by example length ([`length_grouped`]).
    group_by_length: bool,
    /// The next global position, and how many samples each source gave before it.
    position: u64,
    taken: Vec<u64>,
    /// Shuffled orders of the (source, epoch) pairs the current step reaches into.
    orders: HashMap<(usize, u64), Vec<usize>>,
}

/// The shuffling and masking seed of source `s` (source 0 keeps the run's seed, so a
/// one-source run is the same as a run without sources).
pub fn source_seed(seed: u64, s: usize) -> u64 {
    if s == 0 {
        seed
    } else {
        crate::splitmix64(seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

impl StepSampler {
    /// A sampler over one split of `n` examples, `batch_size * accum` samples per step.
    pub fn new(n: usize, batch_size: usize, accum: usize, seed: u64) -> Self {
        Self::mixed(vec![n], &[1.0], batch_size, accum, seed)
    }

    /// A sampler over splits of `sizes` examples mixed by `weights` (positive; normalised
    /// here). A source with no examples is never drawn.
    pub fn mixed(
        sizes: Vec<usize>,
        weights: &[f64],
        batch_size: usize,
        accum: usize,
        seed: u64,
    ) -> Self {
        let weights: Vec<f64> = sizes
            .iter()
            .zip(weights)
            .map(|(&n, &w)| if n == 0 { 0.0 } else { w.max(0.0) })
            .collect();
        let total: f64 = weights.iter().sum();
        let weights = weights
            .iter()
            .map(|w| if total > 0.0 { w / total } else { 0.0 })
            .collect();
        Self {
            taken: vec![0; sizes.len()],
            sizes,
            weights,
            batch_size,
            accum,
            seed,
            group_by_length: false,
            position: 0,
            orders: HashMap::new(),
        }
    }

    /// Regroups each epoch's order so that batches hold examples of similar length.
    pub fn with_length_grouping(mut self, on: bool) -> Self {
        self.group_by_length = on;
        self
    }

    /// The source of global position `self.position`, and advances it.
    fn next_source(&mut self) -> usize {
        let g1 = (self.position + 1) as f64;
        let mut best = 0;
        let mut best_gap = f64::NEG_INFINITY;
        for (s, &w) in self.weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let gap = w * g1 - self.taken[s] as f64;
            if gap > best_gap {
                (best, best_gap) = (s, gap);
            }
        }
        self.position += 1;
        self.taken[best] += 1;
        best
    }

    /// Moves to global position `target`, replaying the source choices from the start when
    /// going back or jumping ahead (a resume); sequential steps cost nothing extra.
    fn seek(&mut self, target: u64) {
        if self.sizes.len() == 1 {
            (self.position, self.taken[0]) = (target, target);
            return;
        }
        if target < self.position {
            self.position = 0;
            self.taken.iter_mut().for_each(|t| *t = 0);
        }
        while self.position < target {
            self.next_source();
        }
    }

    /// Samples each source has given before global position `position` (for proportions).
    pub fn taken_before(&mut self, position: u64) -> Vec<u64> {
        self.seek(position);
        self.taken.clone()
    }

    /// The masked micro-batches of optimizer step `step` (0-based) from `splits` (one per
    /// source, in the order of the sizes given to the sampler).
    pub fn step(
        &mut self,
        step: usize,
        splits: &[&SplitReader],
        vocab: &MaskVocab,
        masking: &MaskingConfig,
        device: &Device,
    ) -> StepBatches {
        let mut out = StepBatches {
            batches: Vec::with_capacity(self.accum),
            tokens: 0,
            source_tokens: vec![0; self.sizes.len()],
            masked: 0,
        };
        if self.weights.iter().all(|&w| w == 0.0) {
            return out;
        }
        let per_step = (self.batch_size * self.accum) as u64;
        self.seek(step as u64 * per_step);
        // Orders of epochs before this step's first samples are no longer needed.
        let firsts: Vec<u64> = self
            .taken
            .iter()
            .zip(&self.sizes)
            .map(|(&t, &n)| t / n.max(1) as u64)
            .collect();
        self.orders.retain(|&(s, e), _| e >= firsts[s]);
        for _ in 0..self.accum {
            let mut examples = Vec::with_capacity(self.batch_size);
            for _ in 0..self.batch_size {
                let s = self.next_source();
                let j = self.taken[s] - 1;
                let n = self.sizes[s] as u64;
                let (epoch, seed) = (j / n, source_seed(self.seed, s));
                let (len, batch_size) = (self.sizes[s], self.batch_size);
                let grouped_by = splits.get(s).filter(|_| self.group_by_length);
                let order = self.orders.entry((s, epoch)).or_insert_with(|| {
                    let order = epoch_order(len, seed, epoch);
                    match grouped_by {
                        Some(split) => {
                            length_grouped(order, batch_size, |i| split.example_len(i).unwrap_or(0))
                        }
                        None => order,
                    }
                });
                let index = order[(j % n) as usize];
                let Some(sample) = splits.get(s).and_then(|split| split.get(index)) else {
                    continue;
                };
                out.tokens += sample.len();
                out.source_tokens[s] += sample.len() as u64;
                examples.push(mask_tokens(
                    &sample,
                    vocab,
                    masking,
                    seed,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixing_holds_each_share_and_a_fresh_sampler_continues_exactly() {
        let mut sampler = StepSampler::mixed(vec![50, 7, 1000], &[0.6, 0.1, 0.3], 8, 1, 3);
        let taken = sampler.taken_before(10_000);
        for (t, share) in taken.iter().zip([0.6, 0.1, 0.3]) {
            let got = *t as f64 / 10_000.0;
            assert!((got - share).abs() < 0.01, "{taken:?}");
            // Greedy blending: within one sample of the share at every prefix.
            assert!((*t as f64 - share * 10_000.0).abs() <= 1.0, "{taken:?}");
        }
        // Seeking back and forth (as a resume does) gives the same counts.
        let mut other = StepSampler::mixed(vec![50, 7, 1000], &[0.6, 0.1, 0.3], 8, 1, 3);
        assert_eq!(other.taken_before(4321), sampler.taken_before(4321));
        assert_eq!(other.taken_before(10_000), taken);
    }

    #[test]
    fn an_empty_source_is_never_drawn() {
        let mut sampler = StepSampler::mixed(vec![10, 0], &[0.5, 0.5], 4, 1, 3);
        assert_eq!(sampler.taken_before(100), vec![100, 0]);
    }
}
