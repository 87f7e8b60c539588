//! Checkpoints: written atomically, verified by checksums, rotated.
//!
//! `RUN_DIR/checkpoints/step-0000100/` holds:
//!
//! | file | contents |
//! |---|---|
//! | `model.bpk` | weights (burnpack, with parameter ids so the optimizer state matches) |
//! | `optimizer.bpk` | AdamW moments and step counts |
//! | `config.json` | the HF model config |
//! | `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` | the tokenizer |
//! | `state.json` | step, samples seen, best validation perplexity, seeds |
//! | `manifest.json` | format version and the SHA-256 of every file above, written last |
//!
//! A checkpoint is built in a hidden temporary folder, each file fsynced, then renamed into
//! place; `checkpoints/latest` and `checkpoints/best` name the newest and the best one and are
//! replaced atomically too. A crash at any moment leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;
use masklm_model::{RobertaConfig, RobertaForMaskedLM};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TrainError;

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;
/// Where training stands: everything besides weights and optimizer that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Training samples consumed (the data position: resuming does not replay data).
    pub samples_seen: u64,
    /// Best validation perplexity so far, and its step.
    pub best_perplexity: Option<f64>,
    pub best_step: Option<usize>,
    /// The run's seed (masks, shuffling and dropout derive from it and the step).
    pub seed: u64,
    pub total_steps: usize,
    /// f16 mixed precision: the loss scaler (absent in f32/bf16 runs and older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::LossScaler>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    step: usize,
    files: BTreeMap<String, String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn sha256_file(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn sync_dir(dir: &Path) {
    // Persist the rename itself; not all platforms can open a directory, which is harmless.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Replaces `path` with `text` atomically.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint of `model` and `optimizer` at `state.step` and points `latest` to it.
pub fn save_checkpoint(
    run_dir: &Path,
    model: &RobertaForMaskedLM,
    optimizer: &ModuleOptimizer,
    config: &RobertaConfig,
    tokenizer_dir: &Path,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:07}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let model_path = tmp.join("model.bpk");
    let mut store = BurnpackStore::from_file(&model_path).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| TrainError::Checkpoint {
            path: model_path.clone(),
            reason: e.to_string(),
        })?;
    let optimizer_path = tmp.join("optimizer.bpk");
    optimizer
        .save(&optimizer_path)
        .map_err(|e| TrainError::Checkpoint {
            path: optimizer_path.clone(),
            reason: format!("{e:?}"),
        })?;
    for path in [&model_path, &optimizer_path] {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
    }
    write_synced(
        &tmp.join("config.json"),
        (config.to_json() + "\n").as_bytes(),
    )?;
    for file in masklm_hub::TOKENIZER_FILES {
        let from = tokenizer_dir.join(file);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(io(&from))?;
            write_synced(&tmp.join(file), &bytes)?;
        }
    }
    let state_text = serde_json::to_string_pretty(state).unwrap_or_default() + "\n";
    write_synced(&tmp.join("state.json"), state_text.as_bytes())?;

    let mut files = BTreeMap::new();
    let mut names: Vec<String> = std::fs::read_dir(&tmp)
        .map_err(io(&tmp))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    for file in names {
        files.insert(file.clone(), sha256_file(&tmp.join(&file))?);
    }
    let manifest = Manifest {
        format_version: CHECKPOINT_VERSION,
        step: state.step,
        files,
    };
    let manifest_text = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
    write_synced(&tmp.join("manifest.json"), manifest_text.as_bytes())?;
    sync_dir(&tmp);

    let final_dir = root.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(&root);
    write_atomic(&root.join("latest"), &name)?;
    Ok(final_dir)
}

/// Marks `name` as the best checkpoint.
pub fn mark_best(run_dir: &Path, checkpoint: &Path) -> Result<(), TrainError> {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_atomic(&checkpoints_dir(run_dir).join("best"), &name)
}

fn pointer(run_dir: &Path, which: &str) -> Option<String> {
    std::fs::read_to_string(checkpoints_dir(run_dir).join(which))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Deletes all but the newest `keep_last` checkpoints and the best one.
pub fn rotate(run_dir: &Path, keep_last: usize) -> Result<(), TrainError> {
    let root = checkpoints_dir(run_dir);
    let mut steps: Vec<String> = std::fs::read_dir(&root)
        .map_err(io(&root))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    let keep: Vec<String> = steps
        .iter()
        .rev()
        .take(keep_last.max(1))
        .cloned()
        .chain(pointer(run_dir, "best"))
        .chain(pointer(run_dir, "latest"))
        .collect();
    for name in steps.iter().filter(|n| !keep.contains(n)) {
        let path = root.join(name);
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The newest checkpoint of a run, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    pointer(run_dir, "latest").map(|name| checkpoints_dir(run_dir).join(name))
}

/// Checks a checkpoint folder's manifest and checksums.
pub fn verify_checkpoint(dir: &Path) -> Result<(), TrainError> {
    let manifest_path = dir.join("manifest.json");
    let corrupt = |path: &Path, reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        corrupt(
            &manifest_path,
            format!("{e}; the checkpoint is incomplete: use an earlier one"),
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| corrupt(&manifest_path, format!("unreadable manifest: {e}")))?;
    if manifest.format_version != CHECKPOINT_VERSION {
        return Err(corrupt(
            &manifest_path,
            format!(
                "checkpoint format {} but this masklm reads {CHECKPOINT_VERSION}; use the masklm version that wrote it",
                manifest.format_version
            ),
        ));
    }
    for (file, sum) in &manifest.files {
        let path = dir.join(file);
        let actual = sha256_file(&path)?;
        if &actual != sum {
            return Err(corrupt(
                &path,
                "checksum mismatch: the file is truncated or was modified; use an earlier checkpoint".to_string(),
            ));
        }
    }
    Ok(())
}

/// Whether `dir` is a masklm checkpoint folder.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("model.bpk").is_file() && dir.join("manifest.json").is_file()
}

/// Loads a checkpoint's model (with its parameter ids) onto `device`.
pub fn load_model(
    dir: &Path,
    device: &Device,
    adjust: impl FnOnce(&mut RobertaConfig),
) -> Result<(RobertaConfig, RobertaForMaskedLM), TrainError> {
    verify_checkpoint(dir)?;
    let mut config =
        RobertaConfig::from_file(&dir.join("config.json")).map_err(|e| TrainError::Config {
            key: "config.json".to_string(),
            reason: e.to_string(),
        })?;
    adjust(&mut config);
    let mut model = RobertaForMaskedLM::new(&config, device).map_err(|e| TrainError::Config {
        key: "config.json".to_string(),
        reason: e.to_string(),
    })?;
    let path = dir.join("model.bpk");
    let mut store = BurnpackStore::from_file(&path);
    model
        .load_from(&mut store)
        .map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok((config, model))
}

/// Loads a checkpoint's optimizer state into `optimizer` and its training state.
pub fn load_optimizer_and_state(
    dir: &Path,
    optimizer: ModuleOptimizer,
) -> Result<(ModuleOptimizer, TrainState), TrainError> {
    let path = dir.join("optimizer.bpk");
    let optimizer = optimizer.load(&path).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        reason: format!("{e:?}"),
    })?;
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    Ok((optimizer, state))
}
