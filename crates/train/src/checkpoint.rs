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
//! Reading one back (pointer resolution, checksums, the weights) is `masklm_infer::checkpoint`'s,
//! which also defines the manifest this module writes.
//!
//! A checkpoint is built in a hidden temporary folder, each file fsynced, then renamed into
//! place; `checkpoints/latest` and `checkpoints/best` name the newest and the best one and are
//! replaced atomically too. A crash at any moment leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::store::BurnpackStore;
use masklm_infer::checkpoint::{CHECKPOINT_VERSION, Manifest, pointer};
pub(crate) use masklm_infer::checkpoint::{
    checkpoints_dir, is_checkpoint, latest_checkpoint, resolve_checkpoint, sha256_file,
    verify_checkpoint,
};
use masklm_model::{MaskedLm, ModelConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TrainError;
use crate::policy::{CheckpointPolicy, step_number};
/// Where training stands: everything besides weights and optimizer that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Training samples consumed (the data position: resuming does not replay data).
    pub samples_seen: u64,
    /// Real (non-padding) training tokens consumed; 0 in checkpoints written before it was
    /// counted.
    #[serde(default)]
    pub tokens_seen: u64,
    /// Best validation perplexity so far, and its step.
    pub best_perplexity: Option<f64>,
    pub best_step: Option<usize>,
    /// The run's seed (masks, shuffling and dropout derive from it and the step).
    pub seed: u64,
    pub total_steps: usize,
    /// f16 mixed precision: the loss scaler (absent in f32/bf16 runs and older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::LossScaler>,
    /// SHA-256 of the tokenizer.json the run trains with (checked on resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_hash: Option<String>,
    /// SHA-256 of the token cache's manifest.json (checked on resume: the data must not
    /// change under a running experiment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hash: Option<String>,
    /// The eval set `best_perplexity` refers to (`[eval] best`; absent: "validation").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_set: Option<String>,
    /// Evaluations in a row without an improvement larger than `eval.min_delta` (early
    /// stopping's patience counter).
    #[serde(default)]
    pub evals_without_improvement: usize,
    /// Tokens each `[data] sources` entry has fed so far (empty for single-source runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_tokens: Vec<u64>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    masklm_data::write_synced(path, bytes).map_err(io(path))
}

fn sync_dir(dir: &Path) {
    // Persist the rename itself; not all platforms can open a directory, which is harmless.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn to_json(value: &impl Serialize, path: &Path) -> Result<String, TrainError> {
    serde_json::to_string_pretty(value)
        .map(|text| text + "\n")
        .map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {e}"),
        })
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

/// The files every checkpoint holds: without any of them it cannot be loaded for fill-mask,
/// evaluated, exported or resumed.
pub const REQUIRED_FILES: [&str; 5] = [
    "model.bpk",
    "optimizer.bpk",
    "config.json",
    "tokenizer.json",
    "state.json",
];

/// The tokenizer a run trains with, held in memory for the run's whole life.
///
/// Every checkpoint is written from these bytes, never copied from a folder: the folder a
/// resumed run read its tokenizer from is itself a checkpoint that rotation deletes.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// (file name, contents): tokenizer.json always, then whichever of tokenizer_config.json
    /// and special_tokens_map.json the source folder has.
    files: Vec<(&'static str, Vec<u8>)>,
}

impl TokenizerFiles {
    /// Reads the tokenizer files of `dir`, which must be the tokenizer whose tokenizer.json
    /// hashes to `hash` (the one the run loaded: a file changed in between is refused).
    pub fn read(dir: &Path, hash: &str) -> Result<Self, TrainError> {
        let mut files = Vec::with_capacity(masklm_hub::TOKENIZER_FILES.len());
        for file in masklm_hub::TOKENIZER_FILES {
            let path = dir.join(file);
            match std::fs::read(&path) {
                Ok(bytes) => files.push((file, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != "tokenizer.json" => {}
                Err(source) => return Err(TrainError::Io { path, source }),
            }
        }
        let read_hash = files
            .first()
            .map(|(_, bytes)| format!("{:x}", Sha256::digest(bytes)));
        if read_hash.as_deref() != Some(hash) {
            return Err(TrainError::Checkpoint {
                path: dir.join("tokenizer.json"),
                reason: "changed while the run was opening it; start again".to_string(),
            });
        }
        Ok(Self { files })
    }
}

/// Refuses a checkpoint folder that lacks one of [`REQUIRED_FILES`]: at save time, so that no
/// checkpoint that cannot be loaded is ever named by `latest` or `best`.
fn check_complete(dir: &Path) -> Result<(), TrainError> {
    let missing: Vec<&str> = REQUIRED_FILES
        .into_iter()
        .filter(|file| !dir.join(file).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason: format!(
            "incomplete checkpoint: no {}; this is a masklm bug, please report it",
            missing.join(", ")
        ),
    })
}

/// Writes a checkpoint of `model` and `optimizer` at `state.step` and points `latest` to it.
pub fn save_checkpoint(
    run_dir: &Path,
    model: &MaskedLm,
    optimizer: &ModuleOptimizer,
    config: &ModelConfig,
    tokenizer: &TokenizerFiles,
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
        .save_weights_into(&mut store)
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
    for (file, bytes) in &tokenizer.files {
        write_synced(&tmp.join(file), bytes)?;
    }
    let state_text = to_json(state, &tmp.join("state.json"))?;
    write_synced(&tmp.join("state.json"), state_text.as_bytes())?;
    check_complete(&tmp)?;

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
    let manifest_text = to_json(&manifest, &tmp.join("manifest.json"))?;
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
        .ok_or_else(|| TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: "not a checkpoint folder name".to_string(),
        })?;
    write_atomic(&checkpoints_dir(run_dir).join("best"), &name)
}

/// Deletes the step folders `policy` gives up (see [`CheckpointPolicy::to_delete`]).
pub fn rotate(run_dir: &Path, policy: &CheckpointPolicy) -> Result<(), TrainError> {
    let root = checkpoints_dir(run_dir);
    let existing: Vec<String> = std::fs::read_dir(&root)
        .map_err(io(&root))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let best = pointer(run_dir, "best");
    let latest = pointer(run_dir, "latest");
    for name in policy.to_delete(&existing, best.as_deref(), latest.as_deref()) {
        let path = root.join(name);
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The `step-*` checkpoint folders of a run, newest (highest step) first.
pub fn step_checkpoints(run_dir: &Path) -> Vec<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((step_number(&e.file_name().to_string_lossy())?, e.path())))
        .filter(|(_, p)| p.is_dir())
        .collect();
    steps.sort();
    steps.into_iter().rev().map(|(_, p)| p).collect()
}

/// Whether the run folder holds any checkpoint (a pointer or a step folder).
pub fn has_checkpoints(run_dir: &Path) -> bool {
    latest_checkpoint(run_dir).is_some() || !step_checkpoints(run_dir).is_empty()
}

/// The checkpoint to resume `run_dir` from, and what was passed over on the way.
///
/// `from` (`step-0000100`, or a path) picks one explicitly; it must verify. Otherwise the
/// `latest` pointer's checkpoint, or, when that is missing or fails its checksums, the newest
/// `step-*` folder that verifies.
pub fn resume_checkpoint(
    run_dir: &Path,
    from: Option<&str>,
) -> Result<(PathBuf, Vec<String>), TrainError> {
    if let Some(from) = from {
        let named = checkpoints_dir(run_dir).join(from);
        let path = if named.exists() {
            resolve_checkpoint(&named)
        } else {
            PathBuf::from(from)
        };
        if is_checkpoint(&path) && !belongs_to(&path, run_dir) {
            return Err(TrainError::Resume(format!(
                "--from {from}: {} is not a checkpoint of {}; --resume continues a run from one \
                 of its own checkpoints. To continue from another run's weights, start a new run \
                 with model.init_from = \"{}\"",
                path.display(),
                run_dir.display(),
                path.display()
            )));
        }
        if !is_checkpoint(&path) {
            let have: Vec<String> = step_checkpoints(run_dir)
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(TrainError::Resume(format!(
                "--from {from}: no checkpoint {} (this run has: {})",
                path.display(),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        verify_checkpoint(&path)?;
        return Ok((path, Vec::new()));
    }
    let mut passed = Vec::new();
    let latest = latest_checkpoint(run_dir);
    match &latest {
        None => passed.push(format!(
            "{} is missing; looking for the newest valid step folder",
            checkpoints_dir(run_dir).join("latest").display()
        )),
        Some(path) => match verify_checkpoint(path) {
            Ok(()) => return Ok((path.clone(), passed)),
            Err(e) => passed.push(format!("skipped {}: {e}", path.display())),
        },
    }
    for path in step_checkpoints(run_dir) {
        if Some(&path) == latest.as_ref() {
            continue;
        }
        match verify_checkpoint(&path) {
            Ok(()) => return Ok((path, passed)),
            Err(e) => passed.push(format!("skipped {}: {e}", path.display())),
        }
    }
    Err(TrainError::Resume(format!(
        "{} has no valid checkpoint to resume from{}",
        run_dir.display(),
        if passed.is_empty() {
            String::new()
        } else {
            format!(" ({})", passed.join("; "))
        }
    )))
}

/// Whether `checkpoint` is a step folder of `run_dir` (the same folder, however spelled).
fn belongs_to(checkpoint: &Path, run_dir: &Path) -> bool {
    let parent = checkpoint.canonicalize().ok();
    let parent = parent.as_deref().and_then(Path::parent);
    let own = checkpoints_dir(run_dir).canonicalize().ok();
    parent.is_some() && parent == own.as_deref()
}

/// The step folders of `run_dir` past `step`: what a resume from an earlier checkpoint would
/// leave behind, and rotation would later rank above the new branch's checkpoints.
pub fn later_checkpoints(run_dir: &Path, step: usize) -> Vec<PathBuf> {
    step_checkpoints(run_dir)
        .into_iter()
        .filter(|path| {
            path.file_name()
                .and_then(|n| step_number(&n.to_string_lossy()))
                .is_some_and(|n| n > step)
        })
        .collect()
}

/// Starts a new branch of a run at `checkpoint` (step `state.step`): moves the step folders
/// past it into `archive`/checkpoints (kept, not deleted: they are work a user may want back)
/// and repoints `latest` to `checkpoint` and `best` to the best checkpoint as of that step
/// (when that folder no longer exists, the pointer is removed and `state`'s best record
/// starts afresh, so the branch's next evaluation writes one). Returns what a user should be
/// told.
pub fn start_branch(
    run_dir: &Path,
    checkpoint: &Path,
    state: &mut TrainState,
    archive: &Path,
) -> Result<Vec<String>, TrainError> {
    let mut notices = Vec::new();
    let later = later_checkpoints(run_dir, state.step);
    if !later.is_empty() {
        let moved = archive.join("checkpoints");
        std::fs::create_dir_all(&moved).map_err(io(&moved))?;
        for path in &later {
            let Some(name) = path.file_name() else {
                continue;
            };
            std::fs::rename(path, moved.join(name)).map_err(io(path))?;
        }
        notices.push(format!(
            "resuming at step {} of a run that went on to {}: its {} later checkpoint(s) moved \
             to {}",
            state.step,
            later
                .first()
                .and_then(|p| p.file_name())
                .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
            later.len(),
            moved.display()
        ));
    }
    let root = checkpoints_dir(run_dir);
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if pointer(run_dir, "latest").as_deref() != Some(name.as_str()) {
        write_atomic(&root.join("latest"), &name)?;
    }
    let best = state
        .best_step
        .map(|step| format!("step-{step:07}"))
        .filter(|best| root.join(best).is_dir());
    match best {
        Some(best) if pointer(run_dir, "best").as_deref() != Some(best.as_str()) => {
            write_atomic(&root.join("best"), &best)?;
        }
        Some(_) => {}
        None => {
            let best_path = root.join("best");
            if best_path.is_file() {
                std::fs::remove_file(&best_path).map_err(io(&best_path))?;
            }
            if let Some(step) = state.best_step.take() {
                notices.push(format!(
                    "the best checkpoint as of step {} (step {step}) no longer exists; `best` \
                     will name the branch's next evaluation",
                    state.step
                ));
                state.best_perplexity = None;
            }
        }
    }
    Ok(notices)
}

/// Reads a checkpoint's training state (step, seed, best so far, hashes).
pub fn load_state(dir: &Path) -> Result<TrainState, TrainError> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// Loads a checkpoint's optimizer state into `optimizer`.
pub fn load_optimizer(
    dir: &Path,
    optimizer: ModuleOptimizer,
) -> Result<ModuleOptimizer, TrainError> {
    let path = dir.join("optimizer.bpk");
    optimizer.load(&path).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        reason: format!("{e:?}"),
    })
}
