//! ModernBERT through every command, as a user runs them (the `masklm` binary): the steps of
//! `scripts/dapt.sh` on the fixture-size `tests/fixtures/modernbert-tiny` (audit, extend,
//! continue with exact resume, eval, probes, fill-mask, export read by transformers, inspect),
//! and a ModernBERT trained from scratch with a masklm tokenizer.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// `masklm train` with `args` after it.
fn train(args: &[&str]) -> String {
    let mut all = vec!["train"];
    all.extend_from_slice(args);
    common::masklm_ok(all)
}

/// The reference Python's check script `name` with `args`: must print `expect`.
fn python_check(name: &str, args: Vec<String>, expect: &str) {
    let Some(python) = common::reference_python("transformers, torch") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name);
    let output = std::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(expect),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Losses of a run by step, from its metrics.
fn losses(run: &Path) -> std::collections::BTreeMap<u64, f64> {
    common::losses(run)
}

/// Held-out text: the corpus's last 40 short lines.
fn held_out(dir: &Path) -> PathBuf {
    let text: Vec<String> = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt"))
        .unwrap()
        .lines()
        .filter(|l| l.len() < 150)
        .rev()
        .take(40)
        .map(String::from)
        .collect();
    let path = dir.join("heldout.txt");
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

#[test]
fn modernbert_goes_through_the_dapt_steps() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::fixture("modernbert-tiny");
    let corpus = common::fixture("tokenizer-corpus.txt");

    // audit: how the ModernBERT tokenizer splits the domain's words.
    let audit: Value = serde_json::from_str(&common::masklm_ok([
        "vocab",
        "audit",
        "--model",
        &s(&base),
        "--input",
        &s(&corpus),
        "--json",
    ]))
    .unwrap();
    let before = audit["tokens_per_word"].as_f64().unwrap();
    assert!(audit["words"].as_u64().unwrap() > 1000, "{audit}");

    // extend: new rows are the mean of their pieces, and transformers reads the result.
    let extended = dir.path().join("extended");
    common::masklm_ok([
        "vocab",
        "extend",
        "--model",
        &s(&base),
        "--input",
        &s(&corpus),
        "--add",
        "24",
        "--min-count",
        "3",
        "--out",
        &s(&extended),
    ]);
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(extended.join("vocab_extension.json")).unwrap(),
    )
    .unwrap();
    let (old, new) = (
        report["old_vocab_size"].as_u64().unwrap(),
        report["new_vocab_size"].as_u64().unwrap(),
    );
    assert_eq!(new, old + report["added"].as_array().unwrap().len() as u64);
    assert!(new > old, "{report}");
    // The specials keep their ids: ModernBERT's sit after its BPE vocabulary, where the new
    // tokens go.
    let (before_tok, after_tok) = (
        masklm_data::load_tokenizer(&base).unwrap(),
        masklm_data::load_tokenizer(&extended).unwrap(),
    );
    assert_eq!(
        (
            after_tok.mask_id,
            after_tok.pad_id,
            after_tok.bos_id,
            after_tok.eos_id
        ),
        (
            before_tok.mask_id,
            before_tok.pad_id,
            before_tok.bos_id,
            before_tok.eos_id
        )
    );
    let masked = "The [MASK] of a protein.";
    assert_eq!(
        after_tok.encode(masked).unwrap(),
        before_tok.encode(masked).unwrap()
    );
    let audit: Value = serde_json::from_str(&common::masklm_ok([
        "vocab",
        "audit",
        "--model",
        &s(&extended),
        "--input",
        &s(&corpus),
        "--json",
    ]))
    .unwrap();
    let after = audit["tokens_per_word"].as_f64().unwrap();
    assert!(after < before, "tokens per word {before} -> {after}");
    python_check(
        "check_vocab_extension.py",
        vec![s(&base), s(&extended)],
        "failed=0",
    );

    // continue pre-training from the extended folder, with dropout in every place ModernBERT
    // has it, then the same run in two parts: the resumed losses are the uninterrupted ones.
    let config = dir.path().join("dapt.toml");
    std::fs::write(
        &config,
        format!(
            r#"
seed = 5
[model]
init_from = "{extended}"
embedding_dropout = 0.1
attention_dropout = 0.1
mlp_dropout = 0.1
[data]
tokenizer = "{extended}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 48
validation_split = 0.05
[optimizer]
lr = 1e-3
[schedule]
# Constant after warmup: the part run's schedule is the whole run's (max_steps differs).
decay = "constant"
warmup_steps = 2
[training]
batch_size = 4
max_steps = 6
[eval]
eval_steps = 3
batch_size = 8
[checkpoint]
save_steps = 3
[logging]
log_steps = 1
"#,
            extended = s(&extended),
            corpus = s(&corpus),
            cache = s(&dir.path().join("cache")),
        ),
    )
    .unwrap();
    let whole = dir.path().join("whole");
    train(&["--config", &s(&config), "--out", &s(&whole)]);
    let part = dir.path().join("part");
    train(&[
        "--config",
        &s(&config),
        "--out",
        &s(&part),
        "--set",
        "training.max_steps=3",
    ]);
    train(&["--resume", &s(&part), "--set", "training.max_steps=6"]);
    let (whole_losses, part_losses) = (losses(&whole), losses(&part));
    assert_eq!(whole_losses.len(), 6, "{whole_losses:?}");
    assert_eq!(
        whole_losses, part_losses,
        "a resumed ModernBERT run must repeat the uninterrupted one's losses exactly"
    );
    let best = whole.join("checkpoints/best");
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("checkpoints/step-0000006/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["model_type"], "modernbert");
    assert_eq!(saved["vocab_size"].as_u64(), Some(new));

    // eval: perplexity and pseudo-perplexity of the held-out text, finite and sane.
    let heldout = held_out(dir.path());
    let doc: Value = serde_json::from_str(
        common::masklm_ok([
            "eval",
            "--model",
            &s(&best),
            "--input",
            &s(&heldout),
            "--max-seq-length",
            "48",
            "--pseudo-perplexity",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let pppl = doc["pseudo_perplexity"].as_f64().unwrap();
    // The fixture's random weights score worse than uniform; what matters here is that the
    // ModernBERT checkpoint is scored at all (parity of the numbers: modernbert_parity.rs).
    assert!(pppl.is_finite() && pppl > 1.0, "{doc}");
    assert!(doc["pseudo_tokens"].as_u64().unwrap() > doc["words"].as_u64().unwrap());

    // probes, written with `<mask>` (any model's mask token is accepted), answered by words
    // the extension made single tokens.
    let added: Vec<&str> = report["added"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["word"].as_str())
        .collect();
    assert!(added.len() >= 2, "{report}");
    let probes = dir.path().join("probes.tsv");
    std::fs::write(
        &probes,
        format!(
            "The <mask> of a protein into the nucleus.\t{}\t{}\n\
             Any process that activates the <mask> of a gene.\t{}\n",
            added[0], added[1], added[1]
        ),
    )
    .unwrap();
    let probed: Value = serde_json::from_str(
        common::masklm_ok([
            "probe",
            "--model",
            &s(&best),
            "--probes",
            &s(&probes),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let mrr = probed["mrr"].as_f64().unwrap();
    assert!(mrr > 0.0 && mrr <= 1.0, "{probed}");

    // export: transformers loads it as ModernBertForMaskedLM and its fill-mask pipeline gives
    // masklm's top-k and scores.
    let export = dir.path().join("export");
    common::masklm_ok(["export", "--checkpoint", &s(&best), "--out", &s(&export)]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "ModernBertForMaskedLM");
    python_check(
        "check_hf_export.py",
        vec![
            "--masklm".into(),
            env!("CARGO_BIN_EXE_masklm").into(),
            "--export".into(),
            s(&export),
            "--checkpoint".into(),
            s(&best),
            "The [MASK] of a protein into the nucleus.".into(),
            "Catalysis of the reaction: ATP + H2O = ADP + [MASK].".into(),
            "Two masks: [MASK] and [MASK].".into(),
        ],
        "EXPORT_CHECK passed=3 failed=0",
    );

    // inspect names the family of both a Hub folder and a checkpoint.
    for model in [&base, &best] {
        let printed = common::masklm_ok(["inspect", "--model", &s(model)]);
        assert!(
            printed.contains("\"model_type\": \"modernbert\""),
            "{printed}"
        );
    }
}

#[test]
fn modernbert_trains_from_scratch_with_a_masklm_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    // masklm's own byte-level BPE tokenizer (RoBERTa's specials: <s>=0, <pad>=1, </s>=2):
    // the config takes its special ids from it. A window of 16 in 48-token rows, so local
    // layers see only part of each row.
    let config = dir.path().join("scratch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
seed = 11
[model]
model_type = "modernbert"
hidden_size = 32
num_hidden_layers = 3
num_attention_heads = 2
intermediate_size = 48
global_attn_every_n_layers = 3
local_attention = 16
max_position_embeddings = 64
embedding_dropout = 0.1
[data]
tokenizer = "{tokenizer}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 48
validation_split = 0.05
[optimizer]
lr = 3e-3
[schedule]
# Constant after warmup: the part run's schedule is the whole run's (max_steps differs).
decay = "constant"
warmup_steps = 4
[training]
batch_size = 8
max_steps = 40
[eval]
eval_steps = 40
batch_size = 16
[checkpoint]
save_steps = 20
[logging]
log_steps = 1
"#,
            tokenizer = s(&common::fixture("tokenizer-go")),
            corpus = s(&common::fixture("tokenizer-corpus.txt")),
            cache = s(&dir.path().join("cache")),
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    train(&["--config", &s(&config), "--out", &s(&run)]);
    let losses = losses(&run);
    assert_eq!(losses.len(), 40);
    let mean = |steps: std::ops::Range<u64>| -> f64 {
        steps.clone().map(|s| losses[&(s + 1)]).sum::<f64>() / steps.count() as f64
    };
    let (first, last) = (mean(0..5), mean(35..40));
    assert!(last < first - 0.5, "the loss must fall: {first} -> {last}");

    let checkpoint = run.join("checkpoints/step-0000040");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["model_type"], "modernbert");
    for (key, id) in [
        ("pad_token_id", 1),
        ("cls_token_id", 0),
        ("bos_token_id", 0),
        ("sep_token_id", 2),
        ("eos_token_id", 2),
    ] {
        assert_eq!(saved[key], id, "{key} from the tokenizer");
    }
    assert_eq!(
        saved["layer_types"],
        serde_json::json!(["full_attention", "sliding_attention", "sliding_attention"])
    );

    // Resumed from step 20, the run ends where the uninterrupted one ended.
    let part = dir.path().join("part");
    train(&[
        "--config",
        &s(&config),
        "--out",
        &s(&part),
        "--set",
        "training.max_steps=20",
    ]);
    train(&["--resume", &s(&part), "--set", "training.max_steps=40"]);
    assert_eq!(common::losses(&part), losses);

    let export = dir.path().join("export");
    common::masklm_ok([
        "export",
        "--checkpoint",
        &s(&checkpoint),
        "--out",
        &s(&export),
    ]);
    python_check(
        "check_hf_export.py",
        vec![
            "--masklm".into(),
            env!("CARGO_BIN_EXE_masklm").into(),
            "--export".into(),
            s(&export),
            "--checkpoint".into(),
            s(&checkpoint),
            "Catalysis of the reaction: ATP + H2O = ADP + <mask>.".into(),
            "The <mask> of a protein into the <mask>.".into(),
        ],
        "EXPORT_CHECK passed=2 failed=0",
    );
}
