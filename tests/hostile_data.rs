//! Bad corpus input for every command that reads a corpus (`prepare`, `tokenizer train`,
//! `train` with its `[eval] sets`, `eval`, `vocab audit`, `vocab extend`): files that are not
//! UTF-8 text (UTF-16 with and without a byte-order mark, NUL bytes), old Mac line endings,
//! and lines `vocab audit` cannot decode. Each case is a test of its own, so a failure names
//! it; each checks the exit status, that no panic text reaches the user, that the message names
//! the file and what to do, and that nothing was written for a refused input.
//!
//! Uses the `tokenizer-go` and `roberta-tiny` fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Text that must never reach a user.
const PANIC_TEXT: [&str; 4] = ["panicked", "RUST_BACKTRACE", "unwrap()", "stack backtrace"];

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// The binary under test: this build's, or `MASKLM_HOSTILE_BIN` (to run the cases against
/// another build, e.g. an older commit's), as in tests/hostile.rs.
fn binary() -> String {
    std::env::var("MASKLM_HOSTILE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_masklm").to_string())
}

fn masklm(args: &[String]) -> Outcome {
    let out = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the masklm binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for text in PANIC_TEXT {
        assert!(!stderr.contains(text), "panic text {text:?}: {stderr}");
    }
    assert!(out.status.code().is_some(), "killed: {:?}", out.status);
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// Runs `args`, which must fail with every one of `needles` in its stderr.
fn refused(args: &[String], needles: &[&str]) {
    let out = masklm(args);
    assert!(
        !out.ok,
        "exited 0: masklm {}\n{}",
        args.join(" "),
        out.stdout
    );
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "stderr lacks {needle:?}: masklm {}\n{}",
            args.join(" "),
            out.stderr
        );
    }
}

/// Runs `args`, which must succeed.
fn works(args: &[String]) -> Outcome {
    let out = masklm(args);
    assert!(out.ok, "failed: masklm {}\n{}", args.join(" "), out.stderr);
    out
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Some lines of the fixture corpus, enough to pass the first bytes a sniff reads.
fn english() -> String {
    let text = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt")).unwrap();
    text.lines().take(200).collect::<Vec<_>>().join("\n") + "\n"
}

fn utf16(text: &str, big_endian: bool, bom: bool) -> Vec<u8> {
    let units = bom.then_some(0xFEFF).into_iter().chain(text.encode_utf16());
    units
        .flat_map(|u| {
            if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            }
        })
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `masklm prepare` of `input` into `dir/cache`.
fn prepare_args(dir: &Path, input: &Path) -> Vec<String> {
    let mut args = s(&["prepare", "--tokenizer"]);
    args.extend([
        p(&common::fixture("tokenizer-go")),
        "--input".into(),
        p(input),
    ]);
    args.extend(["--out".into(), p(&dir.join("cache"))]);
    args
}

/// Prepare refuses `bytes` (written as `name`) naming the file and `needles`, and leaves no
/// cache behind.
fn prepare_refuses(name: &str, bytes: &[u8], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), name, bytes);
    let mut all = vec![p(&input)];
    all.extend(needles.iter().map(|n| n.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    refused(&prepare_args(dir.path(), &input), &all);
    assert!(
        !dir.path().join("cache").exists(),
        "a refused prepare left a cache"
    );
}

#[test]
fn prepare_refuses_utf16_le_with_bom() {
    let bytes = utf16(&english(), false, true);
    prepare_refuses(
        "le-bom.txt",
        &bytes,
        &["UTF-16 LE", "FF FE", "iconv -f UTF-16 -t UTF-8"],
    );
}

#[test]
fn prepare_refuses_utf16_be_with_bom() {
    let bytes = utf16(&english(), true, true);
    prepare_refuses(
        "be-bom.txt",
        &bytes,
        &["UTF-16 BE", "FE FF", "iconv -f UTF-16 -t UTF-8"],
    );
}

#[test]
fn prepare_refuses_utf16_le_without_bom() {
    let bytes = utf16(&english(), false, false);
    prepare_refuses(
        "le.txt",
        &bytes,
        &["UTF-16 LE", "iconv -f UTF-16LE -t UTF-8"],
    );
}

#[test]
fn prepare_refuses_utf16_be_without_bom() {
    let bytes = utf16(&english(), true, false);
    prepare_refuses(
        "be.txt",
        &bytes,
        &["UTF-16 BE", "iconv -f UTF-16BE -t UTF-8"],
    );
}

#[test]
fn prepare_refuses_a_nul_byte_file() {
    prepare_refuses(
        "zeros.txt",
        &vec![0u8; 1 << 20],
        &["binary", "byte 0, line 1"],
    );
}

#[test]
fn prepare_refuses_text_padded_with_nul_bytes() {
    // What a writer that crashed after preallocating leaves: text, then zeros.
    let mut bytes = b"a first line\na second line\n".to_vec();
    bytes.extend(vec![0u8; 1 << 16]);
    prepare_refuses("padded.txt", &bytes, &["binary", "byte 27, line 3"]);
}

#[test]
fn prepare_refuses_utf16_json_lines_and_json_arrays() {
    let jsonl = utf16("{\"text\": \"a cell divides\"}\n", false, true);
    prepare_refuses("records.jsonl", &jsonl, &["UTF-16 LE", "iconv"]);
    let array = utf16("[{\"text\": \"a cell divides\"}]", true, false);
    prepare_refuses("records.json", &array, &["UTF-16 BE", "iconv"]);
}

#[test]
fn prepare_reads_cr_only_line_endings_as_lines() {
    let dir = tempfile::tempdir().unwrap();
    let lines = ["the first document", "the second one", "and a third"];
    let input = write(dir.path(), "mac.txt", (lines.join("\r") + "\r").as_bytes());
    let mut args = prepare_args(dir.path(), &input);
    args.extend(s(&["--packing", "line", "--validation-split", "0"]));
    let out = works(&args);
    assert!(out.stdout.contains("3 documents"), "{}", out.stdout);

    let cache = dir.path().join("cache");
    let manifest = masklm_data::read_manifest(&cache).unwrap();
    assert_eq!(manifest.corpus.documents, 3);
    let split = masklm_data::SplitReader::open(&cache, &manifest, "train").unwrap();
    let tokenizer = masklm_data::load_tokenizer(&common::fixture("tokenizer-go")).unwrap();
    let decoded: Vec<String> = (0..split.len())
        .map(|i| {
            let ids = split.get(i).unwrap();
            let text = tokenizer.tokenizer.decode(&ids, true).unwrap();
            text.trim().to_string()
        })
        .collect();
    assert_eq!(decoded, lines);
}

#[test]
fn tokenizer_train_refuses_utf16() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "export.txt", &utf16(&english(), false, true));
    let out = dir.path().join("tok");
    let mut args = s(&["tokenizer", "train", "--vocab-size", "300", "--input"]);
    args.extend([p(&input), "--out".into(), p(&out)]);
    refused(&args, &[&p(&input), "UTF-16 LE", "iconv"]);
    assert!(
        !out.join("tokenizer.json").exists(),
        "a tokenizer was written"
    );
}

#[test]
fn train_refuses_utf16_inputs_and_eval_sets() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "export.txt", &utf16(&english(), false, false));
    let fixture_corpus = p(&common::fixture("tokenizer-corpus.txt"));
    let cache = dir.path().join("cache");
    let text = common::tiny_config_text(&cache, "").replace(&fixture_corpus, &p(&input));
    let config = write(dir.path(), "bad-inputs.toml", text.as_bytes());
    let run = dir.path().join("run");
    let args = s(&["train", "--config", &p(&config), "--out", &p(&run)]);
    refused(&args, &[&p(&input), "UTF-16 LE", "iconv"]);
    assert!(!cache.join("manifest.json").exists(), "a cache was written");

    let extra = format!("[eval.sets]\nforeign = \"{}\"\n", p(&input));
    let text = common::tiny_config_text(&cache, &extra);
    let config = write(dir.path(), "bad-set.toml", text.as_bytes());
    let run = dir.path().join("run2");
    let args = s(&["train", "--config", &p(&config), "--out", &p(&run)]);
    refused(&args, &[&p(&input), "UTF-16 LE", "eval.sets.foreign"]);
}

#[test]
fn eval_refuses_utf16() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "held-out.txt", &utf16(&english(), true, true));
    let model = p(&common::fixture("roberta-tiny"));
    let args = s(&["eval", "--model", &model, "--input", &p(&input)]);
    refused(&args, &[&p(&input), "UTF-16 BE", "iconv"]);
}

#[test]
fn vocab_audit_and_extend_refuse_a_nul_byte_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "blob.bin", &vec![0u8; 1 << 16]);
    let model = p(&common::fixture("roberta-tiny"));
    let audit = s(&["vocab", "audit", "--model", &model, "--input", &p(&input)]);
    refused(&audit, &[&p(&input), "binary"]);
    let out = dir.path().join("extended");
    let mut extend = s(&["vocab", "extend", "--model", &model, "--input", &p(&input)]);
    extend.extend(s(&["--add", "5", "--out", &p(&out)]));
    refused(&extend, &[&p(&input), "binary"]);
    assert!(
        !out.join("tokenizer.json").exists(),
        "an extension was written"
    );
}

#[test]
fn vocab_audit_says_how_many_lines_it_skipped_and_why() {
    let dir = tempfile::tempdir().unwrap();
    // Past the first bytes a file is read line by line: two Latin-1 lines and one with a NUL.
    let mut bytes = english().into_bytes();
    let clean_lines = english().lines().count();
    let documents = english().lines().filter(|l| !l.trim().is_empty()).count();
    bytes.extend(b"caf\xe9 au lait\nthe mitochondria\nna\xefve\ncut\0short\n");
    let input = write(dir.path(), "mixed.txt", &bytes);
    let model = p(&common::fixture("roberta-tiny"));
    let args = s(&["vocab", "audit", "--model", &model, "--input", &p(&input)]);
    let out = works(&args);
    let first = format!("{}:{}", p(&input), clean_lines + 1);
    let nul = format!("{}:{}", p(&input), clean_lines + 4);
    for needle in [
        format!("skipped 2 line(s) not UTF-8 (the first at {first})"),
        format!("1 line(s) holding a NUL byte (the first at {nul})"),
    ] {
        assert!(
            out.stderr.contains(&needle),
            "lacks {needle:?}: {}",
            out.stderr
        );
    }

    let mut json_args = args.clone();
    json_args.push("--json".to_string());
    let out = works(&json_args);
    let audit: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(audit["corpus"]["skipped_non_utf8"], 2);
    assert_eq!(audit["corpus"]["skipped_nul"], 1);
    assert_eq!(audit["corpus"]["first_non_utf8"], first.as_str());
    assert_eq!(audit["documents"], documents as u64 + 1);
}

#[test]
fn vocab_extend_refuses_a_utf16_words_file() {
    let dir = tempfile::tempdir().unwrap();
    let words = write(
        dir.path(),
        "words.txt",
        &utf16("mitochondria\nribosome\n", false, false),
    );
    let model = p(&common::fixture("roberta-tiny"));
    let out = dir.path().join("extended");
    let args = s(&[
        "vocab",
        "extend",
        "--model",
        &model,
        "--words",
        &p(&words),
        "--out",
        &p(&out),
    ]);
    refused(&args, &[&p(&words), "UTF-16 LE", "iconv -f UTF-16LE"]);
    assert!(
        !out.join("tokenizer.json").exists(),
        "an extension was written"
    );
}
