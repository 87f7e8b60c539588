//! Corpus -> tokenizer -> token cache -> masked batches, end to end.
//!
//! Fixtures: `tests/fixtures/tokenizer-go/` was written by
//! `masklm tokenizer train --input tests/fixtures/tokenizer-corpus.txt --vocab-size 1000
//! --out tests/fixtures/tokenizer-go` (the corpus is the first 3,000 lines of
//! data/go/definitions.txt), and its `reference.json` by `scripts/make_reference.py`, which
//! encodes sentences with transformers' `AutoTokenizer.from_pretrained` on that folder.

mod common;

use std::path::Path;

use burn::tensor::Device;
use masklm_data::{
    CorpusOptions, MaskingConfig, MlmBatcher, NoProgress, Packing, PrepareOptions, SplitReader,
    Stale, StepSampler, TrainOptions, Validation, load_tokenizer, prepare, read_manifest,
    train_tokenizer,
};

fn tokenizer_dir() -> std::path::PathBuf {
    common::fixture("tokenizer-go")
}

#[test]
fn tokenizer_encodes_exactly_as_transformers() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_dir().join("reference.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = load_tokenizer(&tokenizer_dir()).unwrap();
    assert_eq!(
        tokenizer.mask_id,
        reference["mask_token_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        reference["vocab_size"].as_u64().unwrap()
    );
    let sentences = reference["sentences"].as_array().unwrap();
    let expected = reference["input_ids"].as_array().unwrap();
    assert_eq!(sentences.len(), 20);
    for (sentence, ids) in sentences.iter().zip(expected) {
        let sentence = sentence.as_str().unwrap();
        let ids: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(sentence).unwrap(), ids, "{sentence:?}");
    }
    // `<mask>` strips the space before it: "was <mask>" has no separate "Ġ" token.
    let ids = tokenizer
        .encode("The patient was <mask> with pneumonia.")
        .unwrap();
    let mask_at = ids.iter().position(|&t| t == tokenizer.mask_id).unwrap();
    assert_ne!(tokenizer.id_to_token(ids[mask_at - 1]).unwrap(), "Ġ");
}

#[test]
fn training_reproduces_the_transformers_checked_fixture() {
    let out = tempfile::tempdir().unwrap();
    let corpus = common::fixture("tokenizer-corpus.txt");
    let documents =
        masklm_data::Documents::new(vec![corpus], CorpusOptions::default()).map(Result::unwrap);
    let options = TrainOptions {
        vocab_size: 1000,
        ..TrainOptions::default()
    };
    train_tokenizer(documents, &options, out.path()).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let ours = std::fs::read_to_string(out.path().join(file)).unwrap();
        let fixture = std::fs::read_to_string(tokenizer_dir().join(file)).unwrap();
        assert_eq!(
            ours, fixture,
            "{file} differs from the fixture checked by transformers"
        );
    }
}

#[test]
fn tokenizer_without_mask_token_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let json = std::fs::read_to_string(tokenizer_dir().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        json.replace("<mask>", "<hidden>"),
    )
    .unwrap();
    let msg = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("no mask token") && msg.contains("tokenizer.json"),
        "{msg}"
    );
}

fn write_corpus(dir: &Path, lines: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(common::fixture("tokenizer-corpus.txt")).unwrap();
    let path = dir.join("corpus.txt");
    let body: Vec<&str> = text.lines().take(lines).collect();
    std::fs::write(&path, body.join("\n") + "\n").unwrap();
    path
}

fn options(packing: Packing, validation: Validation) -> PrepareOptions {
    PrepareOptions {
        max_seq_length: 64,
        packing,
        validation,
        corpus: CorpusOptions::default(),
    }
}

/// Writes the first `lines` corpus lines and prepares them into `dir/cache`.
struct Setup {
    tokenizer: masklm_data::MlmTokenizer,
    corpus: std::path::PathBuf,
    cache: std::path::PathBuf,
    prepared: masklm_data::Prepared,
}

fn setup(dir: &Path, lines: usize, packing: Packing) -> Setup {
    let corpus = write_corpus(dir, lines);
    let tokenizer = load_tokenizer(&tokenizer_dir()).unwrap();
    let cache = dir.join("cache");
    let input = [corpus.display().to_string()];
    let prepared = prepare(
        &tokenizer,
        &input,
        &options(packing, Validation::None),
        &cache,
        &NoProgress,
    )
    .unwrap();
    Setup {
        tokenizer,
        corpus,
        cache,
        prepared,
    }
}

fn read_all(cache: &Path, split: &str) -> Vec<Vec<u32>> {
    let manifest = read_manifest(cache).unwrap();
    let reader = SplitReader::open(cache, &manifest, split).unwrap();
    (0..reader.len()).map(|i| reader.get(i).unwrap()).collect()
}

#[test]
fn full_packing_round_trips_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer,
        corpus,
        cache,
        prepared,
    } = setup(dir.path(), 400, Packing::Full);
    assert!(!prepared.reused);
    assert_eq!(prepared.manifest.dtype, "u16");

    let examples = read_all(&cache, "train");
    let (bos, eos) = (tokenizer.bos_id, tokenizer.eos_id);
    for (i, example) in examples.iter().enumerate() {
        assert_eq!(example[0], bos);
        assert_eq!(*example.last().unwrap(), eos);
        if i + 1 < examples.len() {
            assert_eq!(example.len(), 64, "block {i} is not max_seq_length");
        }
    }
    // Unframed, the blocks are the documents' tokens, each followed by </s>.
    let mut expected = Vec::new();
    for line in std::fs::read_to_string(&corpus).unwrap().lines() {
        expected.extend(
            tokenizer
                .encode_batch_plain(vec![line.to_string()])
                .unwrap()
                .remove(0),
        );
        expected.push(eos);
    }
    expected.pop(); // the last separator is the last block's closing </s>
    let got: Vec<u32> = examples
        .iter()
        .flat_map(|e| e[1..e.len() - 1].iter().copied())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        prepared.manifest.train.tokens as usize,
        expected.len() + 2 * examples.len()
    );
}

#[test]
fn line_packing_truncates_each_document() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer,
        corpus,
        cache,
        prepared,
    } = setup(dir.path(), 200, Packing::Line);
    let examples = read_all(&cache, "train");
    let lines: Vec<String> = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(examples.len(), lines.len());
    let (mut cut, mut dropped) = (0u64, 0u64);
    for (example, line) in examples.iter().zip(&lines) {
        let mut ids = tokenizer
            .encode_batch_plain(vec![line.clone()])
            .unwrap()
            .remove(0);
        if ids.len() > 62 {
            cut += 1;
            dropped += ids.len() as u64 - 62;
        }
        ids.truncate(62);
        let mut framed = vec![tokenizer.bos_id];
        framed.extend(ids);
        framed.push(tokenizer.eos_id);
        assert_eq!(example, &framed);
    }
    // The manifest counts what was cut, for the notices of prepare, train and eval.
    let train = &prepared.manifest.train;
    assert!(cut > 0, "the fixture has documents longer than 62 tokens");
    assert_eq!((train.truncated, train.truncated_tokens), (cut, dropped));
    let note = train
        .truncation_notice(64, "not scored", "raise it")
        .unwrap();
    assert!(
        note.starts_with(&format!("{cut} of 200 documents were")),
        "{note}"
    );
    assert!(
        note.contains(&format!("the last {dropped} tokens")),
        "{note}"
    );
}

#[test]
fn validation_split_is_deterministic_and_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), 1000);
    let tokenizer = load_tokenizer(&tokenizer_dir()).unwrap();
    let input = [corpus.display().to_string()];
    let opts = options(Packing::Line, Validation::Split(0.1));
    let a = prepare(
        &tokenizer,
        &input,
        &opts,
        &dir.path().join("a"),
        &NoProgress,
    )
    .unwrap();
    let b = prepare(
        &tokenizer,
        &input,
        &opts,
        &dir.path().join("b"),
        &NoProgress,
    )
    .unwrap();
    let m = &a.manifest;
    assert_eq!(m.train.documents + m.validation.documents, 1000);
    let share = m.validation.documents as f64 / 1000.0;
    assert!((0.07..0.13).contains(&share), "validation share {share}");
    assert_eq!(
        read_all(&dir.path().join("a"), "validation"),
        read_all(&dir.path().join("b"), "validation")
    );
    assert_eq!(m.train, b.manifest.train);
}

#[test]
fn cache_is_reused_and_invalidated_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), 100);
    let tokenizer = load_tokenizer(&tokenizer_dir()).unwrap();
    let cache = dir.path().join("cache");
    let input = [corpus.display().to_string()];
    let opts = options(Packing::Full, Validation::None);
    assert!(
        !prepare(&tokenizer, &input, &opts, &cache, &NoProgress)
            .unwrap()
            .reused
    );
    assert!(
        prepare(&tokenizer, &input, &opts, &cache, &NoProgress)
            .unwrap()
            .reused
    );

    let line = options(Packing::Line, Validation::None);
    let again = prepare(&tokenizer, &input, &line, &cache, &NoProgress).unwrap();
    assert_eq!(
        again.rebuilt_because.map(|r| r.to_string()).as_deref(),
        Some("the preparation settings changed (packing full -> line)")
    );

    // A different tokenizer (same files, one byte changed) invalidates the cache.
    let other = dir.path().join("tok");
    std::fs::create_dir(&other).unwrap();
    let json = std::fs::read_to_string(tokenizer_dir().join("tokenizer.json")).unwrap();
    std::fs::write(
        other.join("tokenizer.json"),
        json.replacen("\"<unk>\"", "\"<UNK>\"", 1),
    )
    .unwrap();
    let changed = load_tokenizer(&other).unwrap();
    let again = prepare(&changed, &input, &line, &cache, &NoProgress).unwrap();
    assert_eq!(again.rebuilt_because, Some(Stale::Tokenizer));

    std::fs::write(&corpus, "a different corpus\nwith other text\n").unwrap();
    let again = prepare(&changed, &input, &line, &cache, &NoProgress).unwrap();
    let corpus_path = std::fs::canonicalize(&corpus).unwrap();
    assert_eq!(
        again.rebuilt_because,
        Some(Stale::Inputs(format!(
            "{} was modified",
            corpus_path.display()
        )))
    );
    assert_eq!(again.manifest.train.documents, 2);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = load_tokenizer(&tokenizer_dir()).unwrap();
    let opts = options(Packing::Full, Validation::None);
    let cache = dir.path().join("cache");
    let run = |input: &str| {
        prepare(&tokenizer, &[input.to_string()], &opts, &cache, &NoProgress)
            .unwrap_err()
            .to_string()
    };

    let missing = dir.path().join("missing.txt").display().to_string();
    assert!(run(&missing).contains("no such file or directory"));

    let blank = dir.path().join("blank.txt");
    std::fs::write(&blank, "\n\n   \n").unwrap();
    let msg = run(&blank.display().to_string());
    assert!(
        msg.contains("no text in") && msg.contains("blank.txt"),
        "{msg}"
    );
    assert!(!cache.exists(), "a failed prepare left a cache behind");

    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    assert!(run(&empty_dir.display().to_string()).contains("holds no file"));

    let bad = options(Packing::Full, Validation::Split(1.5));
    let msg = prepare(
        &tokenizer,
        &[blank.display().to_string()],
        &bad,
        &cache,
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("validation_split"), "{msg}");
}

#[test]
fn batcher_gives_masked_batches() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer, cache, ..
    } = setup(dir.path(), 300, Packing::Line);
    let manifest = read_manifest(&cache).unwrap();
    let split = SplitReader::open(&cache, &manifest, "train").unwrap();
    assert_eq!(split.len(), 300);
    assert!(split.get(300).is_none());
    let sample = |i: usize| masklm_data::Sample {
        index: i as u64,
        tokens: split.get(i).unwrap(),
    };

    let batcher = MlmBatcher {
        vocab: tokenizer.mask_vocab().unwrap(),
        config: MaskingConfig::default(),
        seed: 1,
        epoch: 0,
    };
    let device = Device::flex();
    let samples: Vec<_> = (0..8).map(sample).collect();
    let longest = samples.iter().map(|s| s.tokens.len()).max().unwrap();
    let batch = batcher.collate(&samples, &device).unwrap();
    assert_eq!(batch.input_ids.dims(), [8, longest]);
    let mask = common::ints(batch.attention_mask.clone());
    let real: usize = samples.iter().map(|s| s.tokens.len()).sum();
    assert_eq!(mask.iter().sum::<i64>() as usize, real);
    // Labels are the original tokens at the predicted positions.
    let positions = common::ints(batch.positions);
    let labels = common::ints(batch.labels);
    assert!(!positions.is_empty());
    for (p, l) in positions.iter().zip(&labels) {
        let (row, col) = (*p as usize / longest, *p as usize % longest);
        assert_eq!(samples[row].tokens[col] as i64, *l);
    }
    // The same samples in another order mask the same way: masks follow sample indices.
    let reversed: Vec<_> = samples.iter().rev().cloned().collect();
    let again = batcher.collate(&reversed, &device).unwrap();
    // Map each prediction back to (sample, column, label): the same set in both orders.
    let keyed = |positions: &[i64], labels: &[i64], row_of: &dyn Fn(usize) -> usize| {
        let mut v: Vec<(usize, usize, i64)> = positions
            .iter()
            .zip(labels)
            .map(|(&p, &l)| (row_of(p as usize / longest), p as usize % longest, l))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        keyed(&positions, &labels, &|r| r),
        keyed(
            &common::ints(again.positions),
            &common::ints(again.labels),
            &|r| 7 - r
        )
    );
}

#[test]
fn length_grouped_steps_pad_less_see_every_example_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer, cache, ..
    } = setup(dir.path(), 1000, Packing::Line);
    let manifest = read_manifest(&cache).unwrap();
    let split = SplitReader::open(&cache, &manifest, "train").unwrap();
    assert_eq!(split.example_len(3), split.get(3).map(|t| t.len()));
    assert_eq!(split.example_len(1000), None);
    let vocab = tokenizer.mask_vocab().unwrap();
    let masking = MaskingConfig::default();
    let device = Device::flex();
    // One epoch: 125 steps of 8 of the 1,000 line examples.
    let epoch = |grouped: bool| {
        let mut sampler = StepSampler::new(split.len(), 8, 1, 5).with_length_grouping(grouped);
        let (mut cells, mut tokens, mut masked) = (0, 0, 0);
        for step in 0..125 {
            let out = sampler.step(step, &[&split], &vocab, &masking, &device);
            let [rows, cols] = out.batches[0].input_ids.dims();
            cells += rows * cols;
            tokens += out.tokens;
            masked += out.masked;
        }
        (cells, tokens, masked)
    };
    let (plain, grouped) = (epoch(false), epoch(true));
    // The same examples (each once per epoch, masked the same way: masks follow the example),
    // in batches that pad far less.
    let every: usize = (0..split.len()).filter_map(|i| split.example_len(i)).sum();
    assert_eq!((plain.1, plain.2), (every, grouped.2));
    assert_eq!(grouped.1, every);
    assert!(
        grouped.0 * 10 < plain.0 * 8,
        "padded cells: grouped {} vs plain {}",
        grouped.0,
        plain.0
    );
    // A fresh sampler (a resume) gives step 60 exactly as the one that walked there.
    let ids = |sampler: &mut StepSampler, step: usize| {
        let out = sampler.step(step, &[&split], &vocab, &masking, &device);
        let batch = out.batches.into_iter().next().unwrap();
        (common::ints(batch.input_ids), common::ints(batch.labels))
    };
    let mut walked = StepSampler::new(split.len(), 8, 1, 5).with_length_grouping(true);
    for step in 0..60 {
        ids(&mut walked, step);
    }
    let mut fresh = StepSampler::new(split.len(), 8, 1, 5).with_length_grouping(true);
    assert_eq!(ids(&mut walked, 60), ids(&mut fresh, 60));
}

/// Every document of `path`, or the first error.
fn documents_of(path: &Path, field: &str) -> Result<Vec<String>, masklm_data::DataError> {
    let options = CorpusOptions {
        text_field: field.to_string(),
        ..CorpusOptions::default()
    };
    masklm_data::Documents::new(vec![path.to_path_buf()], options).collect()
}

#[test]
fn parquet_written_by_pyarrow_reads_row_by_row_with_clear_errors() {
    let dir = common::fixture("parquet");
    let expected: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lines.json")).unwrap()).unwrap();
    for codec in ["snappy", "zstd"] {
        let path = dir.join(format!("corpus-{codec}.parquet"));
        // 60 rows in 4 row groups, the null in row 7 skipped.
        assert_eq!(documents_of(&path, "text").unwrap(), expected, "{codec}");
    }
    let path = dir.join("corpus-snappy.parquet");
    let err = documents_of(&path, "body").unwrap_err().to_string();
    assert!(
        err.contains("corpus-snappy.parquet")
            && err.contains("no column \"body\" (columns: id, text)"),
        "{err}"
    );
    let err = documents_of(&path, "id").unwrap_err().to_string();
    assert!(err.contains("column \"id\" does not hold strings"), "{err}");

    // Damaged files: the footer cut off, and data pages overwritten.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = documents_of(&cut, "text").unwrap_err().to_string();
    assert!(
        err.contains("cut.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );
    let mut garbled = bytes.clone();
    for b in &mut garbled[200..2000] {
        *b = 0xA5;
    }
    let bad = tmp.path().join("garbled.parquet");
    std::fs::write(&bad, &garbled).unwrap();
    let err = documents_of(&bad, "text").unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("garbled.parquet"), "{err}");
}

/// The documents of the `datasets` folder `input` (split `split`), or the first error.
fn dataset_documents(
    input: &Path,
    split: Option<&str>,
    field: &str,
) -> Result<Vec<String>, masklm_data::DataError> {
    let inputs = [input.display().to_string()];
    let (files, _) = masklm_data::resolve_corpus_inputs(&inputs, split)?;
    let options = CorpusOptions {
        text_field: field.to_string(),
        split: split.map(str::to_string),
        ..CorpusOptions::default()
    };
    masklm_data::Documents::new(files, options).collect()
}

#[test]
fn datasets_folders_read_as_datasets_reads_them() {
    // Written by `datasets` 5.2.0 (scripts/make_datasets_fixture.py), with the text column
    // as `datasets` reads it back; our documents are its non-blank, non-null rows, in order.
    let dir = common::fixture("datasets");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let rows = |key: &str| -> Vec<String> {
        expected[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in expected.json"))
            .iter()
            .filter_map(|v| v.as_str())
            .filter(|t| !t.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    for (folder, split, key) in [
        ("saved", None, "saved"),
        ("saved-dict", None, "saved-dict/train"),
        ("saved-dict", Some("train"), "saved-dict/train"),
        ("saved-dict", Some("validation"), "saved-dict/validation"),
        ("saved-dict/validation", None, "saved-dict/validation"),
        ("load-cache", None, "load-cache/train"),
        ("load-cache", Some("test"), "load-cache/test"),
    ] {
        let documents = dataset_documents(&dir.join(folder), split, "text").unwrap();
        assert_eq!(documents, rows(key), "{folder} {split:?}");
        assert!(!documents.is_empty());
    }
    // Single Arrow files as pyarrow writes them: compressed (lz4 file format, feather's
    // default; zstd stream), and a dictionary-encoded text column.
    for name in ["lz4-file.arrow", "zstd-stream.arrow", "dictionary.arrow"] {
        let documents = documents_of(&dir.join("arrow").join(name), "text").unwrap();
        assert_eq!(documents, rows(&format!("arrow/{name}")), "{name}");
        assert_eq!(documents, rows("saved"), "{name}");
    }
    // The sharded train split reads shard 0 then shard 1, rows in order.
    assert_eq!(rows("saved-dict/train"), rows("saved"));

    // A split the folder lacks names the ones it has.
    let err = dataset_documents(&dir.join("saved-dict"), Some("test"), "text")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("saved-dict") && err.contains("train, validation") && err.contains("--split"),
        "{err}"
    );
    let err = dataset_documents(&dir.join("load-cache"), Some("validation"), "text")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no split \"validation\"") && err.contains("--split"),
        "{err}"
    );
    // Columns: missing, and not text.
    let err = dataset_documents(&dir.join("saved"), None, "body")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data-00000-of-00001.arrow")
            && err.contains("no column \"body\" (columns: text, id)"),
        "{err}"
    );
    let err = dataset_documents(&dir.join("saved"), None, "id")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column \"id\" holds Int64, not strings"),
        "{err}"
    );

    // Damaged folders and files: a listed shard missing, a shard cut short, garbage.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for file in [
        "state.json",
        "dataset_info.json",
        "data-00000-of-00001.arrow",
    ] {
        std::fs::copy(dir.join("saved").join(file), copy.join(file)).unwrap();
    }
    let arrow = copy.join("data-00000-of-00001.arrow");
    let bytes = std::fs::read(&arrow).unwrap();
    std::fs::write(&arrow, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = dataset_documents(&copy, None, "text")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data-00000-of-00001.arrow"), "{err}");
    let mut garbled = bytes.clone();
    for b in &mut garbled[8..] {
        *b = 0xA5;
    }
    std::fs::write(&arrow, &garbled).unwrap();
    let err = dataset_documents(&copy, None, "text")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data-00000-of-00001.arrow"), "{err}");
    std::fs::remove_file(&arrow).unwrap();
    let err = dataset_documents(&copy, None, "text")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state.json")
            && err.contains("lists data-00000-of-00001.arrow, which is missing"),
        "{err}"
    );
}

#[test]
fn prepare_reads_the_split_it_is_given() {
    // `--split` reaches the cache: the validation split's 2 rows, or the 6 non-blank of train.
    let dir = common::fixture("datasets").join("saved-dict");
    let tmp = tempfile::tempdir().unwrap();
    for (split, documents) in [(Some("validation"), 2), (None, 6)] {
        let out = tmp.path().join(format!("cache-{split:?}"));
        let mut args = vec![
            "prepare".to_string(),
            "--tokenizer".to_string(),
            tokenizer_dir().display().to_string(),
            "--input".to_string(),
            dir.display().to_string(),
            "--out".to_string(),
            out.display().to_string(),
            "--validation-split".to_string(),
            "0".to_string(),
        ];
        if let Some(split) = split {
            args.extend(["--split".to_string(), split.to_string()]);
        }
        common::masklm_ok(&args);
        let manifest = read_manifest(&out).unwrap();
        assert_eq!(manifest.corpus.documents, documents, "{split:?}");
    }
}

#[test]
fn a_json_array_reads_element_by_element() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("corpus.json");
    std::fs::write(
        &path,
        "\u{feff}\n [{\"text\": \"first document\", \"id\": 1}, {\"text\": null},\n \"a bare string\", {\"text\": \"  \"}, {\"text\": \"last\"}]\n",
    )
    .unwrap();
    assert_eq!(
        documents_of(&path, "text").unwrap(),
        ["first document", "a bare string", "last"]
    );
    // Still JSON Lines when the file does not start with `[`.
    std::fs::write(&path, "{\"text\": \"one\"}\n{\"text\": \"two\"}\n").unwrap();
    assert_eq!(documents_of(&path, "text").unwrap(), ["one", "two"]);
    for (content, expected) in [
        (
            "[{\"body\": \"x\"}]",
            "record 1: no field \"text\" (fields: body)",
        ),
        (
            "[{\"text\": \"a\"}, 7]",
            "record 2 is 7, not an object or a string",
        ),
        ("[{\"text\": \"a\"}, {\"text\": ", "EOF while parsing"),
        ("[{\"text\": \"a\"}] trailing", "trailing characters"),
    ] {
        std::fs::write(&path, content).unwrap();
        let err = documents_of(&path, "text").unwrap_err().to_string();
        assert!(
            err.contains("corpus.json") && err.contains(expected),
            "{content}: {err}"
        );
    }
}

/// The documents of a packed batch, unmasked (labels put back), in row order.
fn packed_documents(batch: &masklm_data::MlmBatch) -> Vec<Vec<u32>> {
    let [rows, seq] = batch.input_ids.dims();
    let mut ids = common::ints(batch.input_ids.clone());
    for (p, l) in common::ints(batch.positions.clone())
        .into_iter()
        .zip(common::ints(batch.labels.clone()))
    {
        ids[p as usize] = l;
    }
    let mask = common::ints(batch.attention_mask.clone());
    let documents = batch.documents.as_ref().expect("a packed batch");
    assert_eq!(documents.len(), rows);
    let mut out = Vec::new();
    for (r, lens) in documents.iter().enumerate() {
        let used: usize = lens.iter().sum();
        assert!(used <= seq, "row {r} holds {used} tokens in {seq} columns");
        let real = mask[r * seq..][..seq].iter().filter(|&&m| m == 1).count();
        assert_eq!(real, used, "row {r}: attention mask vs document lengths");
        let mut column = r * seq;
        for &n in lens {
            out.push(ids[column..][..n].iter().map(|&t| t as u32).collect());
            column += n;
        }
    }
    out
}

#[test]
fn document_packing_fills_rows_with_every_document_once_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer, cache, ..
    } = setup(dir.path(), 1000, Packing::Documents);
    let manifest = read_manifest(&cache).unwrap();
    let split = SplitReader::open(&cache, &manifest, "train").unwrap();
    let n = split.len();
    let vocab = tokenizer.mask_vocab().unwrap();
    let masking = MaskingConfig::default();
    let device = Device::flex();
    let (batch, accum, row_tokens) = (8, 2, 64);
    let packed_sampler = || StepSampler::new(n, batch, accum, 5).with_packing(Some(row_tokens));
    let mut sampler = packed_sampler();
    // Steps until the first epoch is drawn.
    let (mut drawn, mut documents, mut steps) = (0u64, Vec::new(), Vec::new());
    let (mut cells, mut tokens) = (0, 0);
    while drawn < n as u64 {
        let out = sampler.step(steps.len(), &[&split], &vocab, &masking, &device);
        assert_eq!(out.batches.len(), accum);
        for b in &out.batches {
            let [rows, cols] = b.input_ids.dims();
            cells += rows * cols;
            documents.extend(packed_documents(b));
        }
        tokens += out.tokens;
        drawn += out.samples as u64;
        steps.push(out);
    }
    // Every document of epoch 0 once, then the start of epoch 1's order, as drawn unpacked.
    let mut want: Vec<Vec<u32>> = (0..n).map(|i| split.get(i).unwrap()).collect();
    let next = masklm_data::epoch_order(n, 5, 1);
    want.extend(
        next[..drawn as usize - n]
            .iter()
            .map(|&i| split.get(i).unwrap()),
    );
    want.sort();
    documents.sort();
    assert_eq!(documents.len(), want.len());
    assert!(
        documents == want,
        "packed steps drew other documents than the stream's"
    );
    // First-fit fills the rows far better than one line per row padded to the longest of its
    // batch (on the same documents, the same number of rows per micro-batch).
    let fill = tokens as f64 / cells as f64;
    let mut lines = StepSampler::new(n, batch, accum, 5);
    let (mut line_cells, mut line_tokens) = (0, 0);
    for step in 0..n.div_ceil(batch * accum) {
        let out = lines.step(step, &[&split], &vocab, &masking, &device);
        line_cells += out
            .batches
            .iter()
            .map(|b| b.input_ids.dims().iter().product::<usize>())
            .sum::<usize>();
        line_tokens += out.tokens;
    }
    let line_fill = line_tokens as f64 / line_cells as f64;
    eprintln!("real tokens per cell: packed {fill:.3}, line {line_fill:.3}");
    assert!(
        fill > 0.85 && fill > line_fill + 0.05,
        "packed {fill:.3} vs line {line_fill:.3}"
    );
    assert_eq!(
        packed_sampler().steps_for_samples(n as u64, &[&split]),
        steps.len(),
        "steps for one epoch"
    );
    // A fresh sampler (a resumed run) at step 5 packs exactly what the first one did.
    let again = packed_sampler().step(5, &[&split], &vocab, &masking, &device);
    for (a, b) in again.batches.iter().zip(&steps[5].batches) {
        assert_eq!(
            common::ints(a.input_ids.clone()),
            common::ints(b.input_ids.clone())
        );
        assert_eq!(
            common::ints(a.positions.clone()),
            common::ints(b.positions.clone())
        );
        assert_eq!(
            common::ints(a.labels.clone()),
            common::ints(b.labels.clone())
        );
        assert_eq!(a.documents, b.documents);
    }
    assert_eq!(again.samples, steps[5].samples);
}

#[test]
fn batch_size_warmup_grows_rows_with_tokens_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        tokenizer, cache, ..
    } = setup(dir.path(), 1000, Packing::Documents);
    let manifest = read_manifest(&cache).unwrap();
    let split = SplitReader::open(&cache, &manifest, "train").unwrap();
    let n = split.len();
    let vocab = tokenizer.mask_vocab().unwrap();
    let masking = MaskingConfig::default();
    let device = Device::flex();
    // From 2 rows to 16 over 1,500 real tokens, unpacked and packed.
    for packing in [None, Some(64)] {
        let sampler = || {
            StepSampler::new(n, 16, 1, 5)
                .with_packing(packing)
                .with_batch_size_warmup(Some((2, 1500)))
        };
        let mut s = sampler();
        let (mut tokens, mut rows) = (0u64, Vec::new());
        let mut steps = Vec::new();
        for step in 0..12 {
            let out = s.step(step, &[&split], &vocab, &masking, &device);
            let r = out.batches[0].input_ids.dims()[0];
            assert_eq!(r, s.rows_after(tokens), "step {step} ({packing:?})");
            rows.push(r);
            tokens += out.tokens as u64;
            steps.push(out);
        }
        assert_eq!(rows[0], 2, "{packing:?}: {rows:?}");
        assert!(
            rows.windows(2).all(|w| w[0] <= w[1]),
            "{packing:?}: {rows:?}"
        );
        assert_eq!(*rows.last().unwrap(), 16, "{packing:?}: {rows:?}");
        // A fresh sampler (a resume) at step 7 draws what the first did.
        let again = sampler().step(7, &[&split], &vocab, &masking, &device);
        let (a, b) = (&again.batches[0], &steps[7].batches[0]);
        assert_eq!(
            common::ints(a.input_ids.clone()),
            common::ints(b.input_ids.clone())
        );
        assert_eq!(
            common::ints(a.labels.clone()),
            common::ints(b.labels.clone())
        );
        assert_eq!(a.documents, b.documents);
    }
}
