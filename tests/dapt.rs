//! Domain adaptation features of the trainer: several held-out sets, early stopping,
//! knowledge probes (against transformers' numbers), and mixing several sources by weight.
//! Uses the `tokenizer-go` / `roberta-tiny` fixtures of scripts/make_reference.py.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use masklm_train::{RunOutcome, Silent, Start, TrainConfig, TrainError, train};
use serde_json::Value;

fn run_on_cpu(config: &TrainConfig, run: &Path, start: Start) -> Result<RunOutcome, TrainError> {
    train(
        config,
        run,
        start,
        &Device::flex(),
        &Silent,
        &AtomicBool::new(false),
    )
}

fn records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Splits the fixture corpus into two held-out files (lines 0..150 and 150..300) under `dir`.
fn held_out_files(dir: &Path) -> (PathBuf, PathBuf) {
    let corpus = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt")).unwrap();
    let lines: Vec<&str> = corpus.lines().collect();
    let (a, b) = (dir.join("domain.txt"), dir.join("general.txt"));
    std::fs::write(&a, lines[..150].join("\n")).unwrap();
    std::fs::write(&b, lines[150..300].join("\n")).unwrap();
    (a, b)
}

fn state_of(checkpoint: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json")).unwrap()).unwrap()
}

#[test]
fn every_eval_set_is_reported_and_best_follows_the_named_one() {
    let dir = tempfile::tempdir().unwrap();
    let (domain, general) = held_out_files(dir.path());
    let probes = common::fixture("roberta-tiny/probes.tsv");
    let sets = [
        format!("eval.sets.domain={:?}", domain.display().to_string()),
        format!("eval.sets.general=[{:?}]", general.display().to_string()),
        "eval.best=\"domain\"".to_string(),
        format!("eval.probes={:?}", probes.display().to_string()),
        "training.max_steps=30".to_string(),
    ];
    let config = TrainConfig::load(&common::write_tiny_config(dir.path(), ""), &sets).unwrap();
    let run = dir.path().join("run");
    let outcome = run_on_cpu(&config, &run, Start::New).unwrap();

    let evals: Vec<Value> = records(&run)
        .into_iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 3);
    for r in &evals {
        for key in [
            "eval_perplexity",
            "eval_accuracy",
            "eval/domain/loss",
            "eval/domain/perplexity",
            "eval/domain/accuracy",
            "eval/domain/tokens",
            "eval/general/perplexity",
            "probes/mrr",
            "probes/top5",
        ] {
            assert!(r.get(key).is_some(), "no {key} in {r}");
        }
        assert_eq!(r["probes"].as_array().unwrap().len(), 5);
    }
    // The two sets are different text, so their perplexities differ: `best` must hold the
    // domain set's minimum, not the validation split's.
    let domain_min = evals
        .iter()
        .map(|r| r["eval/domain/perplexity"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let state = state_of(&outcome.checkpoint);
    assert_eq!(state["best_set"], "domain");
    assert_eq!(state["best_perplexity"].as_f64().unwrap(), domain_min);
    let report = outcome.final_report.unwrap();
    let names: Vec<&str> = report.sets.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["validation", "domain", "general"]);
    assert_eq!(
        outcome.final_eval.unwrap().perplexity,
        report.get("domain").unwrap().perplexity
    );
    // Each set was prepared into its own cache, with the run's tokenizer.
    assert!(run.join("eval-cache/domain/manifest.json").is_file());
    assert!(run.join("eval-cache/general/manifest.json").is_file());
}

#[test]
fn patience_ends_the_run_with_a_checkpoint_and_a_resume_says_how_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_config(dir.path(), "");
    // An improvement must be > 100 nats to count: the second evaluation cannot reset the count.
    let sets = ["eval.patience=1", "eval.min_delta=100.0"].map(String::from);
    let config = TrainConfig::load(&path, &sets).unwrap();
    let run = dir.path().join("run");
    let outcome = run_on_cpu(&config, &run, Start::New).unwrap();
    let reason = outcome.stopped_early.expect("early stop");
    assert!(
        reason.contains("step 20") && reason.contains("patience"),
        "{reason}"
    );
    assert_eq!(outcome.last_step, 20);
    assert!(outcome.checkpoint.ends_with("step-0000020"));
    masklm_infer::checkpoint::verify_checkpoint(&outcome.checkpoint).unwrap();
    // The loss still fell, so `best` moved on (min_delta only gates the patience count).
    assert_eq!(state_of(&outcome.checkpoint)["best_step"], 20);

    let resume = Start::Resume { from: None };
    let err = run_on_cpu(&config, &run, resume.clone()).unwrap_err();
    assert!(err.to_string().contains("eval.patience"), "{err}");
    let on = TrainConfig::load(&path, &["eval.patience=0".to_string()]).unwrap();
    let outcome = run_on_cpu(&on, &run, resume).unwrap();
    assert_eq!(outcome.last_step, 50);
    assert!(outcome.stopped_early.is_none());

    // Without min_delta the loss keeps improving and the same patience never fires.
    let config = TrainConfig::load(&path, &["eval.patience=1".to_string()]).unwrap();
    let outcome = run_on_cpu(&config, &dir.path().join("run2"), Start::New).unwrap();
    assert_eq!(outcome.last_step, 50);
    assert!(outcome.stopped_early.is_none());
}

#[test]
fn probe_ranks_and_mrr_match_transformers() {
    let device = Device::flex();
    let dir = common::fixture("roberta-tiny");
    let (_, model, _) = masklm_hub::load_model(&dir, &device).unwrap();
    let tokenizer = masklm_data::load_tokenizer(&dir).unwrap();
    let (probes, notices) =
        masklm_infer::load_probes_from(&dir.join("probes.tsv"), &tokenizer, 64, "probes.tsv")
            .unwrap();
    // "transport" is two tokens in this vocabulary: ignored, with a notice naming it.
    assert_eq!(notices.len(), 1);
    assert!(notices[0].contains("transport") && notices[0].contains(":3:"));
    let report = masklm_infer::run_probes(&model, &probes, &tokenizer, &device).unwrap();

    let text = std::fs::read_to_string(dir.join("probes_reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let expected = reference["probes"].as_array().unwrap();
    assert_eq!(report.probes.len(), expected.len());
    for (ours, theirs) in report.probes.iter().zip(expected) {
        assert_eq!(ours.line as u64, theirs["line"].as_u64().unwrap());
        assert_eq!(ours.answer, theirs["answer"].as_str().unwrap());
        assert_eq!(
            ours.rank as u64,
            theirs["rank"].as_u64().unwrap(),
            "line {}",
            ours.line
        );
        let p = theirs["probability"].as_f64().unwrap();
        assert!(
            (ours.probability - p).abs() < 1e-6,
            "{} vs {p}",
            ours.probability
        );
    }
    let mrr = reference["mrr"].as_f64().unwrap();
    assert!((report.mrr - mrr).abs() < 1e-9, "{} vs {mrr}", report.mrr);
}

#[test]
fn bad_probe_files_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = masklm_data::load_tokenizer(&common::fixture("tokenizer-go")).unwrap();
    for (content, expected) in [
        (
            "No mask here.\tcell\n",
            ":1: a probe needs exactly one <mask> (found 0)",
        ),
        (
            "# c\n\nThe <mask> and <mask>.\tcell\n",
            ":3: a probe needs exactly one",
        ),
        ("The <mask> grows.\n", ":1: no answer"),
        ("The <mask> grows.\ttransport\n", "holds no usable probe:\n"),
        ("# only comments\n", "holds no probe"),
    ] {
        let path = dir.path().join("probes.tsv");
        std::fs::write(&path, content).unwrap();
        let err = masklm_infer::load_probes_from(&path, &tokenizer, 64, "eval.probes").unwrap_err();
        assert!(err.to_string().contains(expected), "{content:?}: {err}");
    }

    // A probe whose answers all split is skipped with a notice naming its line; the others
    // still count.
    let path = dir.path().join("probes.tsv");
    std::fs::write(
        &path,
        "The <mask> grows.\ttransport\nThe <mask> divides.\tcell\n",
    )
    .unwrap();
    let (probes, notices) =
        masklm_infer::load_probes_from(&path, &tokenizer, 64, "eval.probes").unwrap();
    assert_eq!(probes.iter().map(|p| p.line).collect::<Vec<_>>(), [2]);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("probes.tsv:1: skipping this probe"),
        "{notices:?}"
    );
    assert!(
        notices[0].contains("\"transport\" (splits into: "),
        "{notices:?}"
    );
}

#[test]
fn mixed_sources_feed_by_weight_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = held_out_files(dir.path());
    let corpus = common::fixture("tokenizer-corpus.txt");
    let mut config = TrainConfig::load(
        &common::write_tiny_config(dir.path(), ""),
        &[
            "training.max_steps=30".to_string(),
            "checkpoint.save_steps=10".to_string(),
            "checkpoint.keep_last=5".to_string(),
            "eval.eval_steps=0".to_string(),
            // Dropout draws from a process-wide stream that tests running beside this one
            // share; without it a step is a pure function of (seed, step).
            "model.hidden_dropout_prob=0.0".to_string(),
            "model.attention_probs_dropout_prob=0.0".to_string(),
        ],
    )
    .unwrap();
    config.data.inputs.clear();
    let source = |name: &str, path: &Path, weight: f64| masklm_train::config::SourceSection {
        name: name.to_string(),
        inputs: masklm_train::config::Inputs::One(path.display().to_string()),
        weight,
    };
    config.data.sources = vec![
        source("corpus", &corpus, 3.0),
        source("small", &a, 1.0),
        source("other", &b, 0.0001),
    ];
    config.validate().unwrap();
    let run = dir.path().join("run");
    run_on_cpu(&config, &run, Start::New).unwrap();
    let metrics = records(&run);
    let last = metrics
        .iter()
        .rfind(|r| r.get("tokens/corpus").is_some())
        .unwrap();
    let fed: Vec<f64> = ["corpus", "small", "other"]
        .map(|n| last[format!("tokens/{n}")].as_f64().unwrap())
        .to_vec();
    let total: f64 = fed.iter().sum();
    // 240 samples of ~64 tokens: 3:1 by weight, the third source (weight 1e-4) never.
    assert!((fed[0] / total - 0.75).abs() < 0.05, "{fed:?}");
    assert_eq!(fed[2], 0.0, "{fed:?}");
    // Each source has its own cache under data.cache.
    assert!(dir.path().join("cache/small/manifest.json").is_file());

    // Resuming from step 10 replays steps 11..30 exactly: losses and fed tokens.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for entry in ["checkpoints", "config.toml", "metrics.jsonl"] {
        let status = std::process::Command::new("cp")
            .args(["-r", &run.join(entry).display().to_string()])
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let resume = Start::Resume {
        from: Some("step-0000010".to_string()),
    };
    run_on_cpu(&config, &copy, resume).unwrap();
    let again = records(&copy);
    let pick = |records: &[Value]| -> Vec<(u64, f64, f64)> {
        records
            .iter()
            .filter(|r| r.get("loss").is_some() && r["step"].as_u64().unwrap() > 10)
            .map(|r| {
                (
                    r["step"].as_u64().unwrap(),
                    r["loss"].as_f64().unwrap(),
                    r["tokens/small"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(pick(&metrics).len(), 20);
    assert_eq!(pick(&metrics), pick(&again));
}

#[test]
fn bad_sources_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_config(dir.path(), "");
    for (sets, expected) in [
        (
            vec!["data.sources=[{ name = \"a\", inputs = \"x\", weight = 1.0 }]"],
            "give either data.inputs or data.sources",
        ),
        (
            vec![
                "data.inputs=[]",
                "data.sources=[{ name = \"a\", inputs = \"x\", weight = 0.0 }]",
            ],
            "data.sources[0].weight",
        ),
        (
            vec![
                "data.inputs=[]",
                "data.sources=[{ name = \"a\", inputs = \"x\", weight = 1.0 }, { name = \"a\", inputs = \"y\", weight = 1.0 }]",
            ],
            "\"a\" names two sources",
        ),
        (
            vec![
                "data.inputs=[]",
                "data.sources=[{ name = \"a b\", inputs = \"x\", weight = 1.0 }]",
            ],
            "data.sources[0].name",
        ),
    ] {
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let err = TrainConfig::load(&path, &sets).unwrap_err();
        assert!(err.to_string().contains(expected), "{sets:?}: {err}");
    }
}

/// A float32 tensor of a safetensors file, by name.
fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), data)
}

#[test]
fn vocabulary_extension_round_trips_through_transformers_and_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("roberta-tiny");
    let words = dir.path().join("words.txt");
    std::fs::write(
        &words,
        "# domain words\nmitochondrial\ncascade\nmitochondria\nH2O\nthe\n",
    )
    .unwrap();
    let out = dir.path().join("extended");
    let printed = common::masklm_ok([
        "vocab",
        "extend",
        "--model",
        original.to_str().unwrap(),
        "--words",
        words.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(printed.contains("vocab_size 1000 -> 1008"), "{printed}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab_extension.json")).unwrap())
            .unwrap();
    assert_eq!(report["already_single"], serde_json::json!(["the"]));
    // H2O is three pre-tokens (H, 2, O): no single token can spell it.
    assert_eq!(report["not_single"], serde_json::json!(["H2O"]));

    // masklm's tokenizer reads each added word as its one new token.
    let tokenizer = masklm_data::load_tokenizer(&out).unwrap();
    let added = report["added"].as_array().unwrap();
    for token in added.iter().filter(|t| !t["word"].is_null()) {
        let word = token["word"].as_str().unwrap();
        let ids = tokenizer
            .encode(&format!("The {word} of the cell."))
            .unwrap();
        assert_eq!(ids.len(), 8, "{word}: {ids:?}");
        assert_eq!(ids[2] as u64, token["id"].as_u64().unwrap(), "{word}");
    }

    // Old rows bit-identical; each new row the mean of its pieces' rows.
    let key = "roberta.embeddings.word_embeddings.weight";
    let (old_shape, old) = tensor(&original.join("model.safetensors"), key);
    let (new_shape, new) = tensor(&out.join("model.safetensors"), key);
    let (_, old_bias) = tensor(&original.join("model.safetensors"), "lm_head.bias");
    let (_, new_bias) = tensor(&out.join("model.safetensors"), "lm_head.bias");
    let hidden = old_shape[1];
    assert_eq!(new_shape, [1008, hidden]);
    assert!(
        old.iter()
            .zip(&new)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        old_bias
            .iter()
            .zip(&new_bias)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    for token in added {
        let id = token["id"].as_u64().unwrap() as usize;
        let pieces: Vec<usize> = token["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        for h in 0..hidden {
            let mean = pieces
                .iter()
                .map(|&p| old[p * hidden + h] as f64)
                .sum::<f64>()
                / pieces.len() as f64;
            assert!(
                (new[id * hidden + h] as f64 - mean).abs() < 1e-6,
                "row {id}"
            );
        }
        let mean = pieces.iter().map(|&p| old_bias[p] as f64).sum::<f64>() / pieces.len() as f64;
        assert!((new_bias[id] as f64 - mean).abs() < 1e-6);
    }

    // [model] init_from continues training from the extended folder.
    let config = format!(
        r#"
seed = 3
[model]
init_from = "{out}"
[data]
tokenizer = "{out}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 64
validation_split = 0.05
[optimizer]
lr = 1e-3
[training]
batch_size = 4
max_steps = 3
"#,
        out = out.display(),
        corpus = common::fixture("tokenizer-corpus.txt").display(),
        cache = dir.path().join("cache").display(),
    );
    let path = dir.path().join("dapt.toml");
    std::fs::write(&path, config).unwrap();
    let config = TrainConfig::load(&path, &[]).unwrap();
    let outcome = run_on_cpu(&config, &dir.path().join("run"), Start::New).unwrap();
    assert!(outcome.losses.iter().all(|l| l.is_finite()));
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(outcome.checkpoint.join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["vocab_size"], 1008);

    // transformers: AutoTokenizer/AutoModelForMaskedLM load it, and pipeline("fill-mask")
    // gives masklm's top-k and scores.
    let Some(python) = common::reference_python("transformers, torch") else {
        return;
    };
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");
    let run = |args: Vec<std::ffi::OsString>, expect: &str| {
        let output = std::process::Command::new(&python)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(expect),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(
        vec![
            scripts.join("check_vocab_extension.py").into(),
            original.clone().into(),
            out.clone().into(),
        ],
        "failed=0",
    );
    run(
        vec![
            scripts.join("check_hf_export.py").into(),
            "--masklm".into(),
            env!("CARGO_BIN_EXE_masklm").into(),
            "--export".into(),
            out.clone().into(),
            "--checkpoint".into(),
            out.clone().into(),
            "The mitochondrial <mask> of the cell.".into(),
            "A <mask> cascade in mitochondria.".into(),
        ],
        "EXPORT_CHECK passed=2 failed=0",
    );
}

#[test]
fn vocab_audit_counts_words_and_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(
        &corpus,
        "The mitochondria, the mitochondria!\n(mitochondria) of 42 cells\n",
    )
    .unwrap();
    let model = common::fixture("roberta-tiny");
    let json = common::masklm_ok([
        "vocab",
        "audit",
        "--model",
        model.to_str().unwrap(),
        "--input",
        corpus.to_str().unwrap(),
        "--json",
    ]);
    let audit: Value = serde_json::from_str(&json).unwrap();
    // "42" has no letter and is not a word; punctuation is trimmed.
    assert_eq!(audit["words"], 7);
    assert_eq!(audit["unique_words"], 5);
    let top = audit["top"].as_array().unwrap();
    assert_eq!(top[0]["word"], "mitochondria");
    assert_eq!(top[0]["count"], 3);
    assert_eq!(
        top[0]["pieces"],
        serde_json::json!(["Ġmit", "och", "ond", "ri", "a"])
    );
    // the: 1 piece x1, The: 1 x1, mitochondria: 5 x3, of: 1, cells: pieces of " cells".
    let cells = top.iter().find(|w| w["word"] == "cells").unwrap()["pieces"]
        .as_array()
        .unwrap()
        .len();
    let expected = (1 + 1 + 15 + 1 + cells) as f64 / 7.0;
    assert!((audit["tokens_per_word"].as_f64().unwrap() - expected).abs() < 1e-12);
    assert_eq!(audit["fragmented"][0]["word"], "mitochondria");
}

#[test]
fn per_word_pseudo_perplexity_counts_the_texts_words_for_any_vocabulary() {
    // Short GO definitions (no line is truncated at 64 tokens), and the fixture model extended
    // with 30 words of them: the same text in fewer tokens.
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<String> = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt"))
        .unwrap()
        .lines()
        .filter(|l| l.len() < 150)
        .take(40)
        .map(String::from)
        .collect();
    let words_in_text: u64 = text
        .iter()
        .map(|l| l.split_whitespace().count() as u64)
        .sum();
    let input = dir.path().join("text.txt");
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let original = common::fixture("roberta-tiny");
    let extended = dir.path().join("extended");
    common::masklm_ok([
        "vocab",
        "extend",
        "--model",
        original.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--add",
        "30",
        "--min-count",
        "2",
        "--out",
        extended.to_str().unwrap(),
    ]);
    let mut tokens = Vec::new();
    for model in [&original, &extended] {
        // Line by line, and 32-token blocks (most blocks start inside a word).
        for (packing, length) in [("line", "64"), ("full", "32")] {
            let out = common::masklm_ok([
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--packing",
                packing,
                "--max-seq-length",
                length,
                "--pseudo-perplexity",
                "--json",
            ]);
            let doc: Value = serde_json::from_str(out.trim()).unwrap();
            let words = doc["words"].as_u64().unwrap();
            assert_eq!(words, words_in_text, "{} {packing}", model.display());
            // One log-likelihood, two denominators.
            let (per_token, per_word) = (
                doc["pseudo_perplexity"].as_f64().unwrap(),
                doc["pseudo_perplexity_per_word"].as_f64().unwrap(),
            );
            let n = doc["pseudo_tokens"].as_u64().unwrap();
            let expected = (per_token.ln() * n as f64 / words as f64).exp();
            assert!(
                (per_word / expected - 1.0).abs() < 1e-9,
                "{per_word} vs {expected}"
            );
            tokens.push(n);
        }
    }
    // The extended vocabulary scores the same words in fewer tokens.
    assert!(tokens[2] < tokens[0] && tokens[3] < tokens[1], "{tokens:?}");
}
