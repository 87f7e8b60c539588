//! Bad-input cases about what commands write and load: an `--out` that is the command's own
//! input, two writers on one output, the mode of exported files, loads beyond the machine's
//! memory, and the messages of incomplete checkpoints, probe files and `vocab extend --add`.
//! Each case checks the exit status and message and then reads back what must have survived.
//!
//! Uses the `roberta-tiny`, `roberta-tiny-b-bin` and `tokenizer-go` fixtures and tiny
//! training runs made here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PANIC_TEXT: [&str; 4] = ["panicked", "RUST_BACKTRACE", "unwrap()", "stack backtrace"];

/// The binary under test: this build's, or `MASKLM_HOSTILE_BIN` (to run these cases against
/// another build, e.g. an older commit's).
fn binary() -> String {
    std::env::var("MASKLM_HOSTILE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_masklm").to_string())
}

fn masklm_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("the masklm binary runs")
}

fn masklm(args: &[&str]) -> Output {
    masklm_env(args, &[])
}

/// `out` must be a clean failure (exit 1, not a signal or panic) whose stderr names every
/// one of `needles`; `case` says which case failed.
fn assert_fails(case: &str, out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: {:?}\n{stderr}",
        out.status
    );
    for text in PANIC_TEXT {
        assert!(!stderr.contains(text), "{case}: panic text in\n{stderr}");
    }
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{case}: {needle:?} not in\n{stderr}"
        );
    }
}

fn assert_works(case: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// A Hugging Face folder: the roberta-tiny weights with the tokenizer-go files.
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

/// A two-step tiny run in `dir/run`; returns its checkpoint.
fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let config = common::write_tiny_config(dir, "");
    common::train_run(&config, &dir.join("run"), "cpu", 2, &[])
}

/// Every file of a folder with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// fill-mask on `model` works: the folder's tokenizer and weights still belong together.
fn fill_mask_works(case: &str, model: &Path) {
    let out = masklm(&["fill-mask", "--model", s(model), "The <mask> of the cell."]);
    let stdout = assert_works(case, &out);
    assert!(stdout.lines().count() > 1, "{case}: {stdout}");
}

#[test]
fn export_onto_or_around_its_checkpoint_is_refused_and_the_checkpoint_survives() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let before = snapshot(&checkpoint);
    let link = dir.path().join("link-to-checkpoint");
    std::os::unix::fs::symlink(&checkpoint, &link).unwrap();
    let run = dir.path().join("run");
    for (case, out) in [
        ("out is the checkpoint", checkpoint.clone()),
        ("out is a symlink to it", link.clone()),
        ("out is inside it", checkpoint.join("hf")),
        ("out is the run folder holding it", run.clone()),
    ] {
        let result = masklm(&[
            "export",
            "--checkpoint",
            s(&checkpoint),
            "--out",
            s(&out),
            "--force",
        ]);
        assert_fails(
            case,
            &result,
            &["--out", s(&out), "--checkpoint", "own input"],
        );
        assert_eq!(
            snapshot(&checkpoint),
            before,
            "{case}: the checkpoint changed"
        );
    }
    // The run folder as --checkpoint resolves to its latest step: the same refusal.
    let result = masklm(&[
        "export",
        "--checkpoint",
        s(&run),
        "--out",
        s(&checkpoint),
        "--force",
    ]);
    assert_fails(
        "out is the run's latest checkpoint",
        &result,
        &["own input"],
    );
    fill_mask_works("checkpoint after refused exports", &checkpoint);
}

#[test]
fn vocab_extend_onto_its_model_is_refused_and_the_model_survives() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_folder(dir.path());
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "mitochondrion\n").unwrap();
    let before = snapshot(&hf);
    for (case, out) in [
        ("out is the model", hf.clone()),
        ("out is inside the model", hf.join("extended")),
        ("out contains the model", dir.path().to_path_buf()),
    ] {
        let result = masklm(&[
            "vocab",
            "extend",
            "--model",
            s(&hf),
            "--words",
            s(&words),
            "--out",
            s(&out),
            "--force",
        ]);
        assert_fails(case, &result, &["--out", "--model", s(&hf), "own input"]);
        assert_eq!(snapshot(&hf), before, "{case}: the model folder changed");
    }
    fill_mask_works("model after refused extensions", &hf);
}

#[test]
fn report_over_its_own_metrics_is_refused_and_beside_them_works() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let metrics = "{\"step\": 1, \"loss\": 6.5}\n{\"step\": 2, \"eval_loss\": 6.1}\n";
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    std::fs::write(run.join("config.toml"), "seed = 1\n").unwrap();
    let link = dir.path().join("metrics-link.jsonl");
    std::os::unix::fs::symlink(run.join("metrics.jsonl"), &link).unwrap();
    for (case, out, input) in [
        (
            "out is metrics.jsonl",
            run.join("metrics.jsonl"),
            "metrics.jsonl",
        ),
        ("out is config.toml", run.join("config.toml"), "config.toml"),
        ("out is a symlink to metrics.jsonl", link, "metrics.jsonl"),
        (
            "out goes through .. to metrics.jsonl",
            run.join("../run/metrics.jsonl"),
            "metrics.jsonl",
        ),
    ] {
        let result = masklm(&["report", s(&run), "--out", s(&out)]);
        assert_fails(case, &result, &["--out", input, "own input"]);
        let kept = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert_eq!(kept, metrics, "{case}: metrics.jsonl changed");
    }
    let html = run.join("report.html");
    assert_works(
        "report beside the metrics",
        &masklm(&["report", s(&run), "--out", s(&html)]),
    );
    assert!(std::fs::read_to_string(&html).unwrap().contains("<html"));
}

#[test]
fn corpus_commands_refuse_an_out_inside_or_around_their_input() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let text = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt")).unwrap();
    std::fs::write(corpus.join("a.txt"), &text).unwrap();
    let tokenizer = common::fixture("tokenizer-go");
    let glob = format!("{}/*.txt", s(&corpus));
    let (tok_out, cache_out) = (corpus.join("tok"), corpus.join("cache"));
    let cases: [(&str, Vec<&str>); 4] = [
        (
            "tokenizer train into its corpus folder",
            vec![
                "tokenizer",
                "train",
                "--input",
                s(&corpus),
                "--out",
                s(&tok_out),
            ],
        ),
        (
            "prepare into its corpus folder",
            vec![
                "prepare",
                "--tokenizer",
                s(&tokenizer),
                "--input",
                s(&corpus),
                "--out",
                s(&cache_out),
            ],
        ),
        (
            "prepare over a folder holding its corpus files (a glob)",
            vec![
                "prepare",
                "--tokenizer",
                s(&tokenizer),
                "--input",
                &glob,
                "--out",
                s(&corpus),
            ],
        ),
        (
            "prepare over its tokenizer's folder's parent",
            vec![
                "prepare",
                "--tokenizer",
                s(&tokenizer),
                "--input",
                s(&corpus),
                "--out",
                s(tokenizer.parent().unwrap()),
            ],
        ),
    ];
    for (case, args) in cases {
        assert_fails(case, &masklm(&args), &["--out", "own input"]);
        let names: Vec<_> = std::fs::read_dir(&corpus)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["a.txt"], "{case}: the corpus folder changed");
        assert_eq!(
            std::fs::read_to_string(corpus.join("a.txt")).unwrap(),
            text,
            "{case}"
        );
    }
}

#[test]
fn vocab_extend_holds_its_out_lock_and_concurrent_runs_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_folder(dir.path());
    let out = dir.path().join("extended");
    let words: Vec<PathBuf> = [
        ["mitochondrion", "phosphorylation"],
        ["ribosome", "glycolysis"],
    ]
    .iter()
    .enumerate()
    .map(|(i, list)| {
        let path = dir.path().join(format!("words-{i}.txt"));
        std::fs::write(&path, list.join("\n")).unwrap();
        path
    })
    .collect();
    let extend = |words: &Path| {
        Command::new(binary())
            .args([
                "vocab",
                "extend",
                "--model",
                s(&hf),
                "--words",
                s(words),
                "--out",
                s(&out),
                "--force",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Held by another process (here, this one): refused, naming the holder.
    let lock = masklm_data::lock_folder(&out, "test").unwrap();
    let held = extend(&words[0]).wait_with_output().unwrap();
    assert_fails(
        "out locked by another process",
        &held,
        &["in use", &std::process::id().to_string()],
    );
    drop(lock);
    // Two at once: each either wins the lock or is refused; what is left is one whole run.
    let (a, b) = (extend(&words[0]), extend(&words[1]));
    let results = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    assert!(
        results.iter().any(|r| r.status.success()),
        "neither extension finished"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab_extension.json")).unwrap())
            .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        record["new_vocab_size"], config["vocab_size"],
        "report and weights of two runs"
    );
    let tokenizer = masklm_data::load_tokenizer(&out).unwrap();
    let added: Vec<&str> = record["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    for token in added {
        assert!(
            tokenizer.tokenizer.token_to_id(token).is_some(),
            "{token} not in the tokenizer"
        );
    }
    fill_mask_works("concurrently extended folder", &out);
}

/// The mode a newly created file gets in `dir` (0666 less this process's umask).
fn new_file_mode(dir: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe");
    std::fs::write(&probe, "").unwrap();
    let mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    std::fs::remove_file(probe).unwrap();
    mode
}

#[test]
fn exported_and_extended_files_have_a_new_files_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let export = dir.path().join("export");
    assert_works(
        "export",
        &masklm(&[
            "export",
            "--checkpoint",
            s(&checkpoint),
            "--out",
            s(&export),
        ]),
    );
    let hf = hf_folder(dir.path());
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "mitochondrion\n").unwrap();
    let extended = dir.path().join("extended");
    let args = [
        "vocab",
        "extend",
        "--model",
        s(&hf),
        "--words",
        s(&words),
        "--out",
        s(&extended),
    ];
    assert_works("vocab extend", &masklm(&args));
    let want = new_file_mode(dir.path());
    for folder in [&export, &extended] {
        for file in ["model.safetensors", "config.json", "tokenizer.json"] {
            let path = folder.join(file);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode,
                want,
                "{}: mode {mode:o}, a new file gets {want:o}",
                path.display()
            );
        }
        fill_mask_works("exported folder", folder);
    }
}

#[test]
fn loads_beyond_the_memory_available_are_refused_with_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::fixture("roberta-tiny");
    let limit = [("MASKLM_MEMORY_LIMIT", "100000")];
    let out = masklm_env(&["inspect", "--model", s(&tiny)], &limit);
    assert_fails(
        "Hub folder under a 100 kB limit",
        &out,
        &[
            "MASKLM_MEMORY_LIMIT",
            "needs about",
            "vocab_size",
            "config.json",
        ],
    );
    let out = masklm_env(&["fill-mask", "--model", s(&tiny), "a <mask>"], &limit);
    assert_fails(
        "fill-mask under a 100 kB limit",
        &out,
        &["MASKLM_MEMORY_LIMIT", "parameters"],
    );
    let out = masklm_env(
        &["inspect", "--model", s(&tiny)],
        &[("MASKLM_MEMORY_LIMIT", "lots")],
    );
    assert_fails(
        "unreadable limit",
        &out,
        &["MASKLM_MEMORY_LIMIT", "\"lots\""],
    );
    assert_works("no limit", &masklm(&["inspect", "--model", s(&tiny)]));
    // A new run's model too, before any weight is allocated.
    let config = common::write_tiny_config(dir.path(), "");
    let run = dir.path().join("run");
    let args = ["train", "--config", s(&config), "--out", s(&run)];
    let out = masklm_env(&args, &limit);
    assert_fails(
        "new run under a 100 kB limit",
        &out,
        &["MASKLM_MEMORY_LIMIT"],
    );
}

#[test]
fn a_bin_folder_whose_config_outgrows_its_weights_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fixture = common::fixture("roberta-tiny-b-bin");
    std::fs::copy(
        fixture.join("pytorch_model.bin"),
        bin.join("pytorch_model.bin"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixture.join("config.json")).unwrap();
    // (case, config.json edits, what the message names)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 2] = [
        // 16M x 1020 f32 is 65 GB: the allocator aborted here before the header was read.
        (
            "vocab 16M, hidden 1020",
            &[
                ("\"vocab_size\": 1203", "\"vocab_size\": 16000000"),
                ("\"hidden_size\": 48", "\"hidden_size\": 1020"),
            ],
            &["word_embeddings", "[1203, 48]", "[16000000, 1020]"],
        ),
        (
            "layers beyond the file's",
            &[("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 300")],
            &["num_hidden_layers 300", "3 layers"],
        ),
    ];
    for (case, edits, needles) in cases {
        let mut edited = config.clone();
        for (from, to) in edits {
            edited = edited.replace(from, to);
        }
        assert_ne!(edited, config, "{case}: the fixture config changed");
        std::fs::write(bin.join("config.json"), edited).unwrap();
        let out = masklm(&["inspect", "--model", s(&bin)]);
        let mut all = vec!["pytorch_model.bin"];
        all.extend_from_slice(needles);
        assert_fails(case, &out, &all);
    }
    std::fs::write(bin.join("config.json"), config).unwrap();
    assert_works(
        "the unedited .bin folder",
        &masklm(&["inspect", "--model", s(&bin)]),
    );
}

#[test]
fn a_checkpoint_without_its_manifest_is_called_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let broken = dir.path().join("step-broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(&checkpoint).unwrap().flatten() {
        if entry.file_name() != "manifest.json" {
            std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
        }
    }
    let needles = ["incomplete", "manifest.json", s(&broken)];
    let out = masklm(&[
        "fill-mask",
        "--model",
        s(&broken),
        "The <mask> of the cell.",
    ]);
    assert_fails("fill-mask", &out, &needles);
    let config = dir.path().join("from-broken.toml");
    let text = format!(
        "[model]\ninit_from = {:?}\n[data]\ntokenizer = {:?}\ninputs = [{:?}]\ncache = {:?}\n\
         max_seq_length = 64\n[optimizer]\nlr = 1e-4\n[training]\nbatch_size = 4\nmax_steps = 2\n",
        s(&broken),
        s(&common::fixture("tokenizer-go")),
        s(&common::fixture("tokenizer-corpus.txt")),
        s(&dir.path().join("cache2")),
    );
    std::fs::write(&config, text).unwrap();
    let out = masklm(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("run2")),
    ]);
    assert_fails("init_from", &out, &needles);
}

#[test]
fn probe_file_errors_name_the_probes_option() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_folder(dir.path());
    let probes = dir.path().join("probes.tsv");
    for (case, text, needle) in [
        ("no answer", "The <mask> of the cell.\n", ":1: no answer"),
        ("two masks", "The <mask> of <mask>.\tcell\n", "exactly one"),
        ("no probe", "# only a comment\n", "holds no probe"),
    ] {
        std::fs::write(&probes, text).unwrap();
        let out = masklm(&["probe", "--model", s(&hf), "--probes", s(&probes)]);
        assert_fails(case, &out, &["--probes", needle]);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("eval.probes"),
            "{case}"
        );
    }
}

#[test]
fn vocab_extend_add_counts_new_tokens_and_skips_words_that_need_too_many() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_folder(dir.path());
    // One 400-letter word, the best ranked by far, and ordinary domain words.
    let long: String = (0..400)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let mut corpus = String::new();
    for _ in 0..30 {
        corpus += &format!("{long} mitochondrion phosphorylation ribosome glycolysis\n");
    }
    let input = dir.path().join("corpus.txt");
    std::fs::write(&input, corpus).unwrap();
    let out = dir.path().join("extended");
    let args = [
        "vocab",
        "extend",
        "--model",
        s(&hf),
        "--input",
        s(&input),
        "--add",
        "5",
        "--min-count",
        "2",
        "--out",
        s(&out),
    ];
    let result = masklm(&args);
    let stdout = assert_works("--add 5", &result);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("skipped ") && stderr.contains(&long[..20]),
        "{stderr}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab_extension.json")).unwrap())
            .unwrap();
    let added = record["added"].as_array().unwrap().len();
    assert!(
        (1..=5).contains(&added),
        "--add 5 added {added} tokens:\n{stdout}"
    );
    assert!(stdout.contains(&format!("{added} new tokens")), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 1000 + added);
    fill_mask_works("extended within --add", &out);
}
