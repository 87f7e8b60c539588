//! `masklm train` end to end on a tiny model: learning, exact resume after SIGKILL, NaN
//! handling, and the files a run leaves. Uses the `tokenizer-go` fixture (see
//! tests/data_pipeline.rs) and `tests/fixtures/tokenizer-corpus.txt`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use masklm_train::{Silent, Start, TrainConfig, TrainError, train};

/// `train` in this process on the CPU backend, silently, never interrupted.
fn train_on_cpu(config: &TrainConfig, run: &Path) -> Result<masklm_train::RunOutcome, TrainError> {
    train(
        config,
        run,
        Start::New,
        &Device::flex(),
        &Silent,
        &AtomicBool::new(false),
    )
}

#[test]
fn tiny_model_learns_and_leaves_a_complete_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig::load(&common::write_tiny_config(dir.path(), ""), &[]).unwrap();
    let run = dir.path().join("run");
    let outcome = train_on_cpu(&config, &run).unwrap();
    let (first, last) = (outcome.first_eval.unwrap(), outcome.final_eval.unwrap());
    println!("validation loss {} -> {}", first.loss, last.loss);
    assert!(
        last.loss < first.loss - 0.3,
        "validation loss {} -> {}",
        first.loss,
        last.loss
    );
    assert_eq!(outcome.last_step, 50);

    // The run directory: resolved config, metrics with the documented names, TensorBoard
    // events, and a verified checkpoint holding the tokenizer.
    assert!(run.join("config.toml").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r.get("loss").is_some() && r.get("lr").is_some())
    );
    let evals: Vec<_> = records
        .iter()
        .filter(|r| r.get("eval_perplexity").is_some())
        .collect();
    assert_eq!(evals.len(), 5);
    assert!(
        evals
            .iter()
            .all(|r| r.get("eval_loss").is_some() && r.get("eval_accuracy").is_some())
    );
    let events = std::fs::read_dir(run.join("tensorboard")).unwrap().count();
    assert!(events >= 1);
    masklm_infer::checkpoint::verify_checkpoint(&outcome.checkpoint).unwrap();
    assert!(outcome.checkpoint.join("tokenizer.json").is_file());

    // A second run in the same directory is refused rather than overwriting it.
    let err = train_on_cpu(&config, &run).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");

    // TensorBoard's own reader, where the reference venv is installed (CI installs it).
    if let Some(python) = common::reference_python("tensorboard") {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_tensorboard.py");
        let out = Command::new(&python)
            .arg(script)
            .arg(run.join("tensorboard"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("train/loss 50") && stdout.contains("eval/perplexity 5"),
            "{stdout}"
        );
    }
}

#[test]
fn resume_after_sigkill_reproduces_every_later_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        common::write_tiny_config(dir.path(), "[checkpoint]\nsave_steps = 4\nkeep_last = 3\n");
    let masklm = env!("CARGO_BIN_EXE_masklm");
    let run = |out: &Path| {
        Command::new(masklm)
            .args(["train", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(out)
            .args([
                "--set",
                "training.max_steps=24",
                "--set",
                "eval.eval_steps=0",
            ])
            .output()
            .unwrap()
    };
    let whole = dir.path().join("whole");
    let out = run(&whole);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same run, killed with SIGKILL once its step-8 checkpoint exists.
    let killed = dir.path().join("killed");
    let mut child = Command::new(masklm)
        .args(["train", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&killed)
        .args([
            "--set",
            "training.max_steps=24",
            "--set",
            "eval.eval_steps=0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = killed.join("checkpoints/latest");
    let start = Instant::now();
    loop {
        let at = std::fs::read_to_string(&latest).unwrap_or_default();
        if at.trim() >= "step-0000008" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let resumed_from = std::fs::read_to_string(&latest).unwrap();
    assert!(
        resumed_from.trim() < "step-0000024",
        "killed too late: {resumed_from}"
    );

    let stdout = common::masklm_ok(["train".as_ref(), "--resume".as_ref(), killed.as_os_str()]);
    assert!(stdout.contains("finished 24 steps"), "{stdout}");

    let (a, b) = (common::losses(&whole), common::losses(&killed));
    assert_eq!(a.len(), 24);
    assert_eq!(b.len(), 24);
    for (step, loss) in &a {
        let other = b[step];
        assert!(
            (loss - other).abs() <= 1e-6,
            "step {step}: {loss} uninterrupted vs {other} resumed"
        );
    }
}

#[test]
fn span_masking_trains_resumes_exactly_and_old_whole_word_runs_resume() {
    // `strategy = "span"` (SpanBERT) on the tiny fixture: a run stopped at step 3 and resumed
    // gives the uninterrupted run's losses (span masks, like the others, are a function of
    // (seed, epoch, index)), and they are not the token-masking run's losses.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(dir.path(), "");
    let span = ["masking.strategy=\"span\""];
    let whole = dir.path().join("span-whole");
    common::train_run(&config, &whole, "cpu", 6, &span);
    let part = dir.path().join("span-part");
    common::train_run(&config, &part, "cpu", 3, &span);
    let saved = std::fs::read_to_string(part.join("config.toml")).unwrap();
    assert!(
        saved.contains("strategy = \"span\"") && saved.contains("span_max_length = 10"),
        "{saved}"
    );
    let resume = |run: &Path| {
        common::masklm_ok([
            "train".as_ref(),
            "--resume".as_ref(),
            run.as_os_str(),
            "--set".as_ref(),
            "training.max_steps=6".as_ref(),
        ])
    };
    resume(&part);
    let (span_whole, span_part) = (common::losses(&whole), common::losses(&part));
    assert_eq!(span_part.len(), 6, "{span_part:?}");
    let worst = common::worst_loss_diff(&span_whole, &span_part);
    // Another mask moves a loss by ~1e-2; float reordering, by ~1e-7.
    assert!(
        worst <= 1e-5,
        "resumed span-masking losses differ by {worst}"
    );

    // A run saved before `strategy` existed (`whole_word = false`) still resumes, and its
    // config is written back in the new spelling. Its losses are token masking's, which
    // differ from span masking's.
    let token = dir.path().join("token");
    common::train_run(&config, &token, "cpu", 3, &[]);
    let saved = token.join("config.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("strategy = \"token\"\n"), "{text}");
    std::fs::write(
        &saved,
        text.replace("strategy = \"token\"\n", "whole_word = false\n"),
    )
    .unwrap();
    resume(&token);
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(
        text.contains("strategy = \"token\"") && !text.contains("whole_word"),
        "{text}"
    );
    let token = common::losses(&token);
    assert_eq!(token.len(), 6, "{token:?}");
    let apart = common::worst_loss_diff(&span_whole, &token);
    assert!(
        apart > 1e-3,
        "span and token masking gave the same losses ({apart})"
    );
}

#[test]
fn mixed_precision_follows_f32_and_keeps_f32_weights() {
    // burn's CPU backend runs bf16/f16 too (slowly: it is off by default); the optional
    // backends are covered by tests/backends.rs.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(dir.path(), "");
    common::train_run(&config, &dir.path().join("f32"), "cpu", 12, &[]);
    let reference = common::losses(&dir.path().join("f32"));
    for precision in ["bf16", "f16"] {
        let out = dir.path().join(precision);
        let set = format!("training.precision=\"{precision}\"");
        let checkpoint = common::train_run(&config, &out, "cpu", 12, &[&set]);
        let losses = common::losses(&out);
        assert_eq!(losses.len(), 12);
        let worst = common::worst_loss_diff(&reference, &losses);
        println!("{precision}: 12 losses within {worst:e} of f32");
        assert!(worst <= 2e-3, "{precision}: {worst} from f32");
        assert!(
            worst > 0.0,
            "{precision}: identical to f32, so nothing ran in half precision"
        );
        // The master weights, and so the checkpoint, stay f32.
        let model = masklm_infer::load_model(&checkpoint, &Device::flex())
            .unwrap()
            .model;
        let weight = common::roberta(model).roberta.encoder.layer[0]
            .attention
            .self_attn
            .query
            .weight
            .val();
        assert_eq!(weight.dtype(), burn::tensor::DType::F32);
    }
    // f16 carries its loss scaler in the checkpoint state, for exact resume.
    let state = std::fs::read_to_string(dir.path().join("f16/checkpoints/step-0000012/state.json"))
        .unwrap();
    assert!(state.contains("loss_scaler"), "{state}");
    // ... and its metrics say which steps overflowed (none here) and the scale in use.
    let metrics = std::fs::read_to_string(dir.path().join("f16/metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 12);
    for r in &steps {
        assert_eq!(r["skipped"], false, "{r}");
        assert_eq!(r["loss_scale"], 65536.0, "{r}");
    }
}

fn resume_on_cpu(
    config: &TrainConfig,
    run: &Path,
    from: Option<&str>,
) -> Result<masklm_train::RunOutcome, TrainError> {
    train(
        config,
        run,
        Start::Resume {
            from: from.map(str::to_string),
        },
        &Device::flex(),
        &Silent,
        &AtomicBool::new(false),
    )
}

#[test]
fn non_finite_steps_are_skipped_and_the_named_checkpoint_trains_on() {
    // lr 0 at step 0 (warmup), then 5e29: step 2 computes a finite loss and wrecks the
    // weights, step 3 on are NaN. None of those NaNs may reach the weights, and the run must
    // name step 1 (whose weights went on to a finite step), not step 2.
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_config(dir.path(), "[checkpoint]\nsave_steps = 1\n");
    let sets = |extra: &[&str]| -> Vec<String> {
        [
            "optimizer.lr=1e30",
            "optimizer.max_grad_norm=0",
            "schedule.warmup_steps=2",
            "eval.eval_steps=0",
            "training.max_skipped_steps=3",
            "training.max_steps=8",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let config = TrainConfig::load(&path, &sets(&[])).unwrap();
    let run = dir.path().join("run");
    let err = train_on_cpu(&config, &run).unwrap_err();
    let msg = err.to_string();
    let TrainError::NonFinite {
        step,
        skipped,
        last_checkpoint,
        ..
    } = err
    else {
        panic!("expected a NaN/inf error, got {msg}");
    };
    assert_eq!((step, skipped), (5, 3), "{msg}");
    assert!(
        msg.contains("optimizer.lr") && msg.contains("--from step-0000001"),
        "{msg}"
    );
    let good = last_checkpoint.expect("a checkpoint known to train on");
    assert!(good.ends_with("step-0000001"), "{msg}");

    // Skipped steps leave the weights bit-identical (steps 3, 4, 5 were skipped).
    let weights = |step: usize| {
        std::fs::read(run.join(format!("checkpoints/step-{step:07}/model.bpk"))).unwrap()
    };
    assert_eq!(weights(3), weights(4));
    assert_ne!(weights(1), weights(3));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let skipped: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["skipped"] == true)
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert_eq!(skipped, [3, 4, 5]);

    // The named checkpoint survived rotation and trains on with a sane lr.
    let config = TrainConfig::load(&path, &sets(&["optimizer.lr=1e-3"])).unwrap();
    let outcome = resume_on_cpu(&config, &run, Some("step-0000001")).unwrap();
    assert_eq!(outcome.last_step, 8);
    assert_eq!(outcome.losses.len(), 7);
    assert!(
        outcome.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        outcome.losses
    );
    // The replayed steps replaced the old records instead of appearing twice.
    let steps: Vec<u64> = common::losses(&run).keys().copied().collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("\"loss\"")).count(),
        8,
        "{lines}"
    );
}

#[test]
fn resume_refuses_changed_data_model_or_sampling_and_keeps_the_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_config(dir.path(), "[checkpoint]\nsave_steps = 2\n");
    let base = [
        "training.max_steps=4".to_string(),
        "eval.eval_steps=0".to_string(),
    ];
    let config = TrainConfig::load(&path, &base).unwrap();
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    let saved = run.join("config.toml");
    for (set, key) in [
        ("seed=8", "`seed` was 7, now 8"),
        (
            "training.batch_size=4",
            "`training.batch_size` was 8, now 4",
        ),
        (
            "masking.probability=0.3",
            "`masking.probability` was 0.15, now 0.3",
        ),
        (
            "masking.strategy=\"span\"",
            "`masking.strategy` was \"token\", now \"span\"",
        ),
        (
            "model.hidden_dropout_prob=0.2",
            "`model.hidden_dropout_prob` was 0.1, now 0.2",
        ),
        (
            "data.max_seq_length=32",
            "`data.max_seq_length` was 64, now 32",
        ),
        (
            "training.group_by_length=true",
            "`training.group_by_length` was false, now true",
        ),
    ] {
        let changed = TrainConfig::load(&saved, &[set.to_string()]).unwrap();
        let err = resume_on_cpu(&changed, &run, None).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains("cannot resume"),
            "{set}: {err}"
        );
    }
    // Allowed changes are written into the run's config, so the next resume keeps them.
    let longer = TrainConfig::load(
        &saved,
        &[
            "training.max_steps=6".to_string(),
            "optimizer.lr=1e-3".to_string(),
        ],
    )
    .unwrap();
    let outcome = resume_on_cpu(&longer, &run, None).unwrap();
    assert_eq!(outcome.last_step, 6);
    let reread = TrainConfig::load(&saved, &[]).unwrap();
    assert_eq!(reread.training.max_steps, Some(6));
    assert_eq!(reread.optimizer.lr, 1e-3);
    // A finished run says how to go on instead of "finishing" zero steps.
    let err = resume_on_cpu(&reread, &run, None).unwrap_err().to_string();
    assert!(err.contains("training.max_steps"), "{err}");

    // The data under a running experiment: a changed cache is refused.
    let manifest = dir.path().join("cache/manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen('{', "{\n", 1)).unwrap();
    let more = TrainConfig::load(&saved, &["training.max_steps=8".to_string()]).unwrap();
    let err = resume_on_cpu(&more, &run, None).unwrap_err().to_string();
    assert!(err.contains("changed since the run started"), "{err}");
}

#[test]
fn resume_falls_back_to_the_newest_valid_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        common::write_tiny_config(dir.path(), "[checkpoint]\nsave_steps = 2\nkeep_last = 3\n");
    let config = TrainConfig::load(
        &path,
        &[
            "training.max_steps=6".to_string(),
            "eval.eval_steps=0".to_string(),
        ],
    )
    .unwrap();
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    let longer = TrainConfig::load(
        &run.join("config.toml"),
        &["training.max_steps=8".to_string()],
    )
    .unwrap();
    // The newest checkpoint is damaged and `latest` is gone.
    std::fs::write(run.join("checkpoints/step-0000006/state.json"), "{}").unwrap();
    std::fs::remove_file(run.join("checkpoints/latest")).unwrap();
    let err = resume_on_cpu(&longer, &run, Some("step-0000006"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    let err = resume_on_cpu(&longer, &run, Some("step-0000099"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step-0000004") && err.contains("step-0000002"),
        "{err}"
    );
    let outcome = resume_on_cpu(&longer, &run, None).unwrap();
    assert_eq!(outcome.losses.len(), 4, "resumed from step 4");
}

#[test]
fn a_run_folder_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let _held = masklm_data::lock_folder(&run, "run").unwrap();
    let config = TrainConfig::load(&common::write_tiny_config(dir.path(), ""), &[]).unwrap();
    let err = train_on_cpu(&config, &run).unwrap_err().to_string();
    assert!(err.contains("in use by process"), "{err}");
}

#[test]
fn a_fresh_run_starts_its_metrics_afresh_and_masking_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 99, \"loss\": 1.0}\n").unwrap();
    let path = common::write_tiny_config(dir.path(), "");
    let config = TrainConfig::load(
        &path,
        &[
            "training.max_steps=2".to_string(),
            "eval.eval_steps=0".to_string(),
        ],
    )
    .unwrap();
    train_on_cpu(&config, &run).unwrap();
    let steps: Vec<u64> = common::losses(&run).keys().copied().collect();
    assert_eq!(steps, [1, 2]);
    let err = TrainConfig::load(&path, &["masking.probability=0.0".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("masking.probability"), "{err}");
}

#[test]
fn missing_data_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::tiny_config_text(&dir.path().join("nowhere"), "").replace(
        &format!(
            "inputs = [\"{}\"]",
            common::fixture("tokenizer-corpus.txt").display()
        ),
        "",
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let config = TrainConfig::load(&path, &[]).unwrap();
    let err = train_on_cpu(&config, &dir.path().join("run"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nowhere") && err.contains("manifest.json"),
        "{err}"
    );
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in [
        "quickstart",
        "roberta-base",
        "dapt",
        "dapt-pubmed",
        "pubmed-bert-scratch",
    ] {
        let path = root.join("configs").join(format!("{name}.toml"));
        let mut overrides = Vec::new();
        if name.starts_with("dapt") {
            let fixture = common::fixture("roberta-tiny").display().to_string();
            overrides.push(format!("model.init_from=\"{fixture}\""));
        }
        // Relative paths are relative to the working directory: the repository root.
        let probes = match name {
            "quickstart" => Some("configs/probes-go.tsv"),
            "dapt-pubmed" | "pubmed-bert-scratch" => Some("configs/probes-pubmed.tsv"),
            _ => None,
        };
        if let Some(probes) = probes {
            let probes = root.join(probes).display().to_string();
            overrides.push(format!("eval.probes=\"{probes}\""));
        }
        let config = TrainConfig::load(&path, &overrides).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(config.optimizer.lr > 0.0);
    }
}

#[test]
fn a_new_run_starts_from_a_runs_best_pointer_or_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny_config(dir.path(), "");
    let base = [
        "training.max_steps=2".to_string(),
        "eval.eval_steps=0".to_string(),
    ];
    let first = dir.path().join("first");
    train_on_cpu(&TrainConfig::load(&path, &base).unwrap(), &first).unwrap();
    let best = first.join("checkpoints/best");
    assert!(best.is_file());
    // init_from the pointer, the tokenizer taken from it; then data.tokenizer = the run folder.
    for (name, init, tokenizer) in [
        ("from-pointer", &best, None),
        ("from-folder", &first, Some(&first)),
    ] {
        let mut config = TrainConfig::load(&path, &base).unwrap();
        config.model.init_from = Some(init.clone());
        // As TrainConfig::validate requires: with init_from the shape is the loaded model's.
        config.model.config.clear();
        config.data.tokenizer = tokenizer.cloned();
        let outcome =
            train_on_cpu(&config, &dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(outcome.last_step, 2, "{name}");
    }
}

/// The tiny config with `sets` applied (`--set` assignments).
fn tiny_config(dir: &Path, extra: &str, sets: &[&str]) -> TrainConfig {
    let path = common::write_tiny_config(dir, extra);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(&path, &sets).unwrap()
}

/// The run's own config.toml with `sets` applied (what `--resume RUN --set ...` loads).
fn run_config(run: &Path, sets: &[&str]) -> TrainConfig {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(&run.join("config.toml"), &sets).unwrap()
}

/// The names of a run's step folders, oldest first.
fn step_folders(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

fn pointer(run: &Path, which: &str) -> Option<String> {
    std::fs::read_to_string(run.join("checkpoints").join(which))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Every step folder holds every file a checkpoint needs and verifies; the run (its `latest`)
/// answers fill-mask.
fn assert_self_contained(run: &Path) {
    for name in step_folders(run) {
        let dir = run.join("checkpoints").join(&name);
        for file in masklm_train::checkpoint::REQUIRED_FILES {
            assert!(dir.join(file).is_file(), "{name} has no {file}");
        }
        masklm_infer::checkpoint::verify_checkpoint(&dir).unwrap();
        masklm_data::load_tokenizer(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let out = common::masklm_ok([
        "fill-mask".to_string(),
        "--model".to_string(),
        run.display().to_string(),
        "The <mask> of the cell.".to_string(),
    ]);
    assert!(!out.trim().is_empty(), "fill-mask printed nothing");
}

#[test]
fn a_run_resumed_twice_through_rotation_keeps_self_contained_checkpoints() {
    // Issue #22: a resumed run copied its tokenizer from the checkpoint it resumed from, which
    // rotation then deleted; the second resume's checkpoints had no tokenizer at all.
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        dir.path(),
        "[checkpoint]\nsave_steps = 2\nkeep_last = 2\n",
        &["training.max_steps=10", "eval.eval_steps=0"],
    );
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    assert_self_contained(&run);
    for steps in [20, 24, 26] {
        let longer = run_config(&run, &[&format!("training.max_steps={steps}")]);
        let outcome = resume_on_cpu(&longer, &run, None).unwrap();
        assert_eq!(outcome.last_step, steps);
        assert_self_contained(&run);
    }
    // Rotation deleted every folder the first two legs read their tokenizer from.
    assert_eq!(step_folders(&run), ["step-0000024", "step-0000026"]);
}

#[test]
fn best_names_the_weights_of_the_best_evaluation_off_the_save_schedule() {
    // Evaluate every 3 steps, save every 4 (configs/dapt-pubmed.toml: 100 and 200): an
    // improving evaluation at step 3, 6 or 9 is saved at once, and `best` names it.
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        dir.path(),
        "[checkpoint]\nsave_steps = 4\nkeep_last = 1\n",
        &[
            "training.max_steps=11",
            "eval.eval_steps=3",
            // Measured: evaluations at 3, 6, 9, 11 give perplexity 735, 715, 791, 787: the
            // best at step 6, neither a save step nor the last. No dropout: its random stream
            // is still process-global (issue #23), and tests run side by side.
            "optimizer.lr=5e-2",
            "schedule.warmup_steps=0",
            "schedule.decay=\"constant\"",
            "model.hidden_dropout_prob=0.0",
            "model.attention_probs_dropout_prob=0.0",
        ],
    );
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (best_step, best_perplexity) = records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_perplexity")?.as_f64()?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(
        best_step % 4 != 0 && best_step != 11,
        "the scenario needs the best evaluation off the save schedule; it was at step {best_step}"
    );
    assert_eq!(
        pointer(&run, "best").as_deref(),
        Some(format!("step-{best_step:07}").as_str())
    );
    // Its weights reproduce the logged perplexity: the run's own evaluation, redone.
    let best = run.join("checkpoints").join(format!("step-{best_step:07}"));
    let device = Device::flex();
    let model = masklm_infer::load_model(&best, &device).unwrap().model;
    let cache = dir.path().join("cache");
    let manifest = masklm_data::read_manifest(&cache).unwrap();
    let split = masklm_data::SplitReader::open(&cache, &manifest, "validation").unwrap();
    let vocab = masklm_data::load_tokenizer(&best)
        .unwrap()
        .mask_vocab()
        .unwrap();
    let settings = masklm_infer::EvalSettings {
        masking: config.masking.clone(),
        seed: config.eval.seed,
        batch_size: config.eval.batch_size,
        max_batches: config.eval.max_batches,
    };
    let result = masklm_infer::evaluate_splits(&model, &[&split], &vocab, &settings, &device);
    assert!(
        (result.perplexity - best_perplexity).abs() <= 1e-6 * best_perplexity,
        "best's weights give perplexity {} but the best evaluation logged {best_perplexity}",
        result.perplexity
    );
}

#[test]
fn resume_from_an_earlier_checkpoint_starts_a_clean_branch() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        dir.path(),
        "[checkpoint]\nsave_steps = 2\nkeep_last = 4\n",
        &["training.max_steps=10", "eval.eval_steps=2"],
    );
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    let before = step_folders(&run);
    assert!(before.contains(&"step-0000010".to_string()), "{before:?}");

    // Back to step 4, on to 8 with another learning rate.
    let branch = run_config(&run, &["training.max_steps=8", "optimizer.lr=1e-3"]);
    let outcome = resume_on_cpu(&branch, &run, Some("step-0000004")).unwrap();
    assert_eq!(outcome.losses.len(), 4);
    let after = step_folders(&run);
    assert!(
        after.iter().all(|n| n.as_str() <= "step-0000008"),
        "the old branch's folders are still among the checkpoints: {after:?}"
    );
    assert_eq!(pointer(&run, "latest").as_deref(), Some("step-0000008"));
    let best = pointer(&run, "best").unwrap();
    assert!(
        after.contains(&best),
        "best names {best}, not a folder of the branch"
    );
    // The old branch is kept aside: its checkpoints and its whole metrics file.
    let archives: Vec<_> = std::fs::read_dir(run.join("branches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    assert!(archives[0].join("checkpoints/step-0000010").is_dir());
    assert!(
        common::losses(&archives[0]).contains_key(&10),
        "the archived metrics lost step 10"
    );
    // The run's metrics hold each step once, in order, and nothing of the old branch past 8.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<u64>>());

    // A plain resume continues the new branch, and rotation never prefers the old one.
    let on = run_config(&run, &["training.max_steps=12"]);
    let outcome = resume_on_cpu(&on, &run, None).unwrap();
    assert_eq!(outcome.losses.len(), 4, "resumed from step 8");
    let folders = step_folders(&run);
    assert!(
        folders.ends_with(&[
            "step-0000008".to_string(),
            "step-0000010".to_string(),
            "step-0000012".to_string()
        ]),
        "{folders:?}"
    );
    // Step 10 of the new branch (learning rate 1e-3 from step 4) is not the old one.
    let weights =
        |dir: &Path| std::fs::read(dir.join("checkpoints/step-0000010/model.bpk")).unwrap();
    assert_ne!(weights(&run), weights(&archives[0]));
}

#[test]
fn a_refused_resume_writes_nothing_and_another_runs_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        dir.path(),
        "[checkpoint]\nsave_steps = 2\n",
        &["training.max_steps=4", "eval.eval_steps=0"],
    );
    let run = dir.path().join("run");
    train_on_cpu(&config, &run).unwrap();
    let saved = std::fs::read(run.join("config.toml")).unwrap();
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    // Refused after the frozen-key check: the run already reached step 4. The override
    // (here optimizer.lr, which a resume may change) must not be persisted.
    let shorter = run_config(&run, &["training.max_steps=3", "optimizer.lr=9e-3"]);
    let err = resume_on_cpu(&shorter, &run, None).unwrap_err().to_string();
    assert!(err.contains("already reached step 4"), "{err}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), saved);
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics);

    // --from a checkpoint of another run: refused, naming init_from; nothing moved.
    let other = dir.path().join("other");
    train_on_cpu(&config, &other).unwrap();
    let foreign = other.join("checkpoints/step-0000002");
    let longer = run_config(&run, &["training.max_steps=6"]);
    let err = resume_on_cpu(&longer, &run, foreign.to_str())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a checkpoint of") && err.contains("model.init_from"),
        "{err}"
    );
    assert_eq!(step_folders(&run), ["step-0000002", "step-0000004"]);
    // Its own checkpoint by path, or by pointer, is fine.
    let own = run.join("checkpoints/step-0000004");
    let outcome = resume_on_cpu(&longer, &run, own.to_str()).unwrap();
    assert_eq!(outcome.last_step, 6);

    // `--config` with `--resume` is honoured (it was silently ignored), under the same
    // frozen-key checks as `--set`: the file's own values count, not only the overrides.
    let tiny = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let variant = |name: &str, from: &str, to: &str| {
        let path = dir.path().join(name);
        assert!(tiny.contains(from), "the tiny config has no {from:?}");
        std::fs::write(&path, tiny.replace(from, to)).unwrap();
        path
    };
    let resume_with = |file: &Path, sets: &[&str]| {
        let mut args = vec![
            "train".to_string(),
            "--resume".to_string(),
            run.display().to_string(),
            "--config".to_string(),
            file.display().to_string(),
            "--set".to_string(),
            "eval.eval_steps=0".to_string(),
            "--set".to_string(),
            "checkpoint.save_steps=2".to_string(),
        ];
        for set in sets {
            args.extend(["--set".to_string(), set.to_string()]);
        }
        Command::new(env!("CARGO_BIN_EXE_masklm"))
            .args(&args)
            .output()
            .unwrap()
    };
    let smaller = variant("smaller.toml", "batch_size = 8", "batch_size = 4");
    let out = resume_with(&smaller, &["training.max_steps=8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("`training.batch_size` was 8, now 4"),
        "{stderr}"
    );
    let longer = variant("longer.toml", "max_steps = 50", "max_steps = 8");
    let out = resume_with(&longer, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run_config(&run, &[]).training.max_steps, Some(8));
    assert_eq!(pointer(&run, "latest").as_deref(), Some("step-0000008"));
}

#[test]
fn an_evaluation_with_nothing_to_score_is_an_error_not_no_improvement() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "a\n").unwrap();
    let extra = format!(
        "[eval.sets]\ntiny = \"{}\"\n[checkpoint]\nsave_steps = 2\n",
        tiny.display()
    );
    let config = tiny_config(
        dir.path(),
        &extra,
        &[
            "training.max_steps=6",
            "eval.eval_steps=3",
            "eval.on_start=false",
            "eval.patience=1",
            "eval.best=\"tiny\"",
        ],
    );
    let run = dir.path().join("run");
    match train_on_cpu(&config, &run) {
        Err(TrainError::NonFiniteEval {
            step: 3,
            set,
            tokens: 0,
            ..
        }) => assert_eq!(set, "tiny"),
        other => panic!("expected a NonFiniteEval error at step 3, got {other:?}"),
    }
    // The checkpoint before it survives; nothing was marked best.
    assert_eq!(pointer(&run, "latest").as_deref(), Some("step-0000002"));
    assert_eq!(pointer(&run, "best"), None);
}

#[test]
fn a_cache_other_runs_train_on_is_not_rebuilt_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        dir.path(),
        "",
        &["training.max_steps=2", "eval.eval_steps=0"],
    );
    let first = dir.path().join("first");
    train_on_cpu(&config, &first).unwrap();
    assert!(
        std::fs::read_to_string(dir.path().join("cache/runs.txt"))
            .unwrap()
            .contains("first"),
        "the cache does not list its run"
    );
    // Another run on the same cache with another sequence length: refused, naming the run.
    let shorter = tiny_config(
        dir.path(),
        "",
        &[
            "training.max_steps=2",
            "eval.eval_steps=0",
            "data.max_seq_length=32",
        ],
    );
    let second = dir.path().join("second");
    let err = train_on_cpu(&shorter, &second).unwrap_err().to_string();
    assert!(
        err.contains("max_seq_length") && err.contains("first") && err.contains("rebuild_cache"),
        "{err}"
    );
    let longer = run_config(&first, &["training.max_steps=3"]);
    assert_eq!(resume_on_cpu(&longer, &first, None).unwrap().last_step, 3);
    // A run training now that has not saved yet depends on the cache too (its folder is
    // locked): it is named as well.
    let busy = dir.path().join("busy");
    let held = masklm_data::lock_folder(&busy, "run").unwrap();
    let users = dir.path().join("cache/runs.txt");
    let listed = std::fs::read_to_string(&users).unwrap();
    let busy_line = format!("{}\n", busy.canonicalize().unwrap().display());
    std::fs::write(&users, format!("{listed}{busy_line}")).unwrap();
    let err = train_on_cpu(&shorter, &second).unwrap_err().to_string();
    assert!(err.contains("busy"), "{err}");
    drop(held);

    // Told to: rebuilt, and the binary says so and what it costs the first run.
    let out = Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(["train", "--config"])
        .arg(dir.path().join("config.toml"))
        .arg("--out")
        .arg(&second)
        .args([
            "--set",
            "training.max_steps=2",
            "--set",
            "eval.eval_steps=0",
            "--set",
            "data.max_seq_length=32",
            "--set",
            "data.rebuild_cache=true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rebuilt the token cache") && stderr.contains("can no longer resume"),
        "{stderr}"
    );
    let longer = run_config(&first, &["training.max_steps=4"]);
    let err = resume_on_cpu(&longer, &first, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed since the run started"), "{err}");
}

/// `step -> (loss, lr)` from a run's metrics.jsonl.
fn losses_and_lrs(run: &Path) -> std::collections::BTreeMap<u64, (f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| {
            Some((
                v["step"].as_u64()?,
                (v.get("loss")?.as_f64()?, v.get("lr")?.as_f64()?),
            ))
        })
        .collect()
}

/// Every parameter of a checkpoint's model, in module order.
fn all_weights(checkpoint: &Path) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::Tensor<D>>) {
            self.0.push(common::values(param.val()));
        }
    }
    let model = masklm_infer::load_model(checkpoint, &Device::flex())
        .unwrap()
        .model;
    let mut collect = Collect(Vec::new());
    burn::module::Module::visit(&model, &mut collect);
    collect.0
}

#[test]
fn a_wsd_run_resumed_longer_in_its_stable_phase_is_the_longer_run() {
    // The point of warmup-stable-decay: decide the length late. A StableAdamW run planned for
    // 14 steps (warmup 5, peak held to step 9, decay over the last 4), continued from its
    // step-8 checkpoint with max_steps = 20, must be the run planned for 20 steps from the start:
    // the same lr and loss at every step, bitwise, and the same final weights. This also
    // takes StableAdamW's state through a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(dir.path(), "");
    let train = |out: &Path, extra: &[&str]| {
        let mut args: Vec<String> = vec!["--backend".into(), "cpu".into(), "train".into()];
        args.extend(["--config".into(), config.display().to_string()]);
        args.extend(["--out".into(), out.display().to_string()]);
        for set in [
            "schedule.decay=\"wsd\"",
            "schedule.decay_steps=4",
            "optimizer.name=\"stable_adamw\"",
            "eval.eval_steps=0",
            "checkpoint.save_steps=4",
            "checkpoint.keep_last=5",
        ]
        .iter()
        .chain(extra)
        {
            args.extend(["--set".to_string(), set.to_string()]);
        }
        common::masklm_ok(args)
    };
    let whole = dir.path().join("whole");
    train(&whole, &["training.max_steps=20"]);
    let planned_short = dir.path().join("short");
    train(&planned_short, &["training.max_steps=14"]);
    let out = common::masklm_ok([
        "--backend".to_string(),
        "cpu".to_string(),
        "train".to_string(),
        "--resume".to_string(),
        planned_short.display().to_string(),
        "--from".to_string(),
        "step-0000008".to_string(),
        "--set".to_string(),
        "training.max_steps=20".to_string(),
    ]);
    assert!(out.contains("finished 20 steps"), "{out}");

    let (a, b) = (losses_and_lrs(&whole), losses_and_lrs(&planned_short));
    assert_eq!(a.len(), 20);
    assert_eq!(
        a, b,
        "uninterrupted 20 steps vs 14 planned, resumed at 8 with 20"
    );
    // The run really went through warmup, the held peak and the decay.
    assert_eq!(a[&10].1, 2e-3, "{a:?}");
    assert!(a[&19].1 < 2e-3 && a[&1].1 < 2e-3, "{a:?}");
    let step_20 = |run: &Path| run.join("checkpoints/step-0000020");
    assert!(
        all_weights(&step_20(&whole)) == all_weights(&step_20(&planned_short)),
        "the final weights differ"
    );
    // The shorter plan decayed from step 10 on: its checkpoint there is not the longer run's.
    let archived: Vec<_> = std::fs::read_dir(planned_short.join("branches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let short_lrs = losses_and_lrs(&archived[0]);
    assert!(short_lrs[&12].1 < a[&12].1, "{short_lrs:?}");
}

#[test]
fn a_wsd_run_past_the_start_of_its_decay_refuses_a_new_length() {
    // Planned for 6 steps with the last 3 decaying: at step 6 the decay has happened, so a
    // resume to 12 would jump back to the peak. Refused, naming the way out; the same length
    // resumes (here: nothing left to do) as before.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(dir.path(), "");
    let run = dir.path().join("wsd");
    common::train_run(
        &config,
        &run,
        "cpu",
        6,
        &["schedule.decay=\"wsd\"", "schedule.decay_steps=3"],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(["train", "--resume"])
        .arg(&run)
        .args(["--set", "training.max_steps=12"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("began its decay at step 3 of 6")
            && stderr.contains("training.max_steps=6"),
        "{stderr}"
    );
    assert_eq!(
        common::losses(&run).len(),
        6,
        "the refused resume wrote nothing"
    );

    // Planned for 12 (decay from step 9), branched at step 8 to a 10-step run: that run
    // would have decayed from step 7, so it cannot go on from step 8 at the peak either.
    let long = dir.path().join("wsd-long");
    let out = Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&long)
        .args([
            "--set",
            "schedule.decay=\"wsd\"",
            "--set",
            "schedule.decay_steps=3",
        ])
        .args([
            "--set",
            "training.max_steps=12",
            "--set",
            "checkpoint.save_steps=4",
        ])
        .args(["--set", "eval.eval_steps=0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(["train", "--resume"])
        .arg(&long)
        .args(["--from", "step-0000008", "--set", "training.max_steps=10"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("run of 10 steps decays from step 7, but this run is at step 8")
            && stderr.contains("at least 11 steps or 12 as planned"),
        "{stderr}"
    );
}

#[test]
fn steps_with_nothing_masked_and_an_overlapping_wsd_schedule_are_explained() {
    // Rows of `<s> token </s>` (max_seq_length 3), one per step: 15% masking leaves most steps
    // with nothing masked, and the CLI must say that, not "loss NaN". A WSD schedule with 5
    // warmup + 4 decay steps in a 6-step run is allowed (as transformers), and said.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(dir.path(), "");
    let run = dir.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masklm"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&run)
        .args(
            [
                "data.max_seq_length=3",
                "training.batch_size=1",
                "training.max_steps=6",
                "training.max_skipped_steps=100",
                "eval.eval_steps=0",
                "schedule.decay=\"wsd\"",
                "schedule.decay_steps=4",
            ]
            .iter()
            .flat_map(|s| ["--set", s]),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("5 warmup + 4 decay steps are more than the run's 6 steps"),
        "{stderr}"
    );
    let skipped: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["skipped"] == true)
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert!(!skipped.is_empty(), "some step masked nothing");
    for step in skipped {
        assert!(
            stdout.contains(&format!(
                "step {step}: skipped: no token of the step's batches was masked"
            )),
            "step {step}: {stdout}"
        );
    }
    assert!(!stdout.contains("loss NaN"), "{stdout}");
}
