//! Shared helpers for the integration tests: fixture paths and reading the reference tensors
//! that `scripts/make_reference.py` dumped from transformers.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/NAME`, made by `scripts/make_reference.py`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The tensors of `tests/fixtures/NAME/reference.safetensors`.
pub struct Reference {
    bytes: Vec<u8>,
}

/// A reference tensor's shape and values.
pub struct Values<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        Self::load_file(name, "reference.safetensors")
    }

    /// Another safetensors file of fixture `name`.
    pub fn load_file(name: &str, file: &str) -> Self {
        let path = fixture(name).join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/make_reference.py",
                path.display()
            )
        });
        Self { bytes }
    }

    /// Any safetensors file (an export, say).
    pub fn load_path(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    /// The names of its tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.view().names().into_iter().map(String::from).collect();
        names.sort();
        names
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("reference.safetensors is corrupt")
    }

    pub fn f32(&self, name: &str) -> Values<f32> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("no {name} in reference"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let data = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Values {
            shape: t.shape().to_vec(),
            data,
        }
    }

    pub fn i64(&self, name: &str) -> Values<i64> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("no {name} in reference"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let data = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Values {
            shape: t.shape().to_vec(),
            data,
        }
    }

    /// A `[batch, seq]` int64 reference tensor on `device`.
    pub fn int2(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let v = self.i64(name);
        Tensor::from_data(TensorData::new(v.data, [v.shape[0], v.shape[1]]), device)
    }
}

/// Flat positions (`row * seq + col`) and labels of the masked tokens (label != -100) of a
/// reference batch.
pub fn masked(reference: &Reference, device: &Device) -> (Tensor<1, Int>, Tensor<1, Int>) {
    let labels = reference.i64("labels");
    let (positions, targets): (Vec<i64>, Vec<i64>) = labels
        .data
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != -100)
        .map(|(i, l)| (i as i64, *l))
        .unzip();
    let n = positions.len();
    (
        Tensor::from_data(TensorData::new(positions, [n]), device),
        Tensor::from_data(TensorData::new(targets, [n]), device),
    )
}

/// The fixture model `name` without dropout (the reference gradients were taken in eval mode)
/// on `device`, usually an autodiff one, loaded through the family seam.
pub fn fixture_masked_lm(name: &str, device: &Device) -> masklm_model::MaskedLm {
    let dir = fixture(name);
    let config = masklm_hub::read_config(&dir).expect("fixture config");
    let no_dropout = config
        .dropout_keys()
        .iter()
        .map(|key| (key.to_string(), serde_json::Value::from(0.0)))
        .collect();
    let config = config.with_keys(&no_dropout).expect("valid config");
    let mut model = masklm_model::MaskedLm::new(&config, device).expect("valid config");
    masklm_hub::load_weights(&mut model, &dir).expect("fixture weights");
    model
}

/// The RoBERTa-family model inside `model`.
pub fn roberta(model: masklm_model::MaskedLm) -> masklm_model::RobertaForMaskedLM {
    match model {
        masklm_model::MaskedLm::Roberta(model) => model,
        other => panic!("not a RoBERTa-family model: {:?}", other.family()),
    }
}

/// [`roberta`] by reference.
pub fn roberta_ref(model: &masklm_model::MaskedLm) -> &masklm_model::RobertaForMaskedLM {
    match model {
        masklm_model::MaskedLm::Roberta(model) => model,
        other => panic!("not a RoBERTa-family model: {:?}", other.family()),
    }
}

/// [`fixture_masked_lm`] for a RoBERTa-family fixture, as its own type.
pub fn fixture_model(name: &str, device: &Device) -> masklm_model::RobertaForMaskedLM {
    roberta(fixture_masked_lm(name, device))
}

/// [`fixture_model`] and its masked-LM loss on the reference batch.
pub fn fixture_loss(name: &str, device: &Device) -> (masklm_model::RobertaForMaskedLM, Tensor<1>) {
    fixture_loss_using(name, device, masklm_model::AttentionImpl::Auto)
}

/// [`fixture_loss`] with self-attention computed by `implementation`.
pub fn fixture_loss_using(
    name: &str,
    device: &Device,
    implementation: masklm_model::AttentionImpl,
) -> (masklm_model::RobertaForMaskedLM, Tensor<1>) {
    let reference = Reference::load(name);
    let model = fixture_model(name, device).with_attention(implementation);
    let (positions, labels) = masked(&reference, device);
    let logits = model.forward_at(
        reference.int2("input_ids", device),
        reference.int2("attention_mask", device),
        positions,
    );
    let loss = masklm_model::mlm_loss(logits, labels);
    (model, loss)
}

/// The largest difference between two runs' per-step losses (`losses`), over the steps of
/// `reference`, each of which `other` must have.
pub fn worst_loss_diff(
    reference: &std::collections::BTreeMap<u64, f64>,
    other: &std::collections::BTreeMap<u64, f64>,
) -> f64 {
    reference
        .iter()
        .map(|(step, loss)| {
            let theirs = other
                .get(step)
                .unwrap_or_else(|| panic!("no loss at step {step}"));
            (loss - theirs).abs()
        })
        .fold(0.0, f64::max)
}

/// Runs the `masklm` binary built for these tests with `args`; it must succeed (its stderr is
/// the failure message). Returns its stdout.
pub fn masklm_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(args)
        .output()
        .expect("the masklm binary runs");
    assert!(
        out.status.success(),
        "masklm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Largest absolute difference, with a length check.
pub fn max_abs_diff(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "element counts differ");
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// A tensor's values as a flat vector.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

/// An integer tensor's values as a flat vector of i64 (the backend's int type may be i32).
pub fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .try_to_vec()
        .expect("int tensor")
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// The tiny training config of the end-to-end tests: hidden 32, 2 layers, the `tokenizer-go`
/// fixture and `tokenizer-corpus.txt`, its token cache at `cache`; `extra` is appended.
pub fn tiny_config_text(cache: &Path, extra: &str) -> String {
    format!(
        r#"
seed = 7
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
max_position_embeddings = 70
hidden_dropout_prob = 0.1
[data]
tokenizer = "{tokenizer}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 64
validation_split = 0.05
[optimizer]
lr = 2e-3
weight_decay = 0.01
[schedule]
warmup_steps = 5
[training]
batch_size = 8
max_steps = 50
[eval]
eval_steps = 10
batch_size = 16
[logging]
log_steps = 1
{extra}
"#,
        tokenizer = fixture("tokenizer-go").display(),
        corpus = fixture("tokenizer-corpus.txt").display(),
        cache = cache.display(),
    )
}

/// Writes the tiny config into `dir/config.toml`, its cache under `dir/cache`.
pub fn write_tiny_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, tiny_config_text(&dir.join("cache"), extra)).unwrap();
    path
}

/// `step -> loss` from a run's metrics.jsonl (the last record of each step wins).
pub fn losses(run_dir: &Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// `masklm --backend BACKEND train` of `config` for `steps` steps into `out`, no evaluation,
/// one checkpoint at the end, plus `--set` assignments `sets`; returns the checkpoint.
/// Each run is its own process, so its dropout stream is exactly reproducible.
pub fn train_run(config: &Path, out: &Path, backend: &str, steps: usize, sets: &[&str]) -> PathBuf {
    let (config_arg, out_arg) = (config.display().to_string(), out.display().to_string());
    let (max_steps, save) = (
        format!("training.max_steps={steps}"),
        format!("checkpoint.save_steps={steps}"),
    );
    let mut args = backend_args(backend);
    args.extend(
        [
            "train",
            "--config",
            &config_arg,
            "--out",
            &out_arg,
            "--set",
            &max_steps,
            "--set",
            "eval.eval_steps=0",
            "--set",
            &save,
        ]
        .map(String::from),
    );
    for set in sets {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    masklm_ok(args);
    out.join(format!("checkpoints/step-{steps:07}"))
}

/// The `--device` for `backend` in the tests: `MASKLM_TEST_DEVICE_<BACKEND>` (e.g.
/// `MASKLM_TEST_DEVICE_TCH=cuda:0`), or the backend's default.
pub fn test_device(backend: &str) -> Option<String> {
    std::env::var(format!("MASKLM_TEST_DEVICE_{}", backend.to_uppercase())).ok()
}

/// `--backend BACKEND [--device D]` for a masklm command line.
pub fn backend_args(backend: &str) -> Vec<String> {
    let mut args = vec!["--backend".to_string(), backend.to_string()];
    if let Some(device) = test_device(backend) {
        args.extend(["--device".to_string(), device]);
    }
    args
}

/// The reference Python (`MASKLM_PYTHON`, default the venv `.ci/run` makes) if it can
/// `import modules`. Without it a local run skips the check and says so; in CI (`CI=true`) a
/// missing reference is a failure, so a skipped check can never pass for a passed one.
pub fn reference_python(modules: &str) -> Option<String> {
    let python = std::env::var("MASKLM_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/masklm-venv/bin/python".to_string());
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let message = format!(
        "no reference Python with `{modules}` at {python} (set MASKLM_PYTHON, or install \
         scripts/requirements.txt into /var/tmp/masklm-venv)"
    );
    assert!(
        std::env::var("CI").map_or(true, |ci| ci != "true"),
        "{message}"
    );
    println!("skipped: {message}");
    None
}

/// Checks that a packed batch gives every document the logits it gets alone (relative 1e-5):
/// rows of 30 holding documents of 7, 12 and 3 tokens then padding; 30; 1 and 29. Documents are
/// longer than ModernBERT fixtures' local windows, and positions must restart at each.
/// `what` names the run in failures; returns the largest difference relative to the largest
/// logit.
pub fn assert_packed_rows_equal_documents_alone(
    model: &masklm_model::MaskedLm,
    device: &Device,
    what: &str,
) -> f32 {
    let seq = 30;
    let documents = vec![vec![7, 12, 3], vec![30], vec![1, 29]];
    // Token ids from 10 up, away from every fixture's special ids (pads included).
    let mut next = 0u64;
    let mut token = || {
        next = masklm_data::splitmix64(next + 1);
        10 + (next % 700) as i64
    };
    let rows: Vec<Vec<Vec<i64>>> = documents
        .iter()
        .map(|lens| {
            lens.iter()
                .map(|&n| (0..n).map(|_| token()).collect())
                .collect()
        })
        .collect();
    // Padding ids do not matter: padding is outside every document.
    let mut ids = vec![0i64; documents.len() * seq];
    for (r, row) in rows.iter().enumerate() {
        let flat: Vec<i64> = row.concat();
        ids[r * seq..][..flat.len()].copy_from_slice(&flat);
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [documents.len(), seq]), device);
    let mask = masklm_model::BatchMask::packed(documents.clone(), seq, device).expect("fits");
    let packed = model.forward(ids, mask);
    let vocab = packed.dims()[2];
    let packed = values(packed);
    let mut worst = 0.0f32;
    for (r, row) in rows.iter().enumerate() {
        let mut column = 0;
        for document in row {
            let n = document.len();
            let alone_ids =
                Tensor::<2, Int>::from_data(TensorData::new(document.clone(), [1, n]), device);
            let alone = values(model.forward(alone_ids, Tensor::<2, Int>::ones([1, n], device)));
            let got = &packed[(r * seq + column) * vocab..][..n * vocab];
            let scale = alone.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(got, &alone) / scale;
            assert!(
                diff < 1e-5,
                "{what}: row {r}, document at column {column} ({n} tokens): packed logits differ \
                 from the document alone by {diff:e} of the largest logit"
            );
            worst = worst.max(diff);
            column += n;
        }
    }
    worst
}
