//! Knowledge probes (LAMA-style cloze sentences): does the model put the expected word at the
//! mask? A run logs them at every evaluation (`[eval] probes`), so a domain-adaptation run
//! shows knowledge arriving, not only a falling loss; `masklm probe` ranks them on any model.
//!
//! A probe file is tab-separated, one probe per line: the sentence with one `<mask>` (or the
//! model's own mask token), then one or more accepted answers. Blank lines and lines starting
//! with `#` are skipped.
//!
//! ```text
//! Catalysis of the reaction: ATP + H2O = ADP + <mask>.<TAB>phosphate
//! The <mask> is the powerhouse of the cell.<TAB>mitochondrion<TAB>mitochondria
//! ```

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use masklm_data::MlmTokenizer;
use masklm_model::MaskedLm;
use serde::Serialize;

use crate::InferError;
use crate::fill::{mask_probabilities, rank_of, token_in_context};

/// One probe, tokenized.
#[derive(Debug, Clone)]
pub struct Probe {
    /// 1-based line in the probe file.
    pub line: usize,
    pub text: String,
    pub ids: Vec<u32>,
    /// Position of the mask in `ids`.
    pub mask: usize,
    /// Accepted answers and their token ids.
    pub answers: Vec<(String, u32)>,
}

/// How the model did on one probe.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub line: usize,
    /// The best-ranked accepted answer.
    pub answer: String,
    /// Its 1-based rank over the whole vocabulary.
    pub rank: usize,
    pub probability: f64,
    /// The model's top prediction.
    pub top: String,
}

/// All probes at one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Mean reciprocal rank of the best accepted answer.
    pub mrr: f64,
    /// Share of probes whose answer is ranked first / in the top 5.
    pub top1: f64,
    pub top5: f64,
    pub probes: Vec<ProbeResult>,
}

fn probe_error(source: &str, path: &Path, line: usize, reason: String) -> InferError {
    InferError::Config {
        key: source.to_string(),
        reason: format!("{}:{line}: {reason}", path.display()),
    }
}

/// Reads and tokenizes a probe file, which errors name by `source`, the option or config key
/// that gave it (`--probes`, `eval.probes`). A rank is only defined for a single prediction,
/// so only answers that are one token in their sentence count (see [`token_in_context`]); the
/// others are named in the returned notices, a probe with none is skipped with a notice, and
/// a file left with no probe is an error.
pub fn load_probes_from(
    path: &Path,
    tokenizer: &MlmTokenizer,
    max_len: usize,
    source: &str,
) -> Result<(Vec<Probe>, Vec<String>), InferError> {
    let probe_error = |line, reason| probe_error(source, path, line, reason);
    let mut notices = Vec::new();
    let text = std::fs::read_to_string(path).map_err(|source| InferError::Io {
        path: PathBuf::from(path),
        source,
    })?;
    let mut probes = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        let mut fields = raw.split('\t').map(str::trim);
        let sentence = fields.next().unwrap_or_default();
        let answers: Vec<&str> = fields.filter(|f| !f.is_empty()).collect();
        // `<mask>` is accepted for any model, as in the README's examples.
        let sentence = sentence.replace("<mask>", &tokenizer.mask_token);
        if answers.is_empty() {
            return Err(probe_error(
                line,
                "no answer: write the sentence, a tab, then one or more accepted answers".into(),
            ));
        }
        let ids = tokenizer.encode(&sentence)?;
        let masks: Vec<usize> = (0..ids.len())
            .filter(|&p| ids[p] == tokenizer.mask_id)
            .collect();
        if masks.len() != 1 {
            return Err(probe_error(
                line,
                format!(
                    "a probe needs exactly one {} (found {})",
                    tokenizer.mask_token,
                    masks.len()
                ),
            ));
        }
        if ids.len() > max_len {
            return Err(probe_error(
                line,
                format!("{} tokens; the model takes at most {max_len}", ids.len()),
            ));
        }
        let mut resolved = Vec::new();
        let mut split = Vec::new();
        for answer in answers {
            match token_in_context(tokenizer, &sentence, answer)? {
                Some(id) => resolved.push((answer.to_string(), id)),
                None => {
                    let pieces = tokenizer
                        .tokenizer
                        .encode(format!(" {answer}"), false)
                        .map(|e| e.get_tokens().join(" "))
                        .map_err(|e| {
                            InferError::Tokenizer(masklm_data::DataError::Tokenizer(format!(
                                "{answer:?}: {e}"
                            )))
                        })?;
                    split.push(format!("{answer:?} (splits into: {pieces})"));
                }
            }
        }
        if resolved.is_empty() {
            // A rank is undefined here; the rest of the file still counts.
            notices.push(format!(
                "{}:{line}: skipping this probe: no answer is one token of this tokenizer here: \
                 {}; choose another answer, or add the word with `masklm vocab extend`",
                path.display(),
                split.join(", ")
            ));
            continue;
        }
        if !split.is_empty() {
            notices.push(format!(
                "{}:{line}: ignoring answers that are not one token: {}",
                path.display(),
                split.join(", ")
            ));
        }
        probes.push(Probe {
            line,
            text: sentence,
            mask: masks[0],
            ids,
            answers: resolved,
        });
    }
    if probes.is_empty() {
        return Err(InferError::Config {
            key: source.to_string(),
            reason: if notices.is_empty() {
                format!("{} holds no probe", path.display())
            } else {
                format!(
                    "{} holds no usable probe:\n{}",
                    path.display(),
                    notices.join("\n")
                )
            },
        });
    }
    Ok((probes, notices))
}

/// Ranks each probe's answers under `model`, 32 probes per forward pass.
pub fn run_probes(
    model: &MaskedLm,
    probes: &[Probe],
    tokenizer: &MlmTokenizer,
    device: &Device,
) -> Result<ProbeReport, InferError> {
    let mut results = Vec::with_capacity(probes.len());
    for chunk in probes.chunks(32) {
        let sequences: Vec<&[u32]> = chunk.iter().map(|p| p.ids.as_slice()).collect();
        let masks: Vec<Vec<usize>> = chunk.iter().map(|p| vec![p.mask]).collect();
        let rows = mask_probabilities(model, &sequences, &masks, tokenizer.pad_id, device)?;
        for (probe, row) in chunk.iter().zip(rows) {
            let Some(row) = row.first() else { continue };
            let (answer, id) = probe
                .answers
                .iter()
                .min_by_key(|(_, id)| rank_of(row, *id))
                .cloned()
                .unwrap_or_default();
            let top = (0..row.len() as u32)
                .max_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]))
                .and_then(|t| tokenizer.tokenizer.decode(&[t], false).ok())
                .unwrap_or_default();
            results.push(ProbeResult {
                line: probe.line,
                answer,
                rank: rank_of(row, id),
                probability: row[id as usize] as f64,
                top: top.trim().to_string(),
            });
        }
    }
    let n = results.len().max(1) as f64;
    Ok(ProbeReport {
        mrr: results.iter().map(|r| 1.0 / r.rank as f64).sum::<f64>() / n,
        top1: results.iter().filter(|r| r.rank == 1).count() as f64 / n,
        top5: results.iter().filter(|r| r.rank <= 5).count() as f64 / n,
        probes: results,
    })
}
