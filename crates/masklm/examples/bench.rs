//! Training and evaluation throughput of masklm on one model shape, for `scripts/bench.sh`.
//!
//! A full optimizer step as `masklm train` runs it (`train_step`: forward at masked positions,
//! loss, backward, global-norm clipping, AdamW with HF groups), on batches masked by the
//! collator (15%, 80/10/10) from random token ids; then forward-only evaluation batches.
//!
//! ```text
//! cargo run --release -p masklm --example bench -- \
//!     --hidden 256 --layers 4 --heads 4 --ffn 1024 --vocab 8192 --seq 128 --batch 16 --steps 20
//! ```
//! Prints `MASKLM_BENCH train_tps=... eval_tps=... rss_mb=... params=...`. `--backend wgpu|tch`
//! (and `--device`) run it on an optional backend, in a build with that feature;
//! `--attention eager` turns the fused attention kernel off (it runs wherever attention
//! dropout is inactive: here, evaluation). `--model-type modernbert` benchmarks ModernBERT
//! (`--ffn` is its `intermediate_size`; `--window` its `local_attention`, default 128;
//! `--global-every` its `global_attn_every_n_layers`, default 3). `--gradient-checkpointing`
//! trains with `[training] gradient_checkpointing = true`; `--eval-steps 0` skips evaluation
//! (so that `rss_mb`, the process's peak, is the training's).

use std::time::Instant;

// The CLI's own backend selection, so the benchmark picks devices exactly as `masklm` does.
#[path = "../src/backend.rs"]
mod backend;

use burn::module::Module;
use burn::tensor::Device;
use masklm_data::{MaskVocab, MaskingConfig, collate, mask_tokens};
use masklm_model::{AttentionImpl, MaskedLm, ModelConfig, ModernBertConfig, RobertaConfig};
use masklm_train::{LossScaler, OptimizerConfig, OptimizerName, Precision, train_step};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let (hidden, layers, heads, ffn) = (
        arg("--hidden", 256),
        arg("--layers", 4),
        arg("--heads", 4),
        arg("--ffn", 1024),
    );
    let (vocab, seq, batch, steps) = (
        arg("--vocab", 8192),
        arg("--seq", 128),
        arg("--batch", 16),
        arg("--steps", 20),
    );
    let config: ModelConfig = match text_arg("--model-type").as_deref() {
        None | Some("roberta") => RobertaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            max_position_embeddings: seq + 2,
            type_vocab_size: 1,
            layer_norm_eps: 1e-5,
            ..RobertaConfig::default()
        }
        .into(),
        // The special ids of the batches below (<s> 0, <pad> 1, </s> 2).
        Some("modernbert") => ModernBertConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            max_position_embeddings: seq.max(512),
            local_attention: arg("--window", 128),
            global_attn_every_n_layers: Some(arg("--global-every", 3)),
            pad_token_id: 1,
            bos_token_id: Some(0),
            cls_token_id: Some(0),
            sep_token_id: Some(2),
            eos_token_id: None,
            ..ModernBertConfig::default()
        }
        .resolved()
        .into(),
        Some(other) => {
            eprintln!("bench: --model-type {other}: expected roberta or modernbert");
            std::process::exit(2);
        }
    };
    let name = text_arg("--backend").unwrap_or_else(|| "cpu".to_string());
    let Ok(choice) = <backend::Backend as clap::ValueEnum>::from_str(&name, true) else {
        eprintln!("bench: unknown --backend {name}");
        std::process::exit(2);
    };
    let device: Device = match backend::device(choice, text_arg("--device").as_deref()) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let ad = device.clone().autodiff();
    ad.seed(0);
    let attention = match text_arg("--attention").as_deref() {
        None | Some("auto") => AttentionImpl::Auto,
        Some("eager") => AttentionImpl::Eager,
        Some(other) => {
            eprintln!("bench: --attention {other}: expected auto or eager");
            std::process::exit(2);
        }
    };
    let checkpointing = std::env::args().any(|a| a == "--gradient-checkpointing");
    let mut model = MaskedLm::new(&config, &ad)
        .expect("valid shape")
        .with_attention(attention)
        .with_gradient_checkpointing(checkpointing);
    let params = model.num_params();
    let optim_config = OptimizerConfig {
        name: OptimizerName::Adamw,
        lr: 1e-4,
        betas: [0.9, 0.98],
        eps: 1e-6,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
    };
    let mut optimizer = optim_config.build(&model);
    let mut tokens: Vec<Option<String>> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
    tokens.extend((5..vocab).map(|i| Some(format!("Ġt{i}"))));
    let words = masklm_data::WordBoundary::StartMarkers(vec!['Ġ']);
    let mask_vocab = MaskVocab::new(&tokens, &[0, 1, 2, 3, 4], 4, 1, &words).expect("vocab");
    let masking = MaskingConfig::default();
    // Deterministic pseudo-random blocks <s> ... </s>.
    let mut state = 12345u64;
    let mut make_batch = |step: usize, device: &Device| {
        let examples: Vec<_> = (0..batch)
            .map(|b| {
                let mut block = vec![0u32];
                block.extend((0..seq - 2).map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    5 + ((state >> 33) as u32) % (vocab as u32 - 5)
                }));
                block.push(2);
                mask_tokens(
                    &block,
                    &mask_vocab,
                    &masking,
                    0,
                    0,
                    (step * batch + b) as u64,
                )
            })
            .collect();
        collate(&examples, 1, device).expect("non-empty batch")
    };

    let precision = match text_arg("--precision").as_deref() {
        None | Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16,
        Some("f16") => Precision::F16,
        Some(other) => {
            eprintln!("bench: --precision {other}: expected f32, bf16 or f16");
            std::process::exit(2);
        }
    };
    if let Err(e) = precision.check(&device) {
        eprintln!(
            "bench: --precision {} is not supported here: {e}",
            precision.name()
        );
        std::process::exit(2);
    }
    let mut scaler = LossScaler::default();
    let warmup = arg("--warmup", 3);
    let mut start = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            start = Instant::now();
        }
        let b = make_batch(step, &ad);
        let (next_model, _) = train_step(
            model,
            &mut optimizer,
            std::slice::from_ref(&b),
            1e-4,
            1.0,
            precision,
            &mut scaler,
        );
        model = next_model;
    }
    let train_tps = (steps * batch * seq) as f64 / start.elapsed().as_secs_f64();

    // Evaluation: forward at masked positions, cross-entropy and argmax, no autodiff.
    let eval_model = model.valid();
    let eval_steps = arg("--eval-steps", steps);
    let warmup = if eval_steps == 0 { 0 } else { warmup };
    let mut start = Instant::now();
    for step in 0..warmup + eval_steps {
        if step == warmup {
            start = Instant::now();
        }
        let b = make_batch(10_000 + step, &device);
        let logits = eval_model.forward_at(b.input_ids, b.attention_mask, b.positions);
        let loss = masklm_model::mlm_loss(logits.clone(), b.labels);
        let _ = loss.into_scalar::<f32>();
        let _ = logits.argmax(1).into_data();
    }
    let eval_tps = (eval_steps * batch * seq) as f64 / start.elapsed().as_secs_f64();
    println!(
        "MASKLM_BENCH train_tps={train_tps:.1} eval_tps={eval_tps:.1} rss_mb={:.0} params={params}",
        peak_rss_mb()
    );
}
