//! `masklm tokenizer train --model bpe|wordpiece|unigram` against transformers, whole-word
//! masking on each family's words, the refusals of bad options, and the PubMedBERT-style recipe
//! (configs/pubmed-bert-scratch.toml) from tokenizer to a transformers fill-mask.
//!
//! Each family is trained once per test run, by the CLI, on the shipped corpus
//! (data/go/definitions.txt, 5.9 MB) with 2,000 tokens. transformers' side is
//! `scripts/tokenizer_reference.py` (AutoTokenizer) and `scripts/check_hf_export.py`
//! (pipeline("fill-mask")), run with the reference Python (`common::reference_python`; a
//! missing one fails under CI=true).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use masklm_data::{MaskingConfig, MaskingStrategy, WordBoundary, load_tokenizer, mask_tokens};
use serde_json::Value;

const MASKLM: &str = env!("CARGO_BIN_EXE_masklm");
const FAMILIES: [&str; 3] = ["bpe", "wordpiece", "unigram"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus() -> PathBuf {
    repo().join("data/go/definitions.txt")
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// The tokenizer folder of `model`, trained by the CLI on the first use in this test run.
fn trained(model: &str) -> PathBuf {
    static TRAINED: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let index = FAMILIES.iter().position(|&m| m == model).unwrap();
    TRAINED[index]
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("tokenizer_families")
                .join(model);
            let _ = std::fs::remove_dir_all(&out);
            let printed = common::masklm_ok([
                "tokenizer",
                "train",
                "--model",
                model,
                "--input",
                &s(&corpus()),
                "--vocab-size",
                "2000",
                "--out",
                &s(&out),
            ]);
            assert!(
                printed.contains(&format!("2000 {model} tokens")),
                "{printed}"
            );
            out
        })
        .clone()
}

/// Sentences for the parity check; `{mask}` becomes the family's mask token, and the other
/// families' mask spellings stay plain text.
const SENTENCES: [&str; 20] = [
    "The patient was {mask} with pneumonia.",
    "Catalysis of the reaction: ATP + H2O = ADP + phosphate.",
    "Café, naïve, résumé and Ångström: accents everywhere.",
    "UPPERCASE WORDS and MiXeD CaSe in gene names like BRCA1 and p53.",
    "Digits 12345, decimals 3.14, exponents 1e-5 and 100% yields at 37°C.",
    "Punctuation!? (parentheses) [brackets] {braces} \"quotes\" 'single' — dashes – and … ellipses.",
    "Unicode: αβγ-tubulin, 5 µm, ±2, ≥ 5, x² → result.",
    "中文字符 and 日本語 text mixed with English.",
    "Compatibility forms: ﬁnal ﬂow ＡＢＣ ① ½.",
    "An emoji 🧬 and a check mark ✓ inside text.",
    "Zyxwvut frobnicated the quuxification of glorbs.",
    "  leading, trailing   and   repeated   spaces  ",
    "tab\tseparated\nand newline\r\ntext",
    "{mask} at the start, and at the end {mask}",
    "glued{mask}mask, then <mask> and [MASK] as they are",
    "Any process that activates or increases the frequency, rate or extent of cell division.",
    "The mitochondrial inner membrane (MIM) holds ~20 proteins; see GO:0005743.",
    "Émile's œuvre: Ærø, straße, ĳ, Ø, İstanbul.",
    "",
    "Control\u{7}char, zero\u{200b}width space and soft\u{ad}hyphen.",
];

#[test]
fn each_family_encodes_exactly_as_transformers() {
    let work = tempfile::tempdir().unwrap();
    for model in FAMILIES {
        let dir = trained(model);
        let tokenizer = load_tokenizer(&dir).unwrap();
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        // Each convention's specials at its ids, and how it marks words.
        let (class, specials, boundary) = match model {
            "bpe" => (
                "RobertaTokenizer",
                ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                WordBoundary::StartMarkers(vec!['Ġ', '▁']),
            ),
            "wordpiece" => (
                "BertTokenizer",
                ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                WordBoundary::ContinuationPrefix("##".to_string()),
            ),
            _ => (
                "XLMRobertaTokenizer",
                ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                WordBoundary::StartMarkers(vec!['Ġ', '▁']),
            ),
        };
        for (id, token) in specials.iter().enumerate() {
            assert_eq!(
                tokenizer.tokenizer.token_to_id(token),
                Some(id as u32),
                "{model}"
            );
        }
        assert_eq!(config["tokenizer_class"], class, "{model}");
        assert_eq!(tokenizer.mask_token, specials[4], "{model}");
        assert_eq!(tokenizer.word_boundary(), boundary, "{model}");
        let expected_model = match model {
            "bpe" => "BPE",
            "wordpiece" => "WordPiece",
            _ => "Unigram",
        };
        assert_eq!(json["model"]["type"], expected_model);
        if model == "wordpiece" {
            assert_eq!(json["normalizer"]["lowercase"], true);
            assert_eq!(config["do_lower_case"], true);
            assert_eq!(
                (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id),
                (2, 3, 0)
            );
        } else {
            assert_eq!(
                (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id),
                (0, 2, 1)
            );
        }

        let sentences: Vec<String> = SENTENCES
            .iter()
            .map(|t| t.replace("{mask}", &tokenizer.mask_token))
            .collect();
        let ours: Vec<Vec<u32>> = sentences
            .iter()
            .map(|t| tokenizer.encode(t).unwrap())
            .collect();
        // The mask token is found inside text, wherever it is written.
        for (sentence, ids) in sentences.iter().zip(&ours) {
            let masks = ids.iter().filter(|&&id| id == tokenizer.mask_id).count();
            let written = sentence.matches(tokenizer.mask_token.as_str()).count();
            assert_eq!(masks, written, "{model}: {sentence:?}");
        }

        let Some(python) = common::reference_python("transformers") else {
            continue;
        };
        let file = work.path().join(format!("{model}.json"));
        std::fs::write(&file, serde_json::to_string(&sentences).unwrap()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(repo().join("scripts/tokenizer_reference.py"))
            .arg(&dir)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(theirs["class"], class, "{model}");
        assert_eq!(theirs["len"], tokenizer.vocab_size(), "{model}");
        for (name, id) in [
            ("mask", tokenizer.mask_id),
            ("pad", tokenizer.pad_id),
            ("cls", tokenizer.bos_id),
            ("sep", tokenizer.eos_id),
        ] {
            assert_eq!(theirs["specials"][name][1], id, "{model}: {name}");
        }
        for (i, (sentence, ids)) in sentences.iter().zip(&ours).enumerate() {
            let expected: Vec<u32> =
                serde_json::from_value(theirs["input_ids"][i].clone()).unwrap();
            let pieces: Vec<String> = ids
                .iter()
                .map(|&id| tokenizer.id_to_token(id).unwrap_or_default())
                .collect();
            assert_eq!(ids, &expected, "{model}: {sentence:?} ({pieces:?})");
            let decoded = tokenizer.tokenizer.decode(ids, true).unwrap();
            assert_eq!(theirs["decoded"][i], decoded, "{model}: {sentence:?}");
        }
        // Pairs (`<s> A </s></s> B </s>`, `[CLS] A [SEP] B [SEP]` with B of type 1), which
        // masklm does not use itself but a fine-tuning user of the folder will.
        for (i, pair) in sentences.chunks(2).enumerate() {
            let encoding = tokenizer
                .tokenizer
                .encode((pair[0].as_str(), pair[1].as_str()), true)
                .unwrap();
            let (ids, types): (Vec<u32>, Vec<u32>) =
                serde_json::from_value(theirs["pairs"][i].clone()).unwrap();
            assert_eq!(encoding.get_ids(), ids, "{model}: pair {pair:?}");
            assert_eq!(encoding.get_type_ids(), types, "{model}: pair {pair:?}");
        }
    }
}

#[test]
fn whole_word_masking_masks_whole_wordpiece_and_unigram_words() {
    // The masker reads word boundaries from the model type (`##` continues a WordPiece word,
    // `▁` starts a Unigram one); here they must be the tokenizer's own words: its encodings'
    // word ids, what transformers' `word_ids()` returns and its whole-word collator groups by.
    let text = std::fs::read_to_string(corpus()).unwrap();
    let lines: Vec<&str> = text.lines().take(400).collect();
    let config = MaskingConfig {
        strategy: MaskingStrategy::WholeWord,
        ..MaskingConfig::default()
    };
    for model in ["wordpiece", "unigram"] {
        let tokenizer = load_tokenizer(&trained(model)).unwrap();
        let vocab = tokenizer.mask_vocab().unwrap();
        let (mut words, mut chosen, mut chosen_multi_piece) = (0usize, 0usize, 0usize);
        for (i, line) in lines.iter().enumerate() {
            let encoding = tokenizer.tokenizer.encode(*line, true).unwrap();
            let (ids, word_ids) = (encoding.get_ids(), encoding.get_word_ids());
            for p in 1..ids.len() {
                if vocab.is_special(ids[p]) || vocab.is_special(ids[p - 1]) {
                    continue;
                }
                assert_eq!(
                    vocab.starts_word(ids[p]),
                    word_ids[p] != word_ids[p - 1],
                    "{model}: token {p} ({:?}) of {line:?}",
                    tokenizer.id_to_token(ids[p])
                );
            }
            let masked = mask_tokens(ids, &vocab, &config, 3, 0, i as u64);
            let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for (p, word) in word_ids.iter().enumerate() {
                if let Some(word) = word
                    && !vocab.is_special(ids[p])
                {
                    groups.entry(*word).or_default().push(p as u32);
                }
            }
            for positions in groups.values() {
                let selected: Vec<bool> = positions
                    .iter()
                    .map(|p| masked.positions.contains(p))
                    .collect();
                assert!(
                    selected.iter().all(|&s| s == selected[0]),
                    "{model}: a word split by the masker in {line:?}: {positions:?} {selected:?}"
                );
                words += 1;
                if selected[0] {
                    chosen += 1;
                    chosen_multi_piece += usize::from(positions.len() > 1);
                }
            }
        }
        // One draw per word at the masking probability (0.15): within ~4 sigma over the
        // ~8,000 words.
        let rate = chosen as f64 / words as f64;
        assert!(
            (rate - 0.15).abs() < 0.016,
            "{model}: {rate} of {words} words"
        );
        assert!(
            chosen_multi_piece > 100,
            "{model}: only {chosen_multi_piece} multi-piece words masked"
        );
    }
}

/// `masklm tokenizer train ARGS`, which must fail; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = std::process::Command::new(MASKLM)
        .args(["tokenizer", "train"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_options_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before any text is read: the input does not even exist.
    let absent = s(&dir.path().join("absent.txt"));
    let out = s(&dir.path().join("tok"));
    for (args, expect) in [
        (
            &["--model", "wordpiece", "--vocab-size", "5"][..],
            &["--vocab-size", "5 special tokens"][..],
        ),
        (
            &["--model", "bpe", "--vocab-size", "100"],
            &["--vocab-size", "256 byte symbols"],
        ),
        (
            &["--model", "bpe", "--vocab-size", "261"],
            &["--vocab-size", "261 leaves no room for merges"],
        ),
        (
            &["--model-max-length", "0"],
            &["--model-max-length", "no room for text"],
        ),
        (
            &["--model", "unigram", "--lowercase"],
            &["--lowercase", "--model wordpiece"],
        ),
        (
            &["--model", "bpe", "--no-strip-accents"],
            &["--strip-accents", "--model wordpiece"],
        ),
        (
            &["--model", "unigram", "--min-frequency", "3"],
            &["--min-frequency", "Unigram"],
        ),
        (
            &["--model", "sentencepiece"],
            &["sentencepiece", "bpe, wordpiece or unigram"],
        ),
        (
            &["--model", "wordpiece", "--lowercase", "--no-lowercase"],
            &["--no-lowercase", "cannot be used with"],
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["--input", &absent, "--out", &out]);
        let err = refused(&all);
        for e in expect {
            assert!(err.contains(e), "{args:?}: {err}");
        }
        assert!(
            !err.contains("absent.txt"),
            "{args:?} read the input: {err}"
        );
    }

    // Known only once the text is read: the corpus's alphabet does not fit.
    let text = std::fs::read_to_string(corpus()).unwrap();
    let slice = dir.path().join("slice.txt");
    std::fs::write(
        &slice,
        text.lines().take(300).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "a\n").unwrap();
    for (args, input, expect) in [
        (
            &["--model", "wordpiece", "--vocab-size", "40"][..],
            &slice,
            &["--vocab-size", "40 is too small for this corpus", "##"][..],
        ),
        (
            &["--model", "unigram", "--vocab-size", "20"],
            &slice,
            &[
                "--vocab-size",
                "20 is too small for this corpus",
                "every character",
            ],
        ),
        (
            &["--model", "unigram", "--vocab-size", "100"],
            &tiny,
            &["learned no unigram pieces longer than one character"],
        ),
        (
            &["--model", "wordpiece", "--vocab-size", "100"],
            &tiny,
            &["learned no wordpiece pieces longer than one character"],
        ),
    ] {
        let input = s(input);
        let mut all = args.to_vec();
        all.extend(["--input", &input, "--out", &out]);
        let err = refused(&all);
        for e in expect {
            assert!(err.contains(e), "{args:?}: {err}");
        }
        assert!(
            !dir.path().join("tok/tokenizer.json").exists(),
            "{args:?} wrote a tokenizer"
        );
    }
}

#[test]
fn shipped_pubmed_bert_recipe_trains_exports_and_fills_masks_in_transformers() {
    // configs/pubmed-bert-scratch.toml as shipped, made test-sized: the WordPiece tokenizer
    // trained above, 2,000 GO definitions instead of data/pubmed, a 2-layer 32-wide BERT,
    // 6 steps with evaluations and (GO) probes.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(corpus()).unwrap();
    let slice = dir.path().join("go.txt");
    std::fs::write(
        &slice,
        text.lines().take(2000).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let tokenizer = trained("wordpiece");
    // GO probes in place of configs/probes-pubmed.tsv, whose answers ("diabetes") are not
    // single tokens of a 2,000-token GO vocabulary.
    let probes = dir.path().join("probes.tsv");
    std::fs::write(
        &probes,
        "Catalysis of the reaction: ATP + H2O = ADP + <mask>.\tphosphate\n\
         Any process that activates or increases the frequency of cell <mask>.\tdivision\tgrowth\n\
         The chemical reactions and pathways involving a <mask>.\tprotein\tlipid\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let sets = [
        format!("data.tokenizer=\"{}\"", s(&tokenizer)),
        format!("data.inputs=[\"{}\"]", s(&slice)),
        format!("data.cache=\"{}\"", s(&dir.path().join("cache"))),
        "data.max_seq_length=32".to_string(),
        "model.hidden_size=32".to_string(),
        "model.num_hidden_layers=2".to_string(),
        "model.num_attention_heads=2".to_string(),
        "model.intermediate_size=64".to_string(),
        "model.max_position_embeddings=64".to_string(),
        "training.batch_size=8".to_string(),
        "training.max_steps=6".to_string(),
        "eval.eval_steps=3".to_string(),
        "eval.batch_size=8".to_string(),
        "eval.max_batches=2".to_string(),
        format!("eval.probes=\"{}\"", s(&probes)),
        "checkpoint.save_steps=3".to_string(),
    ];
    let config = s(&repo().join("configs/pubmed-bert-scratch.toml"));
    let mut args = vec![
        "train".to_string(),
        "--config".to_string(),
        config,
        "--out".to_string(),
        s(&run),
    ];
    for set in &sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    common::masklm_ok(&args);
    let effective = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        effective.contains("strategy = \"whole_word\""),
        "{effective}"
    );

    // The export command of the config's comment, from the `best` pointer.
    let export = dir.path().join("export");
    let best = run.join("checkpoints/best");
    common::masklm_ok(["export", "--checkpoint", &s(&best), "--out", &s(&export)]);
    let read = |file: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(export.join(file)).unwrap()).unwrap()
    };
    let config = read("config.json");
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(config["type_vocab_size"], 2);
    assert_eq!(config["pad_token_id"], 0, "[PAD]");
    assert!(
        config["bos_token_id"].is_null() && config["eos_token_id"].is_null(),
        "BERT has no bos/eos: {config}"
    );
    assert_eq!(config["vocab_size"], 2000);
    assert_eq!(
        read("tokenizer_config.json")["tokenizer_class"],
        "BertTokenizer"
    );

    // transformers: AutoModelForMaskedLM + AutoTokenizer in pipeline("fill-mask") give
    // masklm's top-k ids, token strings, sequences, and scores within 1e-4.
    let Some(python) = common::reference_python("transformers, torch") else {
        return;
    };
    let checkpoint = std::fs::read_to_string(&best).unwrap();
    let checkpoint = run.join("checkpoints").join(checkpoint.trim());
    let out = std::process::Command::new(&python)
        .arg(repo().join("scripts/check_hf_export.py"))
        .args(["--masklm", MASKLM, "--export"])
        .arg(&export)
        .arg("--checkpoint")
        .arg(&checkpoint)
        .args([
            "The patient was [MASK] with pneumonia.",
            "Catalysis of the reaction: ATP + H2O = ADP + [MASK].",
            "Two masks: [MASK] and [MASK] in Ångström units.",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("EXPORT_CHECK passed=3 failed=0"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
