//! Gradient checkpointing (`[training] gradient_checkpointing = true`, transformers'
//! `gradient_checkpointing_enable()`): the same gradients as the full backward, for every
//! family, with dropout on (each layer's recomputation must replay the masks of its first pass)
//! and off, on padded and on packed batches; and a training run with it that resumes exactly
//! and follows the run without it.
//!
//! The baseline is the model's own full backward, whose gradients tests/model_parity.rs and
//! tests/modernbert_parity.rs check against transformers (fixtures from
//! scripts/make_reference.py); checkpointing must not move them (1e-6 of each parameter's
//! largest gradient).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use masklm_model::{BatchMask, MaskedLm, mlm_loss};

/// The fixture model `name` with every dropout rate set to `dropout`.
fn fixture_with_dropout(name: &str, dropout: f64, device: &Device) -> MaskedLm {
    let dir = common::fixture(name);
    let config = masklm_hub::read_config(&dir).expect("fixture config");
    let keys = config
        .dropout_keys()
        .iter()
        .map(|key| (key.to_string(), serde_json::Value::from(dropout)))
        .collect();
    let config = config.with_keys(&keys).expect("valid config");
    let mut model = MaskedLm::new(&config, device).expect("valid config");
    masklm_hub::load_weights(&mut model, &dir).expect("fixture weights");
    model
}

/// One batch: ids, its mask, the masked positions and their labels.
type Batch = (Tensor<2, Int>, BatchMask, Tensor<1, Int>, Tensor<1, Int>);

/// The fixture's reference batch (right-padded rows).
fn padded_batch(name: &str, device: &Device) -> Batch {
    let reference = common::Reference::load(name);
    let (positions, labels) = common::masked(&reference, device);
    let ids = reference.int2("input_ids", device);
    let mask = reference.int2("attention_mask", device).into();
    (ids, mask, positions, labels)
}

/// Rows of 30 packing documents of 7, 12 and 3 tokens; 30; 1 and 29; every third token
/// predicted.
fn packed_batch(vocab: usize, device: &Device) -> Batch {
    let (rows, seq) = (3, 30);
    let documents = vec![vec![7, 12, 3], vec![30], vec![1, 29]];
    let mut next = 0u64;
    let mut draw = |modulus: usize| {
        next = masklm_data::splitmix64(next + 1);
        (next % modulus as u64) as i64
    };
    let ids: Vec<i64> = (0..rows * seq).map(|_| 10 + draw(vocab - 10)).collect();
    let picked: Vec<i64> = (0..(rows * seq) as i64).step_by(3).collect();
    let labels: Vec<i64> = picked.iter().map(|_| 10 + draw(vocab - 10)).collect();
    let n = picked.len();
    (
        Tensor::from_data(TensorData::new(ids, [rows, seq]), device),
        BatchMask::packed(documents, seq, device).expect("fits"),
        Tensor::from_data(TensorData::new(picked, [n]), device),
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

/// The gradients of the batch's MLM loss, with dropout seeded by `seed`.
fn gradients(
    model: &MaskedLm,
    checkpointing: bool,
    batch: &Batch,
    seed: u64,
    device: &Device,
) -> GradientsParams {
    let (ids, mask, positions, labels) = batch.clone();
    let model = model.clone().with_gradient_checkpointing(checkpointing);
    model.seed_dropout(seed, device);
    model.loss_gradients(&model, ids, mask, positions, |logits| {
        mlm_loss(logits, labels)
    })
}

/// Per parameter: the largest difference between two gradients relative to the largest
/// element of the first (at least 1e-3, so that near-zero gradients compare absolutely).
struct Compare<'a> {
    a: &'a GradientsParams,
    b: &'a GradientsParams,
    worst: (f32, String),
    count: usize,
}

impl ModuleVisitor for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let what = format!("{:?} {:?}", param.id, param.val().dims());
        let (a, b) = match (self.a.get::<D>(param.id), self.b.get::<D>(param.id)) {
            (Some(a), Some(b)) => (common::values(a), common::values(b)),
            (None, None) => return,
            (a, b) => panic!(
                "{what}: a gradient on one side only ({} / {})",
                a.is_some(),
                b.is_some()
            ),
        };
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let diff = common::max_abs_diff(&b, &a) / scale;
        assert!(diff.is_finite(), "{what}: non-finite gradient");
        self.count += 1;
        if diff > self.worst.0 {
            self.worst = (diff, what);
        }
    }
}

fn worst_difference(
    model: &MaskedLm,
    a: &GradientsParams,
    b: &GradientsParams,
) -> (f32, String, usize) {
    let mut compare = Compare {
        a,
        b,
        worst: (0.0, String::new()),
        count: 0,
    };
    model.visit(&mut compare);
    (compare.worst.0, compare.worst.1, compare.count)
}

#[test]
fn checkpointed_gradients_equal_full_backward_gradients_in_every_family() {
    let device = Device::flex().autodiff();
    for name in ["roberta-tiny", "bert-tiny", "modernbert-tiny"] {
        for dropout in [0.0, 0.1] {
            let model = fixture_with_dropout(name, dropout, &device);
            let vocab = model.word_embeddings().dims()[0];
            for (layout, batch) in [
                ("padded", padded_batch(name, &device)),
                ("packed", packed_batch(vocab, &device)),
            ] {
                let full = gradients(&model, false, &batch, 11, &device);
                let checkpointed = gradients(&model, true, &batch, 11, &device);
                let (worst, what, count) = worst_difference(&model, &full, &checkpointed);
                eprintln!(
                    "{name}, dropout {dropout}, {layout}: {count} parameter gradients, \
                     largest relative difference {worst:e} ({what})"
                );
                assert!(count > 10, "{name}: only {count} parameters got a gradient");
                assert!(
                    worst <= 1e-6,
                    "{name}, dropout {dropout}, {layout}: checkpointed gradients differ from \
                     the full backward's by {worst:e} of the largest ({what})"
                );
                if dropout > 0.0 {
                    // The masks are live: other masks give other gradients.
                    let reseeded = gradients(&model, true, &batch, 12, &device);
                    let (apart, ..) = worst_difference(&model, &full, &reseeded);
                    assert!(
                        apart > 1e-2,
                        "{name}: another dropout seed moved the gradients by {apart:e} only"
                    );
                }
            }
        }
    }
}

/// `masklm train` with `gradient_checkpointing = true` (dropout 0.1 in the tiny config): a run
/// stopped at step 6 and resumed to 12 reproduces every loss of the uninterrupted run, and
/// both follow the run without checkpointing (the same masks, the same gradients).
#[test]
fn checkpointed_training_resumes_exactly_and_follows_the_full_backward() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(
        dir.path(),
        "[schedule]\ndecay = \"constant\"\nwarmup_steps = 2\n",
    );
    // A constant schedule, so that a run of 6 steps extended to 12 follows the 12-step run's
    // learning rates (the tiny config's own [schedule] is removed).
    let config_text = std::fs::read_to_string(&config).unwrap();
    let config_text = config_text.replacen("[schedule]\nwarmup_steps = 5\n", "", 1);
    std::fs::write(&config, config_text).unwrap();
    let on = ["training.gradient_checkpointing=true"];
    let plain = dir.path().join("plain");
    common::train_run(&config, &plain, "cpu", 12, &[]);
    let whole = dir.path().join("whole");
    common::train_run(&config, &whole, "cpu", 12, &on);
    let stopped = dir.path().join("stopped");
    common::train_run(&config, &stopped, "cpu", 6, &on);
    common::masklm_ok([
        "train".as_ref(),
        "--resume".as_ref(),
        stopped.as_os_str(),
        "--set".as_ref(),
        "training.max_steps=12".as_ref(),
    ]);
    let (a, b, c) = (
        common::losses(&whole),
        common::losses(&stopped),
        common::losses(&plain),
    );
    assert_eq!((a.len(), b.len(), c.len()), (12, 12, 12));
    for (step, loss) in &a {
        assert!(
            (loss - b[step]).abs() <= 1e-6,
            "step {step}: {loss} uninterrupted vs {} resumed",
            b[step]
        );
        assert!(
            (loss - c[step]).abs() <= 1e-5,
            "step {step}: {loss} with checkpointing vs {} without",
            c[step]
        );
    }
}

// The CLI's backend selection, so that the optional backends are picked as `masklm` does.
#[cfg(any(feature = "wgpu", feature = "tch"))]
#[path = "../crates/masklm/src/backend.rs"]
#[allow(dead_code)]
mod backend;

/// On wgpu and libtorch (each compiled in; CI builds both), without dropout: the checkpointed
/// gradients equal the full backward's (1e-5 of each parameter's largest), padded and packed.
/// With dropout those backends reseed their generator per layer, so only the masks' replay
/// within the checkpointed step is exact there, not equality with the full backward.
#[cfg(any(feature = "wgpu", feature = "tch"))]
#[test]
fn checkpointed_gradients_equal_full_backward_gradients_on_every_backend() {
    let compiled = [
        ("wgpu", backend::Backend::Wgpu, cfg!(feature = "wgpu")),
        ("tch", backend::Backend::Tch, cfg!(feature = "tch")),
    ];
    for (name, choice, _) in compiled.into_iter().filter(|(.., built)| *built) {
        let spec = common::test_device(name);
        let device = backend::device(choice, spec.as_deref())
            .unwrap_or_else(|e| panic!("--backend {name}: {e:#}"))
            .autodiff();
        for fixture in ["roberta-tiny", "modernbert-tiny"] {
            let model = fixture_with_dropout(fixture, 0.0, &device);
            let vocab = model.word_embeddings().dims()[0];
            for (layout, batch) in [
                ("padded", padded_batch(fixture, &device)),
                ("packed", packed_batch(vocab, &device)),
            ] {
                let full = gradients(&model, false, &batch, 11, &device);
                let checkpointed = gradients(&model, true, &batch, 11, &device);
                let (worst, what, count) = worst_difference(&model, &full, &checkpointed);
                assert!(count > 10, "{name} {fixture}: only {count} gradients");
                assert!(
                    worst <= 1e-5,
                    "{name} {fixture} {layout}: checkpointed gradients differ by {worst:e} \
                     of the largest ({what})"
                );
            }
        }
    }
}
