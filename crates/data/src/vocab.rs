//! How a tokenizer fragments a domain's words, and extending its vocabulary with them.
//!
//! A word is a whitespace-separated chunk of text with its leading and trailing punctuation
//! removed, kept when it has a letter. Its pieces are the tokens the tokenizer gives it in
//! running text (after a space: RoBERTa's `Ġword` form).
//!
//! Extension adds words as ordinary vocabulary entries, not as "added tokens": an added token
//! is matched in the raw text before pre-tokenization, so RoBERTa's byte-level BPE would either
//! leave a stray `Ġ` before it or, with `lstrip`, lose the space when decoding. Instead:
//! - BPE (RoBERTa, GPT-2 style): `Ġword` and the merges that build it from its current pieces,
//!   left to right (`Ġmit`+`och` -> `Ġmitoch`, ... -> `Ġmitochondria`). New merges rank after
//!   every old one, so they act only where the old merges left off: old tokens keep their ids,
//!   and a word's intermediate prefixes become tokens too (also listed as new tokens);
//! - WordPiece (BERT): the word itself, normalized as the tokenizer normalizes (greedy
//!   longest-match then takes it whole).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::{CorpusOptions, CorpusStats, DataError, Documents, MlmTokenizer};

/// A word of the corpus and how the tokenizer splits it.
#[derive(Debug, Clone, Serialize)]
pub struct WordPieces {
    pub word: String,
    pub count: u64,
    pub pieces: Vec<String>,
}

/// Word frequencies of a corpus.
#[derive(Debug, Clone, Default)]
pub struct WordCounts {
    pub documents: u64,
    pub words: u64,
    pub counts: HashMap<String, u64>,
    /// What reading the corpus found, skipped lines included.
    pub corpus: CorpusStats,
}

/// The words of one text (see the module docs).
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| w.chars().any(char::is_alphabetic))
}

/// Counts the words of the documents of `inputs`.
pub fn count_words(inputs: &[String], options: &CorpusOptions) -> Result<WordCounts, DataError> {
    let (files, _) = crate::resolve_corpus_inputs(inputs, options.split.as_deref())?;
    let mut counts = WordCounts::default();
    let mut documents = Documents::new(files, options.clone());
    for document in documents.by_ref() {
        let document = document?;
        counts.documents += 1;
        for word in words(&document) {
            counts.words += 1;
            *counts.counts.entry(word.to_string()).or_default() += 1;
        }
    }
    counts.corpus = documents.stats().clone();
    if counts.words == 0 {
        let skipped = counts.corpus.skipped_note().map(|n| format!(" ({n})"));
        return Err(DataError::Input(format!(
            "no words in {}{}: check the paths (and --text-field for JSON/Parquet)",
            inputs.join(", "),
            skipped.unwrap_or_default()
        )));
    }
    Ok(counts)
}

/// The pieces of each word in running text.
fn pieces_of(tokenizer: &Tokenizer, words: &[&str]) -> Result<Vec<Vec<String>>, DataError> {
    let texts: Vec<String> = words.iter().map(|w| format!(" {w}")).collect();
    tokenizer
        .encode_batch(texts, false)
        .map(|encodings| {
            encodings
                .into_iter()
                .map(|e| e.get_tokens().to_vec())
                .collect()
        })
        .map_err(|e| DataError::Tokenizer(e.to_string()))
}

/// Whether the pre-tokenizer keeps `word` (after a space) in one piece. Only then can it become
/// one token: BPE never merges across pre-tokens, and RoBERTa's and BERT's pre-tokenizers split
/// digits and punctuation off (`H2O` -> `H`, `2`, `O`).
fn one_pretoken(tokenizer: &Tokenizer, word: &str) -> bool {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let Some(pre) = tokenizer.get_pre_tokenizer() else {
        return true;
    };
    let mut text = PreTokenizedString::from(format!(" {word}"));
    pre.pre_tokenize(&mut text).is_ok()
        && text
            .get_splits(OffsetReferential::Original, OffsetType::Char)
            .len()
            == 1
}

/// How a tokenizer fragments a corpus.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub documents: u64,
    pub words: u64,
    pub unique_words: usize,
    /// Tokens per word over every word of the corpus.
    pub tokens_per_word: f64,
    /// Tokens per word over the occurrences of the `top` most frequent words.
    pub top_tokens_per_word: f64,
    /// The most frequent words.
    pub top: Vec<WordPieces>,
    /// The most frequent words split into 3 or more pieces.
    pub fragmented: Vec<WordPieces>,
    /// What reading the corpus found: files, lines, and the lines skipped as not text.
    pub corpus: CorpusStats,
}

/// Audits `tokenizer` on `counts`, listing `top` words in each table.
pub fn audit(
    tokenizer: &MlmTokenizer,
    counts: &WordCounts,
    top: usize,
) -> Result<Audit, DataError> {
    let mut ranked: Vec<(&String, u64)> = counts.counts.iter().map(|(w, &c)| (w, c)).collect();
    // Most frequent first; ties alphabetically, so the tables are reproducible.
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let words: Vec<&str> = ranked.iter().map(|(w, _)| w.as_str()).collect();
    let pieces = pieces_of(&tokenizer.tokenizer, &words)?;
    let tokens: u64 = ranked
        .iter()
        .zip(&pieces)
        .map(|((_, c), p)| c * p.len() as u64)
        .sum();
    let head = ranked.len().min(top);
    let head_words: u64 = ranked[..head].iter().map(|(_, c)| c).sum();
    let head_tokens: u64 = ranked[..head]
        .iter()
        .zip(&pieces)
        .map(|((_, c), p)| c * p.len() as u64)
        .sum();
    let entry = |i: usize| WordPieces {
        word: ranked[i].0.clone(),
        count: ranked[i].1,
        pieces: pieces[i].clone(),
    };
    Ok(Audit {
        documents: counts.documents,
        words: counts.words,
        unique_words: ranked.len(),
        tokens_per_word: tokens as f64 / counts.words.max(1) as f64,
        top_tokens_per_word: head_tokens as f64 / head_words.max(1) as f64,
        top: (0..head).map(entry).collect(),
        fragmented: (0..ranked.len())
            .filter(|&i| pieces[i].len() >= 3)
            .take(top)
            .map(entry)
            .collect(),
        corpus: counts.corpus.clone(),
    })
}

/// The `n` words worth adding: those seen at least `min_count` times, split into 2+ pieces and
/// one pre-token (so one token can spell them), ranked by the tokens they would save,
/// `count * (pieces - 1)` (frequent *and* fragmented; ties by count, then alphabetically).
pub fn candidates(
    tokenizer: &MlmTokenizer,
    counts: &WordCounts,
    n: usize,
    min_count: u64,
) -> Result<Vec<WordPieces>, DataError> {
    let frequent: Vec<(&String, u64)> = counts
        .counts
        .iter()
        .filter(|(w, c)| **c >= min_count && one_pretoken(&tokenizer.tokenizer, w))
        .map(|(w, &c)| (w, c))
        .collect();
    let words: Vec<&str> = frequent.iter().map(|(w, _)| w.as_str()).collect();
    let pieces = pieces_of(&tokenizer.tokenizer, &words)?;
    let mut ranked: Vec<WordPieces> = frequent
        .iter()
        .zip(pieces)
        .filter(|(_, p)| p.len() >= 2)
        .map(|((w, c), pieces)| WordPieces {
            word: w.to_string(),
            count: *c,
            pieces,
        })
        .collect();
    let saved = |w: &WordPieces| w.count * (w.pieces.len() as u64 - 1);
    ranked.sort_by(|a, b| {
        saved(b)
            .cmp(&saved(a))
            .then_with(|| b.count.cmp(&a.count))
            .then_with(|| a.word.cmp(&b.word))
    });
    ranked.truncate(n);
    Ok(ranked)
}

/// A token the extension added.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub id: u32,
    pub token: String,
    /// The word it spells, when it is a whole requested word (not a BPE prefix of one).
    pub word: Option<String>,
    /// The ids of the old tokenizer's pieces it stands for: its embedding starts as their mean.
    pub pieces: Vec<u32>,
}

/// A tokenizer with added words.
#[derive(Debug, Clone)]
pub struct Extension {
    /// The new tokenizer.json.
    pub tokenizer_json: String,
    /// New tokens, by id (ids `first_id..`).
    pub added: Vec<NewToken>,
    /// Requested words that were already one token, and words that could not be made one.
    pub already_single: Vec<String>,
    pub not_single: Vec<String>,
}

fn ext_error(reason: String) -> DataError {
    DataError::Tokenizer(format!("vocabulary extension: {reason}"))
}

/// Adds `words` to the vocabulary of `tokenizer`, new ids from `first_id` on (the model's
/// vocab_size, which may exceed the tokenizer's id space).
pub fn extend_tokenizer(
    tokenizer: &MlmTokenizer,
    words: &[String],
    first_id: u32,
) -> Result<Extension, DataError> {
    let (path, json) = read_tokenizer_json(tokenizer)?;
    let kind = json["model"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wanted = distinct_words(words)?;
    let old = &tokenizer.tokenizer;
    let old_pieces = pieces_of(old, &as_strs(&wanted))?;
    let already_single: Vec<String> = wanted
        .iter()
        .zip(&old_pieces)
        .filter(|(_, pieces)| pieces.len() <= 1)
        .map(|(word, _)| word.clone())
        .collect();
    // Only a word of one pre-token can become one token (see `one_pretoken`).
    let splittable: Vec<usize> = (0..wanted.len())
        .filter(|&i| old_pieces[i].len() > 1 && one_pretoken(old, &wanted[i]))
        .collect();
    let mut growing = Growing {
        old,
        json,
        next_id: first_id.max(tokenizer.vocab_size() as u32),
        added: Vec::new(),
        expansion: HashMap::new(),
    };
    growing.pin_added_tokens();
    match kind.as_str() {
        "BPE" => growing.add_bpe(&wanted, &old_pieces, splittable)?,
        "WordPiece" => growing.add_wordpiece(&wanted, &old_pieces, &splittable)?,
        other => {
            return Err(ext_error(format!(
                "{} has a {other:?} model; only BPE (RoBERTa) and WordPiece (BERT) \
                 vocabularies can be extended",
                path.display()
            )));
        }
    }
    growing.finish(&wanted, already_single)
}

/// The path and JSON of `tokenizer`'s tokenizer.json.
fn read_tokenizer_json(
    tokenizer: &MlmTokenizer,
) -> Result<(std::path::PathBuf, serde_json::Value), DataError> {
    let path = tokenizer.dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Read {
        path: path.clone(),
        line: None,
        source,
    })?;
    let json =
        serde_json::from_str(&text).map_err(|e| ext_error(format!("{}: {e}", path.display())))?;
    Ok((path, json))
}

/// `words` trimmed, each once, in their first order; an error for one that is empty or holds
/// a space.
fn distinct_words(words: &[String]) -> Result<Vec<String>, DataError> {
    let mut wanted: Vec<String> = Vec::new();
    for word in words {
        let word = word.trim();
        if word.is_empty() || word.chars().any(char::is_whitespace) {
            return Err(ext_error(format!(
                "{word:?} is not a word (empty or with spaces)"
            )));
        }
        if !wanted.iter().any(|w| w == word) {
            wanted.push(word.to_string());
        }
    }
    Ok(wanted)
}

fn as_strs(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

/// A tokenizer.json being extended, and the tokens added to it so far.
struct Growing<'a> {
    old: &'a Tokenizer,
    json: serde_json::Value,
    next_id: u32,
    added: Vec<NewToken>,
    /// New token -> the old pieces it stands for.
    expansion: HashMap<String, Vec<u32>>,
}

impl Growing<'_> {
    /// The old tokenizer's ids of `pieces`.
    fn old_ids(&self, pieces: &[String]) -> Vec<u32> {
        pieces
            .iter()
            .filter_map(|p| self.old.token_to_id(p))
            .collect()
    }

    /// The old ids `token` stands for: its expansion if it is new, else its own id.
    fn expand(&self, token: &String) -> Vec<u32> {
        self.expansion
            .get(token)
            .cloned()
            .unwrap_or_else(|| self.old_ids(std::slice::from_ref(token)))
    }

    /// Puts every added token (`[MASK]`, `[CLS]`, ...) that the model's vocabulary lacks into
    /// it, at the id it has. When tokenizer.json is loaded, `tokenizers` (Rust and Python
    /// alike) gives an added token that its model does not know the next id after the model's
    /// vocabulary, whatever id the file says. ModernBERT's specials sit after its BPE
    /// vocabulary: without this, the new tokens appended there would take the specials' ids and
    /// the specials would move past them (`[MASK]` becoming a new word's id). The specials are
    /// matched before the model runs, so the model never produces them itself.
    fn pin_added_tokens(&mut self) {
        let added: Vec<(String, u64)> = self.json["added_tokens"]
            .as_array()
            .map(|tokens| {
                tokens
                    .iter()
                    .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        for (content, id) in added {
            if self.json["model"]["vocab"].get(&content).is_none() {
                self.json["model"]["vocab"][&content] = serde_json::json!(id);
            }
        }
    }

    /// Gives `token` the next id; its embedding will start as the mean of `pieces`.
    fn add_token(&mut self, token: String, pieces: Vec<u32>) {
        self.json["model"]["vocab"][&token] = serde_json::json!(self.next_id);
        self.added.push(NewToken {
            id: self.next_id,
            token,
            word: None,
            pieces,
        });
        self.next_id += 1;
    }

    /// BPE: chains of merges for the words at `pending` (indices into `wanted`).
    fn add_bpe(
        &mut self,
        wanted: &[String],
        old_pieces: &[Vec<String>],
        mut pending: Vec<usize>,
    ) -> Result<(), DataError> {
        let string_merges = self.json["model"]["merges"]
            .as_array()
            .and_then(|m| m.first())
            .is_none_or(|m| m.is_string());
        let mut current = old_pieces.to_vec();
        // A later word's merges can pre-empt an earlier word's pair, so check and chain the
        // new pieces again, a few rounds at most.
        for _round in 0..4 {
            if pending.is_empty() {
                break;
            }
            for &i in &pending {
                self.chain(&current[i], string_merges);
            }
            let now = Tokenizer::from_bytes(self.json.to_string().as_bytes())
                .map_err(|e| ext_error(e.to_string()))?;
            let left: Vec<&str> = pending.iter().map(|&i| wanted[i].as_str()).collect();
            let mut still = Vec::new();
            for (&i, pieces) in pending.iter().zip(pieces_of(&now, &left)?) {
                if pieces.len() > 1 {
                    still.push(i);
                }
                current[i] = pieces;
            }
            pending = still;
        }
        Ok(())
    }

    /// The merges that build `pieces` (2 or more) into one token, left to right
    /// (`Ġmit`+`och` -> `Ġmitoch`, then + `ondria`), adding each prefix not yet a token.
    fn chain(&mut self, pieces: &[String], string_merges: bool) {
        let mut acc = pieces[0].clone();
        for piece in &pieces[1..] {
            let merged = format!("{acc}{piece}");
            if self.json["model"]["vocab"].get(&merged).is_none() {
                let mut sources = self.expand(&acc);
                sources.extend(self.expand(piece));
                self.expansion.insert(merged.clone(), sources.clone());
                self.add_token(merged.clone(), sources);
            }
            let merge = if string_merges {
                serde_json::json!(format!("{acc} {piece}"))
            } else {
                serde_json::json!([acc, piece])
            };
            if let Some(merges) = self.json["model"]["merges"].as_array_mut() {
                merges.push(merge);
            }
            acc = merged;
        }
    }

    /// WordPiece: each word at `indices`, normalized as the tokenizer normalizes, as a whole
    /// vocabulary entry.
    fn add_wordpiece(
        &mut self,
        wanted: &[String],
        old_pieces: &[Vec<String>],
        indices: &[usize],
    ) -> Result<(), DataError> {
        for &i in indices {
            let normalized = match self.old.get_normalizer() {
                Some(normalizer) => {
                    use tokenizers::tokenizer::Normalizer;
                    let mut s = tokenizers::NormalizedString::from(wanted[i].as_str());
                    normalizer
                        .normalize(&mut s)
                        .map_err(|e| ext_error(e.to_string()))?;
                    s.get().to_string()
                }
                None => wanted[i].clone(),
            };
            if self.json["model"]["vocab"].get(&normalized).is_none() {
                let pieces = self.old_ids(&old_pieces[i]);
                self.add_token(normalized, pieces);
            }
        }
        Ok(())
    }

    /// The new tokenizer.json, with which requested word each new token spells.
    fn finish(
        mut self,
        wanted: &[String],
        already_single: Vec<String>,
    ) -> Result<Extension, DataError> {
        let tokenizer_json =
            serde_json::to_string_pretty(&self.json).map_err(|e| ext_error(e.to_string()))?;
        let new = Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| ext_error(e.to_string()))?;
        let check = pieces_of(&new, &as_strs(wanted))?;
        let by_token: BTreeMap<String, usize> = self
            .added
            .iter()
            .enumerate()
            .map(|(i, t)| (t.token.clone(), i))
            .collect();
        let mut not_single = Vec::new();
        for (word, pieces) in wanted.iter().zip(&check) {
            match pieces.as_slice() {
                [one] => {
                    if let Some(&i) = by_token.get(one) {
                        self.added[i].word = Some(word.clone());
                    }
                }
                _ => not_single.push(word.clone()),
            }
        }
        if self.added.iter().any(|t| t.pieces.is_empty()) {
            return Err(ext_error(
                "a new token has no known pieces in the old vocabulary".to_string(),
            ));
        }
        Ok(Extension {
            tokenizer_json,
            added: self.added,
            already_single,
            not_single,
        })
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn fixture(name: &str) -> MlmTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        crate::load_tokenizer(&dir.join(name)).unwrap()
    }

    /// What an extension added, one token a line, and the SHA-256 of its tokenizer.json.
    fn summary(extension: &Extension) -> (Vec<String>, String) {
        let lines = extension
            .added
            .iter()
            .map(|t| format!("{} {} {:?} {:?}", t.id, t.token, t.word, t.pieces))
            .chain([format!(
                "single {:?} not {:?}",
                extension.already_single, extension.not_single
            )])
            .collect();
        let hash = format!("{:x}", Sha256::digest(extension.tokenizer_json.as_bytes()));
        (lines, hash)
    }

    /// Pins what extension gives for both model kinds, as the code before `extend_tokenizer`
    /// was split into helpers gave it (same lines, byte-identical tokenizer.json).
    #[test]
    fn extension_of_bpe_and_wordpiece_is_pinned() {
        let words: Vec<String> = [
            "mitochondrial",
            "mitochondria",
            "cascade",
            "H2O",
            "the",
            "Ribosome",
            "mitochondrial",
        ]
        .map(String::from)
        .to_vec();
        let bpe = extend_tokenizer(&fixture("tokenizer-go"), &words, 1000).unwrap();
        let (lines, hash) = summary(&bpe);
        assert_eq!(
            lines,
            [
                "1000 Ġmitoch None [758, 847]",
                "1001 Ġmitochond None [758, 847, 631]",
                "1002 Ġmitochondri None [758, 847, 631, 324]",
                "1003 Ġmitochondrial Some(\"mitochondrial\") [758, 847, 631, 324, 278]",
                "1004 Ġmitochondria Some(\"mitochondria\") [758, 847, 631, 324, 69]",
                "1005 Ġcasc None [270, 927]",
                "1006 Ġcasca None [270, 927, 69]",
                "1007 Ġcascade Some(\"cascade\") [270, 927, 69, 391]",
                "1008 ĠR None [225, 54]",
                "1009 ĠRib None [225, 54, 817]",
                "1010 ĠRibosome Some(\"Ribosome\") [225, 54, 817, 760]",
                "single [\"the\"] not [\"H2O\"]",
            ]
        );
        assert_eq!(
            hash,
            "42ed792e0835255543ef7e1bdd476c4be13e04289e89aded39a876c9cdd94ccd"
        );

        // bert-tiny's tokenizer has 1100 ids: new ones start there, not at the 1000 asked.
        let wordpiece = extend_tokenizer(&fixture("bert-tiny"), &words, 1000).unwrap();
        let (lines, hash) = summary(&wordpiece);
        assert_eq!(
            lines,
            [
                "1100 mitochondrial Some(\"mitochondrial\") [839, 950]",
                "1101 mitochondria Some(\"mitochondria\") [839, 143, 57]",
                "1102 ribosome Some(\"Ribosome\") [486, 554]",
                "single [\"cascade\", \"H2O\", \"the\"] not []",
            ]
        );
        assert_eq!(
            hash,
            "8b4ecc3740b47572842dfa8134b860e299ac9a8e49fd82d26522dc802dc4fb26"
        );
    }
}
