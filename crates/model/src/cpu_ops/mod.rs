//! Fused, multi-threaded f32 kernels for the CPU backend (burn's flex), with their own
//! backward passes.
//!
//! Why: a flex training step runs its matmuls on every core (gemm + rayon) but each
//! elementwise op on the calling thread, one scalar at a time. On 2 cores `perf` showed the
//! calling thread busy ~50% of a step while the rayon workers waited, and exact GELU alone
//! (scalar libm `erff` forward, `erff` + `expf` backward) was a third of that serial time.
//! Here the encoder's hot ops each run as one pass split across rayon's workers, in loops the
//! compiler vectorises (AVX2 + FMA where the CPU has them, picked at run time):
//!
//! - [`linear`]: gemm straight into the bias rows (burn-flex allocates each matmul output
//!   zeroed through a byte vector that burn-std copies again for alignment, then adds the bias
//!   in another pass); backward two gemms and a column sum.
//! - [`attention`]: multi-head attention as one task per (batch, head), gemms reading the
//!   `[batch, seq, hidden]` projections in place (no head split/merge copies), softmax and
//!   dropout in between.
//! - [`attention_windowed`]: the same for ModernBERT's sliding-window layers, computing only
//!   the band of keys each block of queries sees (cost linear in the sequence length).
//! - [`rotary`]: ModernBERT's rotate-half RoPE on q or k in the projection layout, with
//!   transformers' f32 tables ([`rope_cos_sin`]).
//! - [`gelu`], [`geglu`], [`softmax_last`], [`layer_norm`], [`cross_entropy`], [`mul_constant`]
//!   (dropout): one node each where burn's autodiff chains 3-20 primitive ops.
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

mod attention;
mod elementwise;
mod geglu;
mod linear;
mod loss;
mod norm;
mod rotary;
mod window;

pub(crate) use attention::attention;
pub(crate) use elementwise::{gelu, mul_constant, softmax_last};
pub(crate) use geglu::geglu;
pub(crate) use linear::linear;
pub(crate) use loss::cross_entropy;
pub(crate) use norm::layer_norm;
pub(crate) use {rotary::rope_cos_sin, rotary::rotary, window::attention_windowed};

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

// ---- plumbing: contiguous f32 views, parallel maps, SIMD dispatch ----

/// Records `output` as one node of burn's autodiff graph with parents `inputs`, whose backward
/// is `op` given `state()` (built only when some input needs a gradient).
fn record<Op, const N: usize>(
    op: Op,
    inputs: [&FloatTensor<FlexAd>; N],
    output: FlexTensor,
    state: impl FnOnce() -> Op::State,
) -> FloatTensor<FlexAd>
where
    Op: Backward<Flex, N>,
{
    match op
        .prepare::<NoCheckpointing>(inputs.map(|t| t.node()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state(), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// A strided matrix for gemm: first element, row stride, column stride (in elements).
type Strided<P> = (P, isize, isize);

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`: `[m, k] x [k, n]`,
/// with gemm's own threads when `parallel` and the product is worth them (burn-flex's
/// threshold: below ~192^3 multiply-adds threads cost more than they save).
///
/// # Safety
/// Each (pointer, strides) must address its whole matrix in bounds, `dst` must not alias the
/// inputs, and without `accumulate` `dst` may be uninitialised only when k > 0 (gemm then
/// writes every element).
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let parallelism = if parallel && m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // gemm takes (column stride, row stride) and computes alpha * dst + beta * lhs rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Softmax of one row, in place.
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

/// Softmax's backward for one row, in place: `g <- p * (g - sum(g * p))`.
#[inline(always)]
fn softmax_grad_in_place(p: &[f32], g: &mut [f32]) {
    let dot: f32 = p.iter().zip(g.iter()).map(|(&p, &g)| p * g).sum();
    for (g, &p) in g.iter_mut().zip(p) {
        *g = p * (*g - dot);
    }
}

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
        std::f32::consts::FRAC_2_SQRT_PI,
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
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Helpers shared by the kernels' tests.
#[cfg(test)]
mod testing {
    use burn::tensor::{Device, Tensor};

    pub(super) fn grid() -> Vec<f32> {
        (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect()
    }

    pub(super) fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    pub(super) fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32")
    }

    pub(super) fn random(n: usize, seed: u64, device: &Device) -> Tensor<1> {
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
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use burn::tensor::Device;

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
}
