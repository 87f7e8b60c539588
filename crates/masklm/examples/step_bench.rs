//! Times one MLM training step (forward + loss + backward, no optimizer) on the default CPU
//! backend, for comparing burn feature sets such as `x86-v4`.
//!
//! Shape: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 8192, seq 128, batch 16, 15% of
//! tokens masked (the benchmarks' "small" config).
//!
//! ```text
//! cargo run --release -p masklm --example step_bench [-- STEPS]
//! cargo run --release -p masklm --features x86-v4 --example step_bench [-- STEPS]
//! ```

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use masklm_model::{RobertaConfig, RobertaForMaskedLM, mlm_loss};

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let config = RobertaConfig {
        vocab_size: 8192,
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 1024,
        max_position_embeddings: 130,
        ..RobertaConfig::default()
    };
    let (batch, seq) = (16, 128);
    let device = Device::flex().autodiff();
    device.seed(0);
    let model = RobertaForMaskedLM::new(&config, &device).expect("valid config");

    let ids = Tensor::<2, Int>::random([batch, seq], Distribution::Uniform(5.0, 8000.0), &device);
    let mask = Tensor::<2, Int>::ones([batch, seq], &device);
    let masked = batch * seq * 15 / 100;
    let positions: Vec<i64> = (0..masked).map(|i| (i * 100 / 15) as i64).collect();
    let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [masked]), &device);
    let labels = Tensor::<1, Int>::random([masked], Distribution::Uniform(5.0, 8000.0), &device);

    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let start = Instant::now();
        let logits = model.forward_at(ids.clone(), mask.clone(), positions.clone());
        let loss = mlm_loss(logits, labels.clone());
        let _grads = loss.backward();
        device.sync().expect("device sync");
        // The first two steps warm allocators and caches.
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "x86-v4: {}  steps: {steps}  median step: {:.1} ms  min: {:.1} ms  tokens/s (fwd+bwd): {:.0}",
        cfg!(feature = "x86-v4"),
        median * 1e3,
        times[0] * 1e3,
        (batch * seq) as f64 / median
    );
}
