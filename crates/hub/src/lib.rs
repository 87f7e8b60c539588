//! Hugging Face checkpoint folders to and from masklm models.
//!
//! A Hub folder holds `config.json` and `model.safetensors` (or the older
//! `pytorch_model.bin`). [`load_roberta`] reads both through burn-store for the RoBERTa family
//! (`roberta`, `xlm-roberta`, `camembert`) and BERT (`bert`); [`export_model`] writes them back.
//! The weight names need a short documented remapping, everything else is the HF key itself:
//!
//! | HF key                                   | masklm module path                          |
//! |------------------------------------------|---------------------------------------------|
//! | `...attention.self.{query,key,value}.*`  | `...attention.self_attn.*` (`self` is a Rust keyword) |
//! | `*.LayerNorm.weight` / `.bias`           | `*.LayerNorm.gamma` / `.beta` (burn's names, via `PyTorchToBurnAdapter`) |
//! | Linear `weight` `[out, in]`              | `weight` `[in, out]` (transposed by the same adapter) |
//! | BERT `bert.*`                            | `roberta.*` |
//! | BERT `cls.predictions.transform.{dense,LayerNorm}.*` | `lm_head.{dense,layer_norm}.*` |
//! | BERT `cls.predictions.bias`              | `lm_head.bias` |
//!
//! Tensors that are expected to be absent or extra are not reported: the tied decoder
//! (`lm_head.decoder.*`, `cls.predictions.decoder.*`), `*.pooler.*` and
//! `cls.seq_relationship.*` (unused by MLM), and the `position_ids` / `token_type_ids` buffers
//! that some checkpoints saved.

use std::path::{Path, PathBuf};

use burn::store::{
    ApplyError, BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::Device;
use masklm_model::{ConfigError, RobertaConfig, RobertaForMaskedLM};

/// Why a checkpoint folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The folder (or file given as a folder) does not exist.
    #[error("{0}: no such checkpoint folder")]
    NoFolder(PathBuf),
    /// No `config.json` in the folder.
    #[error(
        "{0}: no config.json; a Hugging Face checkpoint folder holds config.json and model.safetensors"
    )]
    NoConfig(PathBuf),
    /// `config.json` is unreadable or describes an impossible model.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `config.json` names an architecture this loader does not handle.
    #[error(
        "{path}: model_type {model_type:?} is not supported; masklm loads \"roberta\", \"xlm-roberta\", \"camembert\" and \"bert\" checkpoints"
    )]
    UnsupportedModelType { path: PathBuf, model_type: String },
    /// Neither `model.safetensors` nor `pytorch_model.bin` is in the folder.
    #[error("{0}: no model.safetensors or pytorch_model.bin")]
    NoWeights(PathBuf),
    /// The weights file could not be parsed (truncated download, wrong format).
    #[error("{path}: cannot read weights ({reason}); the file may be truncated: download it again")]
    ReadWeights { path: PathBuf, reason: String },
    /// Tensors the model needs are not in the file.
    #[error("{path}: missing tensor{} {}", if names.len() == 1 { "" } else { "s" }, names.join(", "))]
    MissingTensors { path: PathBuf, names: Vec<String> },
    /// A tensor's shape disagrees with config.json.
    #[error("{path}: tensor {name} has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// config.json disagrees with the weights file.
    #[error("{}: {reason}; the config.json does not belong to these weights", path.display())]
    ConfigMismatch { path: PathBuf, reason: String },
    /// Writing an export failed (disk full, permissions).
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    /// Any other per-tensor failure (unsupported dtype, unreadable data).
    #[error("{path}: tensor {name}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// What a successful load found beyond the model: tensors in the file that the model does not
/// use (other than the expected ones listed in the crate docs), which the CLI shows as
/// warnings, and the dtypes the weights were stored in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// The weights file that was read.
    pub weights: PathBuf,
    /// Tensor names in the file that were not used.
    pub unexpected: Vec<String>,
    /// The float dtypes of the stored weights (`F32`, `F16`, `BF16`, `F64`). They are upcast to
    /// f32 on load, as transformers does by default.
    pub stored_dtypes: Vec<String>,
}

/// Checks config.json against a safetensors header before the model is allocated: the layer
/// count and the word-embedding shape must match (a config claiming 10^6 layers for a file
/// holding 2 is refused here, not in the allocator).
fn check_header(config: &RobertaConfig, file: &Path) -> Result<(), HubError> {
    let read_err = |reason: String| HubError::ReadWeights {
        path: file.to_path_buf(),
        reason,
    };
    let handle = std::fs::File::open(file).map_err(|e| read_err(e.to_string()))?;
    // SAFETY: read-only mapping of a file we only read; a concurrent writer could change the
    // bytes under us, which safetensors' header parse then reports as an error.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| read_err(e.to_string()))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| read_err(format!("bad safetensors header: {e}")))?;
    let tensors = metadata.tensors();
    let layers = tensors
        .keys()
        .filter_map(|name| {
            let rest = name.split("encoder.layer.").nth(1)?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    if layers > 0 && layers != config.num_hidden_layers {
        return Err(HubError::ConfigMismatch {
            path: file.to_path_buf(),
            reason: format!(
                "config.json says num_hidden_layers {} but the weights hold {layers} layers",
                config.num_hidden_layers
            ),
        });
    }
    if let Some((name, info)) = tensors
        .iter()
        .find(|(name, _)| name.ends_with("embeddings.word_embeddings.weight"))
    {
        let expected = [config.vocab_size, config.hidden_size];
        if info.shape != expected {
            return Err(HubError::ShapeMismatch {
                path: file.to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
    }
    Ok(())
}

/// Checks `config` against the folder's weight file header where it can be read without
/// loading the weights (safetensors), before any model is allocated.
pub fn check_weights(config: &RobertaConfig, dir: &Path) -> Result<(), HubError> {
    let safetensors = dir.join("model.safetensors");
    if safetensors.is_file() {
        check_header(config, &safetensors)?;
    }
    Ok(())
}

/// Casts every float parameter to f32 (half-precision and f64 Hub weights), returning the
/// dtypes found.
fn upcast_to_f32(model: RobertaForMaskedLM) -> (RobertaForMaskedLM, Vec<String>) {
    use burn::module::{Module, ModuleMapper, Param};
    use burn::tensor::{DType, FloatDType, Tensor};
    struct Upcast(std::collections::BTreeSet<String>);
    impl ModuleMapper for Upcast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = param.val().dtype();
            self.0.insert(format!("{dtype:?}"));
            if dtype == DType::F32 {
                param
            } else {
                param.map(|t| t.cast(FloatDType::F32))
            }
        }
    }
    let mut upcast = Upcast(Default::default());
    let model = model.map(&mut upcast);
    (model, upcast.0.into_iter().collect())
}

/// Tensor names (after remapping to module paths) that may be absent or extra in a HF file.
fn is_expected_extra(name: &str) -> bool {
    name.starts_with("lm_head.decoder.")
        || name.starts_with("roberta.pooler.")
        || name == "roberta.embeddings.position_ids"
        || name == "roberta.embeddings.token_type_ids"
        || name.starts_with("cls.predictions.decoder.")
        || name.starts_with("cls.seq_relationship.")
}

/// BERT checkpoint names -> module paths (regex, replacement): `bert.*` is the encoder,
/// `cls.predictions.*` the MLM head.
const BERT_TO_MODULE: [(&str, &str); 4] = [
    (r"^bert\.", "roberta."),
    (r"^cls\.predictions\.transform\.dense\.", "lm_head.dense."),
    (
        r"^cls\.predictions\.transform\.LayerNorm\.",
        "lm_head.layer_norm.",
    ),
    (r"^cls\.predictions\.bias$", "lm_head.bias"),
];
/// The reverse of [`BERT_TO_MODULE`], for export.
const MODULE_TO_BERT: [(&str, &str); 4] = [
    (r"^roberta\.", "bert."),
    (r"^lm_head\.dense\.", "cls.predictions.transform.dense."),
    (
        r"^lm_head\.layer_norm\.",
        "cls.predictions.transform.LayerNorm.",
    ),
    (r"^lm_head\.bias$", "cls.predictions.bias"),
];

/// Module path -> HF name, for messages: users know the HF names.
fn hf_name(path: &str, bert: bool) -> String {
    let name = path
        .replace(".self_attn.", ".self.")
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias")
        .replace("layer_norm.gamma", "layer_norm.weight")
        .replace("layer_norm.beta", "layer_norm.bias");
    if !bert {
        return name;
    }
    if let Some(rest) = name.strip_prefix("roberta.") {
        format!("bert.{rest}")
    } else if let Some(rest) = name.strip_prefix("lm_head.dense.") {
        format!("cls.predictions.transform.dense.{rest}")
    } else if let Some(rest) = name.strip_prefix("lm_head.layer_norm.") {
        format!("cls.predictions.transform.LayerNorm.{rest}")
    } else if name == "lm_head.bias" {
        "cls.predictions.bias".to_string()
    } else {
        name
    }
}

/// Reads and validates `DIR/config.json`, checking that it is a RoBERTa- or BERT-family model.
pub fn read_config(dir: &Path) -> Result<RobertaConfig, HubError> {
    if !dir.is_dir() {
        return Err(HubError::NoFolder(dir.to_path_buf()));
    }
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(HubError::NoConfig(dir.to_path_buf()));
    }
    let config = RobertaConfig::from_file(&path)?;
    if !matches!(
        config.model_type.as_str(),
        "roberta" | "xlm-roberta" | "camembert" | "bert"
    ) {
        return Err(HubError::UnsupportedModelType {
            path,
            model_type: config.model_type.clone(),
        });
    }
    Ok(config)
}

/// Loads a RoBERTa-family `*ForMaskedLM` checkpoint folder onto `device`.
pub fn load_roberta(
    dir: &Path,
    device: &Device,
) -> Result<(RobertaConfig, RobertaForMaskedLM, LoadReport), HubError> {
    let config = read_config(dir)?;
    check_weights(&config, dir)?;
    let mut model = RobertaForMaskedLM::new(&config, device)?;
    let report = load_weights(&mut model, dir)?;
    Ok((config, model, report))
}

/// Applies a weights store to `model`, naming `path` if the file cannot be read.
fn apply_store<S: ModuleStore>(
    model: &mut RobertaForMaskedLM,
    mut store: S,
    path: &Path,
) -> Result<burn::store::ApplyResult, HubError> {
    model
        .load_from(&mut store)
        .map_err(|e| HubError::ReadWeights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Loads the weights of the checkpoint folder `dir` into `model`, whose shapes come from the
/// folder's config.json.
/// Weights stored in f16/bf16/f64 are upcast to f32.
pub fn load_weights(model: &mut RobertaForMaskedLM, dir: &Path) -> Result<LoadReport, HubError> {
    let bert = model.roberta.embeddings.absolute_positions;
    let mut patterns = vec![(r"\.attention\.self\.", ".attention.self_attn.")];
    if bert {
        patterns.extend(BERT_TO_MODULE);
    }
    // The patterns are constants of this crate; a bad one is a bug caught by every test.
    let remapper = KeyRemapper::from_patterns(patterns).unwrap_or_default();
    let safetensors = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    let (path, result) = if safetensors.is_file() {
        let store = SafetensorsStore::from_file(&safetensors)
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(remapper)
            .validate(false)
            .allow_partial(true);
        (safetensors.clone(), apply_store(model, store, &safetensors))
    } else if bin.is_file() {
        // PytorchStore applies PyTorchToBurnAdapter itself.
        let store = PytorchStore::from_file(&bin)
            .remap(remapper)
            .validate(false)
            .allow_partial(true);
        (bin.clone(), apply_store(model, store, &bin))
    } else {
        return Err(HubError::NoWeights(dir.to_path_buf()));
    };
    let result = result?;

    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: name,
                expected,
                found,
            } => HubError::ShapeMismatch {
                path,
                name: hf_name(name, bert),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            ApplyError::DTypeMismatch {
                path: name,
                expected,
                found,
            } => HubError::Tensor {
                path,
                name: hf_name(name, bert),
                reason: format!("dtype {found:?}, expected {expected:?}"),
            },
            ApplyError::AdapterError {
                path: name,
                message,
            }
            | ApplyError::LoadError {
                path: name,
                message,
            } => HubError::Tensor {
                path,
                name: hf_name(name, bert),
                reason: message.clone(),
            },
        });
    }
    let missing: Vec<String> = result
        .missing
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| !is_expected_extra(name))
        .map(|name| hf_name(name, bert))
        .collect();
    if !missing.is_empty() {
        return Err(HubError::MissingTensors {
            path,
            names: missing,
        });
    }
    let unexpected = result
        .unused
        .iter()
        .filter(|name| !is_expected_extra(name))
        .map(|name| hf_name(name, bert))
        .collect();
    // `map` consumes the module; the clone shares its tensors.
    let (upcast, stored_dtypes) = upcast_to_f32(model.clone());
    *model = upcast;
    Ok(LoadReport {
        weights: path,
        unexpected,
        stored_dtypes,
    })
}

/// Tokenizer files copied into an export when present.
pub const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes `model` as a Hugging Face folder that `AutoModelForMaskedLM.from_pretrained(out)` and
/// `pipeline("fill-mask", model=out)` load: `config.json`, `model.safetensors` with HF names and
/// layouts (the tied decoder is not stored, as transformers itself saves it), and the tokenizer
/// files found in `tokenizer_dir`.
pub fn export_model(
    model: &RobertaForMaskedLM,
    config: &RobertaConfig,
    tokenizer_dir: Option<&Path>,
    out: &Path,
) -> Result<(), HubError> {
    let write_err = |path: &Path, reason: String| HubError::Write {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e.to_string()))?;
    let weights = out.join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&weights)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping(r"\.attention\.self_attn\.", ".attention.self.")
        .clear_metadata()
        // transformers refuses safetensors files whose metadata lacks format "pt".
        .metadata("format", "pt")
        .overwrite(true);
    if config.is_bert() {
        for (from, to) in MODULE_TO_BERT {
            store = store.with_key_remapping(from, to);
        }
    }
    model
        .save_into(&mut store)
        .map_err(|e| write_err(&weights, e.to_string()))?;
    let mut config = config.clone();
    config.architectures = vec![if config.is_bert() {
        "BertForMaskedLM".to_string()
    } else {
        "RobertaForMaskedLM".to_string()
    }];
    let config_path = out.join("config.json");
    std::fs::write(&config_path, config.to_json() + "\n")
        .map_err(|e| write_err(&config_path, e.to_string()))?;
    if let Some(dir) = tokenizer_dir {
        for file in TOKENIZER_FILES {
            let from = dir.join(file);
            if from.is_file() {
                std::fs::copy(&from, out.join(file))
                    .map_err(|e| write_err(&out.join(file), e.to_string()))?;
            }
        }
    }
    Ok(())
}
