//! Multi-head attention.

use super::*;

/// Multi-head attention `softmax(q k^T / sqrt(d) + bias) v`, with dropout on the
/// probabilities when `dropout` is given (it draws the host mask over `[batch, heads, seq,
/// seq]`, scaled by 1 / keep, and is called only once the kernel runs), from and to the
/// `[batch, seq, hidden]` layout of the projections: HF's eager attention, which on the CPU
/// also serves where the fused kernel would (same function without dropout). `None` unless q,
/// k and v are f32 flex tensors (all autodiff or all plain); the caller then runs burn's ops.
///
/// `runs` (packed rows): the `(first token, length)` runs of the flattened `[batch * seq]`
/// token axis that attend only among themselves, one per document; tokens outside every run
/// (a packed row's padding) get a zero output and gradient, and the dropout mask holds
/// `heads * length^2` entries per run, run by run. `None`: each row is one run.
///
/// burn's path reshapes to `[batch, heads, seq, head_dim]` (copies), runs batched matmuls
/// whose outputs flex allocates zeroed and then copies, and differentiates scale, bias add,
/// softmax, dropout and both matmuls node by node. Here each (run, head) is one rayon task
/// of four small gemms reading the projections in place (a head is a column block of
/// `[seq, hidden]`), forward and backward.
pub(crate) fn attention(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    bias: &Tensor<4>,
    runs: Option<&[(usize, usize)]>,
    dropout: Option<&dyn Fn(usize) -> Vec<f32>>,
) -> Option<Tensor<3>> {
    let shape = Attention::of(q, k, v, heads, bias, runs)?;
    let bias: Vec<f32> = bias.to_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    run(shape, q, k, v, &bias, dropout)
}

/// A fused attention computation over `[batch, seq, hidden]` projections, one rayon task per
/// (batch, head): dense ([`Attention`]) or banded ([`super::window::Window`]). They share the
/// dispatch below and the autodiff node.
pub(super) trait Kernel: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// Elements of the dropout mask.
    fn mask_len(&self) -> usize;

    /// `(context [batch, seq, hidden], probabilities before dropout)`, the latter in whatever
    /// layout `backward` reads.
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        dropout: Option<&Vec<f32>>,
    ) -> (Vec<f32>, Vec<f32>);

    /// `(dq, dk, dv)` from the context's gradient `g`, `[batch, seq, hidden]` each.
    fn backward(&self, state: &AttentionState<Self>, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>);
}

/// Runs `kernel` on flex f32 tensors (all autodiff or all plain), recording one autodiff node;
/// `None` for any other backend. The dropout mask is drawn only once the kernel runs.
pub(super) fn run<K: Kernel>(
    kernel: K,
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    bias: &[f32],
    dropout: Option<&dyn Fn(usize) -> Vec<f32>>,
) -> Option<Tensor<3>> {
    let draw = || {
        let n = kernel.mask_len();
        let mask = dropout.map(|draw| draw(n));
        debug_assert!(mask.as_ref().is_none_or(|m| m.len() == n));
        mask.map(std::sync::Arc::new)
    };
    if let (Ok(qt), Ok(kt), Ok(vt)) = (
        q.clone().try_into_primitive::<FlexAd>(),
        k.clone().try_into_primitive::<FlexAd>(),
        v.clone().try_into_primitive::<FlexAd>(),
    ) {
        let (qc, kc, vc) = (
            contiguous(qt.primitive()),
            contiguous(kt.primitive()),
            contiguous(vt.primitive()),
        );
        let dropout = draw();
        let (context, probs) = kernel.forward(
            f32_slice(&qc),
            f32_slice(&kc),
            f32_slice(&vc),
            bias,
            dropout.as_deref(),
        );
        let output = from_vec(context, qc.layout().shape());
        let inputs = [&qt, &kt, &vt];
        let backward = AttentionBackward(std::marker::PhantomData::<K>);
        let out = record(backward, inputs, output, || AttentionState {
            shape: kernel,
            q: qc,
            k: kc,
            v: vc,
            probs: std::sync::Arc::new(probs),
            dropout,
        });
        return Some(Tensor::from_primitive::<FlexAd>(out));
    }
    if let (Ok(qt), Ok(kt), Ok(vt)) = (
        q.clone().try_into_primitive::<Flex>(),
        k.clone().try_into_primitive::<Flex>(),
        v.clone().try_into_primitive::<Flex>(),
    ) {
        let (qc, kc, vc) = (contiguous(&qt), contiguous(&kt), contiguous(&vt));
        let dropout = draw();
        let (context, _) = kernel.forward(
            f32_slice(&qc),
            f32_slice(&kc),
            f32_slice(&vc),
            bias,
            dropout.as_deref(),
        );
        return Some(Tensor::from_primitive::<Flex>(from_vec(
            context,
            qc.layout().shape(),
        )));
    }
    None
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) hidden: usize,
    pub(super) heads: usize,
    /// The runs of tokens that attend among themselves, `(first token, length)` on the
    /// flattened `[batch * seq]` axis: every row, or every document of packed rows. Task
    /// `t` is head `t % heads` of run `t / heads`.
    pub(super) runs: std::sync::Arc<Vec<(usize, usize)>>,
}

#[derive(Debug, Clone)]
pub(super) struct AttentionState<K> {
    pub(super) shape: K,
    pub(super) q: FlexTensor,
    pub(super) k: FlexTensor,
    pub(super) v: FlexTensor,
    /// softmax probabilities before dropout, in the kernel's layout (`[batch, heads, seq,
    /// seq]` for the dense one).
    pub(super) probs: std::sync::Arc<Vec<f32>>,
    pub(super) dropout: Option<std::sync::Arc<Vec<f32>>>,
}

/// A pointer the rayon tasks write through; each task writes its own (batch, head) column
/// block, so the writes never overlap.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements (see the type's doc).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole Sync wrapper, not the raw field).
    pub(super) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl Attention {
    /// The shape of an attention over these inputs, or `None` where the kernels do not apply
    /// (not f32, shapes that disagree, an empty sequence).
    pub(super) fn of(
        q: &Tensor<3>,
        k: &Tensor<3>,
        v: &Tensor<3>,
        heads: usize,
        bias: &Tensor<4>,
        runs: Option<&[(usize, usize)]>,
    ) -> Option<Self> {
        let [batch, seq, hidden] = q.dims();
        let f32_inputs = [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
            .iter()
            .all(|&d| d == DType::F32);
        let runs = match runs {
            Some(runs) => runs.to_vec(),
            None => (0..batch).map(|b| (b * seq, seq)).collect(),
        };
        // Runs inside one row each, non-empty and disjoint (in order).
        let runs_fit = runs
            .iter()
            .all(|&(start, len)| len > 0 && start / seq.max(1) == (start + len - 1) / seq.max(1))
            && runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
            && runs.last().is_none_or(|&(s, l)| s + l <= batch * seq);
        (f32_inputs
            && heads > 0
            && hidden % heads == 0
            && batch * seq * hidden > 0
            && runs_fit
            && k.dims() == q.dims()
            && v.dims() == q.dims()
            && bias.dims() == [batch, 1, 1, seq])
        .then_some(Self {
            batch,
            seq,
            hidden,
            heads,
            runs: std::sync::Arc::new(runs),
        })
    }

    pub(super) fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Tasks: (run, head) pairs.
    pub(super) fn tasks(&self) -> usize {
        self.runs.len() * self.heads
    }

    /// Task `task`'s run `(first token, length)`.
    pub(super) fn run_of(&self, task: usize) -> (usize, usize) {
        self.runs[task / self.heads]
    }

    /// Offset of task `task`'s `[length, head_dim]` block (row stride `hidden`) in a
    /// `[batch, seq, hidden]` tensor.
    pub(super) fn block(&self, task: usize) -> usize {
        self.run_of(task).0 * self.hidden + (task % self.heads) * self.head_dim()
    }
}

/// `buf` cut into consecutive chunks of `lens` (which sum to at most its length).
pub(super) fn split_lens<'a>(mut buf: &'a mut [f32], lens: &[usize]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (chunk, rest) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(chunk);
        buf = rest;
    }
    out
}

/// The start of each of `lens`' chunks, and their total.
pub(super) fn offsets(lens: &[usize]) -> (Vec<usize>, usize) {
    let mut total = 0;
    let starts = lens
        .iter()
        .map(|&n| {
            total += n;
            total - n
        })
        .collect();
    (starts, total)
}

impl Attention {
    /// Probability elements per task: `length^2` of its run.
    fn task_sizes(&self) -> Vec<usize> {
        (0..self.tasks())
            .map(|t| self.run_of(t).1 * self.run_of(t).1)
            .collect()
    }
}

impl Kernel for Attention {
    fn mask_len(&self) -> usize {
        self.task_sizes().iter().sum()
    }

    /// Probabilities `[length, length]` per task, task after task (`[batch, heads, seq, seq]`
    /// for unpacked rows).
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        dropout: Option<&Vec<f32>>,
    ) -> (Vec<f32>, Vec<f32>) {
        let hidden = self.hidden;
        let d = self.head_dim();
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = zeros(q.len());
        let out = SharedMut(context.as_mut_ptr());
        let sizes = self.task_sizes();
        let (starts, total) = offsets(&sizes);
        let mut probs = zeros(total);
        split_lens(&mut probs, &sizes)
            .into_par_iter()
            .enumerate()
            .for_each(|(task, p)| {
                let at = self.block(task);
                let (first, len) = self.run_of(task);
                let bias = &bias[first..][..len];
                // SAFETY: the blocks addressed are inside q, k (`at + (len-1)*hidden + d <= len`)
                // and p; `out` is written only in this task's block.
                unsafe {
                    // scores = q k^T / sqrt(d); k^T[a][j] = k[j][a].
                    gemm_into(
                        (len, len, d),
                        (p.as_mut_ptr(), len as isize, 1),
                        (q.as_ptr().add(at), hidden as isize, 1),
                        (k.as_ptr().add(at), 1, hidden as isize),
                        scale,
                        false,
                        false,
                    );
                }
                simd(|| {
                    for row in p.chunks_mut(len) {
                        for (s, &b) in row.iter_mut().zip(bias) {
                            *s += b;
                        }
                        softmax_in_place(row);
                    }
                });
                let mask = dropout.map(|m| &m[starts[task]..][..len * len]);
                let dropped = with_dropout(p, mask);
                // SAFETY: as above; context's block for this task is written by this task only.
                unsafe {
                    gemm_into(
                        (len, d, len),
                        (out.at(at), hidden as isize, 1),
                        (dropped.as_ptr(), len as isize, 1),
                        (v.as_ptr().add(at), hidden as isize, 1),
                        1.0,
                        false,
                        false,
                    );
                }
            });
        (context, probs)
    }

    fn backward(&self, state: &AttentionState<Self>, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let hidden = self.hidden;
        let d = self.head_dim();
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
        let sizes = self.task_sizes();
        let (starts, _) = offsets(&sizes);
        (0..self.tasks()).into_par_iter().for_each(|task| {
            let at = self.block(task);
            let len = self.run_of(task).1;
            let p = &state.probs[starts[task]..][..len * len];
            let mask = state
                .dropout
                .as_ref()
                .map(|m| &m[starts[task]..][..len * len]);
            let mut dp = vec![0.0f32; len * len];
            // SAFETY: every block is inside its buffer; the outputs' blocks are this task's.
            unsafe {
                // dP' = g v^T; v^T[a][j] = v[j][a].
                gemm_into(
                    (len, len, d),
                    (dp.as_mut_ptr(), len as isize, 1),
                    (g.as_ptr().add(at), hidden as isize, 1),
                    (v.as_ptr().add(at), 1, hidden as isize),
                    1.0,
                    false,
                    false,
                );
                // dv = P'^T g, P' = P * mask.
                let dropped = with_dropout(p, mask);
                gemm_into(
                    (len, d, len),
                    (dv_p.at(at), hidden as isize, 1),
                    (dropped.as_ptr(), 1, len as isize),
                    (g.as_ptr().add(at), hidden as isize, 1),
                    1.0,
                    false,
                    false,
                );
            }
            simd(|| {
                // dP = dP' * mask; dS = P * (dP - rowsum(dP * P)).
                for (r, (ds, p)) in dp.chunks_mut(len).zip(p.chunks(len)).enumerate() {
                    if let Some(m) = mask {
                        for (ds, &m) in ds.iter_mut().zip(&m[r * len..][..len]) {
                            *ds *= m;
                        }
                    }
                    softmax_grad_in_place(p, ds);
                }
            });
            // SAFETY: as above.
            unsafe {
                // dq = dS k / sqrt(d); dk = dS^T q / sqrt(d).
                gemm_into(
                    (len, d, len),
                    (dq_p.at(at), hidden as isize, 1),
                    (dp.as_ptr(), len as isize, 1),
                    (k.as_ptr().add(at), hidden as isize, 1),
                    scale,
                    false,
                    false,
                );
                gemm_into(
                    (len, d, len),
                    (dk_p.at(at), hidden as isize, 1),
                    (dp.as_ptr(), 1, len as isize),
                    (q.as_ptr().add(at), hidden as isize, 1),
                    scale,
                    false,
                    false,
                );
            }
        });
        (dq, dk, dv)
    }
}

#[derive(Debug)]
struct AttentionBackward<K>(std::marker::PhantomData<K>);

impl<K: Kernel> Backward<Flex, 3> for AttentionBackward<K> {
    type State = AttentionState<K>;

    fn backward(self, ops: Ops<AttentionState<K>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let state = ops.state;
        let (dq, dk, dv) = state.shape.backward(&state, f32_slice(&grad));
        let shape = state.q.layout().shape();
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, from_vec(g, shape));
            }
        }
    }
}

/// The probabilities after dropout: `p * mask`, or `p` itself without dropout.
pub(super) fn with_dropout<'a>(p: &'a [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match mask {
        Some(mask) => p.iter().zip(mask).map(|(&p, &m)| p * m).collect(),
        None => std::borrow::Cow::Borrowed(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn attention_values_and_gradients_match_the_eager_composite_with_pads_and_dropout() {
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let (batch, seq, heads, d) = (2, 7, 3, 4);
        let hidden = heads * d;
        let n = batch * seq * hidden;
        // Pads: the last two keys of the second sequence.
        let bias: Vec<f32> = (0..batch * seq)
            .map(|i| if i >= batch * seq - 2 { f32::MIN } else { 0.0 })
            .collect();
        let bias = Tensor::<1>::from_floats(bias.as_slice(), &device).reshape([batch, 1, 1, seq]);
        let upstream = random(n, 13, &plain).reshape([batch, seq, hidden]);
        let probs = batch * heads * seq * seq;
        let mask: Vec<f32> = (0..probs)
            .map(|i| if i % 5 == 2 { 0.0 } else { 1.0 / 0.8 })
            .collect();
        for dropout in [None, Some(mask)] {
            let run = |fused: bool| {
                let q = random(n, 14, &device).require_grad();
                let k = random(n, 15, &device).require_grad();
                let v = random(n, 16, &device).require_grad();
                let (q3, k3, v3) = (
                    q.clone().reshape([batch, seq, hidden]),
                    k.clone().reshape([batch, seq, hidden]),
                    v.clone().reshape([batch, seq, hidden]),
                );
                let context = if fused {
                    let draw = |_: usize| dropout.clone().expect("drawn only with dropout");
                    let draw = dropout
                        .is_some()
                        .then_some(&draw as &dyn Fn(usize) -> Vec<f32>);
                    attention(&q3, &k3, &v3, heads, &bias, None, draw).expect("f32 flex autodiff")
                } else {
                    let split = |t: Tensor<3>| t.reshape([batch, seq, heads, d]).swap_dims(1, 2);
                    let scores = split(q3).matmul(split(k3).swap_dims(2, 3)) / (d as f64).sqrt();
                    let mut p = burn::tensor::activation::softmax(scores + bias.clone(), 3);
                    if let Some(m) = &dropout {
                        p = p * Tensor::<1>::from_floats(m.as_slice(), &plain)
                            .reshape([batch, heads, seq, seq]);
                    }
                    p.matmul(split(v3))
                        .swap_dims(1, 2)
                        .reshape([batch, seq, hidden])
                };
                let grads = (context.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<1>| values(t.grad(&grads).expect("a gradient"));
                (values(context.reshape([n])), grad(&q), grad(&k), grad(&v))
            };
            let want = run(false);
            let got = run(true);
            let what = if dropout.is_some() {
                "dropout"
            } else {
                "no dropout"
            };
            assert_close(&format!("{what} context"), &got.0, &want.0, 1e-6);
            assert_close(&format!("{what} dq"), &got.1, &want.1, 1e-5);
            assert_close(&format!("{what} dk"), &got.2, &want.2, 1e-5);
            assert_close(&format!("{what} dv"), &got.3, &want.3, 1e-5);
        }
    }
}
