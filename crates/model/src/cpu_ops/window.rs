//! Sliding-window (local) multi-head attention, as ModernBERT's local layers compute it, in
//! O(seq * window) rather than O(seq^2).

use super::attention::{Attention, AttentionState, Kernel, SharedMut, offsets, run, split_lens};
use super::*;
use std::sync::Arc;

/// Query rows per block: each block's scores are one `[BLOCK, BLOCK + 2 * half]` gemm over the
/// keys its rows can see, so a block computes `BLOCK / (BLOCK + 2 * half)` more than the band
/// (1.25x at ModernBERT's window of 128) for gemms large enough to run near peak.
const BLOCK: usize = 32;

/// Multi-head attention where query `i` sees only keys `j` with `|i - j| <= local_attention / 2`
/// (integer division) that are not padding: ModernBERT's local attention
/// (`ModernBertModel._update_attention_mask`: `distance <= local_attention // 2` fills the
/// additive mask with `finfo.min` outside the window). Otherwise as [`super::attention`]: q, k, v
/// `[batch, seq, hidden]`, `bias` `[batch, 1, 1, seq]` (0 for tokens, `f32::MIN` for pads: a
/// key is padding when its bias is `<= f32::MIN`), `None` off flex or off f32.
///
/// Only the band is computed, forward and backward: per (batch, head) and per block of
/// [`BLOCK`] queries, the scores against the keys those queries can see.
///
/// A query whose window holds only pads (a pad further than `local_attention / 2` from every
/// token, or a row of pads) gets what the dense computation with `finfo.min` gives: every
/// score equals `f32::MIN`, so the softmax is uniform over all `seq` keys and the output is the
/// mean of all values. Its gradient is that too (computed through `head_dim`-square products,
/// still linear in `seq`), but without dropout: its output reaches no loss.
///
/// Dropout: `dropout(n)` draws the mask (scaled by 1 / keep) over `[batch, heads, seq, width]`,
/// `width = min(2 * half + 1, seq)`: row `i` holds keys `start(i) .. start(i) + width` with
/// `start(i) = min(i.saturating_sub(half), seq - width)`, every key in `i`'s window among them
/// (entries for keys outside the window are drawn but unused). A window that covers the whole
/// sequence (`half >= seq - 1`) gives `width = seq`, `start = 0`: the dense kernel's layout.
///
/// The keys are their padding `bias` and, for packed rows, `runs`: as in [`super::attention`], each document attends only within itself
/// (its own window, clipped at its ends, as when it is run alone); `seq` above is then each
/// run's length and the mask is laid out run by run.
pub(crate) fn attention_windowed(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    (bias, runs): (&Tensor<4>, Option<&[(usize, usize)]>),
    local_attention: usize,
    dropout: Option<&dyn Fn(usize) -> Vec<f32>>,
) -> Option<Tensor<3>> {
    let shape = Attention::of(q, k, v, heads, bias, runs)?;
    let bias: Vec<f32> = bias.to_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let window = Window::new(shape, local_attention / 2, &bias);
    run(window, q, k, v, &bias, dropout)
}

#[derive(Debug, Clone)]
pub(super) struct Window {
    shape: Attention,
    /// Keys `i - half ..= i + half` are in query `i`'s window (before clipping to its run).
    half: usize,
    /// Queries whose window holds only pads, per token of the flattened `[batch * seq]` axis.
    empty: Arc<Vec<bool>>,
}

/// One run's geometry: `seq` tokens, windows of `half` each side (at most `seq - 1`).
#[derive(Debug, Clone, Copy)]
struct Band {
    seq: usize,
    half: usize,
}

impl Window {
    fn new(shape: Attention, half: usize, bias: &[f32]) -> Self {
        let mut empty = vec![false; shape.batch * shape.seq];
        for &(first, seq) in shape.runs.iter() {
            let half = half.min(seq - 1);
            // tokens[j] = number of non-pad keys before j.
            let mut tokens = Vec::with_capacity(seq + 1);
            tokens.push(0usize);
            for &b in &bias[first..][..seq] {
                tokens.push(tokens[tokens.len() - 1] + usize::from(b > f32::MIN));
            }
            for (i, e) in empty[first..][..seq].iter_mut().enumerate() {
                let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(seq));
                *e = tokens[hi] == tokens[lo];
            }
        }
        Self {
            shape,
            half,
            empty: Arc::new(empty),
        }
    }

    /// Task `task`'s run geometry.
    fn band_of(&self, task: usize) -> Band {
        let seq = self.shape.run_of(task).1;
        Band {
            seq,
            half: self.half.min(seq - 1),
        }
    }

    /// Dropout-mask elements per task: `seq * width` of its run.
    fn mask_sizes(&self) -> Vec<usize> {
        (0..self.shape.tasks())
            .map(|t| {
                let band = self.band_of(t);
                band.seq * band.width()
            })
            .collect()
    }

    /// Stored probabilities per task.
    fn prob_sizes(&self) -> Vec<usize> {
        (0..self.shape.tasks())
            .map(|t| self.band_of(t).per_task())
            .collect()
    }

    /// The mean of all `seq` values of the head at `at`: the output of a query whose window
    /// holds only pads.
    fn mean_value(&self, v: &[f32], at: usize, seq: usize) -> Vec<f32> {
        let hidden = self.shape.hidden;
        let d = self.shape.head_dim();
        let mut mean = vec![0.0f32; d];
        for j in 0..seq {
            for (m, &x) in mean.iter_mut().zip(&v[at + j * hidden..][..d]) {
                *m += x;
            }
        }
        let inv = 1.0 / seq as f32;
        mean.iter_mut().for_each(|m| *m *= inv);
        mean
    }
}

impl Band {
    /// Width of a dropout-mask row (see [`attention_windowed`]).
    fn width(&self) -> usize {
        (2 * self.half + 1).min(self.seq)
    }

    /// The first key of query `i`'s dropout-mask row.
    fn mask_start(&self, i: usize) -> usize {
        i.saturating_sub(self.half).min(self.seq - self.width())
    }

    /// Keys any query of `i0..i1` sees: `k0..k1`.
    fn keys(&self, i0: usize, i1: usize) -> (usize, usize) {
        (i0.saturating_sub(self.half), (i1 + self.half).min(self.seq))
    }

    /// Row stride of a block's stored probabilities: the widest key range of a block.
    fn span(&self) -> usize {
        (BLOCK + 2 * self.half).min(self.seq)
    }

    /// Stored probabilities per task: every block, `BLOCK` rows of `span`.
    fn per_task(&self) -> usize {
        self.seq.div_ceil(BLOCK) * BLOCK * self.span()
    }

    /// Query `i`'s window as columns `lo..hi` of its block, whose keys start at `k0`.
    fn band(&self, i: usize, k0: usize) -> (usize, usize) {
        (
            i.saturating_sub(self.half) - k0,
            (i + self.half + 1).min(self.seq) - k0,
        )
    }

    /// A block's probabilities after dropout (`p` itself without): `rows` rows of `span`,
    /// the mask read from the task's mask rows `i0..`.
    fn dropped<'a>(
        &self,
        p: &'a [f32],
        mask: Option<&[f32]>,
        (i0, k0): (usize, usize),
        rows: usize,
    ) -> std::borrow::Cow<'a, [f32]> {
        let Some(mask) = mask else {
            return std::borrow::Cow::Borrowed(p);
        };
        let (span, width) = (self.span(), self.width());
        let mut out = vec![0.0f32; rows * span];
        for r in 0..rows {
            let i = i0 + r;
            let (lo, hi) = self.band(i, k0);
            let m = &mask[i * width + (k0 + lo - self.mask_start(i))..][..hi - lo];
            for ((o, &p), &m) in out[r * span + lo..][..hi - lo]
                .iter_mut()
                .zip(&p[r * span + lo..][..hi - lo])
                .zip(m)
            {
                *o = p * m;
            }
        }
        std::borrow::Cow::Owned(out)
    }
}

impl Kernel for Window {
    fn mask_len(&self) -> usize {
        self.mask_sizes().iter().sum()
    }

    /// Probabilities per task, per block of [`BLOCK`] queries `i0..`: `[BLOCK, span]`,
    /// column `c` the key `k0 + c` (see [`Band::keys`]), 0 outside each query's window.
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        dropout: Option<&Vec<f32>>,
    ) -> (Vec<f32>, Vec<f32>) {
        let hidden = self.shape.hidden;
        let d = self.shape.head_dim();
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = zeros(q.len());
        let out = SharedMut(context.as_mut_ptr());
        let sizes = self.prob_sizes();
        let (_, total) = offsets(&sizes);
        let (mask_starts, _) = offsets(&self.mask_sizes());
        let mut probs = zeros(total);
        split_lens(&mut probs, &sizes)
            .into_par_iter()
            .enumerate()
            .for_each(|(task, probs)| {
                let at = self.shape.block(task);
                let band = self.band_of(task);
                let (first, seq) = (self.shape.run_of(task).0, band.seq);
                let span = band.span();
                let bias = &bias[first..][..seq];
                let empty = &self.empty[first..][..seq];
                let mask = dropout.map(|m| &m[mask_starts[task]..][..seq * band.width()]);
                for (block, p) in probs.chunks_mut(BLOCK * span).enumerate() {
                    let (i0, i1) = (block * BLOCK, (block * BLOCK + BLOCK).min(seq));
                    let (k0, k1) = band.keys(i0, i1);
                    // SAFETY: rows i0..i1 of q and k0..k1 of k/v lie inside the head's block
                    // (`at + (seq - 1) * hidden + d <= len`), p holds `(i1 - i0) * span`
                    // elements with `k1 - k0 <= span`, and context's rows i0..i1 of this head
                    // are written by this task only.
                    unsafe {
                        // scores = q k^T / sqrt(d) over the block's keys; k^T[a][j] = k[j][a].
                        gemm_into(
                            (i1 - i0, k1 - k0, d),
                            (p.as_mut_ptr(), span as isize, 1),
                            (q.as_ptr().add(at + i0 * hidden), hidden as isize, 1),
                            (k.as_ptr().add(at + k0 * hidden), 1, hidden as isize),
                            scale,
                            false,
                            false,
                        );
                    }
                    simd(|| {
                        for (r, row) in p.chunks_mut(span).take(i1 - i0).enumerate() {
                            let i = i0 + r;
                            let (lo, hi) = band.band(i, k0);
                            if empty[i] {
                                row.fill(0.0);
                                continue;
                            }
                            row[..lo].fill(0.0);
                            row[hi..].fill(0.0);
                            for (s, &b) in row[lo..hi].iter_mut().zip(&bias[k0 + lo..k0 + hi]) {
                                *s += b;
                            }
                            softmax_in_place(&mut row[lo..hi]);
                        }
                    });
                    let dropped = band.dropped(p, mask, (i0, k0), i1 - i0);
                    // SAFETY: as above.
                    unsafe {
                        gemm_into(
                            (i1 - i0, d, k1 - k0),
                            (out.at(at + i0 * hidden), hidden as isize, 1),
                            (dropped.as_ptr(), span as isize, 1),
                            (v.as_ptr().add(at + k0 * hidden), hidden as isize, 1),
                            1.0,
                            false,
                            false,
                        );
                    }
                }
                if empty.iter().any(|&e| e) {
                    let mean = self.mean_value(v, at, seq);
                    for i in (0..seq).filter(|&i| empty[i]) {
                        // SAFETY: row i of this head's block, written by this task only.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(out.at(at + i * hidden), d) };
                        row.copy_from_slice(&mean);
                    }
                }
            });
        (context, probs)
    }

    fn backward(&self, state: &AttentionState<Self>, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let hidden = self.shape.hidden;
        let d = self.shape.head_dim();
        let scale = 1.0 / (d as f32).sqrt();
        let (q, k, v) = (
            f32_slice(&state.q),
            f32_slice(&state.k),
            f32_slice(&state.v),
        );
        let (mut dq, mut dk, mut dv) = (zeros(q.len()), zeros(q.len()), zeros(q.len()));
        let (dq_p, dk_p, dv_p) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        let sizes = self.prob_sizes();
        let (starts, _) = offsets(&sizes);
        let (mask_starts, _) = offsets(&self.mask_sizes());
        (0..self.shape.tasks()).into_par_iter().for_each(|task| {
            let at = self.shape.block(task);
            let band = self.band_of(task);
            let (first, seq) = (self.shape.run_of(task).0, band.seq);
            let span = band.span();
            let probs = &state.probs[starts[task]..][..sizes[task]];
            let mask = state
                .dropout
                .as_ref()
                .map(|m| &m[mask_starts[task]..][..seq * band.width()]);
            let mut dp = vec![0.0f32; BLOCK * span];
            for (block, p) in probs.chunks(BLOCK * span).enumerate() {
                let (i0, i1) = (block * BLOCK, (block * BLOCK + BLOCK).min(seq));
                let (k0, k1) = band.keys(i0, i1);
                let (rows, keys) = (i1 - i0, k1 - k0);
                let dropped = band.dropped(p, mask, (i0, k0), rows);
                // SAFETY: as in the forward; dv, dk rows k0..k1 and dq rows i0..i1 of this
                // head are written by this task only.
                unsafe {
                    // dP' = g v^T; v^T[a][j] = v[j][a].
                    gemm_into(
                        (rows, keys, d),
                        (dp.as_mut_ptr(), span as isize, 1),
                        (g.as_ptr().add(at + i0 * hidden), hidden as isize, 1),
                        (v.as_ptr().add(at + k0 * hidden), 1, hidden as isize),
                        1.0,
                        false,
                        false,
                    );
                    // dv += P'^T g, P' = P * mask (blocks overlap in keys: accumulate).
                    gemm_into(
                        (keys, d, rows),
                        (dv_p.at(at + k0 * hidden), hidden as isize, 1),
                        (dropped.as_ptr(), 1, span as isize),
                        (g.as_ptr().add(at + i0 * hidden), hidden as isize, 1),
                        1.0,
                        true,
                        false,
                    );
                }
                simd(|| {
                    // dP = dP' * mask; dS = P * (dP - rowsum(dP * P)) inside the window.
                    for (r, (ds, p)) in dp
                        .chunks_mut(span)
                        .zip(p.chunks(span))
                        .take(rows)
                        .enumerate()
                    {
                        let i = i0 + r;
                        let (lo, hi) = band.band(i, k0);
                        if let Some(mask) = mask {
                            let m = &mask[i * band.width() + (k0 + lo - band.mask_start(i))..]
                                [..hi - lo];
                            for (ds, &m) in ds[lo..hi].iter_mut().zip(m) {
                                *ds *= m;
                            }
                        }
                        softmax_grad_in_place(&p[lo..hi], &mut ds[lo..hi]);
                        ds[..lo].fill(0.0);
                        ds[hi..].fill(0.0);
                    }
                });
                // SAFETY: as above.
                unsafe {
                    // dq = dS k / sqrt(d); dk += dS^T q / sqrt(d).
                    gemm_into(
                        (rows, d, keys),
                        (dq_p.at(at + i0 * hidden), hidden as isize, 1),
                        (dp.as_ptr(), span as isize, 1),
                        (k.as_ptr().add(at + k0 * hidden), hidden as isize, 1),
                        scale,
                        false,
                        false,
                    );
                    gemm_into(
                        (keys, d, rows),
                        (dk_p.at(at + k0 * hidden), hidden as isize, 1),
                        (dp.as_ptr(), 1, span as isize),
                        (q.as_ptr().add(at + i0 * hidden), hidden as isize, 1),
                        scale,
                        true,
                        false,
                    );
                }
            }
            let empty = &self.empty[first..][..seq];
            if empty.iter().any(|&e| e) {
                let len = (seq - 1) * hidden + d;
                // The offset of row j of this head in dq, dk, dv.
                let rows = |p: SharedMut| SharedMut(p.at(at));
                self.uniform_backward(
                    empty,
                    (
                        &q[at..at + len],
                        &k[at..at + len],
                        &v[at..at + len],
                        &g[at..at + len],
                    ),
                    (rows(dq_p), rows(dk_p), rows(dv_p)),
                );
            }
        });
        (dq, dk, dv)
    }
}

impl Window {
    /// Adds the gradient of the queries in `empty`, whose probabilities are `1 / seq` over all
    /// keys, to one head's `dq`, `dk`, `dv` (each a `[seq, head_dim]` block of row stride
    /// `hidden`, which only this call writes). With `F` those queries, `vbar` the mean value and `c = scale / seq`:
    /// `dv_j += sum_F g_i / seq`; `dS_ij = g_i . (v_j - vbar) / seq`, so
    /// `dq_i = c g_i^T M` with `M = sum_j (v_j - vbar) k_j^T`, and
    /// `dk_j += c (v_j - vbar)^T N` with `N = sum_F g_i q_i^T` (both `[d, d]`).
    fn uniform_backward(
        &self,
        empty: &[bool],
        (q, k, v, g): (&[f32], &[f32], &[f32], &[f32]),
        (dq, dk, dv): (SharedMut, SharedMut, SharedMut),
    ) {
        // SAFETY: row j of the head's block (see the doc): in bounds, written by no one else.
        let row_mut = |p: SharedMut, j: usize| unsafe {
            std::slice::from_raw_parts_mut(p.at(j * self.shape.hidden), self.shape.head_dim())
        };
        let (seq, hidden) = (empty.len(), self.shape.hidden);
        let d = self.shape.head_dim();
        let c = 1.0 / ((d as f32).sqrt() * seq as f32);
        let row = |t: &[f32], j: usize| -> Vec<f32> { t[j * hidden..][..d].to_vec() };
        let mean = self.mean_value(v, 0, seq);
        let centred =
            |j: usize| -> Vec<f32> { row(v, j).iter().zip(&mean).map(|(x, m)| x - m).collect() };
        let (mut m, mut n, mut g_sum) = (vec![0.0f32; d * d], vec![0.0f32; d * d], vec![0.0f32; d]);
        for j in 0..seq {
            let (vc, kj) = (centred(j), row(k, j));
            for (a, &x) in vc.iter().enumerate() {
                for (m, &y) in m[a * d..][..d].iter_mut().zip(&kj) {
                    *m += x * y;
                }
            }
        }
        for i in (0..seq).filter(|&i| empty[i]) {
            let (gi, qi) = (row(g, i), row(q, i));
            for (a, &x) in gi.iter().enumerate() {
                g_sum[a] += x;
                for (n, &y) in n[a * d..][..d].iter_mut().zip(&qi) {
                    *n += x * y;
                }
            }
            let dqi = row_mut(dq, i);
            for (a, &x) in gi.iter().enumerate() {
                for (o, &y) in dqi.iter_mut().zip(&m[a * d..][..d]) {
                    *o += c * x * y;
                }
            }
        }
        let inv = 1.0 / seq as f32;
        for j in 0..seq {
            let vc = centred(j);
            let dkj = row_mut(dk, j);
            for (a, &x) in vc.iter().enumerate() {
                for (o, &y) in dkj.iter_mut().zip(&n[a * d..][..d]) {
                    *o += c * x * y;
                }
            }
            for (o, &s) in row_mut(dv, j).iter_mut().zip(&g_sum) {
                *o += s * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    /// Sizes of the comparison: 37 queries span two blocks, the last one partial.
    const BATCH: usize = 3;
    const SEQ: usize = 37;
    const HEADS: usize = 2;
    const D: usize = 5;

    /// Pads per row: a token in the middle of row 0, the last 20 of row 1, all of row 2.
    fn is_pad(b: usize, j: usize) -> bool {
        match b {
            0 => j == 5,
            1 => j >= SEQ - 20,
            _ => true,
        }
    }

    /// The band mask of `attention_windowed`'s layout: a fixed pattern of dropped entries.
    fn band_mask(width: usize) -> Vec<f32> {
        (0..BATCH * HEADS * SEQ * width)
            .map(|i| if i * 7919 % 5 == 2 { 0.0 } else { 1.0 / 0.8 })
            .collect()
    }

    /// `(context, dq, dk, dv)` of one run, flattened.
    type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    /// How a run computes the attention.
    #[derive(Clone, Copy, PartialEq)]
    enum Path {
        /// `attention_windowed`.
        Windowed,
        /// The dense kernel `attention` (only for windows covering the sequence).
        DenseKernel,
        /// burn's ops on the dense scores with HF's sliding-window mask.
        Composite,
    }

    fn run(path: Path, local_attention: usize, dropout: bool, autodiff: bool) -> Run {
        let plain = Device::flex();
        let device = if autodiff {
            plain.clone().autodiff()
        } else {
            plain.clone()
        };
        let hidden = HEADS * D;
        let n = BATCH * SEQ * hidden;
        let half = (local_attention / 2).min(SEQ - 1);
        let width = (2 * half + 1).min(SEQ);
        let pad_bias: Vec<f32> = (0..BATCH * SEQ)
            .map(|i| {
                if is_pad(i / SEQ, i % SEQ) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let bias =
            Tensor::<1>::from_floats(pad_bias.as_slice(), &device).reshape([BATCH, 1, 1, SEQ]);
        let empty = |b: usize, i: usize| {
            (i.saturating_sub(half)..(i + half + 1).min(SEQ)).all(|j| is_pad(b, j))
        };
        let mask = dropout.then(|| {
            let mut mask = band_mask(width);
            if path == Path::DenseKernel {
                // The dense kernel drops from a query with only pads in its window, which the
                // windowed one leaves undropped: keep all of those.
                for (row, m) in mask.chunks_mut(width).enumerate() {
                    if empty(row / (HEADS * SEQ), row % SEQ) {
                        m.fill(1.0);
                    }
                }
            }
            mask
        });
        let input = |seed| {
            let x = random(n, seed, &device);
            if autodiff { x.require_grad() } else { x }
        };
        let (q, k, v) = (input(14), input(15), input(16));
        let (q3, k3, v3) = (
            q.clone().reshape([BATCH, SEQ, hidden]),
            k.clone().reshape([BATCH, SEQ, hidden]),
            v.clone().reshape([BATCH, SEQ, hidden]),
        );
        let draw = |_: usize| mask.clone().expect("drawn only with dropout");
        let draw = dropout.then_some(&draw as &dyn Fn(usize) -> Vec<f32>);
        let context = match path {
            Path::Windowed => {
                attention_windowed(&q3, &k3, &v3, HEADS, (&bias, None), local_attention, draw)
                    .expect("f32 flex")
            }
            Path::DenseKernel => {
                super::super::attention(&q3, &k3, &v3, HEADS, &bias, None, draw).expect("f32 flex")
            }
            Path::Composite => {
                // HF: the padding mask, then `masked_fill(distance > local_attention // 2,
                // finfo.min)`; its dropout mask is the band mask placed at each key, 1 where
                // unused (probability 0, or a query with only pads in its window, which the
                // kernel leaves undropped).
                let start = |i: usize| i.saturating_sub(half).min(SEQ - width);
                let mut dense_bias = vec![f32::MIN; BATCH * SEQ * SEQ];
                for b in 0..BATCH {
                    for i in 0..SEQ {
                        for j in 0..SEQ {
                            if i.abs_diff(j) <= half {
                                dense_bias[(b * SEQ + i) * SEQ + j] = pad_bias[b * SEQ + j];
                            }
                        }
                    }
                }
                let dense_bias = Tensor::<1>::from_floats(dense_bias.as_slice(), &device)
                    .reshape([BATCH, 1, SEQ, SEQ]);
                let split = |t: Tensor<3>| t.reshape([BATCH, SEQ, HEADS, D]).swap_dims(1, 2);
                let scores = split(q3).matmul(split(k3).swap_dims(2, 3)) / (D as f64).sqrt();
                let mut p = burn::tensor::activation::softmax(scores + dense_bias, 3);
                if let Some(m) = &mask {
                    let mut dense = vec![1.0f32; BATCH * HEADS * SEQ * SEQ];
                    for task in 0..BATCH * HEADS {
                        for i in (0..SEQ).filter(|&i| !empty(task / HEADS, i)) {
                            for j in i.saturating_sub(half)..(i + half + 1).min(SEQ) {
                                dense[(task * SEQ + i) * SEQ + j] =
                                    m[(task * SEQ + i) * width + j - start(i)];
                            }
                        }
                    }
                    p = p * Tensor::<1>::from_floats(dense.as_slice(), &plain)
                        .reshape([BATCH, HEADS, SEQ, SEQ]);
                }
                p.matmul(split(v3))
                    .swap_dims(1, 2)
                    .reshape([BATCH, SEQ, hidden])
            }
        };
        if !autodiff {
            return (values(context.reshape([n])), vec![], vec![], vec![]);
        }
        // Every query's output has a gradient, pads' too, so the uniform rows' backward counts.
        let upstream = random(n, 13, &plain).reshape([BATCH, SEQ, hidden]);
        let grads = (context.clone() * upstream).sum().backward();
        let grad = |t: &Tensor<1>| values(t.grad(&grads).expect("a gradient"));
        (values(context.reshape([n])), grad(&q), grad(&k), grad(&v))
    }

    fn assert_runs_close(what: &str, got: &Run, want: &Run) {
        assert_close(&format!("{what} context"), &got.0, &want.0, 1e-6);
        assert_close(&format!("{what} dq"), &got.1, &want.1, 1e-5);
        assert_close(&format!("{what} dk"), &got.2, &want.2, 1e-5);
        assert_close(&format!("{what} dv"), &got.3, &want.3, 1e-5);
    }

    #[test]
    fn windowed_attention_matches_the_dense_composite_with_hfs_window_mask() {
        // Windows of 0 and 2 (self only, one key each side), odd, spanning blocks, and wider
        // than the sequence.
        for local_attention in [0, 2, 5, 16, 100] {
            for dropout in [false, true] {
                let what = format!("local_attention {local_attention}, dropout {dropout}");
                let want = run(Path::Composite, local_attention, dropout, true);
                let got = run(Path::Windowed, local_attention, dropout, true);
                assert_runs_close(&what, &got, &want);
                let plain = run(Path::Windowed, local_attention, dropout, false);
                assert_eq!(plain.0, got.0, "{what}: plain flex = autodiff flex");
            }
        }
    }

    #[test]
    fn a_window_over_the_whole_sequence_is_the_dense_kernel_with_its_mask_layout() {
        for dropout in [false, true] {
            let want = run(Path::DenseKernel, 2 * SEQ, dropout, true);
            let got = run(Path::Windowed, 2 * SEQ, dropout, true);
            assert_runs_close(&format!("dropout {dropout}"), &got, &want);
        }
    }

    /// `(context, dq, dk, dv)` of the kernel (`local_attention`: windowed, `None`: dense) on
    /// `[batch, seq, hidden]` inputs `x` (q, k, v) with runs `runs`, no pads, gradient of
    /// `sum(context * upstream)`.
    fn kernel_run(
        (batch, seq): (usize, usize),
        x: [&[f32]; 3],
        upstream: &[f32],
        runs: Option<&[(usize, usize)]>,
        local_attention: Option<usize>,
    ) -> Run {
        let device = Device::flex().autodiff();
        let hidden = HEADS * D;
        let n = batch * seq * hidden;
        let [q, k, v] = x.map(|x| Tensor::<1>::from_floats(x, &device).require_grad());
        let shape = |t: &Tensor<1>| t.clone().reshape([batch, seq, hidden]);
        let bias = Tensor::<4>::zeros([batch, 1, 1, seq], &device);
        let (q3, k3, v3) = (shape(&q), shape(&k), shape(&v));
        let context = match local_attention {
            Some(w) => attention_windowed(&q3, &k3, &v3, HEADS, (&bias, runs), w, None),
            None => super::super::attention(&q3, &k3, &v3, HEADS, &bias, runs, None),
        }
        .expect("f32 flex");
        let upstream = Tensor::<1>::from_floats(upstream, &device).reshape([batch, seq, hidden]);
        let grads = (context.clone() * upstream).sum().backward();
        let grad = |t: &Tensor<1>| values(t.grad(&grads).expect("a gradient"));
        (values(context.reshape([n])), grad(&q), grad(&k), grad(&v))
    }

    #[test]
    fn packed_runs_attend_only_within_themselves_as_if_each_ran_alone() {
        // Two rows of 37: row 0 holds documents of 10, 20 and 5 tokens then 2 pads; row 1
        // one of 3 (shorter than any block or window) and one of 34 (two blocks).
        let (batch, seq, hidden) = (2, SEQ, HEADS * D);
        let runs = [(0, 10), (10, 20), (30, 5), (37, 3), (40, 34)];
        let n = batch * seq * hidden;
        let plain = Device::flex();
        let [q, k, v, up] = [14, 15, 16, 13].map(|seed| values(random(n, seed, &plain)));
        for local_attention in [None, Some(4), Some(16), Some(100)] {
            let packed = kernel_run(
                (batch, seq),
                [&q, &k, &v],
                &up,
                Some(&runs),
                local_attention,
            );
            let mut covered = vec![false; batch * seq];
            for &(first, len) in &runs {
                let part = |x: &[f32]| x[first * hidden..][..len * hidden].to_vec();
                let alone = kernel_run(
                    (1, len),
                    [&part(&q), &part(&k), &part(&v)],
                    &part(&up),
                    None,
                    local_attention,
                );
                let what = format!("window {local_attention:?}, run {first}+{len}");
                assert_runs_close(
                    &what,
                    &(
                        part(&packed.0),
                        part(&packed.1),
                        part(&packed.2),
                        part(&packed.3),
                    ),
                    &alone,
                );
                covered[first..first + len]
                    .iter_mut()
                    .for_each(|c| *c = true);
            }
            // Padding after the last document: no output, no gradient.
            for (t, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
                for x in [&packed.0, &packed.1, &packed.2, &packed.3] {
                    assert!(
                        x[t * hidden..][..hidden].iter().all(|&x| x == 0.0),
                        "pad {t}"
                    );
                }
            }
        }
    }
}
