//! Dynamic MLM masking: a pure function of (tokens, seed, epoch, sample index).
//!
//! Like fairseq's `MaskTokensDataset`, the random stream of each example is seeded by
//! `(seed, epoch, index)` alone, so a resumed run, a second worker, or an evaluation pass
//! reproduces exactly the same masks without replaying any data, and a new epoch gets new ones.
//! The selection follows transformers' `DataCollatorForLanguageModeling.torch_mask_tokens`:
//! each non-special token is selected with probability `probability`; a selected token becomes
//! `<mask>` with probability `mask_fraction`, a random non-special token with probability
//! `random_fraction`, and stays unchanged otherwise (defaults 0.15 and 80/10/10).
//!
//! [`MaskingStrategy`] says what one selection covers: a token (above), a whole word
//! (`run_mlm.py --whole_word_mask`), or a span of whole words whose length is drawn from a
//! truncated geometric distribution (SpanBERT); word boundaries always come from the tokenizer's
//! model ([`WordBoundary`]), never from guessing at spellings.

use std::ops::Range;

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Masking hyper-parameters, the `[masking]` section of a training config.
///
/// In TOML the strategy is one key, `strategy = "token" | "whole_word" | "span"`, with the
/// span lengths as flat `span_*` keys beside it (allowed only with `"span"`). The older
/// `whole_word = true/false` still loads (saved run configs carry it) and means
/// `strategy = "whole_word"`/`"token"`; a config is always written back with `strategy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MaskingToml", into = "MaskingToml")]
pub struct MaskingConfig {
    /// Probability that a (non-special) token is selected for prediction; for span masking,
    /// the share of the non-special tokens that the spans fill (the masking budget).
    pub probability: f64,
    /// Share of selected tokens replaced by `<mask>` (of selected spans, for span masking).
    pub mask_fraction: f64,
    /// Share of selected tokens replaced by a random non-special token (of selected spans,
    /// each of whose tokens then gets its own random token).
    pub random_fraction: f64,
    /// What is selected together: single tokens, whole words, or spans of whole words.
    pub strategy: MaskingStrategy,
}

/// What one selection draw covers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskingStrategy {
    /// Each non-special token independently (BERT, RoBERTa; transformers'
    /// `DataCollatorForLanguageModeling`).
    Token,
    /// Each word independently, all its tokens together (BERT's whole-word masking,
    /// `run_mlm.py --whole_word_mask`). A word starts at a token the tokenizer marks as a word
    /// start (see [`WordBoundary`]) or right after a special token.
    WholeWord,
    /// Spans of whole words (SpanBERT, Joshi et al. 2020), see [`SpanLengths`].
    Span(SpanLengths),
}

/// SpanBERT's span lengths, counted in words: `P(l) ∝ p (1 - p)^(l - min_length)` for
/// `l` in `min_length..=max_length`, renormalised over that range as SpanBERT's code does
/// (`PairWithSpanMaskingScheme.len_distrib`); with p = 0.2, 1..=10 the mean is 3.8 words, the
/// paper's figure (piling the tail onto 10 instead would give 4.46).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanLengths {
    /// `span_geometric_p`, in (0, 1]: larger gives shorter spans.
    pub geometric_p: f64,
    /// `span_min_length`, in words (SpanBERT's `--span-lower`).
    pub min_length: usize,
    /// `span_max_length`, in words (SpanBERT's `--span-upper`).
    pub max_length: usize,
}

impl Default for SpanLengths {
    fn default() -> Self {
        Self {
            geometric_p: 0.2,
            min_length: 1,
            max_length: 10,
        }
    }
}

impl SpanLengths {
    /// `P(length = l)`, for tests and reports.
    pub fn pmf(&self, l: usize) -> f64 {
        if l < self.min_length || l > self.max_length {
            return 0.0;
        }
        let q = 1.0 - self.geometric_p;
        let terms = (self.max_length - self.min_length + 1) as f64;
        self.geometric_p * q.powf((l - self.min_length) as f64) / (1.0 - q.powf(terms))
    }

    /// The length whose cumulative probability first exceeds `u` in [0, 1): walks up from
    /// `min_length`, so it costs the drawn length, however large `max_length` is.
    fn sample(&self, u: f64) -> usize {
        let q = 1.0 - self.geometric_p;
        let terms = (self.max_length - self.min_length + 1) as f64;
        let target = u * (1.0 - q.powf(terms));
        let (mut cumulative, mut term) = (0.0, self.geometric_p);
        for l in self.min_length..self.max_length {
            cumulative += term;
            if target < cumulative {
                return l;
            }
            term *= q;
        }
        self.max_length
    }
}

impl Default for MaskingConfig {
    fn default() -> Self {
        Self {
            probability: 0.15,
            mask_fraction: 0.8,
            random_fraction: 0.1,
            strategy: MaskingStrategy::Token,
        }
    }
}

impl MaskingConfig {
    /// Rejects probabilities outside [0, 1], splits that add up to more than 1, and span
    /// lengths that cannot be drawn.
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
        if let MaskingStrategy::Span(lengths) = &self.strategy {
            let bad = |key: &str, reason: String| {
                Err(DataError::Config {
                    key: format!("masking.{key}"),
                    reason,
                })
            };
            let p = lengths.geometric_p;
            if !(p > 0.0 && p <= 1.0) {
                return bad(
                    "span_geometric_p",
                    format!("{p} is not in (0, 1]; SpanBERT uses 0.2 (mean span 3.8 words)"),
                );
            }
            if lengths.min_length == 0 {
                return bad(
                    "span_min_length",
                    "a span holds at least 1 word; use 1 (SpanBERT)".to_string(),
                );
            }
            if lengths.max_length < lengths.min_length {
                return bad(
                    "span_max_length",
                    format!(
                        "{} is below span_min_length {}; SpanBERT uses 10",
                        lengths.max_length, lengths.min_length
                    ),
                );
            }
        }
        Ok(())
    }
}

/// `strategy` as spelled in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StrategyName {
    Token,
    WholeWord,
    Span,
}

/// `[masking]` as written in TOML: flat keys, the old `whole_word` flag accepted on reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MaskingToml {
    probability: f64,
    mask_fraction: f64,
    random_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    strategy: Option<StrategyName>,
    /// The spelling before `strategy` (runs saved before it still load); never written.
    #[serde(skip_serializing)]
    whole_word: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_geometric_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_min_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_max_length: Option<usize>,
}

impl Default for MaskingToml {
    /// The defaults of [`MaskingConfig`], with no strategy given (so that `whole_word` alone
    /// is not taken as contradicting it).
    fn default() -> Self {
        Self {
            strategy: None,
            ..MaskingConfig::default().into()
        }
    }
}

impl From<MaskingConfig> for MaskingToml {
    fn from(config: MaskingConfig) -> Self {
        let (strategy, span) = match config.strategy {
            MaskingStrategy::Token => (StrategyName::Token, None),
            MaskingStrategy::WholeWord => (StrategyName::WholeWord, None),
            MaskingStrategy::Span(lengths) => (StrategyName::Span, Some(lengths)),
        };
        Self {
            probability: config.probability,
            mask_fraction: config.mask_fraction,
            random_fraction: config.random_fraction,
            strategy: Some(strategy),
            whole_word: None,
            span_geometric_p: span.map(|s| s.geometric_p),
            span_min_length: span.map(|s| s.min_length),
            span_max_length: span.map(|s| s.max_length),
        }
    }
}

impl TryFrom<MaskingToml> for MaskingConfig {
    type Error = DataError;

    fn try_from(toml: MaskingToml) -> Result<Self, DataError> {
        let from_flag = |whole_word: bool| {
            if whole_word {
                StrategyName::WholeWord
            } else {
                StrategyName::Token
            }
        };
        let name = match (toml.strategy, toml.whole_word) {
            (Some(name), None) => name,
            (None, Some(flag)) => from_flag(flag),
            (None, None) => StrategyName::Token,
            (Some(name), Some(flag)) if name == from_flag(flag) => name,
            (Some(name), Some(flag)) => {
                return Err(DataError::Config {
                    key: "masking.whole_word".to_string(),
                    reason: format!(
                        "`whole_word = {flag}` is the old spelling of `strategy = {:?}` and \
                         contradicts `strategy = {:?}`; remove `whole_word`",
                        spelled(from_flag(flag)),
                        spelled(name)
                    ),
                });
            }
        };
        let strategy = match name {
            StrategyName::Token => MaskingStrategy::Token,
            StrategyName::WholeWord => MaskingStrategy::WholeWord,
            StrategyName::Span => {
                let default = SpanLengths::default();
                MaskingStrategy::Span(SpanLengths {
                    geometric_p: toml.span_geometric_p.unwrap_or(default.geometric_p),
                    min_length: toml.span_min_length.unwrap_or(default.min_length),
                    max_length: toml.span_max_length.unwrap_or(default.max_length),
                })
            }
        };
        if name != StrategyName::Span {
            for (key, given) in [
                ("span_geometric_p", toml.span_geometric_p.is_some()),
                ("span_min_length", toml.span_min_length.is_some()),
                ("span_max_length", toml.span_max_length.is_some()),
            ] {
                if given {
                    return Err(DataError::Config {
                        key: format!("masking.{key}"),
                        reason: format!(
                            "only applies to `strategy = \"span\"` (this config masks by {:?}); \
                             remove it or set `strategy = \"span\"`",
                            spelled(name)
                        ),
                    });
                }
            }
        }
        Ok(Self {
            probability: toml.probability,
            mask_fraction: toml.mask_fraction,
            random_fraction: toml.random_fraction,
            strategy,
        })
    }
}

fn spelled(name: StrategyName) -> &'static str {
    match name {
        StrategyName::Token => "token",
        StrategyName::WholeWord => "whole_word",
        StrategyName::Span => "span",
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
    let (selected, per_span) = match &config.strategy {
        MaskingStrategy::Token => {
            let selected = tokens
                .iter()
                .map(|&t| {
                    // Draw for every token, special or not, so that positions keep their draws
                    // whatever the neighbours are.
                    let u: f64 = rng.random();
                    u < config.probability && !vocab.is_special(t)
                })
                .collect();
            (selected, false)
        }
        MaskingStrategy::WholeWord => (
            select_words(tokens, vocab, config.probability, &mut rng),
            false,
        ),
        MaskingStrategy::Span(lengths) => {
            let mut selected = vec![false; tokens.len()];
            for span in select_spans(tokens, vocab, config.probability, lengths, &mut rng) {
                selected[span.tokens].fill(true);
            }
            (selected, true)
        }
    };

    let mut input_ids = tokens.to_vec();
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    let mut u = 0.0;
    for (i, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
        positions.push(i as u32);
        labels.push(tokens[i]);
        // Span masking decides 80/10/10 once per run of selected tokens, as SpanBERT's
        // `span_masking(replacement="span")` does after merging touching spans; the other
        // strategies decide per token.
        if !per_span || i == 0 || !selected[i - 1] {
            u = rng.random();
        }
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

/// One span chosen by span masking.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    /// Its tokens: whole words, no special token.
    tokens: Range<usize>,
    /// The length drawn for it, in words; it holds fewer where it met a special token, the end
    /// of the example, an earlier span, or the budget.
    drawn: usize,
}

/// The words of `tokens` as token ranges: a word starts at a word-start token or right after a
/// special token (as in [`select_words`]); special tokens belong to no word.
fn words(tokens: &[u32], vocab: &MaskVocab) -> Vec<Range<usize>> {
    let mut words: Vec<Range<usize>> = Vec::new();
    let mut previous_special = true;
    for (i, &t) in tokens.iter().enumerate() {
        if vocab.is_special(t) {
            previous_special = true;
            continue;
        }
        match words.last_mut() {
            Some(word) if !previous_special && !vocab.starts_word(t) => word.end = i + 1,
            _ => words.push(i..i + 1),
        }
        previous_special = false;
    }
    words
}

/// SpanBERT's span selection, in whole words: until the spans hold the budget (`probability`
/// of the non-special tokens), draw a length in words from `lengths`, a start uniformly among
/// the words no span holds yet, and take words from there until the length is reached, the
/// next word is taken or beyond a special token or the end, or the budget is spent.
///
/// Like SpanBERT (`PairWithSpanMaskingScheme.mask`), the length is drawn before the start, and
/// the budget ends the last span early. Unlike it: the start is a uniform word rather than the
/// word under a uniform token (the paper: "uniformly ... must be the beginning of one word");
/// the budget is `probability * n` rounded stochastically (SpanBERT takes the ceiling); and the
/// word that would cross the budget is never cut (SpanBERT cuts it mid-word) but taken whole
/// with probability `left / its tokens`, so an example holds the budget to within one word and
/// exactly on average, as token and whole-word masking do.
fn select_spans(
    tokens: &[u32],
    vocab: &MaskVocab,
    probability: f64,
    lengths: &SpanLengths,
    rng: &mut impl Rng,
) -> Vec<Span> {
    let words = words(tokens, vocab);
    let candidates: usize = words.iter().map(ExactSizeIterator::len).sum();
    let exact = probability * candidates as f64;
    let u: f64 = rng.random();
    let mut budget = exact.floor() as usize + usize::from(u < exact - exact.floor());

    let mut free = FreeWords::new(words.len());
    let mut spans = Vec::new();
    let mut masked = 0;
    while masked < budget && !free.is_empty() {
        let drawn = lengths.sample(rng.random());
        let first = free.pick(rng);
        // Words first..end are taken.
        let mut end = first;
        while end - first < drawn && masked < budget {
            let open = end == first
                || (end < words.len()
                    && words[end].start == words[end - 1].end
                    && free.is_free(end));
            if !open {
                break;
            }
            let (size, left) = (words[end].len(), budget - masked);
            if size > left && rng.random::<f64>() * size as f64 >= left as f64 {
                // The word crossing the budget is left out: the budget counts as spent.
                budget = masked;
                break;
            }
            free.take(end);
            masked += size;
            end += 1;
        }
        if end > first {
            spans.push(Span {
                tokens: words[first].start..words[end - 1].end,
                drawn,
            });
        }
    }
    spans
}

/// The words no span holds yet: a uniform pick and a removal in O(1).
struct FreeWords {
    /// The free words, in no order.
    free: Vec<usize>,
    /// `slot[w]`: where word `w` is in `free`, `None` once taken.
    slot: Vec<Option<usize>>,
}

impl FreeWords {
    fn new(n: usize) -> Self {
        Self {
            free: (0..n).collect(),
            slot: (0..n).map(Some).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    fn is_free(&self, w: usize) -> bool {
        self.slot[w].is_some()
    }

    /// A uniformly drawn free word (there must be one).
    fn pick(&self, rng: &mut impl Rng) -> usize {
        self.free[rng.random_range(0..self.free.len())]
    }

    fn take(&mut self, w: usize) {
        if let Some(at) = self.slot[w].take() {
            self.free.swap_remove(at);
            if let Some(&moved) = self.free.get(at) {
                self.slot[moved] = Some(at);
            }
        }
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
                strategy: MaskingStrategy::Token,
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

    fn span_config() -> MaskingConfig {
        MaskingConfig {
            strategy: MaskingStrategy::Span(SpanLengths::default()),
            ..MaskingConfig::default()
        }
    }

    #[test]
    fn same_key_same_mask_other_epoch_other_mask() {
        let vocab = vocab();
        let block = &blocks(1)[0];
        for strategy in [
            MaskingStrategy::Token,
            MaskingStrategy::WholeWord,
            MaskingStrategy::Span(SpanLengths::default()),
        ] {
            let config = MaskingConfig {
                strategy,
                ..MaskingConfig::default()
            };
            let a = mask_tokens(block, &vocab, &config, 1, 3, 42);
            assert_eq!(a, mask_tokens(block, &vocab, &config, 1, 3, 42));
            assert_ne!(a, mask_tokens(block, &vocab, &config, 1, 4, 42));
            assert_ne!(a, mask_tokens(block, &vocab, &config, 1, 3, 43));
            assert_ne!(a, mask_tokens(block, &vocab, &config, 2, 3, 42));
        }
    }

    /// Blocks of `len` tokens packed like `packing = "full"`: documents of 20 to 200 tokens,
    /// each framed by <s> ... </s>, so special tokens also sit inside a block; every tenth
    /// block ends in padding.
    fn packed_blocks(n: usize, len: usize) -> Vec<Vec<u32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        (0..n)
            .map(|b| {
                let mut block = Vec::with_capacity(len);
                while block.len() < len {
                    block.push(0);
                    let doc = rng.random_range(20..200);
                    block.extend((0..doc).map(|_| rng.random_range(5..1000u32)));
                    block.push(2);
                }
                block.truncate(if b % 10 == 0 { len - 40 } else { len });
                block.resize(len, 1);
                block
            })
            .collect()
    }

    /// The number of words in `range` of `block`, counted here from the vocabulary's
    /// word-start table (a word also starts after a special token).
    fn words_in(block: &[u32], range: &Range<usize>, vocab: &MaskVocab) -> usize {
        range
            .clone()
            .filter(|&p| p == 0 || vocab.is_special(block[p - 1]) || vocab.starts_word(block[p]))
            .count()
    }

    #[test]
    fn span_lengths_in_words_follow_the_truncated_geometric() {
        // 100k+ spans over packed 512-token blocks. Each span must be whole words without
        // special tokens, overlap no other, and hold exactly its drawn number of words unless
        // it was stopped, for a reason checked here: the end of the block, a special token,
        // an earlier span, or the budget (only the last span). The drawn lengths must follow
        // the truncated geometric: a chi-square over the 10 lengths (9 degrees of freedom)
        // below 27.88, its 0.1% critical value, so a correct sampler fails for 1 seed in 1000
        // while a clip at 9 or 11, or p = 0.25, moves thousands of draws (chi-square > 500).
        let vocab = vocab();
        let lengths = SpanLengths::default();
        let config = span_config();
        let mut drawn = [0usize; 11];
        let (mut spans_seen, mut stopped) = (0usize, 0usize);
        for (i, block) in packed_blocks(12_000, 512).iter().enumerate() {
            let mut rng = example_rng(7, 0, i as u64);
            let spans = select_spans(block, &vocab, 0.15, &lengths, &mut rng);
            let mut held = vec![false; block.len()];
            for (k, span) in spans.iter().enumerate() {
                let r = span.tokens.clone();
                assert!(!r.is_empty(), "block {i}: empty span");
                assert!(
                    r.clone().all(|p| !vocab.is_special(block[p]) && !held[p]),
                    "block {i}: span {r:?} holds a special token or overlaps an earlier span"
                );
                let starts = |p: usize| {
                    p == 0 || vocab.is_special(block[p - 1]) || vocab.starts_word(block[p])
                };
                assert!(
                    starts(r.start),
                    "block {i}: span {r:?} starts inside a word"
                );
                let at_end = r.end == block.len();
                assert!(
                    at_end || vocab.is_special(block[r.end]) || starts(r.end),
                    "block {i}: span {r:?} ends inside a word"
                );
                let words = words_in(block, &r, &vocab);
                assert!(
                    words <= span.drawn,
                    "block {i}: {words} words > drawn {}",
                    span.drawn
                );
                if words < span.drawn {
                    let last = k + 1 == spans.len();
                    assert!(
                        last || at_end || vocab.is_special(block[r.end]) || held[r.end],
                        "block {i}: span {r:?} of {words} words stopped short of {} for no reason",
                        span.drawn
                    );
                    stopped += 1;
                }
                held[r].fill(true);
                drawn[span.drawn] += 1;
                spans_seen += 1;
            }
            // The public function masks exactly these spans.
            let out = mask_tokens(block, &vocab, &config, 7, 0, i as u64);
            let expected: Vec<u32> = (0..block.len() as u32)
                .filter(|&p| held[p as usize])
                .collect();
            assert_eq!(out.positions, expected, "block {i}");
        }
        assert!(spans_seen >= 100_000, "{spans_seen} spans");
        let n = spans_seen as f64;
        let chi2: f64 = (1..=10)
            .map(|l| {
                let e = n * lengths.pmf(l);
                (drawn[l] as f64 - e).powi(2) / e
            })
            .sum();
        let mean = (1..=10).map(|l| (l * drawn[l]) as f64).sum::<f64>() / n;
        println!(
            "{spans_seen} spans, {stopped} stopped early; lengths {:?}; chi2 {chi2:.2}; mean {mean:.3}",
            &drawn[1..]
        );
        assert!(chi2 < 27.88, "chi-square {chi2} over {:?}", &drawn[1..]);
        // The paper's 3.8 words; the standard error over 1e5 draws is 0.008.
        assert!((mean - 3.797).abs() < 0.03, "mean span {mean}");
        assert!((lengths.pmf(1) - 0.2241).abs() < 1e-4 && (lengths.pmf(10) - 0.0301).abs() < 1e-4);
    }

    #[test]
    fn span_masking_spends_the_budget_exactly_on_average_and_never_masks_specials() {
        // Per example the masked tokens are within one word (plus the rounding) of
        // probability * candidates; over ~1.5e5 candidate tokens the share is the budget
        // within 0.002 (its standard error is ~0.0003). Finishing the word that crosses the
        // budget every time would give ~0.158 here, where words average 2 tokens.
        let vocab = vocab();
        for probability in [0.15, 0.4] {
            let config = MaskingConfig {
                probability,
                ..span_config()
            };
            let (mut masked, mut candidates) = (0usize, 0usize);
            for (i, block) in packed_blocks(1200, 128).iter().enumerate() {
                let out = mask_tokens(block, &vocab, &config, 3, 1, i as u64);
                let n = block.iter().filter(|&&t| !vocab.is_special(t)).count();
                let longest = words(block, &vocab)
                    .iter()
                    .map(|w| w.len())
                    .max()
                    .unwrap_or(0);
                let exact = probability * n as f64;
                let got = out.positions.len() as f64;
                assert!(
                    got > exact.floor() - longest as f64 && got < exact.ceil() + longest as f64,
                    "block {i}: {got} masked for a budget of {exact}"
                );
                masked += out.positions.len();
                candidates += n;
            }
            let rate = masked as f64 / candidates as f64;
            println!("span masking at {probability}: {rate:.4} of {candidates} tokens");
            assert!(
                (rate - probability).abs() < 0.002,
                "rate {rate} for {probability}"
            );
        }
        // The shared invariants (labels, no special selected or drawn, the rest untouched).
        let c = count(&span_config(), 1200);
        assert!(c.selected > 0);
    }

    #[test]
    fn span_masking_replaces_each_run_of_masked_tokens_together() {
        // SpanBERT's `replacement="span"`: one 80/10/10 draw per run of adjacent masked
        // tokens. Over ~17k runs the shares are within 0.015 of 80/10/10 (standard errors
        // <= 0.003), and no run mixes <mask> with other tokens.
        let vocab = vocab();
        let config = span_config();
        let (mut runs, mut masked, mut random) = (0usize, 0usize, 0usize);
        for (i, block) in packed_blocks(6000, 128).iter().enumerate() {
            let out = mask_tokens(block, &vocab, &config, 9, 0, i as u64);
            let mut p = 0;
            while p < out.positions.len() {
                let mut q = p + 1;
                while q < out.positions.len() && out.positions[q] == out.positions[q - 1] + 1 {
                    q += 1;
                }
                let ids: Vec<u32> = out.positions[p..q]
                    .iter()
                    .map(|&x| out.input_ids[x as usize])
                    .collect();
                let n_mask = ids.iter().filter(|&&t| t == vocab.mask_id).count();
                assert!(
                    n_mask == 0 || n_mask == ids.len(),
                    "block {i}: a run mixes <mask> with other tokens: {ids:?}"
                );
                runs += 1;
                if n_mask > 0 {
                    masked += 1;
                } else if ids.iter().zip(&out.labels[p..q]).any(|(a, b)| a != b) {
                    random += 1;
                }
                p = q;
            }
        }
        let share = |k: usize| k as f64 / runs as f64;
        println!(
            "{runs} runs: {:.4} masked, {:.4} random",
            share(masked),
            share(random)
        );
        assert!(runs > 15_000, "{runs} runs");
        assert!((share(masked) - 0.8).abs() < 0.015, "{}", share(masked));
        assert!((share(random) - 0.1).abs() < 0.015, "{}", share(random));
    }

    #[test]
    fn whole_word_masking_never_splits_a_word() {
        let vocab = vocab();
        let config = MaskingConfig {
            strategy: MaskingStrategy::WholeWord,
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
