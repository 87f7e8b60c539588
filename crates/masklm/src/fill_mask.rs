//! `masklm fill-mask`: ranked predictions at each mask, shaped like transformers'
//! `pipeline("fill-mask")`.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use masklm_infer::fill::{FillText, encode_for_fill, pipeline_output, target_ids, top_candidates};
use masklm_infer::{InferError, Loaded, Source};
use masklm_model::{MaskedLm, ModelConfig};

#[derive(Args, Debug)]
pub struct FillMaskArgs {
    /// A masklm checkpoint (runs/NAME/checkpoints/step-...), a Hugging Face folder, or a Hub
    /// model id (org/name[@revision]: from the Hub cache, downloaded if missing).
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

/// Warns about the tensors of a Hugging Face weight file that no parameter took.
fn warn_unused<T>(loaded: &Loaded<T>) {
    for name in loaded.unused() {
        eprintln!("warning: unused tensor {name} in {}", loaded.dir.display());
    }
}

/// Loads a masklm checkpoint (or run folder, or `best`/`latest`) or a Hugging Face folder and
/// the tokenizer beside its weights (checked to fit it), for a command that reads text;
/// `no_tokenizer` says what to do when that folder has no usable tokenizer.
fn load(
    path: &Path,
    device: &Device,
    no_tokenizer: impl FnOnce(&Path) -> String,
) -> Result<Loaded> {
    let source = Source::open(path).with_context(|| format!("loading {}", path.display()))?;
    let dir = source.dir().to_path_buf();
    match source.load(device) {
        Ok(loaded) => {
            warn_unused(&loaded);
            Ok(loaded)
        }
        Err(InferError::Tokenizer(e)) => Err(e).context(no_tokenizer(&dir)),
        Err(e @ InferError::TokenizerTooLarge { .. }) => Err(e.into()),
        Err(e) => Err(e).with_context(|| format!("loading {}", path.display())),
    }
}

/// [`load`] for a command that needs the tokenizer `purpose` ("to evaluate text").
pub fn load_model_and_tokenizer(path: &Path, device: &Device, purpose: &str) -> Result<Loaded> {
    load(path, device, |dir| {
        format!("{} needs its tokenizer files {purpose}", dir.display())
    })
}

/// Ranks the vocabulary (or `targets`) at each mask of `ids`; one list per mask.
fn predict(model: &MaskedLm, text: &FillText, device: &Device) -> Result<Vec<Vec<f32>>> {
    let mut rows = masklm_infer::fill::mask_probabilities(
        model,
        &[&text.ids],
        std::slice::from_ref(&text.masks),
        0,
        device,
    )?;
    rows.pop().context("the model returned no distribution")
}

pub fn fill_mask(args: FillMaskArgs, device: &Device) -> Result<()> {
    if let Some(ids) = &args.ids {
        let loaded = masklm_infer::load_model(&args.model, device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        warn_unused(&loaded);
        if args.top_k == 0 {
            bail!("--top-k must be at least 1");
        }
        return fill_ids(
            &loaded.model,
            &loaded.config,
            ids,
            args.mask_id,
            args.top_k,
            device,
        );
    }
    let loaded = load(&args.model, device, |dir| {
        format!(
            "{} has no usable tokenizer; pass token ids with --ids, or use a folder with tokenizer.json",
            dir.display()
        )
    })?;
    let (config, model, tokenizer) = (loaded.config, loaded.model, loaded.tokenizer);
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let targets = match &args.targets {
        Some(words) => {
            let (ids, notices) = target_ids(&tokenizer, words).context("--targets")?;
            for notice in notices {
                eprintln!("warning: --targets: {notice}");
            }
            Some(ids)
        }
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
        let encoded = encode_for_fill(&tokenizer, text, config.max_sequence_length())?;
        let rows = predict(&model, &encoded, device)?;
        let doc = pipeline_output(&tokenizer, &encoded, &rows, args.top_k, targets.as_deref());
        if args.json {
            println!("{doc}");
            continue;
        }
        println!("{text}");
        // One mask: a flat list; several: a list per mask.
        let lists: Vec<&serde_json::Value> = if encoded.masks.len() == 1 {
            vec![&doc]
        } else {
            doc.as_array().into_iter().flatten().collect()
        };
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
    Ok(())
}

fn fill_ids(
    model: &MaskedLm,
    config: &ModelConfig,
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
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= config.vocab_size()) {
        bail!(
            "--ids: token id {bad} is outside the vocabulary (vocab_size {})",
            config.vocab_size()
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
    let text = FillText { ids, masks };
    for (row, position) in predict(model, &text, device)?.iter().zip(&text.masks) {
        println!("mask at position {position}:");
        for (id, score) in top_candidates(row, top_k, None) {
            println!("  {id:>6}  {score:.4}");
        }
    }
    Ok(())
}
