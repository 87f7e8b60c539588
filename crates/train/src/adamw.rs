//! AdamW (torch.optim.AdamW, the HF Trainer's `adamw_torch`) exactly as burn's own
//! [`burn::optim::AdamW`] computes it, fused into one multi-threaded pass on the CPU backend.
//!
//! Why: burn's AdamW runs a dozen whole-tensor ops per parameter (`m β₁`, `g (1-β₁)`, their
//! sum, `g²`, ..., `p (1 - lr wd)`, `p - lr Δ`), each a single-threaded loop that reads and
//! writes the whole tensor, most of them into a freshly allocated one. On ModernBERT-base
//! (150M parameters) that was 0.5-1.0 s of a 6.4 s CPU training step. Here, for f32 tensors on
//! flex, the moments and the parameter are updated in place (when nothing else holds them;
//! otherwise into new buffers) in one rayon pass. Every other backend and dtype takes burn's
//! AdamW unchanged.
//!
//! The fused loop performs burn's operations in burn's order with the same f32 scalars, so
//! the two agree bit for bit (tested below), and the state is burn's [`AdamWState`]: the
//! record keys are unchanged, so checkpoints written before this existed resume as they were.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::optim::{AdamW as BurnAdamW, AdamWConfig, AdamWState, AdaptiveMomentumState};
use burn::optim::{LearningRate, Optimizer};
use burn::tensor::{DType, Device, Tensor};
use rayon::prelude::*;

/// One parameter group's AdamW (see the module doc).
#[derive(Clone)]
pub struct AdamW {
    beta_1: f32,
    beta_2: f32,
    eps: f32,
    weight_decay: f32,
    /// burn's AdamW with the same settings, for tensors the fused pass does not take.
    fallback: BurnAdamW,
}

impl AdamW {
    pub fn new(betas: [f64; 2], eps: f64, weight_decay: f64) -> Self {
        let (beta_1, beta_2, eps, weight_decay) = (
            betas[0] as f32,
            betas[1] as f32,
            eps as f32,
            weight_decay as f32,
        );
        let fallback = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(eps)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            beta_1,
            beta_2,
            eps,
            weight_decay,
            fallback,
        }
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// The scalars of one step, in f32 as burn's scalar ops see them.
#[derive(Clone, Copy)]
struct Scalars {
    beta_1: f32,
    beta_2: f32,
    /// `1 - β₁`, `1 - β₂`.
    factor_1: f32,
    factor_2: f32,
    /// The bias corrections `1 - βᵗ`.
    correction_1: f32,
    correction_2: f32,
    eps: f32,
    /// `1 - lr wd`, or `None` without decay (burn skips the multiplication then).
    keep: Option<f32>,
    lr: f32,
}

impl Scalars {
    fn new(adamw: &AdamW, lr: LearningRate, time: usize) -> Self {
        let decay_rate = lr * adamw.weight_decay as f64;
        Self {
            beta_1: adamw.beta_1,
            beta_2: adamw.beta_2,
            factor_1: 1.0 - adamw.beta_1,
            factor_2: 1.0 - adamw.beta_2,
            correction_1: 1f32 - adamw.beta_1.powi(time as i32),
            correction_2: 1f32 - adamw.beta_2.powi(time as i32),
            eps: adamw.eps,
            keep: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
        }
    }

    /// burn's `AdaptiveMomentumW::transform` and `AdamW::step` op by op, on one chunk.
    /// `FIRST`: no moments yet (they start as `g (1-β)`). Without weight decay `keep` is 1,
    /// and `p * 1` is `p` exactly. Branch-free, so the compiler vectorises it; `div` and
    /// `sqrt` are exactly rounded in every width, and Rust never fuses a multiply-add.
    #[inline(always)]
    fn update<const FIRST: bool>(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        let keep = self.keep.unwrap_or(1.0);
        for i in 0..n {
            let g_i = g[i];
            let g2 = g_i * g_i;
            if FIRST {
                m[i] = g_i * self.factor_1;
                v[i] = g2 * self.factor_2;
            } else {
                m[i] = m[i] * self.beta_1 + g_i * self.factor_1;
                v[i] = v[i] * self.beta_2 + g2 * self.factor_2;
            }
            let delta = (m[i] / self.correction_1) / ((v[i] / self.correction_2).sqrt() + self.eps);
            p[i] = p[i] * keep - delta * self.lr;
        }
    }

    /// [`Self::update`] on one chunk, the first step or a later one.
    #[inline(always)]
    fn update_any(&self, first: bool, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        if first {
            self.update::<true>(p, g, m, v)
        } else {
            self.update::<false>(p, g, m, v)
        }
    }

    /// [`Self::update`] in the widest vectors the CPU has (AVX-512 or AVX2, picked at run
    /// time): the `inline(always)` loop is compiled into each feature's copy. (A closure
    /// handed to a generic feature function was not inlined: the loop stayed 4 wide.)
    fn update_chunk(&self, first: bool, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            fn avx512(
                s: &Scalars,
                first: bool,
                chunk: (&mut [f32], &[f32], &mut [f32], &mut [f32]),
            ) {
                s.update_any(first, chunk.0, chunk.1, chunk.2, chunk.3)
            }
            #[target_feature(enable = "avx2")]
            fn avx2(s: &Scalars, first: bool, chunk: (&mut [f32], &[f32], &mut [f32], &mut [f32])) {
                s.update_any(first, chunk.0, chunk.1, chunk.2, chunk.3)
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the feature `avx512` is compiled for.
                return unsafe { avx512(self, first, (p, g, m, v)) };
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { avx2(self, first, (p, g, m, v)) };
            }
        }
        self.update_any(first, p, g, m, v)
    }
}

/// A flex f32 tensor's elements to write: in place when nothing else holds its buffer and it
/// is contiguous from its start, otherwise a copy in a new buffer.
fn writable(tensor: FlexTensor) -> FlexTensor {
    let whole = tensor.is_unique()
        && tensor
            .layout()
            .contiguous_offsets()
            .is_some_and(|(start, end)| start == 0 && end == tensor.layout().num_elements());
    if whole {
        tensor
    } else {
        let data = tensor.into_data();
        FlexTensor::from_data(data)
    }
}

/// `tensor`'s flex f32 primitive, sharing its buffer (`None` on another backend or dtype).
/// Once the caller drops `tensor`, the primitive is the buffer's only holder again.
fn flex_f32<const D: usize>(tensor: &Tensor<D>) -> Option<FlexTensor> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    tensor.clone().try_into_primitive::<Flex>().ok()
}

/// The flex primitives of a parameter, its gradient and its moments (with their step count),
/// sharing their buffers; `None` when one of them is not a flex f32 tensor of the parameter's
/// shape (burn's AdamW takes those), or the state is AMSGrad's.
type Primitives = (
    FlexTensor,
    FlexTensor,
    Option<(usize, FlexTensor, FlexTensor)>,
);

fn primitives<const D: usize>(
    tensor: &Tensor<D>,
    grad: &Tensor<D>,
    state: &Option<AdamWState<D>>,
) -> Option<Primitives> {
    let shape = tensor.shape();
    let moments = match state {
        None => None,
        Some(s) => {
            let m = &s.momentum;
            let same = m.moment_1.shape() == shape && m.moment_2.shape() == shape;
            if m.max_moment_2.is_some() || !same {
                return None;
            }
            Some((m.time, flex_f32(&m.moment_1)?, flex_f32(&m.moment_2)?))
        }
    };
    let g = flex_f32(grad).filter(|_| grad.shape() == shape)?;
    Some((flex_f32(tensor)?, g, moments))
}

/// The fused step on [`primitives`]' output: the parameter and its state.
fn fused<const D: usize>(
    adamw: &AdamW,
    lr: LearningRate,
    (p, g, moments): Primitives,
) -> (Tensor<D>, AdamWState<D>) {
    let time = moments.as_ref().map_or(0, |(time, _, _)| *time) + 1;
    let scalars = Scalars::new(adamw, lr, time);
    let g = g.to_contiguous();
    let mut p = writable(p);
    let first = moments.is_none();
    let (mut m, mut v) = match moments {
        Some((_, m, v)) => (writable(m), writable(v)),
        None => {
            let zeros = || FlexTensor::zeros(p.layout().shape().clone(), DType::F32);
            (zeros(), zeros())
        }
    };
    let n = p.layout().num_elements();
    // `writable` and `zeros` give buffers that start at the first element; a buffer may be
    // longer than its tensor, so each view is cut to `n`.
    let Some(gs) = g.as_slice::<f32>() else {
        unreachable!("to_contiguous gives a contiguous tensor")
    };
    let ps = &mut p.storage_mut::<f32>()[..n];
    let ms = &mut m.storage_mut::<f32>()[..n];
    let vs = &mut v.storage_mut::<f32>()[..n];
    ps.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| scalars.update_chunk(first, p, g, m, v));
    let state = AdamWState {
        momentum: AdaptiveMomentumState {
            time,
            moment_1: Tensor::from_primitive::<Flex>(m),
            moment_2: Tensor::from_primitive::<Flex>(v),
            max_moment_2: None,
        },
    };
    (Tensor::from_primitive::<Flex>(p), state)
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        match primitives(&tensor, &grad, &state) {
            Some(prims) => {
                // The primitives are then the only holders of these buffers: in place.
                drop((tensor, grad, state));
                let (tensor, state) = fused(self, lr, prims);
                (tensor, Some(state))
            }
            None => self.fallback.step(lr, tensor, grad, state),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        BurnAdamW::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    /// Asserts two tensors equal bit for bit, naming the first difference.
    fn same_bits<const D: usize>(ours: &Tensor<D>, theirs: &Tensor<D>, what: &str) {
        let values = |t: &Tensor<D>| t.to_data().try_to_vec::<f32>().expect("an f32 tensor");
        let (a, b) = (values(ours), values(theirs));
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!(
                "{what}: {differ} of {} values differ, first at {i}: {} vs {}",
                a.len(),
                a[i],
                b[i]
            );
        }
    }

    /// Steps burn's AdamW and the fused one side by side on the same gradients: parameters
    /// and both moments must agree bit for bit at every step, with and without weight decay,
    /// with the parameter uniquely held (in place) or shared (copied), on a tensor larger than
    /// one rayon chunk.
    #[test]
    fn the_fused_pass_is_burns_adamw_bit_for_bit() {
        let device = Device::flex();
        for (weight_decay, shared) in [(0.01, false), (0.0, false), (0.1, true)] {
            let ours = AdamW::new([0.9, 0.98], 1e-6, weight_decay);
            let theirs = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.98)
                .with_epsilon(1e-6)
                .with_weight_decay(weight_decay as f32)
                .build();
            let start = Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 0.5), &device);
            let (mut p_ours, mut p_theirs) = (start.clone(), start.clone());
            drop(start);
            let (mut s_ours, mut s_theirs) = (None, None);
            for step in 0..6 {
                let grad =
                    Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 1e-2), &device);
                let lr = 1e-3 * (1.0 + step as f64);
                let held = shared.then(|| p_ours.clone());
                let (p, s) = ours.step(lr, p_ours, grad.clone(), s_ours);
                (p_ours, s_ours) = (p, s);
                let (p, s) = theirs.step(lr, p_theirs, grad, s_theirs);
                (p_theirs, s_theirs) = (p, s);
                drop(held);
                same_bits(&p_ours, &p_theirs, &format!("parameter at step {step}"));
                let (Some(a), Some(b)) = (&s_ours, &s_theirs) else {
                    panic!("both optimizers keep a state");
                };
                assert_eq!(a.momentum.time, b.momentum.time);
                same_bits(&a.momentum.moment_1, &b.momentum.moment_1, "first moment");
                same_bits(&a.momentum.moment_2, &b.momentum.moment_2, "second moment");
            }
        }
    }

    /// A parameter held elsewhere (a model clone) keeps its values: the step writes a copy.
    #[test]
    fn a_shared_parameter_is_not_written_in_place() {
        let device = Device::flex();
        let p = Tensor::<1>::from_data(TensorData::from([1.0f32, -2.0, 3.0]), &device);
        let held = p.clone();
        let grad = Tensor::<1>::from_data(TensorData::from([0.5f32, 0.5, -0.5]), &device);
        let (updated, _) = AdamW::new([0.9, 0.999], 1e-8, 0.0).step(0.1, p, grad, None);
        assert_eq!(
            held.to_data().try_to_vec::<f32>().ok(),
            Some(vec![1.0, -2.0, 3.0])
        );
        let moved = updated.to_data().try_to_vec::<f32>().expect("f32");
        assert_eq!(moved.len(), 3);
        // Adam's first step moves each weight by lr against its gradient's sign.
        for (after, before) in moved.iter().zip([1.0f32, -2.0, 3.0]) {
            assert!((before - after).abs() > 0.09, "{before} -> {after}");
        }
    }
}
