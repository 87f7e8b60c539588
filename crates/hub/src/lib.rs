//! Hugging Face checkpoint folders to and from masklm models.
//!
//! A Hub folder holds `config.json` and `model.safetensors`, or
//! `model.safetensors.index.json` and the shards its `weight_map` names, or the older
//! `pytorch_model.bin` (transformers' order of preference). [`load_roberta`] reads both through burn-store for the RoBERTa family
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
//! ModernBERT folders (`model_type` "modernbert") load with [`load_modernbert`] and export
//! with [`export_modernbert`]; their module paths are the HF keys (see `modernbert.rs`).
//!
//! A model named by Hub id (`org/name[@revision]`) rather than by folder is resolved to its
//! snapshot in the local Hub cache, downloading what is missing, by [`resolve_model`] (the
//! [`ids`] module; the rules are in its doc).
//!
//! Tensors that are expected to be absent or extra are not reported: the tied decoder
//! (`lm_head.decoder.*`, `cls.predictions.decoder.*`), `*.pooler.*` and
//! `cls.seq_relationship.*` (unused by MLM), and the `position_ids` / `token_type_ids` buffers
//! that some checkpoints saved.

use std::path::{Path, PathBuf};

use burn::store::pytorch_reader::PytorchReader;
use burn::store::{
    ApplyError, BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::Device;
use masklm_model::{ConfigError, Family, MaskedLm, ModelConfig, RobertaConfig, RobertaForMaskedLM};

mod download;
pub mod ids;
mod modernbert;

pub use ids::{
    DownloadProgress, HubSettings, ModelId, Need, NoDownloadProgress, ResolveError, Resolver,
    resolve_model, set_download_progress,
};
pub use modernbert::{
    check_modernbert_weights, export_modernbert, load_modernbert, load_modernbert_weights,
    read_modernbert_config,
};

/// Why a checkpoint folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The folder does not exist.
    #[error("{0}: no such checkpoint folder")]
    NoFolder(PathBuf),
    /// A file given where a model folder belongs.
    #[error("{0}: a file, not a model folder; give the folder that holds it")]
    FileNotFolder(PathBuf),
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
        "{path}: model_type {model_type:?} is not supported; masklm loads {}",
        Family::known_model_types()
    )]
    UnsupportedModelType { path: PathBuf, model_type: String },
    /// Neither `model.safetensors`, `model.safetensors.index.json` nor `pytorch_model.bin` is
    /// in the folder.
    #[error("{0}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights(PathBuf),
    /// `model.safetensors.index.json` names a shard that is not in the folder.
    #[error(
        "{}: names the shard {shard}, which is not in the folder; download the model again",
        index.display()
    )]
    MissingShard { index: PathBuf, shard: String },
    /// A model id could not be resolved to a folder (not in the Hub cache, not downloadable).
    #[error(transparent)]
    Resolve(#[from] ids::ResolveError),
    /// A masklm checkpoint folder lacking a file its save writes (the manifest, last): the
    /// save was interrupted or files were removed.
    #[error(
        "{}: an incomplete masklm checkpoint (no {}): its save did not finish or files were \
         removed; use another checkpoint of the run (an earlier checkpoints/step-N, or \
         checkpoints/best)",
        dir.display(),
        missing.join(", ")
    )]
    IncompleteCheckpoint {
        dir: PathBuf,
        missing: Vec<&'static str>,
    },
    /// A folder written from another that is the same folder: copying a file onto itself
    /// empties it.
    #[error(
        "{} and {} are the same folder: write the output to another folder",
        out.display(),
        from.display()
    )]
    SameFolder { out: PathBuf, from: PathBuf },
    /// The model does not fit in the memory available.
    #[error("{}: the model does not fit in memory", path.display())]
    Memory {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    /// A tokenizer_config.json that export cannot read (it is rewritten, not copied).
    #[error("{path}: {reason}; fix the file or remove it from the tokenizer folder")]
    TokenizerConfig { path: PathBuf, reason: String },
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

/// The names and shapes of the tensors in a weights file, read from its header (safetensors)
/// or its pickle (`pytorch_model.bin`) without reading the tensors themselves.
pub(crate) fn tensor_shapes(file: &Path) -> Result<Vec<(String, Vec<usize>)>, HubError> {
    let read_err = |reason: String| HubError::ReadWeights {
        path: file.to_path_buf(),
        reason,
    };
    if file.extension().is_some_and(|e| e == "bin") {
        let reader = PytorchReader::new(file).map_err(|e| read_err(e.to_string()))?;
        let tensors = reader.tensors().iter();
        return Ok(tensors
            .map(|(n, t)| (n.clone(), t.shape().to_vec()))
            .collect());
    }
    let handle = std::fs::File::open(file).map_err(|e| read_err(e.to_string()))?;
    // SAFETY: read-only mapping of a file we only read; a concurrent writer could change the
    // bytes under us, which safetensors' header parse then reports as an error.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| read_err(e.to_string()))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| read_err(format!("bad safetensors header: {e}")))?;
    let tensors = metadata.tensors().into_iter();
    Ok(tensors.map(|(n, info)| (n, info.shape.clone())).collect())
}

/// Checks config.json against the shapes a weights file holds, before the model is
/// allocated: the layer count and the word-embedding shape must match (a config claiming
/// 10^6 layers or a 16M vocabulary for a file holding 2 layers of 1000 is refused here, not in
/// the allocator).
fn check_shapes(
    config: &RobertaConfig,
    file: &Path,
    tensors: &[(String, Vec<usize>)],
) -> Result<(), HubError> {
    let layers = tensors
        .iter()
        .filter_map(|(name, _)| {
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
    if let Some((name, shape)) = tensors
        .iter()
        .find(|(name, _)| name.ends_with("embeddings.word_embeddings.weight"))
    {
        let expected = [config.vocab_size, config.hidden_size];
        if shape[..] != expected {
            return Err(HubError::ShapeMismatch {
                path: file.to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
    }
    Ok(())
}

/// Weight files of a Hub folder, in transformers' order of preference.
pub(crate) const WEIGHT_FILES: [&str; 3] =
    ["model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin"];

/// The index of sharded safetensors weights: `{"weight_map": {tensor: shard file}}`.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// The weights of a Hub folder: one file, or the shards of `model.safetensors.index.json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Weights {
    /// The file named in messages: the weights file, or the index of the shards.
    pub path: PathBuf,
    /// The files holding the tensors (one unless sharded).
    pub files: Vec<PathBuf>,
}

/// The shard file names an index's `weight_map` lists, each once, in order of first use.
/// A name that would leave the folder (absolute, `..`) is refused: an index is data from the
/// Hub, not a licence to read elsewhere.
pub fn read_safetensors_index(index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::ReadWeights {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".to_string()))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        let inside = Path::new(shard)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if shard.is_empty() || !inside {
            return Err(bad(format!(
                "weight_map[{tensor:?}] = {shard:?} is not a file inside the folder"
            )));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    if shards.is_empty() {
        return Err(bad("weight_map is empty".to_string()));
    }
    Ok(shards)
}

/// The weights of a Hub folder: `model.safetensors`, else the shards of
/// `model.safetensors.index.json` (each must be there), else `pytorch_model.bin`.
pub(crate) fn weights_of(dir: &Path) -> Result<Weights, HubError> {
    let path = WEIGHT_FILES
        .map(|name| dir.join(name))
        .into_iter()
        .find(|path| path.is_file())
        .ok_or_else(|| HubError::NoWeights(dir.to_path_buf()))?;
    if !path.ends_with(SAFETENSORS_INDEX) {
        return Ok(Weights {
            files: vec![path.clone()],
            path,
        });
    }
    let files = read_safetensors_index(&path)?
        .into_iter()
        .map(|shard| {
            let file = dir.join(&shard);
            if file.is_file() {
                Ok(file)
            } else {
                Err(HubError::MissingShard {
                    index: path.clone(),
                    shard,
                })
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Weights { path, files })
}

/// The names and shapes of every tensor of a folder's weights (all shards), from their
/// headers.
pub(crate) fn weight_shapes(weights: &Weights) -> Result<Vec<(String, Vec<usize>)>, HubError> {
    let mut all = Vec::new();
    for file in &weights.files {
        all.extend(tensor_shapes(file)?);
    }
    Ok(all)
}

/// Checks `config` against the folder's weights file (its header, not its tensors) and the
/// memory available, before any model is allocated.
pub fn check_weights(config: &ModelConfig, dir: &Path) -> Result<(), HubError> {
    let weights = weights_of(dir)?;
    match config {
        ModelConfig::Roberta(config) => {
            check_shapes(config, &weights.path, &weight_shapes(&weights)?)?
        }
        ModelConfig::ModernBert(config) => return check_modernbert_weights(config, dir),
    }
    config.check_memory().map_err(|source| HubError::Memory {
        path: dir.join("config.json"),
        source,
    })
}

/// The error for a masklm checkpoint folder that lacks its manifest or weights (so that it
/// is not taken for a Hub folder and reported as one without weights).
fn incomplete_checkpoint(dir: &Path) -> Option<HubError> {
    let has = |name: &str| dir.join(name).is_file();
    let masklm = ["model.bpk", "manifest.json", "state.json", "optimizer.bpk"];
    if !masklm.into_iter().any(has) || WEIGHT_FILES.into_iter().any(has) {
        return None;
    }
    let missing: Vec<&'static str> = ["manifest.json", "model.bpk"]
        .into_iter()
        .filter(|name| !has(name))
        .collect();
    (!missing.is_empty()).then(|| HubError::IncompleteCheckpoint {
        dir: dir.to_path_buf(),
        missing,
    })
}

/// Casts every float parameter to f32 (half-precision and f64 Hub weights), keeping whether it
/// tracks gradients, and returns the dtypes found.
fn upcast_to_f32<M: burn::module::Module>(model: M) -> (M, Vec<String>) {
    use burn::module::{ModuleMapper, Param};
    use burn::tensor::{DType, Tensor};
    struct Upcast(std::collections::BTreeSet<String>);
    impl ModuleMapper for Upcast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = param.val().dtype();
            self.0.insert(format!("{dtype:?}"));
            if dtype == DType::F32 {
                param
            } else {
                // Converted on the host, not by a cast kernel on the device: wgpu has no
                // bf16 kernels (on lavapipe the cast panicked in cubecl's worker and left
                // garbage), and the host conversion is exact. The new tensor is a leaf,
                // tracked again when the parameter was.
                param.map(|t| {
                    let tracked = t.is_require_grad();
                    let device = t.device();
                    let data = t.into_data().convert_dtype(DType::F32);
                    Tensor::from_data(data, &device).set_require_grad(tracked)
                })
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

/// BERT's Hub names and the module paths they load into, as prefixes (an entry without a
/// trailing dot is a whole name). The one table for loading, export and messages.
const BERT_NAMES: [(&str, &str); 4] = [
    ("bert.", "roberta."),
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    (
        "cls.predictions.transform.LayerNorm.",
        "lm_head.layer_norm.",
    ),
    ("cls.predictions.bias", "lm_head.bias"),
];

/// HF's `attention.self` is the module `attention.self_attn` (`self` is a Rust keyword).
const SELF_ATTENTION: (&str, &str) = (".attention.self.", ".attention.self_attn.");

/// A literal name as a regex (names hold letters, digits, `_` and `.`).
fn literal(name: &str) -> String {
    name.replace('.', r"\.")
}

/// Regex (pattern, replacement) pairs renaming each `from` prefix (or whole name) to `to`.
fn prefix_patterns<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(from, to)| {
            let end = if from.ends_with('.') { "" } else { "$" };
            (format!("^{}{end}", literal(from)), to.to_string())
        })
        .collect()
}

/// Module paths -> names as the checkpoint stores them (export), or back (load).
fn name_patterns(bert: bool, to_hub: bool) -> Vec<(String, String)> {
    let swap = |(hub, module): (&'static str, &'static str)| {
        if to_hub { (module, hub) } else { (hub, module) }
    };
    let (from, to) = swap(SELF_ATTENTION);
    let mut patterns = vec![(literal(from), to.to_string())];
    if bert {
        patterns.extend(prefix_patterns(BERT_NAMES.map(swap)));
    }
    patterns
}

/// Module path -> HF name, for messages: users know the HF names.
fn hf_name(path: &str, bert: bool) -> String {
    let name = path
        .replace(SELF_ATTENTION.1, SELF_ATTENTION.0)
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias")
        .replace("layer_norm.gamma", "layer_norm.weight")
        .replace("layer_norm.beta", "layer_norm.bias");
    let renamed = BERT_NAMES
        .iter()
        .filter(|_| bert)
        .find_map(|&(hub, module)| match name.strip_prefix(module) {
            Some(rest) if module.ends_with('.') || rest.is_empty() => Some(format!("{hub}{rest}")),
            _ => None,
        });
    renamed.unwrap_or(name)
}

/// Reads and validates `DIR/config.json`, choosing the model family by its `model_type`.
pub fn read_config(dir: &Path) -> Result<ModelConfig, HubError> {
    let path = config_path(dir)?;
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: Some(path.clone()),
            source,
        })?;
    if let Some(model_type) = value.get("model_type").and_then(|v| v.as_str())
        && Family::of_model_type(model_type).is_none()
    {
        return Err(HubError::UnsupportedModelType {
            path,
            model_type: model_type.to_string(),
        });
    }
    Ok(ModelConfig::from_file(&path)?)
}

/// Loads a `*ForMaskedLM` checkpoint folder of any family onto `device`.
pub fn load_model(
    dir: &Path,
    device: &Device,
) -> Result<(ModelConfig, MaskedLm, LoadReport), HubError> {
    let config = read_config(dir)?;
    check_weights(&config, dir)?;
    let mut model = MaskedLm::new(&config, device)?;
    let report = load_weights(&mut model, dir)?;
    Ok((config, model, report))
}

/// `DIR/config.json` of a Hub folder, or why `dir` is not one.
pub(crate) fn config_path(dir: &Path) -> Result<PathBuf, HubError> {
    if dir.is_file() {
        return Err(HubError::FileNotFolder(dir.to_path_buf()));
    }
    if !dir.is_dir() {
        return Err(HubError::NoFolder(dir.to_path_buf()));
    }
    if let Some(error) = incomplete_checkpoint(dir) {
        return Err(error);
    }
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(HubError::NoConfig(dir.to_path_buf()));
    }
    Ok(path)
}

/// Loads a RoBERTa-family `*ForMaskedLM` checkpoint folder onto `device`.
pub fn load_roberta(
    dir: &Path,
    device: &Device,
) -> Result<(RobertaConfig, RobertaForMaskedLM, LoadReport), HubError> {
    match load_model(dir, device)? {
        (ModelConfig::Roberta(config), MaskedLm::Roberta(model), report) => {
            Ok((config, model, report))
        }
        (config, ..) => Err(HubError::UnsupportedModelType {
            path: dir.join("config.json"),
            model_type: config.family().name().to_string(),
        }),
    }
}

/// Loads the weights of the checkpoint folder `dir` into `model`, whose shapes come from the
/// folder's config.json. Weights stored in f16/bf16/f64 are upcast to f32.
pub fn load_weights(model: &mut MaskedLm, dir: &Path) -> Result<LoadReport, HubError> {
    match model {
        MaskedLm::Roberta(model) => load_roberta_weights(model, dir),
        MaskedLm::ModernBert(model) => load_modernbert_weights(model, dir),
    }
}

/// Applies a weights store to `model`, naming `path` if the file cannot be read.
fn apply_store<M: ModuleSnapshot, S: ModuleStore>(
    model: &mut M,
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

/// [`load_weights`] for the RoBERTa family.
fn load_roberta_weights(
    model: &mut RobertaForMaskedLM,
    dir: &Path,
) -> Result<LoadReport, HubError> {
    let bert = model.roberta.embeddings.absolute_positions;
    let names = WeightNames {
        // The patterns are constants of this crate; a bad one is a bug caught by every test.
        remapper: KeyRemapper::from_patterns(name_patterns(bert, false)).unwrap_or_default(),
        hf_name: &|path| hf_name(path, bert),
        expected_extra: &is_expected_extra,
    };
    read_weights(model, dir, &names)
}

/// How one architecture's module paths relate to the names in its Hub weights files.
pub(crate) struct WeightNames<'a> {
    /// Hub names -> module paths (burn's own `weight`/`gamma` renames and transposes are the
    /// PyTorch adapter's, not this).
    pub remapper: KeyRemapper,
    /// Module path -> Hub name, for messages: users know the Hub names.
    pub hf_name: &'a dyn Fn(&str) -> String,
    /// Module paths (after remapping) that a Hub file may lack or carry beyond the model's.
    pub expected_extra: &'a dyn Fn(&str) -> bool,
}

/// Applies one weights file (safetensors or `pytorch_model.bin`) to `model`, partially: a
/// sharded checkpoint holds each tensor in one of its files.
fn apply_file<M: ModuleSnapshot>(
    model: &mut M,
    file: &Path,
    names: &WeightNames<'_>,
) -> Result<burn::store::ApplyResult, HubError> {
    if file.extension().is_some_and(|e| e == "bin") {
        // PytorchStore applies PyTorchToBurnAdapter itself.
        let store = PytorchStore::from_file(file)
            .remap(names.remapper.clone())
            .validate(false)
            .allow_partial(true);
        apply_store(model, store, file)
    } else {
        let store = SafetensorsStore::from_file(file)
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(names.remapper.clone())
            .validate(false)
            .allow_partial(true);
        apply_store(model, store, file)
    }
}

/// Reads the weights of `dir` into `model`: `model.safetensors`, its shards, or
/// `pytorch_model.bin`, any float dtype, upcast to f32. Missing tensors, wrong shapes and
/// unreadable tensors are errors naming the Hub key and the file; unused tensors are reported.
pub(crate) fn read_weights<M: ModuleSnapshot + burn::module::Module>(
    model: &mut M,
    dir: &Path,
    names: &WeightNames<'_>,
) -> Result<LoadReport, HubError> {
    let hf_name = names.hf_name;
    let weights = weights_of(dir)?;
    // Each file is applied partially; a parameter is missing only when no file held it.
    let mut applied = std::collections::HashSet::new();
    let mut missing = Vec::new();
    let mut unused = Vec::new();
    for (i, file) in weights.files.iter().enumerate() {
        let result = apply_file(model, file, names)?;
        if let Some(error) = result.errors.first() {
            return Err(apply_error(error, file, hf_name));
        }
        if i == 0 {
            missing = result.missing.into_iter().map(|(name, _)| name).collect();
        }
        applied.extend(result.applied);
        unused.extend(result.unused);
    }
    let missing: Vec<String> = missing
        .iter()
        .filter(|name| !applied.contains(*name) && !(names.expected_extra)(name))
        .map(|name| hf_name(name))
        .collect();
    let path = weights.path;
    if !missing.is_empty() {
        return Err(HubError::MissingTensors {
            path,
            names: missing,
        });
    }
    let unexpected = unused
        .iter()
        .filter(|name| !(names.expected_extra)(name.as_str()))
        .map(|name| hf_name(name))
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

/// A tensor that could not be applied, as an error naming its Hub key and `file`.
fn apply_error(error: &ApplyError, file: &Path, hf_name: &dyn Fn(&str) -> String) -> HubError {
    let path = file.to_path_buf();
    match error {
        ApplyError::ShapeMismatch {
            path: name,
            expected,
            found,
        } => HubError::ShapeMismatch {
            path,
            name: hf_name(name),
            expected: expected.to_vec(),
            found: found.to_vec(),
        },
        ApplyError::DTypeMismatch {
            path: name,
            expected,
            found,
        } => HubError::Tensor {
            path,
            name: hf_name(name),
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
            name: hf_name(name),
            reason: message.clone(),
        },
    }
}

/// Tokenizer files copied into an export when present.
pub const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub(crate) fn write_err(path: &Path, reason: impl ToString) -> HubError {
    HubError::Write {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Whether two paths name one existing folder (through symlinks and `..`).
fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Writes `model` as a Hugging Face folder that `AutoModelForMaskedLM.from_pretrained(out)` and
/// `pipeline("fill-mask", model=out)` load: `config.json`, `model.safetensors` with HF names and
/// layouts (the tied decoder is not stored, as transformers itself saves it), and the tokenizer
/// files found in `tokenizer_dir`, which must be another folder than `out`. Write into a
/// [`Staging`] folder to replace an existing export all at once.
pub fn export_model(
    model: &MaskedLm,
    config: &ModelConfig,
    tokenizer_dir: Option<&Path>,
    out: &Path,
) -> Result<(), HubError> {
    match (model, config) {
        (MaskedLm::Roberta(model), ModelConfig::Roberta(config)) => {
            export_roberta(model, config, tokenizer_dir, out)
        }
        (MaskedLm::ModernBert(model), ModelConfig::ModernBert(config)) => {
            export_modernbert(model, config, tokenizer_dir, out)
        }
        (model, config) => Err(HubError::ConfigMismatch {
            path: out.to_path_buf(),
            reason: format!(
                "a {} model cannot be exported with a {} config",
                model.family().name(),
                config.family().name()
            ),
        }),
    }
}

fn export_roberta(
    model: &RobertaForMaskedLM,
    config: &RobertaConfig,
    tokenizer_dir: Option<&Path>,
    out: &Path,
) -> Result<(), HubError> {
    let mut config = config.clone();
    config.architectures = vec![if config.is_bert() {
        "BertForMaskedLM".to_string()
    } else {
        "RobertaForMaskedLM".to_string()
    }];
    let max_tokens = config.max_sequence_length();
    write_folder(
        &config.to_json(),
        max_tokens,
        tokenizer_dir,
        out,
        |weights| write_weights(model, config.is_bert(), weights),
    )
}

/// Writes a Hugging Face folder: `config.json` (the text `config_json`), `model.safetensors`
/// (by `write_weights`, given its path), and the tokenizer files found in `tokenizer_dir`,
/// which must be another folder than `out`, their `model_max_length` capped at `max_tokens`.
pub(crate) fn write_folder(
    config_json: &str,
    max_tokens: usize,
    tokenizer_dir: Option<&Path>,
    out: &Path,
    write_weights: impl FnOnce(&Path) -> Result<(), HubError>,
) -> Result<(), HubError> {
    if let Some(from) = tokenizer_dir.filter(|dir| same_folder(dir, out)) {
        return Err(HubError::SameFolder {
            out: out.to_path_buf(),
            from: from.to_path_buf(),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    let config_path = out.join("config.json");
    std::fs::write(&config_path, config_json.to_string() + "\n")
        .map_err(|e| write_err(&config_path, e))?;
    let weights = out.join("model.safetensors");
    write_weights(&weights)?;
    // burn-store publishes safetensors' own temporary file, created 0600; an export is meant
    // to be shared, so it takes config.json's mode: a new file's, 0666 less the umask.
    std::fs::metadata(&config_path)
        .and_then(|m| std::fs::set_permissions(&weights, m.permissions()))
        .map_err(|e| write_err(&weights, e))?;
    if let Some(dir) = tokenizer_dir {
        for file in TOKENIZER_FILES {
            let from = dir.join(file);
            let to = out.join(file);
            if file == "tokenizer_config.json" && from.is_file() {
                let text = capped_tokenizer_config(&from, max_tokens)?;
                std::fs::write(&to, text).map_err(|e| write_err(&to, e))?;
            } else if from.is_file() {
                std::fs::copy(&from, &to).map_err(|e| write_err(&to, e))?;
            }
        }
    }
    Ok(())
}

/// `tokenizer_config.json` with `model_max_length` at most `max_tokens`, the longest input the
/// model's position table takes. Tokenizers trained or saved without one carry transformers'
/// "unlimited" 1e30, so the exported model's fill-mask pipeline would not truncate a long text
/// and fail inside the model instead.
fn capped_tokenizer_config(path: &Path, max_tokens: usize) -> Result<String, HubError> {
    let text = std::fs::read_to_string(path).map_err(|e| HubError::TokenizerConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| HubError::TokenizerConfig {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
    let Some(object) = value.as_object_mut() else {
        return Err(HubError::TokenizerConfig {
            path: path.to_path_buf(),
            reason: "not a JSON object".to_string(),
        });
    };
    let fits = object
        .get("model_max_length")
        .and_then(serde_json::Value::as_f64)
        .is_some_and(|n| n <= max_tokens as f64);
    if fits {
        return Ok(text);
    }
    object.insert("model_max_length".to_string(), max_tokens.into());
    Ok(format!("{value:#}\n"))
}

/// `model.safetensors` with HF names and layouts.
fn write_weights(model: &RobertaForMaskedLM, bert: bool, path: &Path) -> Result<(), HubError> {
    let remapper = KeyRemapper::from_patterns(name_patterns(bert, true)).unwrap_or_default();
    save_safetensors(model, remapper, path)
}

/// Writes `model` as `path` (safetensors) with PyTorch layouts and the names `remapper` gives,
/// and the `format: pt` metadata transformers requires.
pub(crate) fn save_safetensors<M: ModuleSnapshot>(
    model: &M,
    remapper: KeyRemapper,
    path: &Path,
) -> Result<(), HubError> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .remap(remapper)
        .clear_metadata()
        // transformers refuses safetensors files whose metadata lacks format "pt".
        .metadata("format", "pt")
        .overwrite(true);
    model.save_into(&mut store).map_err(|e| write_err(path, e))
}

/// A folder built beside its destination and moved into it once complete, so that a failed
/// or interrupted write leaves the destination as it was, and two writers never mix their
/// files (each publishes a whole set; hold the destination's lock around build and publish).
pub struct Staging {
    dir: tempfile::TempDir,
    out: PathBuf,
}

impl Staging {
    /// A new, empty staging folder beside `out` (on its filesystem, so publishing renames).
    pub fn new(out: &Path) -> Result<Self, HubError> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = out
            .file_name()
            .ok_or_else(|| write_err(out, "not a folder name"))?;
        std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{}.partial-", name.to_string_lossy()))
            .tempdir_in(parent)
            .map_err(|e| write_err(parent, e))?;
        Ok(Self {
            dir,
            out: out.to_path_buf(),
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Moves every file into the destination, replacing files of the same name, config.json
    /// last: loaders look for it first, so a new folder is not taken for complete before it is.
    pub fn publish(self) -> Result<(), HubError> {
        let entries = std::fs::read_dir(self.path()).map_err(|e| write_err(self.path(), e))?;
        let mut names = entries
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| write_err(self.path(), e))?;
        names.sort_by_key(|name| name == "config.json");
        for name in names {
            let to = self.out.join(&name);
            std::fs::rename(self.path().join(&name), &to).map_err(|e| write_err(&to, e))?;
        }
        // Persist the renames; a folder that cannot be opened for syncing is harmless.
        if let Ok(dir) = std::fs::File::open(&self.out) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}
