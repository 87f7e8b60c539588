//! Fused, multi-threaded f32 kernels for the CPU backend (burn's flex), with their own
//! backward passes.
//!
//! Why: a flex training step runs its matmuls on every core (gemm + rayon) but each
//! elementwise op on the calling thread, one scalar at a time. On 2 cores `perf` showed the
//! calling thread busy ~50% of a step while the rayon workers waited, and exact GELU alone
//! (scalar libm `erff` forward, `erff` + `expf` backward) was a third of that serial time.
//! Here the hot elementwise ops of the encoder each run as one pass over the tensor, split
//! across rayon's workers, in loops the compiler vectorises (AVX2 + FMA where the CPU has
//! them, picked at run time).
//!
//! Each op routes by where its input lives: flex tensors (plain or autodiff) take the kernels
//! below; every other backend, and any dtype but f32, gets burn's own op unchanged. Under
//! autodiff the op is one node in burn's graph (`burn_autodiff::ops::Backward`), whose
//! backward is a fused kernel too, instead of burn's chain of primitive ops.
//!
//! Accuracy: `erf` is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the formula
//! PyTorch's own vectorised CPU `erf` (ATen `Vectorized<float>::erf`) uses, so GELU here
//! agrees with transformers on the CPU to ~1e-7; `exp` is Cephes' `expf` polynomial
//! (~2 ulp). Tests below bound both against libm.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::LayerNorm;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

type FlexAd = Autodiff<Flex>;

/// Elements per rayon task: large enough that scheduling is noise, small enough that two
/// workers share an FFN activation ([16 x 128 x 1024] = 2M elements) evenly.
const CHUNK: usize = 1 << 14;

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.functional.gelu`.
pub(crate) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    if let Ok(t) = x.clone().try_into_primitive::<FlexAd>() {
        drop(x);
        return Tensor::from_primitive::<FlexAd>(gelu_autodiff(t));
    }
    if let Ok(t) = x.clone().try_into_primitive::<Flex>() {
        drop(x);
        return Tensor::from_primitive::<Flex>(map_unary(&t, gelu_f));
    }
    burn::tensor::activation::gelu(x)
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The op's input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            map_binary(&x, grad, gelu_grad_f)
        });
    }
}

fn gelu_autodiff(t: FloatTensor<FlexAd>) -> FloatTensor<FlexAd> {
    let input = t.primitive().clone();
    let output = map_unary(&input, gelu_f);
    match GeluBackward
        .prepare::<NoCheckpointing>([t.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(input, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// `x * factor` elementwise for a factor that needs no gradient (a dropout mask), with
/// `factor` in `x`'s shape, row-major.
pub(crate) fn mul_constant<const D: usize>(x: Tensor<D>, factor: Vec<f32>) -> Tensor<D> {
    if x.dtype() == DType::F32
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
    {
        drop(x);
        let factor = FlexTensor::from_data(TensorData::new(
            factor,
            t.primitive().layout().shape().clone(),
        ));
        let output = map_binary(&factor, t.primitive().clone(), |f, x| x * f);
        let out = match MulConstantBackward
            .prepare::<NoCheckpointing>([t.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(factor, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        return Tensor::from_primitive::<FlexAd>(out);
    }
    let shape = x.shape();
    let plain = x.device().without_autodiff();
    let factor = Tensor::<D>::from_data(TensorData::new(factor, shape), &plain);
    let dtype = burn::tensor::FloatDType::from(x.dtype());
    // A plain tensor times an autodiff one is a constant factor in the graph; in the input's
    // dtype under mixed precision (a no-op cast otherwise).
    x * factor.cast(dtype)
}

#[derive(Debug)]
struct MulConstantBackward;

impl Backward<Flex, 1> for MulConstantBackward {
    /// The factor.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let factor = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            map_binary(&factor, grad, |f, g| g * f)
        });
    }
}

/// LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta` with the
/// biased variance, as `torch.nn.LayerNorm`.
///
/// burn 0.22's autodiff has no LayerNorm node: it differentiates the composite (mean, sub, mul,
/// mean, add, sqrt, div, mul, add), ~20 single-threaded passes over the activations per call
/// in training. Here it is one pass forward and one backward.
pub(crate) fn layer_norm<const D: usize>(
    norm: &LayerNorm,
    epsilon: f64,
    x: Tensor<D>,
) -> Tensor<D> {
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().map(|b| b.val());
    let all_f32 = x.dtype() == DType::F32
        && gamma.dtype() == DType::F32
        && beta.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if all_f32
        && let Some(beta) = beta
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
        && let Ok(g) = gamma.clone().try_into_primitive::<FlexAd>()
        && let Ok(b) = beta.clone().try_into_primitive::<FlexAd>()
    {
        drop((x, gamma, beta));
        return Tensor::from_primitive::<FlexAd>(layer_norm_autodiff(t, g, b, epsilon));
    }
    norm.forward(x)
}

#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    /// Per row: mean and 1 / sqrt(var + eps).
    stats: std::sync::Arc<Vec<(f32, f32)>>,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<LayerNormState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let LayerNormState { x, gamma, stats } = ops.state;
        let (dx, dgamma, dbeta) = layer_norm_grad(&x, &gamma, &stats, &grad);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, dbeta);
        }
    }
}

fn layer_norm_autodiff(
    x: FloatTensor<FlexAd>,
    gamma: FloatTensor<FlexAd>,
    beta: FloatTensor<FlexAd>,
    epsilon: f64,
) -> FloatTensor<FlexAd> {
    let input = contiguous(x.primitive());
    let (output, stats) = layer_norm_forward(&input, gamma.primitive(), beta.primitive(), epsilon);
    match LayerNormBackward
        .prepare::<NoCheckpointing>([x.node(), gamma.node(), beta.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = LayerNormState {
                x: input,
                gamma: contiguous(gamma.primitive()),
                stats: std::sync::Arc::new(stats),
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let (gamma, beta) = (f32_slice(&gamma), f32_slice(&beta));
    let width = gamma.len();
    let input = f32_slice(x);
    let rows = input.len() / width.max(1);
    let mut out = zeros(input.len());
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let per_task = rows_per_task(width);
    out.par_chunks_mut(per_task * width)
        .zip(input.par_chunks(per_task * width))
        .zip(stats.par_chunks_mut(per_task))
        .for_each(|((out, input), stats)| {
            simd(|| {
                for ((y, x), stat) in out.chunks_mut(width).zip(input.chunks(width)).zip(stats) {
                    // Two passes (mean, then squared deviations), as torch's CPU kernel.
                    let mean = x.iter().sum::<f32>() / width as f32;
                    let var =
                        x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                    let rstd = 1.0 / (var + epsilon as f32).sqrt();
                    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                        *y = (x - mean) * rstd * g + b;
                    }
                    *stat = (mean, rstd);
                }
            })
        });
    (from_vec(out, x.layout().shape()), stats)
}

/// `(dx, dgamma, dbeta)`: with xhat = (x - mean) * rstd and dxhat = g * gamma,
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dgamma = sum over rows of
/// g * xhat, dbeta = sum over rows of g.
fn layer_norm_grad(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &[(f32, f32)],
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let grad = contiguous(grad);
    let (input, gamma_s, g) = (f32_slice(x), f32_slice(gamma), f32_slice(&grad));
    let width = gamma_s.len();
    let mut dx = zeros(input.len());
    let per_task = rows_per_task(width);
    // Each task returns its rows' partial sums for dgamma and dbeta.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per_task * width)
        .zip(input.par_chunks(per_task * width))
        .zip(g.par_chunks(per_task * width))
        .zip(stats.par_chunks(per_task))
        .map(|(((dx, x), g), stats)| {
            let mut dgamma = vec![0.0f32; width];
            let mut dbeta = vec![0.0f32; width];
            simd(|| {
                for (((dx, x), g), &(mean, rstd)) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(g.chunks(width))
                    .zip(stats)
                {
                    let mut sum_dxhat = 0.0f32;
                    let mut sum_dxhat_xhat = 0.0f32;
                    for (((&x, &g), &gm), (dg, db)) in x
                        .iter()
                        .zip(g)
                        .zip(gamma_s)
                        .zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
                    {
                        let xhat = (x - mean) * rstd;
                        let dxhat = g * gm;
                        sum_dxhat += dxhat;
                        sum_dxhat_xhat += dxhat * xhat;
                        *dg += g * xhat;
                        *db += g;
                    }
                    let a = sum_dxhat / width as f32;
                    let b = sum_dxhat_xhat / width as f32;
                    for (((dx, &x), &g), &gm) in dx.iter_mut().zip(x).zip(g).zip(gamma_s) {
                        let xhat = (x - mean) * rstd;
                        *dx = rstd * (g * gm - a - xhat * b);
                    }
                }
            });
            (dgamma, dbeta)
        })
        .collect();
    let mut dgamma = vec![0.0f32; width];
    let mut dbeta = vec![0.0f32; width];
    for (pg, pb) in &partials {
        for (d, p) in dgamma.iter_mut().zip(pg) {
            *d += p;
        }
        for (d, p) in dbeta.iter_mut().zip(pb) {
            *d += p;
        }
    }
    let param_shape = gamma.layout().shape();
    (
        from_vec(dx, x.layout().shape()),
        from_vec(dgamma, param_shape),
        from_vec(dbeta, param_shape),
    )
}

/// Softmax over the last dimension, as `torch.softmax(x, -1)`.
///
/// burn 0.22's autodiff differentiates softmax as exp / sum / div nodes (each a
/// single-threaded pass and a stored intermediate); here it is one node whose backward is
/// `p * (g - sum(g * p))` per row.
pub(crate) fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
    {
        drop(x);
        let width = t.primitive().layout().shape()[D - 1];
        let output = map_rows(t.primitive(), width, softmax_row);
        let out = match SoftmaxBackward
            .prepare::<NoCheckpointing>([t.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(output.clone(), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        return Tensor::from_primitive::<FlexAd>(out);
    }
    burn::tensor::activation::softmax(x, D - 1)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The op's output, p.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let p = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let width = p.layout().shape()[p.layout().shape().num_dims() - 1];
            let grad = contiguous(&grad);
            let (probs, g) = (f32_slice(&p), f32_slice(&grad));
            let mut dx = zeros(probs.len());
            let per_task = rows_per_task(width) * width;
            dx.par_chunks_mut(per_task)
                .zip(probs.par_chunks(per_task).zip(g.par_chunks(per_task)))
                .for_each(|(dx, (p, g))| {
                    simd(|| {
                        for ((dx, p), g) in dx
                            .chunks_mut(width)
                            .zip(p.chunks(width))
                            .zip(g.chunks(width))
                        {
                            let dot: f32 = p.iter().zip(g).map(|(&p, &g)| p * g).sum();
                            for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
                                *dx = p * (g - dot);
                            }
                        }
                    })
                });
            from_vec(dx, p.layout().shape())
        });
    }
}

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for (y, &x) in y.iter_mut().zip(x) {
        *y = exp(x - max);
        sum += *y;
    }
    let inv = 1.0 / sum;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

/// `f(row, out_row)` for each row of `width`, rows split across rayon's workers.
fn map_rows(
    x: &FlexTensor,
    width: usize,
    f: impl Fn(&[f32], &mut [f32]) + Copy + Send + Sync,
) -> FlexTensor {
    let x = contiguous(x);
    let input = f32_slice(&x);
    let mut out = zeros(input.len());
    let per_task = rows_per_task(width) * width;
    out.par_chunks_mut(per_task)
        .zip(input.par_chunks(per_task))
        .for_each(|(o, i)| {
            simd(|| {
                for (o, i) in o.chunks_mut(width).zip(i.chunks(width)) {
                    f(i, o);
                }
            })
        });
    from_vec(out, x.layout().shape())
}

/// Mean cross-entropy of `logits` (`[rows, vocab]`) against `labels`, `[1]`: the mean over rows
/// of `logsumexp(row) - row[label]`, as `torch.nn.functional.cross_entropy`. `None` when the
/// logits are not an f32 flex autodiff tensor, there are no rows, or a label is out of range
/// (the caller then runs burn's log_softmax + gather, which reports it).
///
/// One node instead of burn's log_softmax chain (max, sub, exp, sum, log, sub, gather, mean,
/// each a pass over `[rows, vocab]` and a stored intermediate); its backward writes
/// `(softmax(row) - onehot(label)) * g / rows` in one pass.
pub(crate) fn cross_entropy(
    logits: &Tensor<2>,
    labels: &Tensor<1, burn::tensor::Int>,
) -> Option<Tensor<1>> {
    if logits.dtype() != DType::F32 {
        return None;
    }
    let t = logits.clone().try_into_primitive::<FlexAd>().ok()?;
    let [rows, vocab] = logits.dims();
    let labels: Vec<i64> = labels
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .ok()?;
    if rows == 0 || labels.len() != rows || labels.iter().any(|&l| l < 0 || l as usize >= vocab) {
        return None;
    }
    let input = contiguous(t.primitive());
    let x = f32_slice(&input);
    // Per row: log-sum-exp, computed once and kept for the backward.
    let mut lse = vec![0.0f32; rows];
    let per_task = rows_per_task(vocab);
    lse.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task * vocab))
        .for_each(|(lse, x)| {
            simd(|| {
                for (lse, row) in lse.iter_mut().zip(x.chunks(vocab)) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f32 = row.iter().map(|&v| exp(v - max)).sum();
                    *lse = max + sum.ln();
                }
            })
        });
    let loss = lse
        .iter()
        .zip(&labels)
        .enumerate()
        .map(|(r, (&lse, &l))| (lse - x[r * vocab + l as usize]) as f64)
        .sum::<f64>()
        / rows.max(1) as f64;
    let output = from_vec(vec![loss as f32], &burn::tensor::Shape::from(vec![1]));
    let out = match CrossEntropyBackward
        .prepare::<NoCheckpointing>([t.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = CrossEntropyState {
                logits: input,
                lse: std::sync::Arc::new(lse),
                labels: std::sync::Arc::new(labels),
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Some(Tensor::from_primitive::<FlexAd>(out))
}

#[derive(Debug, Clone)]
struct CrossEntropyState {
    logits: FlexTensor,
    lse: std::sync::Arc<Vec<f32>>,
    labels: std::sync::Arc<Vec<i64>>,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(self, ops: Ops<CrossEntropyState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let CrossEntropyState {
            logits,
            lse,
            labels,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            // The upstream gradient of the scalar loss.
            let g = f32_slice(&contiguous(&grad))
                .first()
                .copied()
                .unwrap_or(0.0);
            let shape = logits.layout().shape().clone();
            let vocab = shape[1];
            let x = f32_slice(&logits);
            let scale = g / lse.len().max(1) as f32;
            let mut dx = zeros(x.len());
            let per_task = rows_per_task(vocab);
            dx.par_chunks_mut(per_task * vocab)
                .zip(x.par_chunks(per_task * vocab))
                .zip(lse.par_chunks(per_task).zip(labels.par_chunks(per_task)))
                .for_each(|((dx, x), (lse, labels))| {
                    simd(|| {
                        for (((dx, x), &lse), &label) in dx
                            .chunks_mut(vocab)
                            .zip(x.chunks(vocab))
                            .zip(lse)
                            .zip(labels)
                        {
                            for (d, &v) in dx.iter_mut().zip(x) {
                                *d = exp(v - lse) * scale;
                            }
                            dx[label as usize] -= scale;
                        }
                    })
                });
            from_vec(dx, &shape)
        });
    }
}

/// `x W + b` for `x` `[..., in]`, `W` `[in, out]` (any strides: the LM head passes the
/// transposed word embeddings), `b` `[out]`, as burn's `module::linear`.
///
/// On flex, burn's linear allocates each output zeroed through a byte vector that burn-std then
/// re-allocates and copies for alignment (two extra passes over every matmul output, ~20% of
/// the calling thread's time in a training step), adds the bias in a third, and its backward
/// sums the bias gradient in a fourth. Here the output starts as the bias rows and gemm
/// accumulates into it; the backward is two gemm calls and one column sum.
pub(crate) fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_some_and(|b| b.dtype() == DType::F32);
    if f32s && let Some(b) = bias.clone() {
        if let Ok(xt) = x.clone().try_into_primitive::<FlexAd>()
            && let Ok(wt) = weight.clone().try_into_primitive::<FlexAd>()
            && let Ok(bt) = b.clone().try_into_primitive::<FlexAd>()
        {
            return Tensor::from_primitive::<FlexAd>(linear_autodiff(xt, wt, bt));
        }
        if let Ok(xt) = x.clone().try_into_primitive::<Flex>()
            && let Ok(wt) = weight.clone().try_into_primitive::<Flex>()
            && let Ok(bt) = b.try_into_primitive::<Flex>()
        {
            return Tensor::from_primitive::<Flex>(linear_forward(&contiguous(&xt), &wt, &bt));
        }
    }
    burn::tensor::module::linear(x, weight, bias)
}

#[derive(Debug, Clone)]
struct LinearState {
    /// The input, contiguous.
    x: FlexTensor,
    weight: FlexTensor,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<LinearState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let LinearState { x, weight } = ops.state;
        let (k, n) = (weight.layout().shape()[0], weight.layout().shape()[1]);
        let m = x.layout().num_elements() / k;
        let g = f32_slice(&grad);
        let (w_ptr, w_rs, w_cs) = matrix(&weight);
        if let Some(node) = node_x {
            // dx [m, k] = g [m, n] W^T; W^T[a][b] = W[b][a].
            // SAFETY: every pointer/stride pair addresses the matrix it describes, in bounds.
            let dx = unsafe { gemm_new(m, k, n, g.as_ptr(), n as isize, 1, w_ptr, w_cs, w_rs) };
            grads.register::<Flex>(node.id, from_vec(dx, x.layout().shape()));
        }
        if let Some(node) = node_w {
            // dW [k, n] = x^T [k, m] g [m, n]; x^T[a][b] = x[b][a].
            let xs = f32_slice(&x);
            // SAFETY: as above.
            let dw = unsafe {
                gemm_new(
                    k,
                    n,
                    m,
                    xs.as_ptr(),
                    1,
                    k as isize,
                    g.as_ptr(),
                    n as isize,
                    1,
                )
            };
            grads.register::<Flex>(node.id, from_vec(dw, weight.layout().shape()));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(
                node.id,
                from_vec(column_sums(g, n), &burn::tensor::Shape::from(vec![n])),
            );
        }
    }
}

fn linear_autodiff(
    x: FloatTensor<FlexAd>,
    weight: FloatTensor<FlexAd>,
    bias: FloatTensor<FlexAd>,
) -> FloatTensor<FlexAd> {
    let input = contiguous(x.primitive());
    let output = linear_forward(&input, weight.primitive(), bias.primitive());
    match LinearBackward
        .prepare::<NoCheckpointing>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = LinearState {
                x: input,
                weight: weight.primitive().clone(),
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// `x [..., k] W [k, n] + b [n]` with `x` contiguous.
fn linear_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let (k, n) = (weight.layout().shape()[0], weight.layout().shape()[1]);
    let m = x.layout().num_elements() / k.max(1);
    let bias = contiguous(bias);
    let b = f32_slice(&bias);
    // The bias in every row: gemm then adds x W to it.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    out.spare_capacity_mut()[..m * n]
        .par_chunks_mut(rows_per_task(n) * n)
        .for_each(|rows| {
            for row in rows.chunks_mut(n) {
                for (o, &b) in row.iter_mut().zip(b) {
                    o.write(b);
                }
            }
        });
    // SAFETY: every row was written above.
    unsafe { out.set_len(m * n) };
    let (w_ptr, w_rs, w_cs) = matrix(weight);
    // SAFETY: every pointer/stride pair addresses the matrix it describes, in bounds.
    unsafe {
        gemm_f32(
            m,
            n,
            k,
            &mut out,
            true,
            f32_slice(x).as_ptr(),
            k as isize,
            1,
            w_ptr,
            w_rs,
            w_cs,
        )
    };
    let mut shape = x.layout().shape().clone();
    let last = shape.num_dims() - 1;
    shape[last] = n;
    from_vec(out, &shape)
}

/// A 2-D tensor's first element and (row, column) strides, for gemm.
fn matrix(t: &FlexTensor) -> (*const f32, isize, isize) {
    let strides = t.layout().strides();
    // SAFETY: start_offset is within the storage of the view.
    let ptr = unsafe { t.storage::<f32>().as_ptr().add(t.layout().start_offset()) };
    (ptr, strides[0], strides[1])
}

/// burn-flex's threshold: below ~192^3 multiply-adds threads cost more than they save.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst [m, n] (+)= lhs [m, k] rhs [k, n]`, row-major `dst`; `accumulate` adds to `dst`.
///
/// # Safety
/// `lhs + i * lhs_rs + j * lhs_cs` must be in bounds for i < m, j < k, and likewise `rhs` for
/// k x n.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
) {
    assert_eq!(dst.len(), m * n, "gemm destination size");
    let parallelism = parallelism(m, n, k);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A new row-major `[m, n]` = `lhs [m, k] rhs [k, n]`, written by gemm alone (no zeroing pass).
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
        // SAFETY: with read_dst = false and k > 0 gemm writes every element of dst.
        dst.set_len(m * n);
    }
    dst
}

/// Sums of the `n` columns of a row-major `[rows, n]` matrix.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = g
        .par_chunks(rows_per_task(n) * n)
        .map(|rows| {
            let mut sum = vec![0.0f32; n];
            simd(|| {
                for row in rows.chunks(n) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v;
                    }
                }
            });
            sum
        })
        .collect();
    let mut sum = vec![0.0f32; n];
    for p in &partials {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// Multi-head attention `softmax(q k^T / sqrt(d) + bias) v`, with dropout on the
/// probabilities when `dropout` is given (it draws the host mask over `[batch, heads, seq,
/// seq]`, scaled by 1 / keep, and is called only once the kernel runs), from and to the
/// `[batch, seq, hidden]` layout of the projections: HF's eager attention, which on the CPU
/// also serves where the fused kernel would (same function without dropout). `None` unless q,
/// k and v are f32 flex tensors (all autodiff or all plain); the caller then runs burn's ops.
///
/// burn's path reshapes to `[batch, heads, seq, head_dim]` (copies), runs batched matmuls
/// whose outputs flex allocates zeroed and then copies, and differentiates scale, bias add,
/// softmax, dropout and both matmuls node by node. Here each (batch, head) is one rayon task
/// of four small gemms reading the projections in place (a head is a column block of
/// `[seq, hidden]`), forward and backward.
pub(crate) fn attention(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    bias: &Tensor<4>,
    dropout: Option<&dyn Fn(usize) -> Vec<f32>>,
) -> Option<Tensor<3>> {
    let [batch, seq, hidden] = q.dims();
    if [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
        .iter()
        .any(|&d| d != DType::F32)
        || heads == 0
        || hidden % heads != 0
        || k.dims() != q.dims()
        || v.dims() != q.dims()
        || bias.dims() != [batch, 1, 1, seq]
    {
        return None;
    }
    let shape = Attention {
        batch,
        seq,
        hidden,
        heads,
    };
    let bias: Vec<f32> = bias.to_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let probs = batch * heads * seq * seq;
    let draw = |n: usize| {
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
        let dropout = draw(probs);
        let (context, probs) = shape.forward(
            f32_slice(&qc),
            f32_slice(&kc),
            f32_slice(&vc),
            &bias,
            dropout.as_deref(),
        );
        let output = from_vec(context, qc.layout().shape());
        let out = match AttentionBackward
            .prepare::<NoCheckpointing>([qt.node(), kt.node(), vt.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = AttentionState {
                    shape,
                    q: qc,
                    k: kc,
                    v: vc,
                    probs: std::sync::Arc::new(probs),
                    dropout,
                };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        return Some(Tensor::from_primitive::<FlexAd>(out));
    }
    if let (Ok(qt), Ok(kt), Ok(vt)) = (
        q.clone().try_into_primitive::<Flex>(),
        k.clone().try_into_primitive::<Flex>(),
        v.clone().try_into_primitive::<Flex>(),
    ) {
        let (qc, kc, vc) = (contiguous(&qt), contiguous(&kt), contiguous(&vt));
        let dropout = draw(probs);
        let (context, _) = shape.forward(
            f32_slice(&qc),
            f32_slice(&kc),
            f32_slice(&vc),
            &bias,
            dropout.as_deref(),
        );
        return Some(Tensor::from_primitive::<Flex>(from_vec(
            context,
            qc.layout().shape(),
        )));
    }
    None
}

#[derive(Debug, Clone, Copy)]
struct Attention {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
}

#[derive(Debug, Clone)]
struct AttentionState {
    shape: Attention,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// softmax probabilities before dropout, `[batch, heads, seq, seq]`.
    probs: std::sync::Arc<Vec<f32>>,
    dropout: Option<std::sync::Arc<Vec<f32>>>,
}

/// A pointer the rayon tasks write through; each task writes its own (batch, head) column
/// block, so the writes never overlap.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint elements (see the type's doc).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole Sync wrapper, not the raw field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl Attention {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Offset of (batch b, head h)'s `[seq, head_dim]` block in a `[batch, seq, hidden]` tensor.
    fn block(&self, task: usize) -> usize {
        let (b, h) = (task / self.heads, task % self.heads);
        b * self.seq * self.hidden + h * self.head_dim()
    }

    /// `(context [batch, seq, hidden], probs [batch, heads, seq, seq])`.
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        dropout: Option<&Vec<f32>>,
    ) -> (Vec<f32>, Vec<f32>) {
        let Attention {
            seq, hidden, heads, ..
        } = *self;
        let d = self.head_dim();
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = zeros(q.len());
        let out = SharedMut(context.as_mut_ptr());
        let mut probs = zeros(self.batch * heads * seq * seq);
        probs
            .par_chunks_mut(seq * seq)
            .enumerate()
            .for_each(|(task, p)| {
                let at = self.block(task);
                let bias = &bias[(task / heads) * seq..][..seq];
                // SAFETY: the blocks addressed are inside q, k (`at + (seq-1)*hidden + d <= len`)
                // and p; `out` is written only in this task's block.
                unsafe {
                    // scores = q k^T / sqrt(d); k^T[a][j] = k[j][a].
                    small_gemm(
                        seq,
                        seq,
                        d,
                        (p.as_mut_ptr(), seq as isize, 1),
                        (q.as_ptr().add(at), hidden as isize, 1),
                        (k.as_ptr().add(at), 1, hidden as isize),
                        scale,
                    );
                }
                simd(|| {
                    for row in p.chunks_mut(seq) {
                        for (s, &b) in row.iter_mut().zip(bias) {
                            *s += b;
                        }
                        softmax_in_place(row);
                    }
                });
                let dropped;
                let lhs = match dropout {
                    Some(mask) => {
                        let mask = &mask[task * seq * seq..][..seq * seq];
                        dropped = p
                            .iter()
                            .zip(mask)
                            .map(|(&p, &m)| p * m)
                            .collect::<Vec<f32>>();
                        dropped.as_ptr()
                    }
                    None => p.as_ptr(),
                };
                // SAFETY: as above; context's block for this task is written by this task only.
                unsafe {
                    small_gemm(
                        seq,
                        d,
                        seq,
                        (out.at(at), hidden as isize, 1),
                        (lhs, seq as isize, 1),
                        (v.as_ptr().add(at), hidden as isize, 1),
                        1.0,
                    );
                }
            });
        (context, probs)
    }

    /// `(dq, dk, dv)` from the context's gradient `g`, `[batch, seq, hidden]` each.
    fn backward(&self, state: &AttentionState, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Attention { seq, hidden, .. } = *self;
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
        state
            .probs
            .par_chunks(seq * seq)
            .enumerate()
            .for_each(|(task, p)| {
                let at = self.block(task);
                let mask = state
                    .dropout
                    .as_ref()
                    .map(|m| &m[task * seq * seq..][..seq * seq]);
                let mut dp = vec![0.0f32; seq * seq];
                // SAFETY: every block is inside its buffer; the outputs' blocks are this task's.
                unsafe {
                    // dP' = g v^T; v^T[a][j] = v[j][a].
                    small_gemm(
                        seq,
                        seq,
                        d,
                        (dp.as_mut_ptr(), seq as isize, 1),
                        (g.as_ptr().add(at), hidden as isize, 1),
                        (v.as_ptr().add(at), 1, hidden as isize),
                        1.0,
                    );
                    // dv = P'^T g, P' = P * mask.
                    let dropped: Vec<f32>;
                    let p_used = match mask {
                        Some(m) => {
                            dropped = p.iter().zip(m).map(|(&p, &m)| p * m).collect();
                            dropped.as_ptr()
                        }
                        None => p.as_ptr(),
                    };
                    small_gemm(
                        seq,
                        d,
                        seq,
                        (dv_p.at(at), hidden as isize, 1),
                        (p_used, 1, seq as isize),
                        (g.as_ptr().add(at), hidden as isize, 1),
                        1.0,
                    );
                }
                simd(|| {
                    // dP = dP' * mask; dS = P * (dP - rowsum(dP * P)).
                    for (r, (ds, p)) in dp.chunks_mut(seq).zip(p.chunks(seq)).enumerate() {
                        if let Some(m) = mask {
                            for (ds, &m) in ds.iter_mut().zip(&m[r * seq..][..seq]) {
                                *ds *= m;
                            }
                        }
                        let dot: f32 = ds.iter().zip(p).map(|(&a, &b)| a * b).sum();
                        for (ds, &p) in ds.iter_mut().zip(p) {
                            *ds = p * (*ds - dot);
                        }
                    }
                });
                // SAFETY: as above.
                unsafe {
                    // dq = dS k / sqrt(d); dk = dS^T q / sqrt(d).
                    small_gemm(
                        seq,
                        d,
                        seq,
                        (dq_p.at(at), hidden as isize, 1),
                        (dp.as_ptr(), seq as isize, 1),
                        (k.as_ptr().add(at), hidden as isize, 1),
                        scale,
                    );
                    small_gemm(
                        seq,
                        d,
                        seq,
                        (dk_p.at(at), hidden as isize, 1),
                        (dp.as_ptr(), 1, seq as isize),
                        (q.as_ptr().add(at), hidden as isize, 1),
                        scale,
                    );
                }
            });
        (dq, dk, dv)
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<AttentionState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
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

#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for y in row.iter_mut() {
        *y = exp(*y - max);
        sum += *y;
    }
    let inv = 1.0 / sum;
    for y in row.iter_mut() {
        *y *= inv;
    }
}

/// `dst = scale * lhs rhs` on one thread, for matrices given as (pointer, row stride,
/// column stride): `[m, k] x [k, n] -> [m, n]`.
///
/// # Safety
/// Each (pointer, strides) must address its whole matrix in bounds; `dst` must not alias the
/// inputs.
unsafe fn small_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    scale: f32,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            false,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

// ---- plumbing: contiguous f32 views, parallel maps, SIMD dispatch ----

/// The tensor's elements in row-major order (a copy only when its layout is strided).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    match t.layout().contiguous_offsets() {
        Some(_) => t.clone(),
        None => t.to_contiguous(),
    }
}

fn f32_slice(t: &FlexTensor) -> &[f32] {
    let (start, end) = t
        .layout()
        .contiguous_offsets()
        .unwrap_or((0, t.layout().num_elements()));
    &t.storage::<f32>()[start..end]
}

fn from_vec(values: Vec<f32>, shape: &burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.clone()))
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them (checked once), else as built.
/// `f` is inlined into the wide copy, so the loops inside it vectorise 8 lanes wide.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        #[target_feature(enable = "avx2,fma")]
        fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if *WIDE.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the CPU has the features `wide` is compiled for.
            return unsafe { wide(f) };
        }
    }
    f()
}

/// `f(x)` elementwise into a new tensor, chunked across rayon's workers.
fn map_unary(x: &FlexTensor, f: impl Fn(f32) -> f32 + Copy + Send + Sync) -> FlexTensor {
    let x = contiguous(x);
    let input = f32_slice(&x);
    let mut out = zeros(input.len());
    out.par_chunks_mut(CHUNK)
        .zip(input.par_chunks(CHUNK))
        .for_each(|(o, i)| {
            simd(|| {
                for (o, &i) in o.iter_mut().zip(i) {
                    *o = f(i);
                }
            })
        });
    from_vec(out, x.layout().shape())
}

/// `f(a, b)` elementwise, written over `b` when nothing else holds it, else into a new tensor.
fn map_binary(
    a: &FlexTensor,
    b: FlexTensor,
    f: impl Fn(f32, f32) -> f32 + Copy + Send + Sync,
) -> FlexTensor {
    let a = contiguous(a);
    let lhs = f32_slice(&a);
    let mut b = b;
    let in_place = b.is_unique()
        && b.layout().start_offset() == 0
        && b.layout().is_contiguous()
        && b.layout().shape() == a.layout().shape();
    if in_place && let Some(rhs) = b.try_storage_mut::<f32>() {
        rhs[..lhs.len()]
            .par_chunks_mut(CHUNK)
            .zip(lhs.par_chunks(CHUNK))
            .for_each(|(r, l)| {
                simd(|| {
                    for (r, &l) in r.iter_mut().zip(l) {
                        *r = f(l, *r);
                    }
                })
            });
        return b;
    }
    let b = contiguous(&b);
    let rhs = f32_slice(&b);
    let mut out = zeros(lhs.len());
    out.par_chunks_mut(CHUNK)
        .zip(lhs.par_chunks(CHUNK).zip(rhs.par_chunks(CHUNK)))
        .for_each(|(o, (l, r))| {
            simd(|| {
                for ((o, &l), &r) in o.iter_mut().zip(l).zip(r) {
                    *o = f(l, r);
                }
            })
        });
    from_vec(out, a.layout().shape())
}

/// `n` zeros, written by rayon's workers chunk by chunk. `vec![0.0; n]` memsets on the calling
/// thread (glibc's calloc reuses freed heap memory, which must be cleared) while the workers
/// wait: that memset was a quarter of the calling thread's time in a training step.
fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above initialised all n elements.
    unsafe { v.set_len(n) };
    v
}

/// Rows of `width` per rayon task: about `CHUNK` elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

#[inline(always)]
fn gelu_f(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_with_exp(x * std::f32::consts::FRAC_1_SQRT_2).0)
}

/// `g * d/dx gelu(x)`: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi),
/// whose exponential is the one erf already computed.
#[inline(always)]
fn gelu_grad_f(x: f32, g: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let (erf, e) = erf_with_exp(x * std::f32::consts::FRAC_1_SQRT_2);
    g * (0.5 * (1.0 + erf) + x * INV_SQRT_2PI * e)
}

/// `(erf(z), exp(-z^2))`: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), and below
/// |z| = 0.5, where `1 - poly * e` would cancel to a few f32 ulps of 1, erf's Maclaurin series
/// to z^11 (remainder < 1.3e-8 there). Both are computed and one selected, so loops over this
/// stay branch-free and vectorise.
#[inline(always)]
fn erf_with_exp(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    // 2/sqrt(pi) * (-1)^n / (n! (2n + 1)), n = 0..=5.
    const S: [f32; 6] = [
        1.128_379_2,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -8.548_327e-4,
    ];
    let a = z.abs();
    let e = exp(-a * a);
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let tail = 1.0 - poly * e;
    let s = a * a;
    let series = a * (((((S[5] * s + S[4]) * s + S[3]) * s + S[2]) * s + S[1]) * s + S[0]);
    let erf = if a < 0.5 { series } else { tail };
    (erf.copysign(z), e)
}

/// `e^x` for f32 (Cephes `expf`: range reduction by ln 2, degree-5 polynomial, exponent bits;
/// ~2 ulp). Inputs below -87 flush to ~0 and above 88 saturate, as f32 `exp` does near there.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer in the float unit (no SSE4.1 needed).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1)
        * (r * r)
        + r
        + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn grid() -> Vec<f32> {
        (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect()
    }

    #[test]
    fn exp_and_erf_stay_within_their_bounds_of_libm() {
        let mut worst_exp = 0.0f64;
        for x in (-8700..=8800).map(|i| i as f32 * 0.01) {
            let want = (x as f64).exp();
            worst_exp = worst_exp.max((exp(x) as f64 - want).abs() / want);
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp:e}");
        // burn's flex `erf` is libm's `erff` (within 1 ulp).
        let z = grid();
        let libm: Vec<f32> = Tensor::<1>::from_floats(z.as_slice(), &Device::flex())
            .erf()
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        let mut worst_erf = 0.0f32;
        for (&z, &want) in z.iter().zip(&libm) {
            let (erf, e) = erf_with_exp(z);
            worst_erf = worst_erf.max((erf - want).abs());
            assert!(
                ((e as f64) - (-(z as f64).powi(2)).exp()).abs() < 1e-7,
                "exp(-{z}^2)"
            );
        }
        // A&S's 1.5e-7 plus f32 rounding of `1 - poly * e` near erf ~ 0.5 (a few ulps of 1).
        assert!(worst_erf < 4e-7, "erf absolute error {worst_erf:e}");
        assert!(erf_with_exp(f32::NAN).0.is_nan(), "NaN must stay NaN");
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_gradient_match_burns_libm_gelu_on_flex() {
        let device = Device::flex().autodiff();
        let values = grid();
        let n = values.len();
        // Upstream gradient of varying sign and size, as a real backward has.
        let upstream: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let w = Tensor::<1>::from_floats(upstream.as_slice(), &device.clone().without_autodiff());
        let run = |fused: bool| {
            let x = Tensor::<1>::from_floats(values.as_slice(), &device).require_grad();
            let y = if fused {
                gelu(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let out: Vec<f32> = y.clone().into_data().try_to_vec::<f32>().expect("f32");
            let grads = (y * w.clone()).sum().backward();
            let g: Vec<f32> = x
                .grad(&grads)
                .expect("x has a gradient")
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32");
            (out, g)
        };
        let (want, want_grad) = run(false);
        let (got, got_grad) = run(true);
        for i in 0..n {
            let scale = 1.0 + values[i].abs();
            assert!(
                (got[i] - want[i]).abs() <= 2e-7 * scale,
                "gelu({}) = {} vs {}",
                values[i],
                got[i],
                want[i]
            );
            let gscale = 1.0 + upstream[i].abs() * scale;
            assert!(
                (got_grad[i] - want_grad[i]).abs() <= 3e-7 * gscale,
                "gelu'({}) * {}: {} vs {}",
                values[i],
                upstream[i],
                got_grad[i],
                want_grad[i]
            );
        }
        // Plain (non-autodiff) flex tensors take the kernel too.
        let plain = Tensor::<1>::from_floats(values.as_slice(), &Device::flex());
        let out: Vec<f32> = gelu(plain).into_data().try_to_vec::<f32>().expect("f32");
        assert_eq!(out, got);
    }

    /// Values and gradients of a fused op against burn's own composite op on flex autodiff,
    /// for every tensor that takes part (input and parameters), under a random upstream
    /// gradient so no term of the backward cancels by symmetry.
    fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32")
    }

    /// A leaf tensor of `n` values uniform in [-3, 3).
    fn random(n: usize, seed: u64, device: &Device) -> Tensor<1> {
        let mut z = seed;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::<1>::from_floats(data.as_slice(), device)
    }

    #[test]
    fn layer_norm_values_and_all_three_gradients_match_burns_composite() {
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let width = 48;
        let mut norm = burn::nn::LayerNormConfig::new(width)
            .with_epsilon(1e-5)
            .init(&device);
        // Non-trivial gamma and beta so their gradients and uses are all exercised.
        norm.gamma = burn::module::Param::from_tensor(
            Tensor::from_data((random(width, 1, &plain) + 1.0).into_data(), &device).require_grad(),
        );
        norm.beta = Some(burn::module::Param::from_tensor(
            random(width, 2, &device).require_grad(),
        ));
        let n = 3 * 7 * width;
        let upstream = random(n, 3, &plain).reshape([3, 7, width]);
        let run = |fused: bool| {
            let x = random(n, 4, &device).require_grad();
            let x3 = x.clone().reshape([3, 7, width]);
            let y = if fused {
                layer_norm(&norm, 1e-5, x3)
            } else {
                norm.forward(x3)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = |t: Tensor<1>| values(t.grad(&grads).expect("a gradient"));
            (
                values(y.reshape([n])),
                grad(x),
                grad(norm.gamma.val()),
                grad(norm.beta.as_ref().expect("beta").val()),
            )
        };
        let want = run(false);
        let got = run(true);
        assert_close("y", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-5);
        assert_close("dgamma", &got.2, &want.2, 1e-5);
        assert_close("dbeta", &got.3, &want.3, 1e-5);
    }

    #[test]
    fn softmax_values_and_gradient_match_burns_composite() {
        let device = Device::flex().autodiff();
        let n = 4 * 5 * 37;
        let upstream = random(n, 5, &Device::flex()).reshape([4, 5, 37]);
        let run = |fused: bool| {
            let x = random(n, 6, &device).require_grad();
            // Rows with masked (-1e9) entries, as the attention bias makes.
            let bias = random(n, 7, &device).greater_elem(2.5).float() * -1e9;
            let x3 = (x.clone() + bias).reshape([4, 5, 37]);
            let y = if fused {
                softmax_last(x3)
            } else {
                burn::tensor::activation::softmax(x3, 2)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                values(y.reshape([n])),
                values(x.grad(&grads).expect("a gradient")),
            )
        };
        let want = run(false);
        let got = run(true);
        assert_close("p", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-6);
    }

    #[test]
    fn cross_entropy_and_its_gradient_match_log_softmax_and_gather() {
        let device = Device::flex().autodiff();
        let (rows, vocab) = (9, 301);
        let labels =
            Tensor::<1, burn::tensor::Int>::from_ints([0, 300, 5, 5, 17, 299, 1, 150, 42], &device);
        let run = |fused: bool| {
            let x = random(rows * vocab, 8, &device).require_grad();
            // Spread the logits wide so the max subtraction matters.
            let logits = x.clone().reshape([rows, vocab]) * 7.0;
            let loss = if fused {
                cross_entropy(&logits, &labels)
                    .expect("the fused path takes f32 flex autodiff logits")
            } else {
                let log_probs = burn::tensor::activation::log_softmax(logits, 1);
                log_probs
                    .gather(1, labels.clone().reshape([rows, 1]))
                    .mean()
                    .neg()
            };
            // A non-unit upstream gradient, as under loss scaling or accumulation.
            let grads = (loss.clone() * 0.37).backward();
            (values(loss), values(x.grad(&grads).expect("a gradient")))
        };
        let want = run(false);
        let got = run(true);
        assert_close("loss", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-6);
        // Out-of-range labels and plain tensors take burn's path.
        let bad = Tensor::<1, burn::tensor::Int>::from_ints([0, 0, 0, 0, 0, 0, 0, 0, 301], &device);
        let logits = random(rows * vocab, 8, &device).reshape([rows, vocab]);
        assert!(cross_entropy(&logits, &bad).is_none());
        let plain = random(rows * vocab, 8, &Device::flex()).reshape([rows, vocab]);
        assert!(cross_entropy(&plain, &labels.clone().to_device(&Device::flex())).is_none());
    }

    #[test]
    fn linear_values_and_gradients_match_burns_for_plain_and_transposed_weights() {
        let device = Device::flex().autodiff();
        let (batch, seq, k, n) = (3, 5, 24, 40);
        let upstream = random(batch * seq * n, 9, &Device::flex()).reshape([batch, seq, n]);
        for transposed in [false, true] {
            let run = |fused: bool| {
                let x = random(batch * seq * k, 10, &device).require_grad();
                let w = random(k * n, 11, &device).require_grad();
                let b = random(n, 12, &device).require_grad();
                // The LM head's decoder is the word-embedding matrix [n, k], transposed.
                let weight = if transposed {
                    w.clone().reshape([n, k]).transpose()
                } else {
                    w.clone().reshape([k, n])
                };
                let x3 = x.clone().reshape([batch, seq, k]);
                let y = if fused {
                    linear(x3, weight, Some(b.clone()))
                } else {
                    burn::tensor::module::linear(x3, weight, Some(b.clone()))
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<1>| values(t.grad(&grads).expect("a gradient"));
                (
                    values(y.reshape([batch * seq * n])),
                    grad(&x),
                    grad(&w),
                    grad(&b),
                )
            };
            let want = run(false);
            let got = run(true);
            let what = if transposed { "transposed" } else { "plain" };
            assert_close(&format!("{what} y"), &got.0, &want.0, 1e-6);
            assert_close(&format!("{what} dx"), &got.1, &want.1, 1e-6);
            assert_close(&format!("{what} dW"), &got.2, &want.2, 1e-6);
            assert_close(&format!("{what} db"), &got.3, &want.3, 1e-6);
        }
        // Inference tensors (no autodiff) take the fused forward too.
        let plain = Device::flex();
        let x = random(batch * seq * k, 10, &plain).reshape([batch, seq, k]);
        let w = random(k * n, 11, &plain).reshape([k, n]);
        let b = random(n, 12, &plain);
        let got = values(linear(x.clone(), w.clone(), Some(b.clone())).reshape([batch * seq * n]));
        let want = values(burn::tensor::module::linear(x, w, Some(b)).reshape([batch * seq * n]));
        assert_close("inference y", &got, &want, 1e-6);
    }

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
                    attention(&q3, &k3, &v3, heads, &bias, draw).expect("f32 flex autodiff")
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
