//! Dropout with a counter-based random stream.
//!
//! burn's `Dropout` draws its Bernoulli mask from the device RNG (ChaCha, one element at a
//! time); on the CPU backend that took ~14% of a training step of the benchmarks' small model.
//! This one draws the mask from a splitmix64 hash of (stream seed, call number, element index):
//! several times cheaper, and still a pure function of the seed that the trainer sets each step
//! ([`seed_dropout`]), so resumed runs see the same masks. Active only on autodiff devices, as
//! burn's is; evaluation (`Module::valid`) has none.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::Module;
use burn::tensor::{FloatDType, Tensor, TensorData};

static STREAM_SEED: AtomicU64 = AtomicU64::new(0x5EED);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Starts a new dropout stream: the masks that follow depend only on `seed` and their order.
pub fn seed_dropout(seed: u64) {
    STREAM_SEED.store(seed, Ordering::SeqCst);
    CALLS.store(0, Ordering::SeqCst);
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if self.prob == 0.0 || !input.device().is_autodiff() {
            return input;
        }
        let shape = input.shape();
        let n = shape.num_elements();
        let call = CALLS.fetch_add(1, Ordering::SeqCst);
        let key = splitmix64(STREAM_SEED.load(Ordering::SeqCst) ^ splitmix64(call));
        let keep = 1.0 - self.prob;
        let threshold = (keep * (1u64 << 32) as f64) as u64;
        let scale = (1.0 / keep) as f32;
        // Two 32-bit draws per hash.
        let mut mask = Vec::with_capacity(n);
        for i in 0..n.div_ceil(2) {
            let h = splitmix64(key ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for half in [h & 0xFFFF_FFFF, h >> 32] {
                if mask.len() < n {
                    mask.push(if half < threshold { scale } else { 0.0 });
                }
            }
        }
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &input.device());
        // In the input's dtype under mixed precision (a no-op cast otherwise).
        let dtype = FloatDType::from(input.dtype());
        input * mask.cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn rate_scale_determinism_and_eval_passthrough() {
        let device = Device::flex().autodiff();
        let dropout = MlmDropout::new(0.1);
        let x = Tensor::<2>::ones([200, 500], &device);
        seed_dropout(3);
        let a: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        seed_dropout(3);
        let b: Vec<f32> = dropout.forward(x.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = dropout.forward(x).into_data().try_to_vec().unwrap();
        assert_ne!(a, c, "the next call draws a new mask");
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        let out: Vec<f32> = dropout.forward(plain).into_data().try_to_vec().unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }
}
