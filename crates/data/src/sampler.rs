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
//! With document packing (`[data] packing = "documents"`), a micro-batch is `batch_size` rows
//! of `row_tokens` tokens filled with whole documents taken in the same stream order, each
//! placed in the first row with room for it (first-fit); the first document that fits no row
//! starts the next micro-batch. A step then takes a varying number of samples, so the position
//! where step `k` starts is found by packing the lengths of the steps before it (memoised; a
//! resume packs lengths only, no tokens are masked).
//!
//! With batch-size warmup ([`StepSampler::with_batch_size_warmup`], ModernBERT's
//! `batch_size_warmup_tokens`), a micro-batch holds fewer rows at first: step `k`'s rows grow
//! linearly from a minimum to `batch_size` in the real tokens drawn before `k`, found the same
//! way (packing or summing the lengths of the earlier steps, memoised).
//!
//! Either way the batches of a step are a pure function of (seed, step): a resumed run
//! continues exactly, without replaying data.

use std::collections::HashMap;

use burn::tensor::Device;

use crate::{
    MaskVocab, MaskedExample, MaskingConfig, MlmBatch, SplitReader, collate, collate_packed,
    epoch_order, length_grouped, mask_tokens,
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
    /// Samples (examples, or packed documents) drawn for this step.
    pub samples: usize,
}

/// One sample of the stream: its source, epoch, masking seed and index in its split.
#[derive(Debug, Clone, Copy)]
struct Drawn {
    source: usize,
    epoch: u64,
    seed: u64,
    index: usize,
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
    /// Document packing: tokens per row (`None`: one sample per row).
    row_tokens: Option<usize>,
    /// Batch-size warmup: `(first rows per micro-batch, tokens to grow over)`.
    warmup: Option<(usize, u64)>,
    /// With packing or batch-size warmup: the global position at which each step starts and
    /// the real tokens drawn before it, as far as computed.
    step_starts: Vec<(u64, u64)>,
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
            row_tokens: None,
            warmup: None,
            step_starts: vec![(0, 0)],
        }
    }

    /// Batch-size warmup: micro-batches start with `min_rows` rows (at least 1, at most
    /// `batch_size`) and grow linearly to `batch_size` over `tokens` real tokens. `None`: always
    /// `batch_size`.
    pub fn with_batch_size_warmup(mut self, warmup: Option<(usize, u64)>) -> Self {
        self.warmup = warmup
            .filter(|&(_, tokens)| tokens > 0)
            .map(|(min, tokens)| (min.clamp(1, self.batch_size.max(1)), tokens));
        self
    }

    /// Rows per micro-batch after `tokens` real tokens.
    pub fn rows_after(&self, tokens: u64) -> usize {
        match self.warmup {
            Some((min, total)) if tokens < total => {
                let grown = (self.batch_size - min) as u128 * tokens as u128 / total as u128;
                min + grown as usize
            }
            _ => self.batch_size,
        }
    }

    /// Whether step starts must be found by replaying lengths (packing or warmup).
    fn replays(&self) -> bool {
        self.row_tokens.is_some() || self.warmup.is_some()
    }

    /// Packs whole documents into rows of `row_tokens` tokens (see the module doc); `None`
    /// keeps one sample per row.
    pub fn with_packing(mut self, row_tokens: Option<usize>) -> Self {
        self.row_tokens = row_tokens.filter(|&n| n > 0);
        self
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

    /// Orders of epochs before the current position's are no longer needed.
    fn prune_orders(&mut self) {
        let firsts: Vec<u64> = self
            .taken
            .iter()
            .zip(&self.sizes)
            .map(|(&t, &n)| t / n.max(1) as u64)
            .collect();
        self.orders.retain(|&(s, e), _| e >= firsts[s]);
    }

    /// The sample at the current position, and advances past it.
    fn draw(&mut self, splits: &[&SplitReader]) -> Drawn {
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
        Drawn {
            source: s,
            epoch,
            seed,
            index: order[(j % n) as usize],
        }
    }

    /// Undoes the last [`StepSampler::draw`] (of `source`): the source choice depends only on
    /// the position and the counts, so the same sample is drawn next.
    fn undraw(&mut self, source: usize) {
        self.position -= 1;
        self.taken[source] -= 1;
    }

    /// One packed micro-batch: `rows` rows of up to `row_tokens` tokens, each a list of
    /// `(sample, length)`, filled first-fit in stream order until a document fits no row
    /// (it is left for the next micro-batch). A document longer than a row, which a cache of
    /// the same `max_seq_length` never holds, is cut to the row when it comes first.
    fn pack(
        &mut self,
        splits: &[&SplitReader],
        rows: usize,
        row_tokens: usize,
    ) -> Vec<Vec<(Drawn, usize)>> {
        let mut rows: Vec<(usize, Vec<(Drawn, usize)>)> = vec![(0, Vec::new()); rows];
        let mut missing = 0usize;
        loop {
            let drawn = self.draw(splits);
            let len = splits
                .get(drawn.source)
                .and_then(|split| split.example_len(drawn.index))
                .unwrap_or(0);
            if len == 0 {
                // An unreadable sample is skipped, as unpacked batches skip it; a split that
                // reads nothing at all ends the micro-batch instead of spinning.
                missing += 1;
                if missing > self.sizes.iter().sum::<usize>() {
                    break;
                }
                continue;
            }
            let empty = rows.iter().all(|(used, _)| *used == 0);
            match rows.iter_mut().find(|(used, _)| used + len <= row_tokens) {
                Some((used, row)) => {
                    *used += len;
                    row.push((drawn, len));
                }
                None if empty => {
                    rows[0] = (row_tokens, vec![(drawn, row_tokens)]);
                }
                None => {
                    self.undraw(drawn.source);
                    break;
                }
            }
        }
        rows.into_iter().map(|(_, row)| row).collect()
    }

    /// The samples of one micro-batch of `rows` rows, each with its length: packed rows, or
    /// one sample per row (unreadable samples skipped, as [`StepSampler::step`] skips them).
    fn micro_batch(&mut self, splits: &[&SplitReader], rows: usize) -> Vec<Vec<(Drawn, usize)>> {
        match self.row_tokens {
            Some(row_tokens) => self.pack(splits, rows, row_tokens),
            None => (0..rows)
                .map(|_| {
                    let drawn = self.draw(splits);
                    let len = splits
                        .get(drawn.source)
                        .and_then(|split| split.example_len(drawn.index))
                        .unwrap_or(0);
                    vec![(drawn, len)]
                })
                .collect(),
        }
    }

    /// Moves to the first sample of step `step` and returns the real tokens drawn before it:
    /// `step * batch_size * accum` samples (tokens not counted: 0) without packing or warmup;
    /// otherwise where drawing the steps before it ends (memoised in `step_starts`).
    fn seek_step(&mut self, step: usize, splits: &[&SplitReader]) -> u64 {
        if !self.replays() {
            self.seek(step as u64 * (self.batch_size * self.accum) as u64);
            return 0;
        }
        while self.step_starts.len() <= step {
            let (position, tokens) = self.step_starts[self.step_starts.len() - 1];
            self.seek(position);
            self.prune_orders();
            let rows = self.rows_after(tokens);
            let mut drawn = 0u64;
            for _ in 0..self.accum {
                let batch = self.micro_batch(splits, rows);
                drawn += batch
                    .iter()
                    .flatten()
                    .map(|&(_, len)| len as u64)
                    .sum::<u64>();
            }
            self.step_starts.push((self.position, tokens + drawn));
        }
        let (position, tokens) = self.step_starts[step];
        self.seek(position);
        tokens
    }

    /// The steps needed to draw `samples` samples (`training.epochs` in steps): a ceiling
    /// division unpacked; packed, found by packing lengths step after step.
    pub fn steps_for_samples(&mut self, samples: u64, splits: &[&SplitReader]) -> usize {
        let per_step = (self.batch_size * self.accum) as u64;
        if !self.replays() || self.weights.iter().all(|&w| w == 0.0) {
            return samples.div_ceil(per_step.max(1)) as usize;
        }
        let mut steps = 0;
        loop {
            self.seek_step(steps, splits);
            if self.position >= samples {
                return steps;
            }
            let before = self.position;
            self.seek_step(steps + 1, splits);
            if self.position == before {
                // Nothing readable: no number of steps gets there.
                return steps;
            }
            steps += 1;
        }
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
            samples: 0,
        };
        if self.weights.iter().all(|&w| w == 0.0) {
            return out;
        }
        let tokens_before = self.seek_step(step, splits);
        self.prune_orders();
        let start = self.position;
        let rows = self.rows_after(tokens_before);
        let mask = |drawn: Drawn, len: usize, out: &mut StepBatches| {
            if len == 0 {
                return None; // unreadable: skipped
            }
            let split = splits.get(drawn.source)?;
            let mut sample = split.get(drawn.index)?;
            sample.truncate(len);
            out.tokens += sample.len();
            out.source_tokens[drawn.source] += sample.len() as u64;
            Some(mask_tokens(
                &sample,
                vocab,
                masking,
                drawn.seed,
                drawn.epoch,
                drawn.index as u64,
            ))
        };
        for _ in 0..self.accum {
            let drawn = self.micro_batch(splits, rows);
            let batch = match self.row_tokens {
                None => {
                    let examples: Vec<MaskedExample> = drawn
                        .into_iter()
                        .flatten()
                        .filter_map(|(d, len)| mask(d, len, &mut out))
                        .collect();
                    collate(&examples, vocab.pad_id, device)
                }
                Some(_) => {
                    let rows: Vec<Vec<MaskedExample>> = drawn
                        .into_iter()
                        .map(|row| {
                            row.into_iter()
                                .filter_map(|(d, len)| mask(d, len, &mut out))
                                .collect()
                        })
                        .collect();
                    collate_packed(&rows, vocab.pad_id, device)
                }
            };
            if let Some(batch) = batch {
                out.masked += batch.masked;
                out.batches.push(batch);
            }
        }
        out.samples = (self.position - start) as usize;
        if self.replays() && self.step_starts.len() == step + 1 {
            self.step_starts
                .push((self.position, tokens_before + out.tokens as u64));
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
