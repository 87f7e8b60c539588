//! Continue-training a Hugging Face folder, export, and the round trip to transformers.
//!
//! `tests/fixtures/roberta-tiny` (vocab 1000) and the `tokenizer-go` fixture (1000 tokens) make
//! a Hugging Face folder together; a few steps of `masklm train` with `init_from` on it give a
//! checkpoint, which `masklm export` turns back into a Hugging Face folder.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Int, Tensor, TensorData};

const MASKLM: &str = env!("CARGO_BIN_EXE_masklm");

fn masklm(args: &[&str]) -> std::process::Output {
    Command::new(MASKLM).args(args).output().unwrap()
}

/// Runs masklm, which must succeed, and parses its stdout as one JSON document.
fn masklm_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&common::masklm_ok(args)).unwrap()
}

/// A HF folder: the roberta-tiny weights plus the tokenizer-go files.
fn hf_folder(dir: &Path) -> PathBuf {
    let out = dir.join("hf");
    std::fs::create_dir_all(&out).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture("roberta-tiny").join(file), out.join(file)).unwrap();
    }
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(common::fixture("tokenizer-go").join(file), out.join(file)).unwrap();
    }
    out
}

fn continue_training(dir: &Path) -> PathBuf {
    let hf = hf_folder(dir);
    let config = dir.join("dapt.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
init_from = "{hf}"
[data]
tokenizer = "{hf}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 64
validation_split = 0.1
[optimizer]
lr = 1e-4
[training]
batch_size = 4
max_steps = 3
"#,
            hf = hf.display(),
            corpus = common::fixture("tokenizer-corpus.txt").display(),
            cache = dir.join("cache").display(),
        ),
    )
    .unwrap();
    let run = dir.join("run");
    common::masklm_ok([
        "train".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        run.as_os_str(),
    ]);
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    run.join("checkpoints").join(latest.trim())
}

fn tensor_names(path: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(path).unwrap();
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[test]
fn export_round_trips_and_matches_transformers_layout() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = continue_training(dir.path());
    let export = dir.path().join("export");
    common::masklm_ok([
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);

    // Exactly the tensor names transformers itself saved for this architecture.
    assert_eq!(
        tensor_names(&export.join("model.safetensors")),
        tensor_names(&common::fixture("roberta-tiny").join("model.safetensors"))
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "roberta");
    assert_eq!(config["architectures"][0], "RobertaForMaskedLM");
    assert!(export.join("tokenizer.json").is_file());

    // The export loads back with the same logits as the checkpoint.
    let device = Device::flex();
    let trained = masklm_infer::load_model(&checkpoint, &device)
        .unwrap()
        .model;
    let (_, exported, report) = masklm_hub::load_roberta(&export, &device).unwrap();
    assert!(report.unexpected.is_empty());
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 40, 4, 300, 77, 2], [1, 6]),
        &device,
    );
    let mask = Tensor::<2, Int>::ones([1, 6], &device);
    let a = common::values(trained.forward(ids.clone(), mask.clone()));
    let b = common::values(exported.forward(ids, mask));
    assert!(common::max_abs_diff(&a, &b) <= 1e-6);

    // transformers on the export, where the reference Python is installed.
    let Some(python) = common::reference_python("transformers, torch") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_hf_export.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["--masklm", MASKLM, "--export"])
        .arg(&export)
        .arg("--checkpoint")
        .arg(&checkpoint)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("EXPORT_CHECK passed=5 failed=0"),
        "{stdout}"
    );
}

#[test]
fn fill_mask_and_eval_reject_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_folder(dir.path());
    let hf = hf.to_str().unwrap();

    let out = masklm(&["fill-mask", "--model", hf, "no mask in this text"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no mask token") && err.contains("<mask>"),
        "{err}"
    );

    let out = masklm(&["fill-mask", "--model", hf, "   "]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty text"));

    let doc = masklm_json(&[
        "fill-mask",
        "--model",
        hf,
        "--json",
        "--top-k",
        "3",
        "The <mask> of cells.",
    ]);
    let list = doc.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for key in ["score", "token", "token_str", "sequence"] {
        assert!(list[0].get(key).is_some(), "missing {key}");
    }
    // Scores are sorted probabilities.
    let scores: Vec<f64> = list.iter().map(|c| c["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]) && scores[0] <= 1.0);

    let corpus = common::fixture("tokenizer-corpus.txt");
    let doc = masklm_json(&[
        "eval",
        "--model",
        hf,
        "--input",
        corpus.to_str().unwrap(),
        "--max-seq-length",
        "64",
        "--json",
    ]);
    let ppl = doc["perplexity"].as_f64().unwrap();
    assert!(
        ppl > 1.0 && ppl.is_finite() && doc["tokens"].as_u64().unwrap() > 1000,
        "{doc}"
    );
    assert!((doc["loss"].as_f64().unwrap().exp() - ppl).abs() < 1e-6 * ppl);
}

#[test]
fn bert_export_has_the_names_transformers_saves_and_round_trips() {
    let device = Device::flex();
    let fixture = common::fixture("bert-tiny");
    let (config, model, _) = masklm_hub::load_model(&fixture, &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    masklm_hub::export_model(&model, &config, Some(&fixture), dir.path()).unwrap();
    assert_eq!(
        tensor_names(&dir.path().join("model.safetensors")),
        tensor_names(&fixture.join("model.safetensors"))
    );
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(exported["model_type"], "bert");
    assert_eq!(exported["architectures"][0], "BertForMaskedLM");
    assert!(
        exported["bos_token_id"].is_null(),
        "BERT has no bos token: {exported}"
    );

    let (_, reloaded, report) = masklm_hub::load_roberta(dir.path(), &device).unwrap();
    assert!(report.unexpected.is_empty());
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![2i64, 40, 4, 300, 77, 3], [1, 6]),
        &device,
    );
    let mask = Tensor::<2, Int>::ones([1, 6], &device);
    let a = common::values(model.forward(ids.clone(), mask.clone()));
    let b = common::values(reloaded.forward(ids, mask));
    assert!(common::max_abs_diff(&a, &b) <= 1e-6);
}

/// The fixture's `pseudo_perplexity.json` (by scripts/make_reference.py) and its lines
/// written one per line to `dir/lines.txt`.
fn pseudo_perplexity_lines(name: &str, dir: &Path) -> (serde_json::Value, PathBuf) {
    let path = common::fixture(name).join("pseudo_perplexity.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let lines: Vec<&str> = reference["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let input = dir.join("lines.txt");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    (reference, input)
}

#[test]
fn pseudo_perplexity_matches_transformers() {
    // tests/fixtures/{roberta,modernbert}-tiny/pseudo_perplexity.json, by
    // scripts/make_reference.py.
    for name in ["roberta-tiny", "modernbert-tiny"] {
        let dir = tempfile::tempdir().unwrap();
        let (reference, input) = pseudo_perplexity_lines(name, dir.path());
        let model = common::fixture(name);
        let doc = masklm_json(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--packing",
            "line",
            "--pseudo-perplexity",
            "--json",
        ]);
        let ours = doc["pseudo_perplexity"].as_f64().unwrap();
        let theirs = reference["pseudo_perplexity"].as_f64().unwrap();
        assert_eq!(doc["pseudo_tokens"], reference["tokens"], "{name}");
        assert!(
            (ours - theirs).abs() <= 1e-4 * theirs,
            "{name}: pseudo-perplexity {ours} vs transformers {theirs}"
        );
    }
}

#[test]
fn eval_says_how_much_of_the_text_it_cut_and_did_not_score() {
    // The pseudo-perplexity lines, scored in 8-token examples: most are cut, and eval says so
    // (stderr, and in --json); at the model's full length nothing is cut and nothing is said.
    let dir = tempfile::tempdir().unwrap();
    let (reference, input) = pseudo_perplexity_lines("roberta-tiny", dir.path());
    let lines = reference["lines"].as_array().unwrap();
    let model = common::fixture("roberta-tiny");
    let eval = |max: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_masklm"))
            .args(["eval", "--model", model.to_str().unwrap(), "--input"])
            .arg(&input)
            .args(["--packing", "line", "--max-seq-length", max])
            .args(["--pseudo-perplexity", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (doc, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (whole, quiet) = eval("128");
    assert_eq!(whole["truncated_documents"], 0);
    assert!(!quiet.contains("longer than"), "{quiet}");
    let (short, note) = eval("8");
    let cut = short["truncated_documents"].as_u64().unwrap();
    let dropped = short["truncated_tokens"].as_u64().unwrap();
    assert!(cut > 0 && cut <= lines.len() as u64, "{short}");
    // The cut tokens are exactly those the 8-token examples do not score.
    let scored = |doc: &serde_json::Value| doc["pseudo_tokens"].as_u64().unwrap();
    assert_eq!(scored(&whole) - scored(&short), dropped);
    assert!(
        note.contains(&format!(
            "{cut} of {} documents were longer than max_seq_length 8",
            lines.len()
        )) && note.contains(&format!("the last {dropped} tokens"))
            && note.contains("not scored; raise --max-seq-length (this model takes up to 128)"),
        "{note}"
    );
}

#[test]
fn export_caps_the_tokenizers_model_max_length_at_the_models_positions() {
    // roberta-tiny: 130 positions, pad 1 -> 128 tokens, but its tokenizer says 512; a
    // tokenizer saved without a length says nothing (transformers then assumes 1e30).
    let device = Device::flex();
    let fixture = common::fixture("roberta-tiny");
    let (config, model, _) = masklm_hub::load_model(&fixture, &device).unwrap();
    assert_eq!(config.max_sequence_length(), 128);
    let read = |path: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let original = read(&fixture.join("tokenizer_config.json"));
    let unlimited = tempfile::tempdir().unwrap();
    for file in masklm_hub::TOKENIZER_FILES {
        std::fs::copy(fixture.join(file), unlimited.path().join(file)).unwrap();
    }
    let mut without = original.clone();
    without.as_object_mut().unwrap().remove("model_max_length");
    std::fs::write(
        unlimited.path().join("tokenizer_config.json"),
        without.to_string(),
    )
    .unwrap();
    for tokenizer in [fixture.as_path(), unlimited.path()] {
        let out = tempfile::tempdir().unwrap();
        masklm_hub::export_model(&model, &config, Some(tokenizer), out.path()).unwrap();
        let exported = read(&out.path().join("tokenizer_config.json"));
        assert_eq!(exported["model_max_length"], 128, "{}", tokenizer.display());
        let mut rest = exported.clone();
        rest.as_object_mut().unwrap().remove("model_max_length");
        assert_eq!(rest, without, "only the length changes");
        masklm_data::load_tokenizer(out.path()).unwrap();
    }

    // A length within the model's is copied byte for byte.
    let fixture = common::fixture("modernbert-tiny");
    let (config, model, _) = masklm_hub::load_model(&fixture, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    masklm_hub::export_model(&model, &config, Some(&fixture), out.path()).unwrap();
    let file = "tokenizer_config.json";
    assert_eq!(
        std::fs::read(out.path().join(file)).unwrap(),
        std::fs::read(fixture.join(file)).unwrap()
    );
}
