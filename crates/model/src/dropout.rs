//! Dropout whose masks are drawn where the activations live.
//!
//! - On the CPU backend (flex), whose activations are in host memory, the mask comes from a
//!   splitmix64 hash of (stream seed, call number, element index) in a host loop: several times
//!   cheaper than burn's `Dropout` there (ChaCha one element at a time, ~14% of a CPU step).
//! - On every other device (wgpu, CUDA, libtorch) it is the device's own Bernoulli generator
//!   (`Tensor::random`, one kernel), seeded by [`DropoutStream::seed`]: nothing is built on the host
//!   and uploaded per call. A host-built mask was ~80% of a GPU training step; an integer hash
//!   in int tensor ops (~15 elementwise passes per call) was tried and was far slower on
//!   lavapipe (session 3, commit c0bc080).
//!
//! Either way a mask is a pure function of the seed the trainer sets each step and of the
//! order of the calls after it, so a resumed run sees the masks the uninterrupted run saw. The
//! price of the device generator: the same seed draws *different* masks on different backends
//! (each has its own generator), so runs with dropout agree across backends in distribution,
//! not bit for bit; with dropout 0 they agree to float rounding (tests/backends.rs).
//!
//! Active only on autodiff devices, as burn's is; evaluation (`Module::valid`) has none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::Module;
use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use masklm_splitmix::splitmix64;
use rayon::prelude::*;

/// The random stream one model's dropout masks come from: a seed and the number of masks
/// drawn since it was set. Every [`MlmDropout`] of a model shares its model's stream (an
/// `Arc`, kept through `clone`, `valid`, `fork` and the mixed-precision view), so two models
/// (two runs in one process, a test beside a run) never disturb each other's masks, and a
/// resumed run sees exactly the masks its uninterrupted self saw.
///
/// Off the CPU backend the masks come from the device's own generator, which
/// [`DropoutStream::seed`] seeds too; on backends where that generator is process-wide (wgpu,
/// libtorch), two models training at once on one such device do share it.
#[derive(Debug)]
pub struct DropoutStream {
    seed: AtomicU64,
    calls: AtomicU64,
}

impl Default for DropoutStream {
    fn default() -> Self {
        Self {
            seed: AtomicU64::new(0x5EED),
            calls: AtomicU64::new(0),
        }
    }
}

impl DropoutStream {
    /// A new stream, to be shared by the dropouts of one model.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts the stream over on `device`: the masks that follow depend only on `seed` and
    /// their order.
    pub fn seed(&self, seed: u64, device: &Device) {
        self.seed.store(seed, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
        if !host_resident(device) {
            device.seed(seed);
        }
    }

    /// The number of the next mask: where a replay of what follows must start
    /// ([`Self::replay_from`]).
    pub(crate) fn position(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes the masks drawn next those drawn after [`Self::position`] gave `call`: the host
    /// masks are a function of (seed, call) already; a device's generator is reseeded from
    /// both, so each replay point must also be passed here before its first draw (gradient
    /// checkpointing marks one per layer and replays each layer's masks in its recomputation).
    pub(crate) fn replay_from(&self, call: u64, device: &Device) {
        self.calls.store(call, Ordering::SeqCst);
        if device.is_autodiff() && !host_resident(device) {
            let seed = self.seed.load(Ordering::SeqCst);
            device.seed(splitmix64(seed ^ splitmix64(call ^ 0xC4EC_4901)));
        }
    }

    /// The seed and number of the next mask.
    fn next_call(&self) -> (u64, u64) {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        (self.seed.load(Ordering::SeqCst), call)
    }
}

/// Whether `device` keeps its tensors in host memory (the flex CPU backend), where a mask
/// written by a host loop costs no transfer.
fn host_resident(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// The 0 / `1 / keep` mask of `n` elements for dropout call `call` of stream `seed`, from the
/// host hash, drawn in chunks across rayon's workers (each element depends only on its index).
fn host_mask_of(seed: u64, n: usize, call: u64, keep: f64) -> Vec<f32> {
    // Two 32-bit draws per hash: element i is half (i % 2) of hash i / 2.
    const CHUNK: usize = 1 << 14;
    let key = splitmix64(seed ^ splitmix64(call));
    let threshold = (keep * (1u64 << 32) as f64) as u64;
    let scale = (1.0 / keep) as f32;
    let mut mask = Vec::with_capacity(n);
    mask.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first_pair = c * CHUNK / 2;
            for (j, pair) in chunk.chunks_mut(2).enumerate() {
                let i = (first_pair + j) as u64;
                let h = splitmix64(key ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
                for (m, half) in pair.iter_mut().zip([h & 0xFFFF_FFFF, h >> 32]) {
                    m.write(if half < threshold { scale } else { 0.0 });
                }
            }
        });
    // SAFETY: every element of every chunk was written above.
    unsafe { mask.set_len(n) };
    mask
}

/// Inverted dropout: zeroes each element with probability `prob` and scales the rest by
/// `1 / (1 - prob)`, as `torch.nn.Dropout` in training.
#[derive(Module, Debug)]
pub struct MlmDropout {
    pub prob: f64,
    /// The model's stream, shared by all its dropouts.
    #[module(skip)]
    pub stream: Arc<DropoutStream>,
}

impl MlmDropout {
    /// A dropout of rate `prob` drawing from `stream` (its model's).
    pub fn new(prob: f64, stream: &Arc<DropoutStream>) -> Self {
        Self {
            prob,
            stream: stream.clone(),
        }
    }

    /// Whether this dropout changes its input: a non-zero rate on an autodiff device.
    pub fn active(&self, device: &Device) -> bool {
        self.prob > 0.0 && device.is_autodiff()
    }

    /// The next host mask of `n` elements (what [`Self::forward`] would multiply an active,
    /// host-resident `n`-element input by): for fused CPU kernels that apply the mask
    /// themselves. The stream advances exactly as one `forward` call would.
    pub(crate) fn draw_host_mask(&self, n: usize) -> Vec<f32> {
        let (seed, call) = self.stream.next_call();
        host_mask_of(seed, n, call, 1.0 - self.prob)
    }

    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let device = input.device();
        if !self.active(&device) {
            return input;
        }
        let shape = input.shape();
        let keep = 1.0 - self.prob;
        let (seed, call) = self.stream.next_call();
        if host_resident(&device) {
            return crate::cpu_ops::mul_constant(
                input,
                host_mask_of(seed, shape.num_elements(), call, keep),
            );
        }
        // The mask needs no gradient: draw it off the autodiff graph.
        let plain = device.clone().without_autodiff();
        let mask = Tensor::<D>::random(shape, Distribution::Bernoulli(keep), &plain) * (1.0 / keep);
        // A plain tensor times an autodiff one is a constant factor in the graph; in the
        // input's dtype under mixed precision (a no-op cast otherwise).
        let dtype = FloatDType::from(input.dtype());
        input * mask.cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The mask's definition, one element at a time: element i is half (i % 2) of
    /// splitmix64(key ^ (i / 2) * odd constant). The chunked, parallel `host_mask` must equal it
    /// bit for bit (runs resumed across versions see the same masks), including odd lengths
    /// and lengths that end mid-chunk.
    #[test]
    fn parallel_mask_equals_its_serial_definition() {
        for n in [1, 2, 3, 16_383, 16_384, 16_385, 100_001] {
            let key = splitmix64(11 ^ splitmix64(5));
            let threshold = (0.9 * (1u64 << 32) as f64) as u64;
            let serial: Vec<f32> = (0..n)
                .map(|i| {
                    let h = splitmix64(key ^ ((i / 2) as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                    let half = if i % 2 == 0 { h & 0xFFFF_FFFF } else { h >> 32 };
                    if half < threshold {
                        (1.0 / 0.9f64) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let parallel = host_mask_of(11, n, 5, 0.9);
            assert_eq!(parallel.len(), n);
            let first_difference = parallel.iter().zip(&serial).position(|(a, b)| a != b);
            assert_eq!(first_difference, None, "n = {n}");
        }
    }

    #[test]
    fn rate_scale_determinism_and_eval_passthrough() {
        let device = Device::flex().autodiff();
        let stream = DropoutStream::shared();
        let dropout = MlmDropout::new(0.1, &stream);
        let x = Tensor::<2>::ones([200, 500], &device);
        stream.seed(3, &device);
        let a: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        stream.seed(3, &device);
        let b: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = dropout.forward(x).into_data().try_to_vec().unwrap();
        assert_ne!(a, c, "the next call draws a new mask");
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        let out: Vec<f32> = dropout.forward(plain).into_data().try_to_vec().unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn each_model_has_its_own_stream() {
        // Two models' dropouts: drawing from one must not move the other (the bug of a
        // process-wide stream: two runs in one process broke each other's exact resume).
        let device = Device::flex().autodiff();
        let (one, two) = (DropoutStream::shared(), DropoutStream::shared());
        let (a, b) = (MlmDropout::new(0.5, &one), MlmDropout::new(0.5, &two));
        let x = Tensor::<2>::ones([64, 64], &device);
        let draw =
            |d: &MlmDropout| -> Vec<f32> { d.forward(x.clone()).into_data().try_to_vec().unwrap() };
        one.seed(7, &device);
        two.seed(7, &device);
        let first = draw(&a);
        let _ = draw(&b);
        let _ = draw(&b);
        two.seed(7, &device);
        assert_eq!(draw(&b), first, "the same seed, its own first mask");
        one.seed(7, &device);
        let _ = draw(&b);
        assert_eq!(
            draw(&a),
            first,
            "another model's draws do not advance this stream"
        );
        // A clone of the module (what valid(), fork() and autocast make) shares the stream.
        let clone = a.clone();
        one.seed(7, &device);
        let _ = draw(&clone);
        assert_ne!(draw(&a), first, "a clone draws from the same stream");
    }
}
