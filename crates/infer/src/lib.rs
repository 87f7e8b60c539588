//! Inference with a trained masked-language model: loading it, filling masks, scoring text.
//!
//! Below both the trainer and the server: `masklm-serve` and the CLI's `fill-mask`, `eval`,
//! `probe`, `export` and `inspect` need only this crate; the trainer uses it to evaluate, probe
//! and start from a trained model.
//!
//! - [`checkpoint`]: reading a masklm checkpoint (pointer and run-folder resolution, manifest
//!   checksums);
//! - [`load()`](load::load): a checkpoint, a Hugging Face folder or a Hub model id (in the
//!   local Hub cache, or downloaded into it), with its tokenizer, as one [`Loaded`]; [`Source`] opens one first for callers that adjust its config before loading;
//! - [`fill`]: the vocabulary distribution at masked positions, shaped like transformers'
//!   `pipeline("fill-mask")`;
//! - [`eval`]: masked-LM perplexity and accuracy over a token cache, and pseudo-perplexity;
//! - [`probes`]: knowledge probes (cloze sentences ranked under a model).
//!
//! ```no_run
//! # fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use masklm_infer::fill::{encode_for_fill, mask_probabilities, pipeline_output};
//! let device = burn::tensor::Device::flex();
//! // A run folder (its latest checkpoint), a step folder, `best`, or a Hugging Face folder.
//! let loaded = masklm_infer::load("runs/quickstart".as_ref(), &device)?;
//! let (tokenizer, max_len) = (&loaded.tokenizer, loaded.config.max_sequence_length());
//! let text = encode_for_fill(tokenizer, "The <mask> is red.", max_len)?;
//! let masks = [text.masks.clone()];
//! let rows = mask_probabilities(&loaded.model, &[&text.ids], &masks, tokenizer.pad_id, &device)?;
//! // [{score, token, token_str, sequence}, ...], as transformers' pipeline("fill-mask").
//! println!("{}", pipeline_output(tokenizer, &text, &rows[0], 5, None));
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod eval;
pub mod fill;
pub mod load;
pub mod probes;

use std::path::PathBuf;

pub use eval::{
    EvalResult, EvalSettings, PseudoPerplexity, count_words, evaluate, evaluate_splits,
    pseudo_log_likelihood, pseudo_log_likelihood_passes, pseudo_perplexity,
};
pub use load::{Loaded, Origin, Source, check_tokenizer_fits, load, load_model};
pub use probes::{Probe, ProbeReport, ProbeResult, load_probes_from, run_probes};

/// Errors of loading a model and running it.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// A value is impossible: a probe file's line, the model's output.
    #[error("invalid `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// A checkpoint's config.json describes no model this masklm can build. The config
    /// error's text (its causes included) is this message's, so it is not repeated as a source.
    #[error("invalid `{key}`: {error}")]
    ModelConfig {
        key: String,
        error: masklm_model::ConfigError,
    },
    /// The tokenizer beside the weights has ids past the model's embedding table.
    #[error(
        "invalid `vocab_size`: {}/tokenizer.json has ids up to {} but the model's vocab_size is \
         {model_vocab}: this tokenizer does not belong to this model",
        dir.display(),
        tokenizer_vocab - 1
    )]
    TokenizerTooLarge {
        dir: PathBuf,
        tokenizer_vocab: usize,
        model_vocab: usize,
    },
    /// The folder has no usable tokenizer beside its weights.
    #[error(transparent)]
    Tokenizer(masklm_data::DataError),
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint is incomplete, corrupt or of another format.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// The tokenizer failed on a text.
    #[error(transparent)]
    Data(#[from] masklm_data::DataError),
    /// A Hugging Face folder could not be loaded.
    #[error(transparent)]
    Hub(#[from] masklm_hub::HubError),
}
