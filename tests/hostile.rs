//! The bad-input catalogue: every subcommand of the `masklm` binary against hostile inputs, as
//! a new user (or a full disk, or a second process) would give them. Each case asserts the
//! exit status, that no panic text reaches the user, and that the message names the file, key
//! or line at fault; the process cases also check that the previous checkpoint survives.
//!
//! Uses the `roberta-tiny` and `tokenizer-go` fixtures and a tiny training run made here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: this build's, or `MASKLM_HOSTILE_BIN` (to run the catalogue against
/// another build, e.g. an older commit's).
fn binary() -> String {
    std::env::var("MASKLM_HOSTILE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_masklm").to_string())
}

fn masklm(args: &[String]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the masklm binary runs")
}

/// What a case must do.
enum Expect {
    /// Exit non-zero; stderr holds every one of these (file, key, line, advice).
    Fails(Vec<String>),
    /// Exit 0; stdout + stderr hold every one of these.
    Works(Vec<String>),
}

/// Text that must never reach a user.
const PANIC_TEXT: [&str; 4] = ["panicked", "RUST_BACKTRACE", "unwrap()", "stack backtrace"];

struct Catalogue {
    checked: usize,
    failures: Vec<String>,
}

impl Catalogue {
    /// Runs `args` with `input` on stdin.
    fn case_stdin(&mut self, name: &str, args: Vec<String>, input: &str, expect: Expect) {
        use std::io::Write;
        let mut child = Command::new(binary())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the masklm binary runs");
        let mut stdin = child.stdin.take().unwrap();
        let text = input.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        self.judge(name, &args, out, expect);
    }

    fn case(&mut self, name: &str, args: Vec<String>, expect: Expect) {
        let out = masklm(&args);
        self.judge(name, &args, out, expect);
    }

    fn judge(&mut self, name: &str, args: &[String], out: Output, expect: Expect) {
        self.checked += 1;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        if let Some(text) = PANIC_TEXT.iter().find(|t| stderr.contains(**t)) {
            problems.push(format!("panic text {text:?}"));
        }
        if stderr.len() > 4000 {
            problems.push(format!("{} bytes of stderr", stderr.len()));
        }
        match &expect {
            Expect::Fails(needles) => {
                if out.status.success() {
                    problems.push("exited 0".to_string());
                }
                if out.status.code().is_none() {
                    problems.push(format!("killed: {:?}", out.status));
                }
                for needle in needles {
                    if !stderr.contains(needle.as_str()) {
                        problems.push(format!("stderr lacks {needle:?}"));
                    }
                }
            }
            Expect::Works(needles) => {
                if !out.status.success() {
                    problems.push(format!("failed ({:?})", out.status));
                }
                for needle in needles {
                    if !stdout.contains(needle.as_str()) && !stderr.contains(needle.as_str()) {
                        problems.push(format!("output lacks {needle:?}"));
                    }
                }
            }
        }
        if !problems.is_empty() {
            self.failures.push(format!(
                "{name}: {}\n  masklm {}\n  stderr: {}",
                problems.join("; "),
                args.join(" "),
                stderr.chars().take(600).collect::<String>()
            ));
        }
    }
}

impl Catalogue {
    fn new() -> Self {
        Self {
            checked: 0,
            failures: Vec::new(),
        }
    }

    /// Fails the test with every case of `group` that misbehaved, each by name.
    fn finish(self, group: &str) {
        println!("{group}: {} hostile inputs checked", self.checked);
        assert!(self.checked > 0, "{group}: no case ran");
        assert!(
            self.failures.is_empty(),
            "{group}: {} of {} cases misbehaved:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}

/// Writes `bytes` into `root/name` and returns its path.
fn write_in(root: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = root.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `train --config CONFIG --out ROOT/OUT --set ...` for each of `sets`.
fn train_args(root: &Path, config: &Path, sets: &[&str], out: &str) -> Vec<String> {
    let mut args = s(&["train", "--config", &p(config), "--out"]);
    args.push(p(&root.join(out)));
    for set in sets {
        args.extend(s(&["--set", set]));
    }
    args
}

fn fill(model: &Path) -> Vec<String> {
    s(&["fill-mask", "--model", &p(model), "The <mask> of the cell."])
}

fn inspect(model: &Path) -> Vec<String> {
    s(&["inspect", "--model", &p(model)])
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn fails(needles: &[&str]) -> Expect {
    Expect::Fails(s(needles))
}

fn works(needles: &[&str]) -> Expect {
    Expect::Works(s(needles))
}

/// A copy of the roberta-tiny fixture (a complete Hugging Face folder with its tokenizer).
fn hf_copy(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(common::fixture("roberta-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x5A;
    std::fs::write(path, bytes).unwrap();
}

/// A tiny run of `steps` steps, checkpoints every 2, no evaluation; returns its folder.
fn tiny_run(root: &Path, name: &str, steps: usize) -> PathBuf {
    let config = common::write_tiny_config(root, "");
    let run = root.join(name);
    common::masklm_ok([
        "train".to_string(),
        "--config".to_string(),
        p(&config),
        "--out".to_string(),
        p(&run),
        "--set".to_string(),
        format!("training.max_steps={steps}"),
        "--set".to_string(),
        "eval.eval_steps=0".to_string(),
        "--set".to_string(),
        "checkpoint.save_steps=2".to_string(),
    ]);
    run
}

#[test]
fn hostile_weights_and_model_configs() {
    // Weights, config.json and half-precision folders.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Catalogue::new();
    let dir = hf_copy(root, "w-truncated");
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    c.case(
        "truncated safetensors",
        fill(&dir),
        fails(&["model.safetensors", "truncated"]),
    );
    let dir = hf_copy(root, "w-empty");
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    c.case(
        "empty safetensors",
        inspect(&dir),
        fails(&["model.safetensors"]),
    );
    let dir = hf_copy(root, "w-garbage");
    std::fs::write(dir.join("model.safetensors"), vec![0xAB; 4096]).unwrap();
    c.case(
        "garbage safetensors",
        fill(&dir),
        fails(&["model.safetensors"]),
    );
    let dir = hf_copy(root, "w-huge-header");
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(dir.join("model.safetensors"), huge).unwrap();
    c.case(
        "header length 2^63",
        inspect(&dir),
        fails(&["model.safetensors"]),
    );
    let dir = hf_copy(root, "w-flipped-header");
    flip_byte(&dir.join("model.safetensors"), 20);
    c.case(
        "flipped header byte",
        fill(&dir),
        fails(&["model.safetensors"]),
    );
    let dir = hf_copy(root, "w-none");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    c.case(
        "no weights file",
        fill(&dir),
        fails(&["no model.safetensors, model.safetensors.index.json or pytorch_model.bin"]),
    );
    let dir = hf_copy(root, "w-dir");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    c.case(
        "weights file is a folder",
        inspect(&dir),
        fails(&["model.safetensors"]),
    );
    let dir = hf_copy(root, "w-bin-garbage");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("pytorch_model.bin"),
        b"PK\x03\x04 not really a zip",
    )
    .unwrap();
    c.case(
        "garbage pytorch_model.bin",
        inspect(&dir),
        fails(&["pytorch_model.bin"]),
    );
    let dir = hf_copy(root, "w-bin-truncated");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let bin =
        std::fs::read(common::fixture("roberta-tiny-b-bin").join("pytorch_model.bin")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), &bin[..bin.len() / 2]).unwrap();
    c.case(
        "truncated pytorch_model.bin",
        inspect(&dir),
        fails(&["pytorch_model.bin"]),
    );
    let dir = hf_copy(root, "w-file");
    let file = root.join("w-file/config.json");
    c.case("model is a file", fill(&file), fails(&["config.json"]));
    c.case(
        "model folder missing",
        fill(&root.join("nowhere")),
        fails(&["nowhere"]),
    );
    c.case(
        "HF folder inspects",
        inspect(&dir),
        works(&["stored dtype: F32"]),
    );

    // --- config.json ---------------------------------------------------------------------
    let config_case = |c: &mut Catalogue, name: &str, from: &str, to: &str, needles: &[&str]| {
        let dir = hf_copy(root, &format!("c-{}", name.replace(' ', "-")));
        edit(&dir.join("config.json"), from, to);
        let mut needles = needles.to_vec();
        needles.push("config.json");
        c.case(name, fill(&dir), fails(&needles));
    };
    config_case(
        &mut c,
        "fractional layers",
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 2.5",
        &["num_hidden_layers"],
    );
    config_case(
        &mut c,
        "vocab 1e9",
        "\"vocab_size\": 1000",
        "\"vocab_size\": 1000000000",
        &["vocab_size"],
    );
    config_case(
        &mut c,
        "layers 1e6",
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 1000000",
        &["num_hidden_layers"],
    );
    config_case(
        &mut c,
        "layers 200 for 2 stored",
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 200",
        &["200", "2 layers"],
    );
    config_case(
        &mut c,
        "heads do not divide",
        "\"hidden_size\": 64",
        "\"hidden_size\": 30",
        &["hidden_size"],
    );
    config_case(
        &mut c,
        "gpt2 model type",
        "\"model_type\": \"roberta\"",
        "\"model_type\": \"gpt2\"",
        &["gpt2"],
    );
    config_case(
        &mut c,
        "negative layers",
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": -1",
        &["num_hidden_layers"],
    );
    config_case(
        &mut c,
        "string vocab",
        "\"vocab_size\": 1000",
        "\"vocab_size\": \"many\"",
        &["vocab_size"],
    );
    config_case(
        &mut c,
        "pad outside vocab",
        "\"pad_token_id\": 1",
        "\"pad_token_id\": 5000",
        &["pad_token_id"],
    );
    config_case(
        &mut c,
        "one position",
        "\"max_position_embeddings\": ",
        "\"max_position_embeddings\": 1, \"x\": ",
        &["max_position_embeddings"],
    );
    let dir = hf_copy(root, "c-not-json");
    std::fs::write(dir.join("config.json"), "{ \"hidden_size\": 64,").unwrap();
    c.case("config not JSON", fill(&dir), fails(&["config.json"]));
    let dir = hf_copy(root, "c-array");
    std::fs::write(dir.join("config.json"), "[1, 2, 3]").unwrap();
    c.case("config is an array", fill(&dir), fails(&["config.json"]));
    let dir = hf_copy(root, "c-empty");
    std::fs::write(dir.join("config.json"), "").unwrap();
    c.case("empty config", inspect(&dir), fails(&["config.json"]));
    let dir = hf_copy(root, "c-none");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    c.case("no config", fill(&dir), fails(&["no config.json"]));

    // --- Half precision weights: loaded as transformers loads them ---------------------------
    // (their numerics are checked in tests/load_errors.rs; here: the binary runs and says so)
    for (dtype, name) in [("F16", "w-f16"), ("BF16", "w-bf16")] {
        let dir = hf_copy(root, name);
        let status = Command::new(
            common::reference_python("safetensors, torch").unwrap_or_else(|| "python3".into()),
        )
        .args([
            "-c",
            &format!(
                "import torch, safetensors.torch as st, sys; p = sys.argv[1]; \
                 st.save_file({{k: v.to({}) for k, v in st.load_file(p).items()}}, p, \
                 metadata={{'format': 'pt'}})",
                if dtype == "F16" {
                    "torch.float16"
                } else {
                    "torch.bfloat16"
                }
            ),
            &p(&dir.join("model.safetensors")),
        ])
        .status();
        if status.is_ok_and(|s| s.success()) {
            c.case(
                &format!("{dtype} weights inspect"),
                inspect(&dir),
                works(&[&format!("stored dtype: {dtype}")]),
            );
            c.case(
                &format!("{dtype} weights fill-mask"),
                fill(&dir),
                works(&["The"]),
            );
        }
    }

    c.finish("hostile_weights_and_model_configs");
}

#[test]
fn hostile_tokenizers() {
    // Tokenizer folders, and tokenizer training on bad settings.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Catalogue::new();
    let corpus = p(&common::fixture("tokenizer-corpus.txt"));
    let dir = hf_copy(root, "t-garbage");
    std::fs::write(dir.join("tokenizer.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    c.case(
        "garbage tokenizer.json",
        fill(&dir),
        fails(&["tokenizer.json"]),
    );
    let dir = hf_copy(root, "t-no-mask");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        std::fs::write(dir.join(file), text.replace("<mask>", "<nomask>")).unwrap();
    }
    c.case(
        "tokenizer without a mask token",
        fill(&dir),
        fails(&["mask token"]),
    );
    let dir = hf_copy(root, "t-too-big");
    edit(
        &dir.join("tokenizer.json"),
        "\"Ġthe\": ",
        "\"Ġthe\": 5000, \"Ġthe_old\": ",
    );
    c.case(
        "tokenizer ids beyond the model's vocabulary",
        fill(&dir),
        fails(&["vocab_size is 1000", "does not belong"]),
    );
    c.case(
        "tokenizer vocab 100",
        s(&[
            "tokenizer",
            "train",
            "--input",
            &corpus,
            "--vocab-size",
            "100",
            "--out",
            &p(&root.join("tok100")),
        ]),
        fails(&["vocab_size", "256 byte symbols"]),
    );
    c.case(
        "tokenizer vocab 1e9",
        s(&[
            "tokenizer",
            "train",
            "--input",
            &corpus,
            "--vocab-size",
            "1000000000",
            "--out",
            &p(&root.join("tok1e9")),
        ]),
        fails(&["vocab_size", "beyond any sane vocabulary"]),
    );
    let a_file = write_in(root, "a-file", b"x");
    c.case(
        "tokenizer --out is a file",
        s(&[
            "tokenizer",
            "train",
            "--input",
            &corpus,
            "--out",
            &p(&a_file),
        ]),
        fails(&["a-file", "is a file"]),
    );

    c.finish("hostile_tokenizers");
}

#[test]
fn hostile_corpora() {
    // Corpora given to prepare: missing, empty, broken, looping, special files.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Catalogue::new();
    write_in(root, "a-file", b"x"); // the "--out is a file" cases
    let corpus = p(&common::fixture("tokenizer-corpus.txt"));
    let tokenizer = p(&common::fixture("tokenizer-go"));
    let write = |name: &str, bytes: &[u8]| write_in(root, name, bytes);
    let prepare = |input: &Path, out: &str, extra: &[&str]| {
        let mut args = s(&[
            "prepare",
            "--tokenizer",
            &tokenizer,
            "--input",
            &p(input),
            "--out",
        ]);
        args.push(p(&root.join(out)));
        args.extend(s(extra));
        args
    };
    c.case(
        "missing input",
        prepare(&root.join("absent.txt"), "k1", &[]),
        fails(&["absent.txt", "no such file"]),
    );
    let empty = write("empty.txt", b"");
    c.case(
        "empty corpus",
        prepare(&empty, "k2", &[]),
        fails(&["empty.txt", "no text"]),
    );
    let blank = write("blank.txt", b"\n \n\t\n");
    c.case(
        "blank corpus",
        prepare(&blank, "k3", &[]),
        fails(&["blank.txt", "no text"]),
    );
    let latin1 = write("latin1.txt", b"caf\xe9 au lait\nfine line\n");
    c.case(
        "non-UTF-8 --strict",
        prepare(&latin1, "k4", &["--strict"]),
        fails(&["latin1.txt:1", "UTF-8"]),
    );
    let jsonl = write("bad.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"broken\n");
    c.case(
        "malformed JSONL",
        prepare(&jsonl, "k5", &[]),
        fails(&["bad.jsonl:2"]),
    );
    let jsonl = write("nofield.jsonl", b"{\"body\": \"text here\"}\n");
    c.case(
        "JSONL without the field",
        prepare(&jsonl, "k6", &[]),
        fails(&["nofield.jsonl:1", "body"]),
    );
    let mut gz = Vec::new();
    {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
        encoder
            .write_all(&b"a cell divides\n".repeat(2000))
            .unwrap();
        encoder.finish().unwrap();
    }
    let gz = write("cut.txt.gz", &gz[..gz.len() / 2]);
    c.case(
        "truncated gzip",
        prepare(&gz, "k7", &[]),
        fails(&["cut.txt.gz"]),
    );
    let zst = write("junk.txt.zst", b"\x28\xb5\x2f\xfd garbage garbage");
    c.case(
        "garbage zstd",
        prepare(&zst, "k8", &[]),
        fails(&["junk.txt.zst"]),
    );
    let fifo = root.join("pipe.txt");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    c.case(
        "FIFO input",
        prepare(&fifo, "k9", &[]),
        fails(&["pipe.txt", "not a regular file"]),
    );
    let looped = root.join("looped");
    std::fs::create_dir_all(looped.join("sub")).unwrap();
    std::fs::copy(
        common::fixture("tokenizer-corpus.txt"),
        looped.join("sub/corpus.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..", looped.join("sub/up")).unwrap();
    std::os::unix::fs::symlink(&fifo, looped.join("sub/pipe")).unwrap();
    c.case(
        "symlink loop and FIFO under a directory",
        prepare(&looped, "k10", &[]),
        works(&["special file"]),
    );
    c.case(
        "prepare --out is a file",
        prepare(&common::fixture("tokenizer-corpus.txt"), "a-file", &[]),
        fails(&["a-file"]),
    );
    c.case(
        "max-seq-length 2",
        prepare(
            &common::fixture("tokenizer-corpus.txt"),
            "k11",
            &["--max-seq-length", "2"],
        ),
        fails(&["max_seq_length"]),
    );
    c.case(
        "validation split 1.5",
        prepare(
            &common::fixture("tokenizer-corpus.txt"),
            "k12",
            &["--validation-split", "1.5"],
        ),
        fails(&["validation_split"]),
    );
    let hollow = root.join("hollow");
    std::fs::create_dir_all(hollow.join("deeper")).unwrap();
    c.case(
        "directory without files",
        prepare(&hollow, "k13", &[]),
        fails(&["hollow", "holds no file"]),
    );
    c.case(
        "glob matching nothing",
        prepare(&root.join("*.nothing"), "k14", &[]),
        fails(&["matches no file"]),
    );
    c.case(
        "bad tokenizer folder for prepare",
        s(&[
            "prepare",
            "--tokenizer",
            &p(&root.join("no-tokenizer")),
            "--input",
            &corpus,
            "--out",
            &p(&root.join("k15")),
        ]),
        fails(&["no-tokenizer", "no such folder"]),
    );

    c.finish("hostile_corpora");
}

#[test]
fn hostile_training_configs() {
    // Training configs: bad TOML, unknown keys, impossible values.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Catalogue::new();
    write_in(root, "a-file", b"x"); // the "--out is a file" cases
    let write = |name: &str, bytes: &[u8]| write_in(root, name, bytes);
    let config = common::write_tiny_config(root, "");
    let train = |config: &Path, sets: &[&str], out: &str| train_args(root, config, sets, out);
    let bad_toml = write("bad.toml", b"seed = 7\n[training\nbatch_size = 8\n");
    c.case(
        "invalid TOML",
        train(&bad_toml, &[], "r1"),
        fails(&["bad.toml", "line 2"]),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let unknown = write(
        "unknown.toml",
        text.replace("[training]", "[training]\nbatchsize = 3")
            .as_bytes(),
    );
    c.case(
        "unknown key",
        train(&unknown, &[], "r2"),
        fails(&["unknown.toml", "batchsize"]),
    );
    let typed = write(
        "typed.toml",
        text.replace("batch_size = 8", "batch_size = \"eight\"")
            .as_bytes(),
    );
    c.case(
        "wrong type",
        train(&typed, &[], "r3"),
        fails(&["typed.toml", "batch_size"]),
    );
    c.case(
        "malformed --set",
        train(&config, &["optimizer.lr"], "r4"),
        fails(&["--set optimizer.lr"]),
    );
    c.case(
        "masking nothing",
        train(&config, &["masking.probability=0.0"], "r5"),
        fails(&["masking.probability"]),
    );
    c.case(
        "zero steps",
        train(&config, &["training.max_steps=0"], "r6"),
        fails(&["training.max_steps"]),
    );
    c.case(
        "missing init_from",
        train(&config, &["model.init_from=\"/no/such/model\""], "r7"),
        fails(&["model.init_from", "/no/such/model"]),
    );
    c.case(
        "negative lr",
        train(&config, &["optimizer.lr=-1.0"], "r8"),
        fails(&["lr"]),
    );
    c.case(
        "cache without manifest",
        train(
            &config,
            &[
                "data.inputs=[]",
                &format!("data.cache=\"{}\"", p(&root.join("nocache"))),
            ],
            "r9",
        ),
        fails(&["nocache", "manifest.json"]),
    );
    c.case(
        "train --out is a file",
        train(&config, &["training.max_steps=1"], "a-file"),
        fails(&["a-file", "is a file"]),
    );
    c.case(
        "a batch beyond the machine's memory",
        train(
            &config,
            &["training.max_steps=1", "training.batch_size=100000000"],
            "r-huge-batch",
        ),
        fails(&["training.batch_size", "needs about", "grad_accum_steps"]),
    );
    c.case(
        "resume without a run",
        s(&["train", "--resume", &p(&root.join("no-run"))]),
        fails(&["no-run"]),
    );
    c.case(
        "--from without --resume",
        s(&["train", "--config", &p(&config), "--from", "step-1"]),
        fails(&["--resume"]),
    );
    // A refused run leaves no folder behind (r9 and r-huge-batch are refused after the run
    // folder was locked; the others before).
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("r"))
        .collect();
    assert!(left.is_empty(), "refused runs left folders: {left:?}");

    c.finish("hostile_training_configs");
}

#[test]
fn hostile_caches_and_checkpoints() {
    // Damaged caches and checkpoints, and commands pointed at the wrong thing.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Catalogue::new();
    let config = common::write_tiny_config(root, "");
    let train = |config: &Path, sets: &[&str], out: &str| train_args(root, config, sets, out);
    let a_file = write_in(root, "a-file", b"x");
    let run = tiny_run(root, "run", 4);
    let cache = root.join("cache");
    let cache_case = |c: &mut Catalogue, name: &str, damage: &dyn Fn(&Path), needles: &[&str]| {
        let copy = root.join(format!("cache-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&cache).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        damage(&copy);
        let set = format!("data.cache=\"{}\"", p(&copy));
        c.case(
            name,
            train(
                &config,
                &["data.inputs=[]", &set, "training.max_steps=2"],
                &format!("rc-{}", name.replace(' ', "-")),
            ),
            fails(needles),
        );
    };
    cache_case(
        &mut c,
        "flipped shard byte",
        &|d| flip_byte(&d.join("train-00000.bin"), 100),
        &["train-00000.bin", "checksum"],
    );
    cache_case(
        &mut c,
        "truncated shard",
        &|d| {
            let bytes = std::fs::read(d.join("train-00000.bin")).unwrap();
            std::fs::write(d.join("train-00000.bin"), &bytes[..bytes.len() / 2]).unwrap();
        },
        &["train-00000.bin"],
    );
    cache_case(
        &mut c,
        "garbage manifest",
        &|d| std::fs::write(d.join("manifest.json"), "{").unwrap(),
        &["manifest.json"],
    );
    cache_case(
        &mut c,
        "missing index",
        &|d| std::fs::remove_file(d.join("train-00000.idx")).unwrap(),
        &["train-00000.idx"],
    );
    cache_case(
        &mut c,
        "ids beyond the vocabulary",
        &|d| {
            // Valid checksums, impossible ids: a cache made for another tokenizer, say.
            let bin = d.join("train-00000.bin");
            let mut bytes = std::fs::read(&bin).unwrap();
            bytes[10..12].copy_from_slice(&60000u16.to_le_bytes());
            std::fs::write(&bin, &bytes).unwrap();
            let idx = std::fs::read(d.join("train-00000.idx")).unwrap();
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            sha2::Digest::update(&mut hasher, &bytes);
            sha2::Digest::update(&mut hasher, &idx);
            let sum = format!("{:x}", sha2::Digest::finalize(hasher));
            let manifest = std::fs::read_to_string(d.join("manifest.json")).unwrap();
            let mut value: serde_json::Value = serde_json::from_str(&manifest).unwrap();
            value["train"]["shards"][0]["sha256"] = serde_json::json!(sum);
            std::fs::write(d.join("manifest.json"), value.to_string()).unwrap();
        },
        &["token id 60000", "outside the vocabulary"],
    );

    // --- Checkpoints -----------------------------------------------------------------------
    let checkpoints = run.join("checkpoints");
    c.case(
        "fill-mask on best-less run folder",
        fill(&run),
        works(&["The"]),
    );
    c.case(
        "fill-mask on the latest pointer",
        fill(&checkpoints.join("latest")),
        works(&["The"]),
    );
    c.case(
        "inspect a masklm checkpoint",
        inspect(&checkpoints.join("step-0000004")),
        works(&["masklm checkpoint"]),
    );
    let broken = root.join("broken-ckpt");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(checkpoints.join("step-0000004")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
    }
    flip_byte(&broken.join("model.bpk"), 5000);
    c.case(
        "corrupted checkpoint weights",
        fill(&broken),
        fails(&["model.bpk", "checksum mismatch", "--from"]),
    );
    std::fs::remove_file(broken.join("manifest.json")).unwrap();
    std::fs::write(
        broken.join("manifest.json"),
        "{\"format_version\": 99, \"step\": 4, \"files\": {}}",
    )
    .unwrap();
    c.case(
        "checkpoint from a future masklm",
        fill(&broken),
        fails(&["format 99"]),
    );
    let out = root.join("export-full");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    c.case(
        "export into a non-empty folder",
        s(&[
            "export",
            "--checkpoint",
            &p(&checkpoints.join("latest")),
            "--out",
            &p(&out),
        ]),
        fails(&["export-full", "--force"]),
    );
    c.case(
        "export --out is a file",
        s(&["export", "--checkpoint", &p(&run), "--out", &p(&a_file)]),
        fails(&["a-file", "is a file"]),
    );
    c.case(
        "export of a HF folder",
        s(&[
            "export",
            "--checkpoint",
            &p(&hf_copy(root, "e-hf")),
            "--out",
            &p(&root.join("e2")),
        ]),
        fails(&["not a masklm checkpoint"]),
    );
    let long = "word ".repeat(200_000) + "<mask>\n";
    c.case_stdin(
        "over-long fill-mask input (1 MB)",
        s(&["fill-mask", "--model", &p(&run)]),
        &long,
        fails(&["tokens long", "at most", "bytes)"]),
    );
    c.case(
        "fill-mask without a mask",
        s(&["fill-mask", "--model", &p(&run), "no mask here"]),
        fails(&["no mask token", "<mask>"]),
    );
    c.case(
        "fill-mask --top-k 0",
        s(&["fill-mask", "--model", &p(&run), "--top-k", "0", "a <mask>"]),
        fails(&["--top-k"]),
    );
    c.case(
        "fill-mask --ids out of range",
        s(&["fill-mask", "--model", &p(&run), "--ids", "0 4 99999 2"]),
        fails(&["99999", "vocab_size"]),
    );
    c.case(
        "fill-mask --ids not numbers",
        s(&["fill-mask", "--model", &p(&run), "--ids", "0 four 2"]),
        fails(&["four"]),
    );
    c.case(
        "fill-mask unknown target word",
        s(&[
            "fill-mask",
            "--model",
            &p(&run),
            "--targets",
            "zzqxj",
            "The <mask> of the cell.",
        ]),
        works(&["not a single token"]),
    );
    c.case(
        "eval on a missing corpus",
        s(&[
            "eval",
            "--model",
            &p(&run),
            "--input",
            &p(&root.join("gone.txt")),
        ]),
        fails(&["gone.txt"]),
    );
    c.case(
        "resume with another seed",
        s(&[
            "train",
            "--resume",
            &p(&run),
            "--set",
            "seed=99",
            "--set",
            "training.max_steps=6",
        ]),
        fails(&["`seed` was 7, now 99"]),
    );
    c.case(
        "resume from a step that does not exist",
        s(&[
            "train",
            "--resume",
            &p(&run),
            "--from",
            "step-0000003",
            "--set",
            "training.max_steps=6",
        ]),
        fails(&["step-0000003", "step-0000004"]),
    );
    c.case(
        "resume a finished run",
        s(&["train", "--resume", &p(&run)]),
        fails(&["already reached step 4", "training.max_steps"]),
    );
    // NaN weights: the scores would all print as 0.0000.
    let nan = hf_copy(root, "w-nan");
    let path = nan.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let data = if name.contains("LayerNorm.weight") {
                f32::NAN.to_le_bytes().repeat(t.data().len() / 4)
            } else {
                t.data().to_vec()
            };
            (name, t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    c.case("NaN weights", fill(&nan), fails(&["not finite"]));
    c.finish("hostile_caches_and_checkpoints");
}

/// Waits for `path` to name a checkpoint at or past `step`, or for the child to end.
fn wait_for(path: &Path, step: &str, child: &mut std::process::Child) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if std::fs::read_to_string(path).is_ok_and(|s| s.trim() >= step) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn kill_9_during_saves_never_costs_the_last_checkpoint() {
    // Ten runs, each killed at a different moment while checkpointing every step: whatever
    // the moment, `latest` names a checkpoint that verifies, and the run resumes from it.
    let tmp = tempfile::tempdir().unwrap();
    let config =
        common::write_tiny_config(tmp.path(), "[checkpoint]\nsave_steps = 1\nkeep_last = 2\n");
    // Prepare the cache once, so the runs start training at once.
    common::masklm_ok([
        "prepare",
        "--tokenizer",
        &p(&common::fixture("tokenizer-go")),
        "--input",
        &p(&common::fixture("tokenizer-corpus.txt")),
        "--out",
        &p(&tmp.path().join("cache")),
        "--max-seq-length",
        "64",
        "--validation-split",
        "0.05",
    ]);
    for trial in 0..10u64 {
        let run = tmp.path().join(format!("run{trial}"));
        let mut child = Command::new(binary())
            .args(["train", "--config", &p(&config), "--out", &p(&run)])
            .args([
                "--set",
                "training.max_steps=40",
                "--set",
                "eval.eval_steps=0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let latest = run.join("checkpoints/latest");
        assert!(
            wait_for(&latest, "step-0000002", &mut child),
            "trial {trial}: no checkpoint"
        );
        // A few hundred microseconds to a few milliseconds later: inside a save, often.
        std::thread::sleep(Duration::from_micros(300 + trial * 700));
        child.kill().unwrap();
        child.wait().unwrap();
        let name = std::fs::read_to_string(&latest).unwrap();
        let checkpoint = run.join("checkpoints").join(name.trim());
        masklm_infer::checkpoint::verify_checkpoint(&checkpoint)
            .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        let out = masklm(&s(&[
            "train",
            "--resume",
            &p(&run),
            "--set",
            "training.max_steps=42",
        ]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "trial {trial}: resume failed: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The resumed run's checkpoints stand on their own (issue #22: they lost their
        // tokenizer once rotation deleted the folder the resume read it from): every one
        // verifies and holds the tokenizer, the run answers fill-mask and resumes again.
        for dir in masklm_train::checkpoint::step_checkpoints(&run) {
            masklm_infer::checkpoint::verify_checkpoint(&dir)
                .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
            for file in masklm_train::checkpoint::REQUIRED_FILES {
                assert!(
                    dir.join(file).is_file(),
                    "trial {trial}: {} has no {file}",
                    dir.display()
                );
            }
        }
        let fill = masklm(&s(&[
            "fill-mask",
            "--model",
            &p(&run),
            "The <mask> of the cell.",
        ]));
        assert!(
            fill.status.success(),
            "trial {trial}: fill-mask on the resumed run failed: {}",
            String::from_utf8_lossy(&fill.stderr)
        );
        let again = masklm(&s(&[
            "train",
            "--resume",
            &p(&run),
            "--set",
            "training.max_steps=44",
        ]));
        assert!(
            again.status.success(),
            "trial {trial}: a second resume failed: {}",
            String::from_utf8_lossy(&again.stderr)
        );
    }
}

#[test]
fn a_second_process_on_a_run_or_a_cache_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path(), "run", 2);
    let mut first = Command::new(binary())
        .args([
            "train",
            "--resume",
            &p(&run),
            "--set",
            "training.max_steps=400",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it trains past the run's 2 steps: it then holds the lock (until it ends).
    // (`.lock` itself outlives the earlier run, so its existence proves nothing; a fixed
    // sleep lost the race on a loaded CI machine.)
    let start = Instant::now();
    let trained_past_2 = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["step"].as_u64().is_some_and(|step| step > 2))
    };
    while !trained_past_2() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the first process never trained"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = masklm(&s(&[
        "train",
        "--resume",
        &p(&run),
        "--set",
        "training.max_steps=400",
    ]));
    first.kill().unwrap();
    first.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("in use by process"), "{stderr}");
    // Once the first is gone (killed: the kernel dropped its lock), the run is free again.
    let out = masklm(&s(&[
        "train",
        "--resume",
        &p(&run),
        "--set",
        "training.max_steps=404",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // prepare: two at once on one --out; the second is refused or, if the first finished
    // before it started, reuses its cache. Either way the cache is whole.
    let big = tmp.path().join("big.txt");
    let text = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt")).unwrap();
    std::fs::write(&big, text.repeat(30)).unwrap();
    let args = s(&[
        "prepare",
        "--tokenizer",
        &p(&common::fixture("tokenizer-go")),
        "--input",
        &p(&big),
        "--out",
        &p(&tmp.path().join("shared")),
    ]);
    let a = Command::new(binary())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = Command::new(binary())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let refused = [&a, &b]
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect::<Vec<_>>();
    assert!(refused.len() <= 1, "{refused:?}");
    for message in &refused {
        assert!(message.contains("in use by process"), "{message}");
    }
    let manifest = masklm_data::read_manifest(&tmp.path().join("shared")).unwrap();
    masklm_data::SplitReader::open(&tmp.path().join("shared"), &manifest, "train").unwrap();
}

#[test]
fn a_full_disk_stops_the_run_with_the_last_checkpoint_intact() {
    // A 1.5 MB tmpfs holds one checkpoint of the tiny model (~0.7 MB) but not two, so the
    // second save runs out of space mid-write.
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("small");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1536k", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("skipped: cannot mount a tmpfs here (needs root); the full-disk case did not run");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mount);
    let config =
        common::write_tiny_config(tmp.path(), "[checkpoint]\nsave_steps = 2\nkeep_last = 1\n");
    let run = mount.join("run");
    let out = masklm(&s(&[
        "train",
        "--config",
        &p(&config),
        "--out",
        &p(&run),
        "--set",
        "training.max_steps=20",
        "--set",
        "eval.eval_steps=0",
        "--set",
        "logging.tensorboard=false",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run fit on the small disk: {stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains(&p(&run)), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let latest = masklm_infer::checkpoint::latest_checkpoint(&run)
        .expect("a checkpoint before the disk filled");
    masklm_infer::checkpoint::verify_checkpoint(&latest).unwrap();
}
