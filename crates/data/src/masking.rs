//! Dynamic MLM masking: a pure function of (tokens, seed, epoch, sample index).
//!
//! Like fairseq's `MaskTokensDataset`, the random stream of each example is seeded by
//! `(seed, epoch, index)` alone, so a resumed run, a second worker, or an evaluation pass
//! reproduces exactly the same masks without replaying any data, and a new epoch gets new ones.
//! The selection follows transformers' `DataCollatorForLanguageModeling.torch_mask_tokens`:
//! each non-special token is selected with probability `probability`; a selected token becomes
//! `<mask>` with probability `mask_fraction`, a random non-special token with probability
//! `random_fraction`, and stays unchanged otherwise (defaults 0.15 and 80/10/10).

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Masking hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskingConfig {
    /// Probability that a (non-special) token is selected for prediction.
    pub probability: f64,
    /// Share of selected tokens replaced by `<mask>`.
    pub mask_fraction: f64,
    /// Share of selected tokens replaced by a random non-special token.
    pub random_fraction: f64,
    /// Select whole words: a word starts at a token beginning with a space marker (`Ġ` in
    /// byte-level BPE) or right after a special token, and all its tokens are selected together.
    pub whole_word: bool,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        Self {
            probability: 0.15,
            mask_fraction: 0.8,
            random_fraction: 0.1,
            whole_word: false,
        }
    }
}

impl MaskingConfig {
    /// Rejects probabilities outside [0, 1] and splits that add up to more than 1.
    pub fn validate(&self) -> Result<(), DataError> {
        for (key, p) in [
            ("probability", self.probability),
            ("mask_fraction", self.mask_fraction),
            ("random_fraction", self.random_fraction),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(DataError::Config {
                    key: format!("masking.{key}"),
                    reason: format!("{p} is not a probability in [0, 1]"),
                });
            }
        }
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9 {
            return Err(DataError::Config {
                key: "masking.random_fraction".to_string(),
                reason: format!(
                    "mask_fraction {} + random_fraction {} exceed 1",
                    self.mask_fraction, self.random_fraction
                ),
            });
        }
        Ok(())
    }
}

/// How a tokenizer marks word boundaries in its token strings, for whole-word masking. Taken
/// from the tokenizer's model type (see `MlmTokenizer::word_boundary`), never guessed from the
/// strings: a byte-level BPE vocabulary may well contain `##`.
#[derive(Debug, Clone, PartialEq)]
pub enum WordBoundary {
    /// WordPiece (and BPE with a continuing-subword prefix): a token continues a word when it
    /// starts with the prefix (`##`).
    ContinuationPrefix(String),
    /// Byte-level BPE and SentencePiece: a token starts a word when it starts with one of these
    /// (`Ġ`, the encoded space; `▁`, the metaspace).
    StartMarkers(Vec<char>),
}

impl WordBoundary {
    /// Whether `token` begins a word.
    pub fn starts_word(&self, token: &str) -> bool {
        match self {
            WordBoundary::ContinuationPrefix(prefix) => !token.starts_with(prefix.as_str()),
            WordBoundary::StartMarkers(markers) => {
                token.chars().next().is_some_and(|c| markers.contains(&c))
            }
        }
    }
}

/// What the masker needs to know about a vocabulary.
#[derive(Debug, Clone)]
pub struct MaskVocab {
    /// The `<mask>` id.
    pub mask_id: u32,
    /// The padding id (never selected).
    pub pad_id: u32,
    /// `special[id]`: special tokens are never selected nor drawn as random replacements.
    special: Vec<bool>,
    /// Non-special ids, the pool of random replacements.
    pool: Vec<u32>,
    /// `word_start[id]`: the token begins a new word (for whole-word masking).
    word_start: Vec<bool>,
}

impl MaskVocab {
    /// Builds the tables from the vocabulary as strings indexed by id (`None`: no token has
    /// that id; such gaps are treated as special, so never masked nor drawn).
    ///
    /// `special_ids` lists the special tokens (including pad and mask); `words` says how the
    /// tokenizer marks word boundaries (see [`WordBoundary`]).
    pub fn new(
        tokens: &[Option<String>],
        special_ids: &[u32],
        mask_id: u32,
        pad_id: u32,
        words: &WordBoundary,
    ) -> Result<Self, DataError> {
        let n = tokens.len();
        for (what, id) in [("<mask>", mask_id), ("<pad>", pad_id)] {
            if id as usize >= n {
                return Err(DataError::Tokenizer(format!(
                    "{what} id {id} is outside the vocabulary of {n} tokens"
                )));
            }
        }
        let mut special: Vec<bool> = tokens.iter().map(Option::is_none).collect();
        for &id in special_ids.iter().chain([&mask_id, &pad_id]) {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let pool: Vec<u32> = (0..n as u32).filter(|&id| !special[id as usize]).collect();
        if pool.is_empty() {
            return Err(DataError::Tokenizer(
                "the vocabulary has no non-special tokens to mask".to_string(),
            ));
        }
        let word_start = tokens
            .iter()
            .map(|t| t.as_deref().is_some_and(|t| words.starts_word(t)))
            .collect();
        Ok(Self {
            mask_id,
            pad_id,
            special,
            pool,
            word_start,
        })
    }

    /// Whether `id` begins a word (for whole-word masking).
    pub fn starts_word(&self, id: u32) -> bool {
        self.word_start.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether `id` is a special token (or outside the vocabulary, which is never masked).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Number of ids in the vocabulary.
    pub fn len(&self) -> usize {
        self.special.len()
    }

    /// Whether the vocabulary is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.special.is_empty()
    }
}

/// One masked example: the model input, and where and what to predict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedExample {
    /// Tokens after replacement (`<mask>`, random, or unchanged).
    pub input_ids: Vec<u32>,
    /// Positions selected for prediction, ascending.
    pub positions: Vec<u32>,
    /// Original token at each selected position.
    pub labels: Vec<u32>,
}

/// The per-example random stream: ChaCha8 keyed by (seed, epoch, index).
fn example_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(b"masklm\0\0");
    ChaCha8Rng::from_seed(key)
}

/// Masks one example. Pure: the same arguments always give the same result.
pub fn mask_tokens(
    tokens: &[u32],
    vocab: &MaskVocab,
    config: &MaskingConfig,
    seed: u64,
    epoch: u64,
    index: u64,
) -> MaskedExample {
    let mut rng = example_rng(seed, epoch, index);
    let selected = if config.whole_word {
        select_words(tokens, vocab, config.probability, &mut rng)
    } else {
        tokens
            .iter()
            .map(|&t| {
                // Draw for every token, special or not, so that positions keep their draws
                // whatever the neighbours are.
                let u: f64 = rng.random();
                u < config.probability && !vocab.is_special(t)
            })
            .collect()
    };

    let mut input_ids = tokens.to_vec();
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    for (i, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
        positions.push(i as u32);
        labels.push(tokens[i]);
        let u: f64 = rng.random();
        if u < config.mask_fraction {
            input_ids[i] = vocab.mask_id;
        } else if u < config.mask_fraction + config.random_fraction {
            input_ids[i] = vocab.pool[rng.random_range(0..vocab.pool.len())];
        }
    }
    MaskedExample {
        input_ids,
        positions,
        labels,
    }
}

/// Whole-word selection: one draw per word, applied to all of the word's tokens.
fn select_words(tokens: &[u32], vocab: &MaskVocab, p: f64, rng: &mut impl Rng) -> Vec<bool> {
    let mut selected = vec![false; tokens.len()];
    let mut word_selected = false;
    let mut previous_special = true;
    for (i, &t) in tokens.iter().enumerate() {
        if vocab.is_special(t) {
            previous_special = true;
            continue;
        }
        let starts_word = previous_special || vocab.word_start[t as usize];
        if starts_word {
            let u: f64 = rng.random();
            word_selected = u < p;
        }
        selected[i] = word_selected;
        previous_special = false;
    }
    selected
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy byte-level vocabulary: 0-4 specials, then alternating word starts ("Ġw") and
    /// continuations ("w").
    fn vocab() -> MaskVocab {
        let mut tokens: Vec<Option<String>> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
            .iter()
            .map(|s| Some(s.to_string()))
            .collect();
        for i in 5..1000 {
            tokens.push(Some(if i % 2 == 0 {
                format!("Ġw{i}")
            } else {
                format!("c{i}")
            }));
        }
        let words = WordBoundary::StartMarkers(vec!['Ġ']);
        MaskVocab::new(&tokens, &[0, 1, 2, 3, 4], 4, 1, &words).unwrap()
    }

    /// Blocks of 128 framed by <s> ... </s>, with some padding, from a fixed pseudo-random
    /// stream (the test's own, independent of the masker's).
    fn blocks(n: usize) -> Vec<Vec<u32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        (0..n)
            .map(|b| {
                let len = if b % 5 == 0 { 90 } else { 128 };
                let mut block = vec![0];
                block.extend((0..len - 2).map(|_| rng.random_range(5..1000u32)));
                block.push(2);
                block.resize(128, 1);
                block
            })
            .collect()
    }

    struct Counts {
        candidates: usize,
        selected: usize,
        masked: usize,
        random: usize,
        unchanged: usize,
    }

    fn count(config: &MaskingConfig, n_blocks: usize) -> Counts {
        let vocab = vocab();
        let mut c = Counts {
            candidates: 0,
            selected: 0,
            masked: 0,
            random: 0,
            unchanged: 0,
        };
        for (i, block) in blocks(n_blocks).iter().enumerate() {
            let out = mask_tokens(block, &vocab, config, 7, 0, i as u64);
            c.candidates += block.iter().filter(|&&t| !vocab.is_special(t)).count();
            c.selected += out.positions.len();
            for (&p, &label) in out.positions.iter().zip(&out.labels) {
                let p = p as usize;
                assert_eq!(label, block[p]);
                assert!(!vocab.is_special(block[p]), "special token selected");
                match out.input_ids[p] {
                    4 => c.masked += 1,
                    t if t == label => c.unchanged += 1,
                    t => {
                        assert!(!vocab.is_special(t), "special token drawn as replacement");
                        c.random += 1
                    }
                }
            }
            // Unselected positions are untouched.
            for (p, (&a, &b)) in block.iter().zip(&out.input_ids).enumerate() {
                if !out.positions.contains(&(p as u32)) {
                    assert_eq!(a, b);
                }
            }
        }
        c
    }

    #[test]
    fn rates_match_configuration_over_many_tokens() {
        // 1200 blocks of ~126 candidates: ~1.5e5 candidate tokens.
        for config in [
            MaskingConfig::default(),
            MaskingConfig {
                probability: 0.3,
                mask_fraction: 0.5,
                random_fraction: 0.25,
                whole_word: false,
            },
        ] {
            let c = count(&config, 1200);
            assert!(c.candidates >= 100_000);
            let rate = c.selected as f64 / c.candidates as f64;
            assert!((rate - config.probability).abs() < 0.005, "rate {rate}");
            let share = |n: usize| n as f64 / c.selected as f64;
            let unchanged = 1.0 - config.mask_fraction - config.random_fraction;
            assert!((share(c.masked) - config.mask_fraction).abs() < 0.01);
            // A random draw can land on the original token (1 in ~500 here): it then counts
            // as unchanged, as it does in transformers.
            assert!((share(c.random) - config.random_fraction).abs() < 0.01);
            assert!((share(c.unchanged) - unchanged).abs() < 0.01);
        }
    }

    #[test]
    fn same_key_same_mask_other_epoch_other_mask() {
        let vocab = vocab();
        let config = MaskingConfig::default();
        let block = &blocks(1)[0];
        let a = mask_tokens(block, &vocab, &config, 1, 3, 42);
        assert_eq!(a, mask_tokens(block, &vocab, &config, 1, 3, 42));
        assert_ne!(a, mask_tokens(block, &vocab, &config, 1, 4, 42));
        assert_ne!(a, mask_tokens(block, &vocab, &config, 1, 3, 43));
        assert_ne!(a, mask_tokens(block, &vocab, &config, 2, 3, 42));
    }

    #[test]
    fn whole_word_masking_never_splits_a_word() {
        let vocab = vocab();
        let config = MaskingConfig {
            whole_word: true,
            ..MaskingConfig::default()
        };
        let mut selected = 0;
        let mut candidates = 0;
        for (i, block) in blocks(800).iter().enumerate() {
            let out = mask_tokens(block, &vocab, &config, 5, 0, i as u64);
            let chosen: Vec<bool> = (0..block.len())
                .map(|p| out.positions.contains(&(p as u32)))
                .collect();
            for p in 1..block.len() {
                let continuation = !vocab.is_special(block[p])
                    && !vocab.is_special(block[p - 1])
                    && !vocab.word_start[block[p] as usize];
                if continuation {
                    assert_eq!(chosen[p], chosen[p - 1], "word split at {p} in block {i}");
                }
                if vocab.is_special(block[p]) {
                    assert!(!chosen[p]);
                }
            }
            selected += out.positions.len();
            candidates += block.iter().filter(|&&t| !vocab.is_special(t)).count();
        }
        let rate = selected as f64 / candidates as f64;
        assert!((rate - 0.15).abs() < 0.01, "whole-word token rate {rate}");
    }

    #[test]
    fn invalid_configuration_names_the_key() {
        let config = MaskingConfig {
            mask_fraction: 0.95,
            random_fraction: 0.1,
            ..MaskingConfig::default()
        };
        let msg = config.validate().unwrap_err().to_string();
        assert!(msg.contains("masking.random_fraction"), "{msg}");
        let config = MaskingConfig {
            probability: 1.5,
            ..MaskingConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("masking.probability")
        );
    }
}
