//! Dropout whose masks are drawn where the activations live.
//!
//! - On the CPU backend (flex), whose activations are in host memory, the mask comes from a
//!   splitmix64 hash of (stream seed, call number, element index) in a host loop: several times
//!   cheaper than burn's `Dropout` there (ChaCha one element at a time, ~14% of a CPU step).
//! - On every other device (wgpu, CUDA, libtorch) it is the device's own Bernoulli generator
//!   (`Tensor::random`, one kernel), seeded by [`seed_dropout`]: nothing is built on the host
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

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::Module;
use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use masklm_splitmix::splitmix64;
use rayon::prelude::*;

static STREAM_SEED: AtomicU64 = AtomicU64::new(0x5EED);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Starts a new dropout stream on `device`: the masks that follow depend only on `seed` and
/// their order. Seeds the device's generator too, which on some backends is process-wide.
pub fn seed_dropout(seed: u64, device: &Device) {
    STREAM_SEED.store(seed, Ordering::SeqCst);
    CALLS.store(0, Ordering::SeqCst);
    if !host_resident(device) {
        device.seed(seed);
    }
}

/// Whether `device` keeps its tensors in host memory (the flex CPU backend), where a mask
/// written by a host loop costs no transfer.
fn host_resident(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// The 0 / `1 / keep` mask of `n` elements for dropout call `call`, from the host hash, drawn
/// in chunks across rayon's workers (each element depends only on its index).
fn host_mask(n: usize, call: u64, keep: f64) -> Vec<f32> {
    host_mask_of(STREAM_SEED.load(Ordering::SeqCst), n, call, keep)
}

/// [`host_mask`] for an explicit stream seed.
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
}

impl MlmDropout {
    pub fn new(prob: f64) -> Self {
        Self { prob }
    }

    /// Whether this dropout changes its input: a non-zero rate on an autodiff device.
    pub fn active(&self, device: &Device) -> bool {
        self.prob > 0.0 && device.is_autodiff()
    }

    /// The next host mask of `n` elements (what [`Self::forward`] would multiply an active,
    /// host-resident `n`-element input by): for fused CPU kernels that apply the mask
    /// themselves. The stream advances exactly as one `forward` call would.
    pub(crate) fn draw_host_mask(&self, n: usize) -> Vec<f32> {
        let call = CALLS.fetch_add(1, Ordering::SeqCst);
        host_mask(n, call, 1.0 - self.prob)
    }

    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let device = input.device();
        if !self.active(&device) {
            return input;
        }
        let shape = input.shape();
        let keep = 1.0 - self.prob;
        let call = CALLS.fetch_add(1, Ordering::SeqCst);
        if host_resident(&device) {
            return crate::cpu_ops::mul_constant(
                input,
                host_mask(shape.num_elements(), call, keep),
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
        let dropout = MlmDropout::new(0.1);
        let x = Tensor::<2>::ones([200, 500], &device);
        seed_dropout(3, &device);
        let a: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        seed_dropout(3, &device);
        let b: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = dropout.forward(x).into_data().try_to_vec().unwrap();
        assert_ne!(a, c, "the next call draws a new mask");
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        let out: Vec<f32> = dropout.forward(plain).into_data().try_to_vec().unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }
}
