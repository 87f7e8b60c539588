//! Dropout whose masks are drawn where the activations live, identically on every backend.
//!
//! Element `i` of the `c`-th dropout call after [`seed_dropout`]`(seed)` is kept when
//! `hash32(i ^ key(seed, c)) >> 1 < keep * 2^31`, with `hash32` Chris Wellons' `lowbias32`
//! integer hash. That is a pure function of (seed, call, index), so resumed runs see the same
//! masks, and it uses only 32-bit wrapping multiplies, xors, logical shifts and masks, so it is
//! computed bit for bit alike
//!
//! - on the CPU backend, whose activations are in host memory: a Rust loop writes the mask;
//! - on any other device (wgpu, CUDA, libtorch): int tensor ops on the device itself, so no
//!   mask is built on the host and uploaded per call (that was ~80% of a GPU training step).
//!
//! burn's own `Dropout` draws from each backend's RNG (different streams per backend, and
//! ChaCha one element at a time on the CPU: ~14% of a CPU step). Active only on autodiff
//! devices, as burn's is; evaluation (`Module::valid`) has none.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

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

const M1: u32 = 0x7feb_352d;
const M2: u32 = 0x846c_a68b;

/// `lowbias32` (https://nullprogram.com/blog/2018/07/31/): a bijective 32-bit hash.
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(M1);
    x ^= x >> 15;
    x = x.wrapping_mul(M2);
    x ^ (x >> 16)
}

/// [`hash32`] of every element of `x`, as int tensor ops. `x` holds 32-bit patterns: in
/// `[0, 2^32)` when the device's ints are 64-bit (`wide`), or as the same bits in an i32. Right
/// shifts are masked to be logical on signed ints; products keep their low 32 bits (i32 wraps,
/// i64 is masked), so both widths give the same bits.
fn hash32_tensor<const D: usize>(x: Tensor<D, Int>, wide: bool) -> Tensor<D, Int> {
    let low32 = |t: Tensor<D, Int>| {
        if wide {
            t.bitwise_and_scalar(0xFFFF_FFFFi64)
        } else {
            t
        }
    };
    let shift_xor = |t: Tensor<D, Int>, k: u32| {
        let shifted = t
            .clone()
            .bitwise_right_shift_scalar(k as i64)
            .bitwise_and_scalar(((1u64 << (32 - k)) - 1) as i64);
        t.bitwise_xor(shifted)
    };
    // The multipliers as signed 32-bit values fit every int width; their products have the
    // same low 32 bits as the unsigned ones.
    let x = shift_xor(x, 16);
    let x = low32(x.mul_scalar(M1 as i32 as i64));
    let x = shift_xor(x, 15);
    let x = low32(x.mul_scalar(M2 as i32 as i64));
    shift_xor(x, 16)
}

/// The next call's 32-bit key.
fn next_key() -> u32 {
    let call = CALLS.fetch_add(1, Ordering::SeqCst);
    splitmix64(STREAM_SEED.load(Ordering::SeqCst) ^ splitmix64(call)) as u32
}

/// The keep threshold on the top 31 bits of a hash: `keep * 2^31`.
fn threshold31(keep: f64) -> u32 {
    (keep * (1u64 << 31) as f64).round().min(((1u64 << 31) - 1) as f64) as u32
}

/// Whether the device's activations live in host memory (the CPU backend), so a mask written
/// by a host loop costs no transfer and beats ~15 passes of int tensor ops.
fn host_resident(device: &Device) -> bool {
    *device == Device::flex() || *device == Device::flex().autodiff()
}

/// The 0/`scale` mask of `n` elements under `key`, on the host.
fn host_mask(n: usize, key: u32, threshold: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if hash32(i as u32 ^ key) >> 1 < threshold {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// The same mask as [`host_mask`], computed with int tensor ops on `device`.
fn device_mask<const D: usize>(
    shape: burn::tensor::Shape,
    key: u32,
    threshold: u32,
    scale: f32,
    device: &Device,
) -> Tensor<D> {
    let n = shape.num_elements();
    let index = Tensor::<1, Int>::arange(0..n as i64, device);
    let wide = matches!(index.dtype(), DType::I64 | DType::U64);
    let keyed = if wide {
        index.bitwise_xor_scalar(key as i64)
    } else {
        index.bitwise_xor_scalar(key as i32 as i64)
    };
    let top31 = hash32_tensor(keyed, wide)
        .bitwise_right_shift_scalar(1)
        .bitwise_and_scalar(0x7FFF_FFFFi64);
    top31
        .lower_elem(threshold as i64)
        .float()
        .mul_scalar(scale)
        .reshape(shape)
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
        let device = input.device();
        if self.prob == 0.0 || !device.is_autodiff() {
            return input;
        }
        let shape = input.shape();
        let keep = 1.0 - self.prob;
        let (key, threshold, scale) = (next_key(), threshold31(keep), (1.0 / keep) as f32);
        let mask = if host_resident(&device) {
            let values = host_mask(shape.num_elements(), key, threshold, scale);
            Tensor::<D>::from_data(TensorData::new(values, shape), &device)
        } else {
            device_mask::<D>(shape, key, threshold, scale, &device)
        };
        // In the input's dtype under mixed precision (a no-op cast otherwise).
        let dtype = FloatDType::from(input.dtype());
        input * mask.cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Masks of successive calls are independent: overlap of dropped sets ~ 0.1 * 0.1.
        let both = a
            .iter()
            .zip(&c)
            .filter(|(x, y)| **x == 0.0 && **y == 0.0)
            .count() as f64
            / a.len() as f64;
        assert!((both - 0.01).abs() < 0.002, "dropped in both calls: {both}");
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        let out: Vec<f32> = dropout.forward(plain).into_data().try_to_vec().unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn the_tensor_hash_equals_the_host_hash_bit_for_bit() {
        // The device path, run here on the CPU backend's int tensors (64-bit), must give the
        // host loop's mask exactly; tests/backends.rs checks the 32-bit-int backends (wgpu).
        let device = Device::flex();
        let shape = burn::tensor::Shape::new([3, 7, 1000]);
        for (key, keep) in [(0u32, 0.9), (0xDEAD_BEEF, 0.9), (0x8000_0001, 0.5), (u32::MAX, 0.25)] {
            let threshold = threshold31(keep);
            let scale = (1.0 / keep) as f32;
            let host = host_mask(shape.num_elements(), key, threshold, scale);
            let tensor: Vec<f32> = device_mask::<3>(shape.clone(), key, threshold, scale, &device)
                .into_data()
                .try_to_vec()
                .unwrap();
            assert_eq!(host, tensor, "key {key:#x}");
        }
        // lowbias32 as computed independently (Python, arbitrary precision, masked to 32 bits).
        assert_eq!(hash32(0), 0);
        assert_eq!(hash32(1), 0x6889_90c0);
        assert_eq!(hash32(12345), 0x912e_fcf7);
    }
}
