//! Forward + backward time of ModernBERT's sliding-window attention on the CPU backend (flex),
//! at ModernBERT-base's head shape, for `BENCHMARKS.md`:
//!
//! - `windowed`: the fused band kernel (`cpu_ops::attention_windowed`), O(seq * window);
//! - `dense kernel`: the fused dense kernel (`cpu_ops::attention`, padding mask only): what
//!   any O(seq^2) fused attention costs;
//! - `composite`: burn's ops on the dense scores with HF's `[batch, 1, seq, seq]` window mask,
//!   as a model without the kernel computes it.
//!
//! ```text
//! cargo build --release --workspace --example bench_window && \
//!     target/release/examples/bench_window --batch 4 --window 128
//! ```
//! Each cell is the median of 3 runs, the three paths alternating (after one warm-up each).
//! `--max-composite-seq N` / `--max-dense-seq N` skip those paths above N (the composite holds
//! several `[batch, heads, seq, seq]` tensors: ~5 GB at 2048); `--seqs 512,4096` picks lengths.

use std::time::{Duration, Instant};

// The kernels are crate-private: compile them into the benchmark, as `masklm`'s bench does
// with the CLI's backend module.
#[allow(dead_code, unused_imports)]
#[path = "../src/cpu_ops/mod.rs"]
mod cpu_ops;

use burn::tensor::{Device, Tensor};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Windowed,
    DenseKernel,
    Composite,
}

/// Pseudo-random values in [-3, 3).
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

/// One forward + backward of `path`; the inputs are made before the clock starts.
fn time(path: Path, [batch, seq, heads, d]: [usize; 4], window: usize) -> Duration {
    let device = Device::flex().autodiff();
    let plain = Device::flex();
    let hidden = heads * d;
    let n = batch * seq * hidden;
    let input = |seed| {
        random(n, seed, &device)
            .reshape([batch, seq, hidden])
            .require_grad()
    };
    let (q, k, v) = (input(1), input(2), input(3));
    let upstream = random(n, 4, &plain).reshape([batch, seq, hidden]) * 0.01;
    let key_bias = Tensor::<4>::zeros([batch, 1, 1, seq], &device);
    let window_bias = (path == Path::Composite).then(|| {
        let half = window / 2;
        let bias: Vec<f32> = (0..seq * seq)
            .map(|t| {
                if (t / seq).abs_diff(t % seq) <= half {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        Tensor::<1>::from_floats(bias.as_slice(), &plain).reshape([1, 1, seq, seq])
    });
    let start = Instant::now();
    let context = match path {
        Path::Windowed => {
            cpu_ops::attention_windowed(&q, &k, &v, heads, (&key_bias, None), window, None)
                .expect("f32 flex")
        }
        Path::DenseKernel => {
            cpu_ops::attention(&q, &k, &v, heads, &key_bias, None, None).expect("f32 flex")
        }
        Path::Composite => {
            let split = |t: Tensor<3>| t.reshape([batch, seq, heads, d]).swap_dims(1, 2);
            let scores =
                split(q.clone()).matmul(split(k.clone()).swap_dims(2, 3)) / (d as f64).sqrt();
            let bias = window_bias.expect("made for the composite");
            let p = burn::tensor::activation::softmax(scores + bias, 3);
            p.matmul(split(v.clone()))
                .swap_dims(1, 2)
                .reshape([batch, seq, hidden])
        }
    };
    let grads = (context * upstream).sum().backward();
    for t in [&q, &k, &v] {
        let _ = t.grad(&grads).expect("a gradient").into_data();
    }
    start.elapsed()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let (batch, heads, d) = (arg("--batch", 4), arg("--heads", 12), arg("--head-dim", 64));
    let window = arg("--window", 128);
    let max_composite = arg("--max-composite-seq", usize::MAX);
    let max_dense = arg("--max-dense-seq", usize::MAX);
    let threads = rayon::current_num_threads();
    println!(
        "sliding-window attention, forward + backward, batch {batch}, {heads} heads x {d}, \
         local_attention {window}, {threads} rayon threads; median of 3 (ms)"
    );
    println!("| seq | windowed | dense kernel | composite (window mask) | windowed / seq (us) |");
    println!("|---:|---:|---:|---:|---:|");
    let seqs: Vec<usize> = match std::env::args().position(|a| a == "--seqs") {
        Some(i) => std::env::args()
            .nth(i + 1)
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect(),
        None => vec![128, 512, 1024, 2048],
    };
    for seq in seqs {
        let shape = [batch, seq, heads, d];
        let paths: Vec<Path> = [Path::Windowed, Path::DenseKernel, Path::Composite]
            .into_iter()
            .filter(|&p| p != Path::Composite || seq <= max_composite)
            .filter(|&p| p != Path::DenseKernel || seq <= max_dense)
            .collect();
        for &p in &paths {
            time(p, shape, window);
        }
        let mut times = vec![Vec::new(); 3];
        for _ in 0..3 {
            for &p in &paths {
                times[p as usize].push(time(p, shape, window));
            }
        }
        let mut ms = |p: Path| {
            let t = std::mem::take(&mut times[p as usize]);
            if t.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", median(t).as_secs_f64() * 1e3)
            }
        };
        let (w, dense, composite) = (
            ms(Path::Windowed),
            ms(Path::DenseKernel),
            ms(Path::Composite),
        );
        let per_token = w
            .parse::<f64>()
            .map(|w| w * 1e3 / seq as f64)
            .unwrap_or(f64::NAN);
        println!("| {seq} | {w} | {dense} | {composite} | {per_token:.1} |");
    }
}
