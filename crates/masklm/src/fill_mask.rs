//! `masklm fill-mask`: ranked predictions at each mask, shaped like transformers'
//! `pipeline("fill-mask")`.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use masklm_data::{MlmTokenizer, load_tokenizer};
use masklm_model::{RobertaConfig, RobertaForMaskedLM};
use serde_json::json;

#[derive(Args, Debug)]
pub struct FillMaskArgs {
    /// A masklm checkpoint (runs/NAME/checkpoints/step-...) or a Hugging Face folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Candidates per mask.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Score only these words (comma-separated), as the pipeline's `targets`.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// One JSON document per input text, shaped like the pipeline's return value.
    #[arg(long)]
    pub json: bool,
    /// Token ids instead of text (for folders without a tokenizer): "0 17 4 9 2".
    #[arg(long, conflicts_with = "text")]
    pub ids: Option<String>,
    /// The mask token's id, with --ids (masklm tokenizers: 4).
    #[arg(long, default_value_t = 4, requires = "ids")]
    pub mask_id: u32,
    /// Texts containing the mask token; read from stdin, one per line, when absent.
    pub text: Vec<String>,
}

/// Loads a masklm checkpoint (or run folder, or `best`/`latest`) or a Hugging Face folder
/// for inference, warning about unused weights.
pub fn load_model(path: &Path, device: &Device) -> Result<masklm_train::Loaded> {
    let loaded = masklm_train::load_for_inference(path, device)?;
    for name in &loaded.unused {
        eprintln!("warning: unused tensor {name} in {}", loaded.dir.display());
    }
    Ok(loaded)
}

/// `text` quoted for a message, cut to its first 60 characters: a 1 MB input must not be
/// echoed whole.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
        None => format!("{text:?}"),
    }
}

struct Candidate {
    id: u32,
    score: f32,
}

/// Ranks the vocabulary (or `targets`) at each mask of `ids`; one list per mask.
fn predict(
    model: &RobertaForMaskedLM,
    ids: &[u32],
    masks: &[usize],
    top_k: usize,
    targets: Option<&[u32]>,
    device: &Device,
) -> Result<Vec<Vec<Candidate>>> {
    let rows = masklm_train::fill::mask_probabilities(model, &[ids], &[masks.to_vec()], 0, device)?
        .pop()
        .unwrap_or_default();
    Ok(rows
        .iter()
        .map(|row| {
            let mut order: Vec<u32> = match targets {
                Some(t) => t.to_vec(),
                None => (0..row.len() as u32).collect(),
            };
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            order
                .into_iter()
                .take(top_k)
                .map(|id| Candidate {
                    id,
                    score: row[id as usize],
                })
                .collect()
        })
        .collect())
}

/// The pipeline's `targets` handling (`FillMaskPipeline.get_target_ids`): a word that is a
/// vocabulary entry is that token; otherwise the first token of its encoding (without
/// specials), with a warning as the pipeline gives. Duplicates collapse.
fn target_ids(tokenizer: &MlmTokenizer, words: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for word in words {
        let id = match tokenizer.tokenizer.token_to_id(word) {
            Some(id) => id,
            None => {
                let id = tokenizer
                    .tokenizer
                    .encode(word.as_str(), false)
                    .ok()
                    .and_then(|enc| enc.get_ids().first().copied())
                    .with_context(|| format!("--targets: {word:?} does not map to any token"))?;
                eprintln!(
                    "warning: --targets {word:?} is not a single token of the vocabulary; \
                     using its first piece {:?} (as transformers' pipeline does)",
                    tokenizer.id_to_token(id).unwrap_or_default()
                );
                id
            }
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

pub fn fill_mask(args: FillMaskArgs, device: &Device) -> Result<()> {
    let loaded = load_model(&args.model, device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let (config, model) = (loaded.config, loaded.model);
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if let Some(ids) = &args.ids {
        return fill_ids(&model, &config, ids, args.mask_id, args.top_k, device);
    }
    let tokenizer = load_tokenizer(&loaded.dir).with_context(|| {
        format!(
            "{} has no usable tokenizer; pass token ids with --ids, or use a folder with tokenizer.json",
            loaded.dir.display()
        )
    })?;
    masklm_train::check_tokenizer_fits(&tokenizer, &config)?;
    let targets = match &args.targets {
        Some(words) => Some(target_ids(&tokenizer, words)?),
        None => None,
    };
    let texts: Vec<String> = if args.text.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()
            .context("reading texts from stdin")?
    } else {
        args.text.clone()
    };
    if texts.is_empty() {
        bail!(
            "no text given: pass TEXT arguments or lines on stdin, each with {}",
            tokenizer.mask_token
        );
    }
    for text in &texts {
        if text.trim().is_empty() {
            bail!("empty text: give a sentence with {}", tokenizer.mask_token);
        }
        let ids = tokenizer.encode(text)?;
        let masks: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i] == tokenizer.mask_id)
            .collect();
        if masks.is_empty() {
            bail!(
                "no mask token in {}: write {} where a word should be predicted",
                excerpt(text),
                tokenizer.mask_token
            );
        }
        if ids.len() > config.max_sequence_length() {
            bail!(
                "{} is {} tokens long; this model takes at most {}",
                excerpt(text),
                ids.len(),
                config.max_sequence_length()
            );
        }
        let ranked = predict(&model, &ids, &masks, args.top_k, targets.as_deref(), device)?;
        let lists: Vec<serde_json::Value> = ranked
            .iter()
            .zip(&masks)
            .map(|(candidates, &position)| {
                let items: Vec<serde_json::Value> = candidates
                    .iter()
                    .map(|c| {
                        let mut filled = ids.clone();
                        filled[position] = c.id;
                        // As the pipeline: specials are dropped only when there is one mask;
                        // with several, the other masks (and <s>, </s>) stay in the text.
                        let single = masks.len() == 1;
                        let sequence = tokenizer.tokenizer.decode(&filled, single).unwrap_or_default();
                        let token_str = tokenizer.tokenizer.decode(&[c.id], false).unwrap_or_default();
                        json!({"score": c.score, "token": c.id, "token_str": token_str, "sequence": sequence})
                    })
                    .collect();
                serde_json::Value::Array(items)
            })
            .collect();
        if args.json {
            // The pipeline returns a flat list for one mask, a list of lists for several.
            let doc = if lists.len() == 1 {
                lists[0].clone()
            } else {
                serde_json::Value::Array(lists)
            };
            println!("{doc}");
        } else {
            println!("{text}");
            for (m, list) in lists.iter().enumerate() {
                if lists.len() > 1 {
                    println!("  mask {}:", m + 1);
                }
                for item in list.as_array().into_iter().flatten() {
                    println!(
                        "  {:>7.4}  {:<16} {}",
                        item["score"].as_f64().unwrap_or(0.0),
                        item["token_str"].as_str().unwrap_or(""),
                        item["sequence"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

fn fill_ids(
    model: &RobertaForMaskedLM,
    config: &RobertaConfig,
    ids: &str,
    mask_id: u32,
    top_k: usize,
    device: &Device,
) -> Result<()> {
    let ids: Vec<u32> = ids
        .split_whitespace()
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--ids: {t:?} is not a token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--ids is empty: give the token ids of one sequence, e.g. --ids \"0 17 4 9 2\"");
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
        bail!(
            "--ids: token id {bad} is outside the vocabulary (vocab_size {})",
            config.vocab_size
        );
    }
    if ids.len() > config.max_sequence_length() {
        bail!(
            "--ids: {} tokens, but this model takes at most {}",
            ids.len(),
            config.max_sequence_length()
        );
    }
    let masks: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    if masks.is_empty() {
        bail!(
            "--ids has no mask token (id {mask_id}); put {mask_id} where a token should be predicted"
        );
    }
    for (candidates, position) in predict(model, &ids, &masks, top_k, None, device)?
        .iter()
        .zip(&masks)
    {
        println!("mask at position {position}:");
        for c in candidates {
            println!("  {:>6}  {:.4}", c.id, c.score);
        }
    }
    Ok(())
}
