//! Reading masklm checkpoints: where a path a user gives really points, and whether the folder
//! is whole (its manifest's checksums). Writing them (save, rotation, optimizer state) is the
//! trainer's (`masklm_train::checkpoint`), which writes the [`Manifest`] defined here.
//!
//! `RUN_DIR/checkpoints/step-0000100/` holds `model.bpk`, `optimizer.bpk`, `config.json`, the
//! tokenizer files, `state.json` and `manifest.json` (format version and the SHA-256 of every
//! other file, written last); `checkpoints/latest` and `checkpoints/best` are one-line files
//! naming a step folder.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::store::BurnpackStore;
use burn::tensor::Device;
use masklm_model::{MaskedLm, ModelConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::InferError;

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;

/// `manifest.json`: the layout version and the SHA-256 of every other file of the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: usize,
    /// File name -> SHA-256 (hex).
    pub files: BTreeMap<String, String>,
}

/// The SHA-256 of a file, streamed (checkpoints of large models do not fit in memory twice).
pub fn sha256_file(path: &Path) -> Result<String, InferError> {
    let io = |source| InferError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The step folder name a `latest`/`best` pointer holds.
pub fn pointer(run_dir: &Path, which: &str) -> Option<String> {
    std::fs::read_to_string(checkpoints_dir(run_dir).join(which))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The newest checkpoint of a run, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    pointer(run_dir, "latest").map(|name| checkpoints_dir(run_dir).join(name))
}

/// Where a checkpoint path given by a user really is: a `latest`/`best` pointer file, or a run
/// folder (its latest checkpoint), become the step folder they name; anything else is kept.
pub fn resolve_checkpoint(path: &Path) -> PathBuf {
    if path.is_file()
        && let Some(name) = path.file_name().and_then(|n| n.to_str())
        && matches!(name, "latest" | "best")
        && let Ok(target) = std::fs::read_to_string(path)
        && let Some(dir) = path.parent()
    {
        return dir.join(target.trim());
    }
    if path.is_dir()
        && checkpoints_dir(path).join("latest").is_file()
        && let Some(latest) = latest_checkpoint(path)
    {
        return latest;
    }
    path.to_path_buf()
}

/// Checks a checkpoint folder's manifest and checksums.
pub fn verify_checkpoint(dir: &Path) -> Result<(), InferError> {
    let manifest_path = dir.join("manifest.json");
    let corrupt = |path: &Path, reason: String| InferError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        corrupt(
            &manifest_path,
            format!(
                "{e}; the checkpoint is incomplete: resume from an earlier one with \
                 `masklm train --resume RUN --from step-N` (or without --from: the newest valid one)"
            ),
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
                "checksum mismatch: the file is truncated or was modified; resume from an earlier \
                 checkpoint with `masklm train --resume RUN --from step-N` (or without --from: \
                 the newest valid one)"
                    .to_string(),
            ));
        }
    }
    Ok(())
}

/// Whether `dir` is a masklm checkpoint folder.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("model.bpk").is_file() && dir.join("manifest.json").is_file()
}

/// Verifies a checkpoint and reads its config.json.
pub(crate) fn read_config(dir: &Path) -> Result<ModelConfig, InferError> {
    verify_checkpoint(dir)?;
    ModelConfig::from_file(&dir.join("config.json")).map_err(config_error)
}

/// The model of `config` with a checkpoint's weights (and their parameter ids, so that the
/// optimizer state a resumed run loads matches them).
pub(crate) fn load_weights(
    dir: &Path,
    config: &ModelConfig,
    device: &Device,
) -> Result<MaskedLm, InferError> {
    let mut model = MaskedLm::new(config, device).map_err(config_error)?;
    let path = dir.join("model.bpk");
    let mut store = BurnpackStore::from_file(&path);
    model
        .load_weights_from(&mut store)
        .map_err(|e| InferError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(model)
}

/// A checkpoint's config.json describes no model this masklm can build.
pub(crate) fn config_error(error: masklm_model::ConfigError) -> InferError {
    InferError::ModelConfig {
        key: "config.json".to_string(),
        error,
    }
}
