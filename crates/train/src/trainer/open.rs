//! Opening a run: every refusal first, then the setup.
//!
//! [`Run::open`] reads (the checkpoint to resume, its state, the tokenizer, the data, the
//! model) and refuses what cannot go on before it writes anything into the run folder: a
//! refused `--resume --set ...` leaves config.toml, the checkpoints and the logs as they were.
//! Only token caches may be prepared before the last check (they are shared, keyed by their
//! inputs and settings, and reused by the next attempt).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use masklm_data::{
    DataError, FolderLock, MlmTokenizer, NoProgress, Packing, PrepareOptions, Rebuild, SplitReader,
    StepSampler, Validation, load_tokenizer, lock_folder, prepare, prepare_with, read_manifest,
};
use masklm_hub::Need;
use masklm_model::{MaskedLm, ModelConfig};

use super::logs::Logs;
use super::{EvalSet, Observer, Run, RunInfo, Start};
use masklm_infer::Source;
use masklm_infer::eval::EvalSettings;
use masklm_infer::probes::load_probes_from;

use crate::checkpoint::{
    TokenizerFiles, TrainState, has_checkpoints, later_checkpoints, load_optimizer, load_state,
    resolve_checkpoint, resume_checkpoint, sha256_file, start_branch, write_atomic,
};
use crate::config::VALIDATION;
use crate::policy::CheckpointPolicy;
use crate::{TrainConfig, TrainError};

/// The checkpoint a resumed run continues from, and its state.
struct Resume {
    checkpoint: PathBuf,
    state: TrainState,
}

/// The run's data: one training split per source, the held-out sets, and what identifies them.
struct Data {
    caches: Vec<SourceCache>,
    manifests: Vec<masklm_data::Manifest>,
    train_splits: Vec<SplitReader>,
    eval_sets: Vec<EvalSet>,
    /// The eval set that picks `best` and drives early stopping.
    tracked: String,
    /// The cache folder shown to the user.
    cache: PathBuf,
    cache_hash: String,
}

impl<'a> Run<'a> {
    /// Opens the run in `run_dir`: checks, then setup (see the module doc).
    pub(super) fn open(
        config: &'a TrainConfig,
        run_dir: &Path,
        start: &Start,
        device: &Device,
        observer: &dyn Observer,
    ) -> Result<Self, TrainError> {
        let lock = lock_run(run_dir)?;
        let resume = choose_start(config, run_dir, start, observer)?;
        let (tokenizer, tokenizer_files) = open_tokenizer(config, resume.as_ref(), observer)?;
        check_precision(config, device)?;
        let data = Data::open(config, &tokenizer, run_dir, resume.is_some(), observer)?;
        let mut state = match resume.as_ref() {
            Some(resume) => {
                check_resume_state(&resume.state, config, &tokenizer, &data)?;
                resume.state.clone()
            }
            None => TrainState::new(config.seed),
        };
        state.tokenizer_hash = Some(tokenizer.hash.clone());
        state.cache_hash = Some(data.cache_hash.clone());
        follow_tracked_set(&mut state, &data.tracked, observer);
        check_patience(&state, config, run_dir, &data.tracked)?;
        let train_examples: usize = data.train_splits.iter().map(SplitReader::len).sum();
        // Packing documents: rows as wide as the widest source's examples.
        let row_tokens = (config.data.packing == Packing::Documents).then(|| {
            data.manifests
                .iter()
                .map(|m| m.options.max_seq_length)
                .max()
                .unwrap_or(config.data.max_seq_length)
        });
        let mut sampler = StepSampler::mixed(
            data.train_splits.iter().map(SplitReader::len).collect(),
            &data.caches.iter().map(|c| c.weight).collect::<Vec<_>>(),
            config.training.batch_size,
            config.training.grad_accum_steps,
            config.seed,
        )
        .with_length_grouping(config.training.group_by_length)
        .with_packing(row_tokens)
        .with_batch_size_warmup(config.training.batch_size_warmup());
        let splits: Vec<&SplitReader> = data.train_splits.iter().collect();
        let planned = state.total_steps;
        state.total_steps = total_steps(config, train_examples, &mut sampler, &splits);
        if resume.is_some() {
            check_wsd_length(config, state.step, planned, state.total_steps)?;
        }
        if let Some(note) = wsd_overlap(config, state.total_steps) {
            observer.on_notice(&note);
        }
        check_unfinished(&state, run_dir)?;
        let ad_device = device.clone().autodiff();
        let (model_config, model, optimizer) =
            open_model(config, &tokenizer, resume.as_ref(), &ad_device)?;
        check_model_fits(&data, &model_config)?;
        check_step_memory(config, &data, &model_config)?;
        let probes = match &config.eval.probes {
            Some(path) => {
                let max_len = model_config.max_sequence_length();
                let (probes, notices) = load_probes_from(path, &tokenizer, max_len, "eval.probes")?;
                for notice in notices {
                    observer.on_notice(&notice);
                }
                Some((probes, tokenizer.clone()))
            }
            None => None,
        };

        // Setup: from here on the run folder is written.
        let archive = match &resume {
            Some(resume) => begin_branch(run_dir, resume, &mut state, observer)?,
            None => None,
        };
        write_atomic(&run_dir.join("config.toml"), &config.to_toml()?)?;
        for cache in &data.caches {
            record_user(&cache.dir, run_dir)?;
        }
        if data.caches.len() > 1 && state.source_tokens.len() != data.caches.len() {
            state.source_tokens = vec![0; data.caches.len()];
        }
        observer.on_start(&RunInfo {
            start_step: state.step,
            total_steps: state.total_steps,
            train_examples,
            validation_examples: data
                .eval_sets
                .iter()
                .find(|(name, _)| name == VALIDATION)
                .map_or(0, |(_, splits)| splits.iter().map(SplitReader::len).sum()),
            parameters: model.num_params(),
            cache: data.cache.clone(),
            cache_reused: data.caches.iter().all(|c| c.reused),
            resumed_from: resume.as_ref().map(|r| r.checkpoint.clone()),
        });
        let logs = Logs::open(
            run_dir,
            config.logging.tensorboard,
            resume.as_ref().map(|_| state.step),
            archive.as_deref(),
        )?;
        let batch_size = config.training.batch_size;
        let eval_settings = EvalSettings {
            masking: config.masking.clone(),
            seed: config.eval.seed,
            batch_size: if config.eval.batch_size > 0 {
                config.eval.batch_size
            } else {
                batch_size
            },
            max_batches: config.eval.max_batches,
        };
        let resumed_name = resume
            .as_ref()
            .and_then(|r| r.checkpoint.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        Ok(Self {
            config,
            dir: run_dir.to_path_buf(),
            device: device.clone(),
            ad_device,
            vocab: tokenizer.mask_vocab()?,
            tokenizer: tokenizer_files,
            sampler,
            train_splits: data.train_splits,
            source_names: data.caches.iter().map(|c| c.name.clone()).collect(),
            eval_sets: data.eval_sets,
            tracked: data.tracked,
            probes,
            model_config,
            model: Some(model.with_gradient_checkpointing(config.training.gradient_checkpointing)),
            optimizer,
            total_steps: state.total_steps,
            state,
            eval_settings,
            logs,
            window: (0, Instant::now()),
            skipped_in_row: 0,
            policy: CheckpointPolicy::new(
                config.checkpoint.save_steps,
                config.checkpoint.keep_last,
                resumed_name,
            ),
            _lock: lock,
        })
    }
}

/// Locks the run folder (a second process on it is refused).
fn lock_run(run_dir: &Path) -> Result<FolderLock, TrainError> {
    if run_dir.is_file() {
        return Err(TrainError::Config {
            key: "--out".to_string(),
            reason: format!("{} is a file; give a folder for the run", run_dir.display()),
        });
    }
    Ok(lock_folder(run_dir, "run")?)
}

/// A new run needs a folder without checkpoints; a resumed one, a checkpoint to continue from
/// (its state read, not yet loaded) and a config whose frozen keys match the run's.
fn choose_start(
    config: &TrainConfig,
    run_dir: &Path,
    start: &Start,
    observer: &dyn Observer,
) -> Result<Option<Resume>, TrainError> {
    match start {
        Start::New if has_checkpoints(run_dir) => Err(TrainError::Resume(format!(
            "{} already holds a run; continue it with --resume {0}, or choose another --out",
            run_dir.display()
        ))),
        Start::New => Ok(None),
        Start::Resume { from } => {
            let (checkpoint, passed) = resume_checkpoint(run_dir, from.as_deref())?;
            for note in passed {
                observer.on_notice(&note);
            }
            check_resume_config(run_dir, config)?;
            let state = load_state(&checkpoint)?;
            Ok(Some(Resume { checkpoint, state }))
        }
    }
}

/// The tokenizer the run trains with, and its files, held in memory for every checkpoint.
///
/// A resumed run takes its checkpoint's. A checkpoint written by a masklm before 2026-12 may
/// lack them (it copied them from the checkpoint it resumed from, which rotation had deleted):
/// then the run's `data.tokenizer` is used when it is byte for byte the tokenizer the run
/// trained with (the state records its hash), and refused otherwise.
fn open_tokenizer(
    config: &TrainConfig,
    resume: Option<&Resume>,
    observer: &dyn Observer,
) -> Result<(MlmTokenizer, TokenizerFiles), TrainError> {
    let dir = match resume {
        Some(resume) if resume.checkpoint.join("tokenizer.json").is_file() => {
            resume.checkpoint.clone()
        }
        Some(resume) => {
            let dir = tokenizer_dir(config)?;
            let tokenizer = load_tokenizer(&dir)?;
            if resume.state.tokenizer_hash.as_deref() != Some(tokenizer.hash.as_str()) {
                return Err(TrainError::Resume(format!(
                    "{} has no tokenizer.json (a masklm before 2026-12 wrote checkpoints without \
                     it after a resume), and {} is not the tokenizer the run trained with; copy \
                     that tokenizer's files into the checkpoint folder",
                    resume.checkpoint.display(),
                    dir.display()
                )));
            }
            observer.on_notice(&format!(
                "{} has no tokenizer files; using {}, the same tokenizer (sha256 matches); \
                 the checkpoints from now on hold their own",
                resume.checkpoint.display(),
                dir.display()
            ));
            dir
        }
        None => tokenizer_dir(config)?,
    };
    let tokenizer = load_tokenizer(&dir)?;
    let files = TokenizerFiles::read(&dir, &tokenizer.hash)?;
    Ok((tokenizer, files))
}

fn check_precision(config: &TrainConfig, device: &Device) -> Result<(), TrainError> {
    let precision = config.training.precision;
    precision
        .check(device)
        .map_err(|reason| TrainError::Config {
            key: "training.precision".to_string(),
            reason: format!(
                "this backend cannot train in {} ({reason}); use \"f32\", or bf16/f16 on a \
                 backend with half-precision support (tch, or wgpu on a GPU with shader-f16)",
                precision.name()
            ),
        })
}

impl Data {
    fn open(
        config: &TrainConfig,
        tokenizer: &MlmTokenizer,
        run_dir: &Path,
        resuming: bool,
        observer: &dyn Observer,
    ) -> Result<Self, TrainError> {
        let caches = resolve_caches(config, tokenizer, run_dir, resuming, observer)?;
        let mut manifests = Vec::with_capacity(caches.len());
        let mut train_splits = Vec::with_capacity(caches.len());
        let mut validations = Vec::with_capacity(caches.len());
        let mut hashes = Vec::with_capacity(caches.len());
        for source in &caches {
            let manifest = read_manifest(&source.dir)?;
            hashes.push(sha256_file(&source.dir.join("manifest.json"))?);
            let train = SplitReader::open(&source.dir, &manifest, "train")?;
            if train.is_empty() {
                return Err(TrainError::Config {
                    key: "data".to_string(),
                    reason: format!("{} has no training examples", source.dir.display()),
                });
            }
            train_splits.push(train);
            validations.push(SplitReader::open(&source.dir, &manifest, "validation")?);
            manifests.push(manifest);
        }
        let cache_hash = combined_hash(&caches, &hashes);
        let (eval_sets, tracked) =
            open_eval_sets(config, tokenizer, &manifests[0], validations, run_dir)?;
        let cache = if caches.len() == 1 {
            caches[0].dir.clone()
        } else {
            config
                .data
                .cache
                .clone()
                .unwrap_or_else(|| run_dir.join("cache"))
        };
        Ok(Self {
            caches,
            manifests,
            train_splits,
            eval_sets,
            tracked,
            cache,
            cache_hash,
        })
    }
}

/// One cache: its manifest's hash (as before sources existed); several: a hash of their names
/// and hashes.
fn combined_hash(caches: &[SourceCache], hashes: &[String]) -> String {
    if let [one] = hashes {
        return one.clone();
    }
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for (source, hash) in caches.iter().zip(hashes) {
        hasher.update(format!("{} {hash}\n", source.name));
    }
    format!("{:x}", hasher.finalize())
}

impl TrainState {
    /// The state of a run before its first step.
    fn new(seed: u64) -> Self {
        Self {
            step: 0,
            samples_seen: 0,
            tokens_seen: 0,
            best_perplexity: None,
            best_step: None,
            seed,
            total_steps: 0,
            loss_scaler: None,
            tokenizer_hash: None,
            cache_hash: None,
            best_set: None,
            evals_without_improvement: 0,
            source_tokens: Vec::new(),
        }
    }
}

/// `best` follows `tracked`; when it followed another set, its old record means nothing here.
fn follow_tracked_set(state: &mut TrainState, tracked: &str, observer: &dyn Observer) {
    if state.best_set.as_deref().unwrap_or(VALIDATION) != tracked {
        if state.best_perplexity.is_some() {
            observer.on_notice(&format!(
                "`best` now follows eval set {tracked:?} (was {:?}); its record starts afresh",
                state.best_set.as_deref().unwrap_or(VALIDATION)
            ));
        }
        state.best_perplexity = None;
        state.best_step = None;
        state.evals_without_improvement = 0;
    }
    state.best_set = Some(tracked.to_string());
}

fn check_patience(
    state: &TrainState,
    config: &TrainConfig,
    run_dir: &Path,
    tracked: &str,
) -> Result<(), TrainError> {
    let patience = config.eval.patience;
    if patience == 0 || state.evals_without_improvement < patience {
        return Ok(());
    }
    Err(TrainError::Resume(format!(
        "{} stopped early at step {}: {} evaluations without improvement on {tracked:?} \
         (eval.patience = {patience}); to train on, resume with --set eval.patience=N (N > {}) \
         or 0",
        run_dir.display(),
        state.step,
        state.evals_without_improvement,
        state.evals_without_improvement
    )))
}

/// `training.max_steps`, or the steps `training.epochs` take over `train_examples` (with
/// document packing, found by packing the documents' lengths).
fn total_steps(
    config: &TrainConfig,
    train_examples: usize,
    sampler: &mut StepSampler,
    splits: &[&SplitReader],
) -> usize {
    let training = &config.training;
    match (training.max_steps, training.epochs) {
        (Some(steps), _) => steps,
        (None, Some(epochs)) => {
            let samples = (epochs * train_examples as f64).ceil() as u64;
            sampler.steps_for_samples(samples, splits)
        }
        (None, None) => 1,
    }
    .max(1)
}

/// A warmup-stable-decay run may change its length only until its decay begins: after that,
/// the steps already decayed would be followed by the peak learning rate again.
fn check_wsd_length(
    config: &TrainConfig,
    step: usize,
    planned: usize,
    total: usize,
) -> Result<(), TrainError> {
    if config.schedule.decay != crate::Decay::Wsd || planned == total || planned == 0 {
        return Ok(());
    }
    let decay_start = planned.saturating_sub(config.schedule.decay_steps(planned));
    let new_start = total.saturating_sub(config.schedule.decay_steps(total));
    if step > decay_start {
        return Err(TrainError::Resume(format!(
            "this warmup-stable-decay run began its decay at step {decay_start} of {planned} and is at \
         step {step}: a new length ({total} steps) would raise the learning rate back to the peak. \
         Resume with training.max_steps={planned}, or from a checkpoint of the stable phase \
         (--from step-N with N <= {decay_start})"
        )));
    }
    if step > new_start {
        // The shorter run would have begun its decay before this step: its schedule cannot
        // continue from here. The shortest length that can (its decay starting at or after
        // this step), if there is one below 4x the plan.
        let shortest = (step..=planned.max(total).saturating_mul(4))
            .find(|&n| n.saturating_sub(config.schedule.decay_steps(n)) >= step)
            .map_or(String::new(), |n| format!("at least {n} steps or "));
        return Err(TrainError::Resume(format!(
            "a warmup-stable-decay run of {total} steps decays from step {new_start}, but this run \
             is at step {step}, still at its peak: resume with training.max_steps of \
             {shortest}{planned} as planned, or from a checkpoint at or before step {new_start}"
        )));
    }
    Ok(())
}

/// A warmup-stable-decay schedule whose warmup and decay do not both fit in the run: as
/// transformers' `get_wsd_schedule`, the decay then starts during the warmup (part-way through
/// its shape) and the peak is never held. Allowed, but said.
fn wsd_overlap(config: &TrainConfig, total: usize) -> Option<String> {
    let schedule = &config.schedule;
    if schedule.decay != crate::Decay::Wsd {
        return None;
    }
    let (warmup, decay) = (schedule.warmup(total), schedule.decay_steps(total));
    (warmup + decay > total).then(|| {
        format!(
            "schedule: {warmup} warmup + {decay} decay steps are more than the run's {total} \
             steps, so the decay starts during the warmup and the learning rate never holds its \
             peak (as transformers' get_wsd_schedule); shorten schedule.decay_steps / \
             decay_fraction or the warmup, or train longer"
        )
    })
}

fn check_unfinished(state: &TrainState, run_dir: &Path) -> Result<(), TrainError> {
    if state.step < state.total_steps {
        return Ok(());
    }
    Err(TrainError::Resume(format!(
        "{} already reached step {} of {}; to train longer, resume with --set \
         training.max_steps=N (N > {})",
        run_dir.display(),
        state.step,
        state.total_steps,
        state.step
    )))
}

/// The model and optimizer the run continues with: the checkpoint's, or a new run's.
fn open_model(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    resume: Option<&Resume>,
    ad_device: &Device,
) -> Result<(ModelConfig, MaskedLm, ModuleOptimizer), TrainError> {
    match resume {
        Some(resume) => {
            let loaded = Source::open(&resume.checkpoint)?.load_model(ad_device)?;
            let (model_config, model) = (loaded.config, loaded.model);
            let optimizer = load_optimizer(&resume.checkpoint, config.optimizer.build(&model))?;
            Ok((model_config, model, optimizer))
        }
        None => {
            let (model_config, model) = initial_model(config, tokenizer, ad_device)?;
            let optimizer = config.optimizer.build(&model);
            Ok((model_config, model, optimizer))
        }
    }
}

fn check_model_fits(data: &Data, model_config: &ModelConfig) -> Result<(), TrainError> {
    for (manifest, source) in data.manifests.iter().zip(&data.caches) {
        if manifest.vocab_size > model_config.vocab_size() {
            return Err(TrainError::Config {
                key: "data.cache".to_string(),
                reason: format!(
                    "{} holds ids up to {} but the model's vocab_size is {}",
                    source.dir.display(),
                    manifest.vocab_size - 1,
                    model_config.vocab_size()
                ),
            });
        }
        if manifest.options.max_seq_length > model_config.max_sequence_length() {
            return Err(TrainError::Config {
                key: "data.max_seq_length".to_string(),
                reason: format!(
                    "{} tokens per example, but the model's position table allows {}",
                    manifest.options.max_seq_length,
                    model_config.max_sequence_length()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a micro-batch whose training step cannot fit in the machine's memory (an
/// estimate, see [`ModelConfig::training_bytes`]), before the first step allocates it.
fn check_step_memory(
    config: &TrainConfig,
    data: &Data,
    model_config: &ModelConfig,
) -> Result<(), TrainError> {
    let seq = data
        .manifests
        .iter()
        .map(|m| m.options.max_seq_length)
        .max()
        .unwrap_or(0);
    let batch = config.training.batch_size;
    let needed = model_config.training_bytes(batch, seq, config.masking.probability);
    masklm_model::memory::check_memory(
        needed,
        &format!("a training step of {batch} sequences of {seq} tokens"),
        "lower training.batch_size and raise training.grad_accum_steps to keep the same \
         global batch",
    )
    .map_err(|e| TrainError::Config {
        key: "training.batch_size".to_string(),
        reason: e.to_string(),
    })
}

/// A resume continues the branch of its checkpoint: step folders past it are moved aside
/// (with the metrics and TensorBoard events they logged) into
/// RUN/branches/from-step-N-UNIXTIME, so that `latest`, `best`, rotation and the fallback never
/// pick a stale folder over the new branch. Returns that archive folder when one was made.
fn begin_branch(
    run_dir: &Path,
    resume: &Resume,
    state: &mut TrainState,
    observer: &dyn Observer,
) -> Result<Option<PathBuf>, TrainError> {
    let branching = !later_checkpoints(run_dir, state.step).is_empty();
    let archive = branching.then(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        run_dir
            .join("branches")
            .join(format!("from-step-{:07}-{stamp}", state.step))
    });
    if let Some(archive) = &archive {
        std::fs::create_dir_all(archive).map_err(|source| TrainError::Io {
            path: archive.clone(),
            source,
        })?;
    }
    let notices = start_branch(
        run_dir,
        &resume.checkpoint,
        state,
        archive.as_deref().unwrap_or(run_dir),
    )?;
    for notice in notices {
        observer.on_notice(&notice);
    }
    Ok(archive)
}

/// One training corpus: `data.inputs` (named "train"), or a `[data] sources` entry.
struct SourceCache {
    name: String,
    weight: f64,
    dir: PathBuf,
    reused: bool,
}

/// Resolves the token caches: `data.inputs` prepared into `data.cache` (or RUN_DIR/cache), or
/// an already prepared `data.cache`, or each `[data] sources` entry prepared into
/// CACHE/NAME. An up-to-date cache is reused; each is checked to be made with this tokenizer.
/// A resumed run never rebuilds an existing cache (its inputs may have changed since the run
/// began: the recorded cache hash is checked instead).
fn resolve_caches(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    run_dir: &Path,
    resuming: bool,
    observer: &dyn Observer,
) -> Result<Vec<SourceCache>, TrainError> {
    let data = &config.data;
    let root = match (
        &data.cache,
        data.inputs.is_empty() && data.sources.is_empty(),
    ) {
        (Some(cache), _) => cache.clone(),
        (None, false) => run_dir.join("cache"),
        (None, true) => {
            return Err(TrainError::Config {
                key: "data.cache".to_string(),
                reason: "give a prepared cache, data.inputs or data.sources".to_string(),
            });
        }
    };
    let validation = if !data.validation_inputs.is_empty() {
        Validation::Inputs(data.validation_inputs.clone())
    } else if data.validation_split > 0.0 {
        Validation::Split(data.validation_split)
    } else {
        Validation::None
    };
    let options = PrepareOptions {
        max_seq_length: data.max_seq_length,
        packing: data.packing,
        validation,
        corpus: data.corpus_options(),
    };
    let corpora: Vec<(String, f64, Vec<String>, PathBuf)> = if data.sources.is_empty() {
        vec![("train".to_string(), 1.0, data.inputs.clone(), root)]
    } else {
        data.sources
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.weight,
                    s.inputs.to_vec(),
                    root.join(&s.name),
                )
            })
            .collect()
    };
    let mut caches = Vec::with_capacity(corpora.len());
    for (name, weight, inputs, dir) in corpora {
        let existing = dir.join("manifest.json").is_file();
        let reused = if !inputs.is_empty() && (!resuming || !existing) {
            prepare_shared(
                config, tokenizer, &inputs, &options, &dir, run_dir, observer,
            )?
        } else {
            check_cache_tokenizer(&dir, tokenizer)?;
            true
        };
        caches.push(SourceCache {
            name,
            weight,
            dir,
            reused,
        });
    }
    Ok(caches)
}

/// The file in a cache folder that lists the runs training on it, one folder per line.
const CACHE_USERS: &str = "runs.txt";

/// Prepares (or reuses) the cache `dir` of a new run and returns whether it was reused. A
/// cache whose settings or inputs differ is rebuilt, and the run says why; but not when other
/// runs still train on it (their checkpoints name its examples, so they could no longer
/// resume) unless `data.rebuild_cache` says to.
fn prepare_shared(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    inputs: &[String],
    options: &PrepareOptions,
    dir: &Path,
    run_dir: &Path,
    observer: &dyn Observer,
) -> Result<bool, TrainError> {
    let others = other_users(dir, run_dir);
    let rebuild = if others.is_empty() || config.data.rebuild_cache {
        Rebuild::Allow
    } else {
        Rebuild::Refuse
    };
    let prepared = match prepare_with(tokenizer, inputs, options, dir, &NoProgress, rebuild) {
        Err(DataError::WouldRebuild { path, reason }) => {
            return Err(TrainError::Config {
                key: "data.cache".to_string(),
                reason: format!(
                    "{} was prepared differently ({reason}) and the runs {} still train on it: \
                     rebuilding it for this run would stop them from resuming. Give this run \
                     its own data.cache, or set data.rebuild_cache = true to rebuild it anyway",
                    path.display(),
                    others
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        other => other?,
    };
    if !prepared.reused
        && let Some(note) = prepared.manifest.corpus.skipped_note()
    {
        observer.on_notice(&format!("{}: {note}", dir.display()));
    }
    // Said on every run, not only the one that built the cache (`masklm prepare` may have).
    let m = &prepared.manifest;
    let cut = [
        (&m.train, "training", "not trained on"),
        (&m.validation, "validation", "not evaluated"),
    ];
    let advice = "raise data.max_seq_length or use packing = \"full\" to keep every token";
    for (split, name, what) in cut {
        if let Some(note) = split.truncation_notice(m.options.max_seq_length, what, advice) {
            observer.on_notice(&format!("{} ({name}): {note}", dir.display()));
        }
    }
    if let Some(reason) = &prepared.rebuilt_because {
        let also = if others.is_empty() {
            String::new()
        } else {
            format!(
                "; the runs that trained on it ({}) can no longer resume",
                others.len()
            )
        };
        observer.on_notice(&format!(
            "rebuilt the token cache {}: {reason}{also}",
            dir.display()
        ));
    }
    Ok(prepared.reused)
}

/// The runs other than `run_dir` listed in `cache`'s users file that still depend on it: those
/// holding checkpoints, and those training now (their folder is locked) that have not saved yet.
fn other_users(cache: &Path, run_dir: &Path) -> Vec<PathBuf> {
    let me = run_dir
        .canonicalize()
        .unwrap_or_else(|_| run_dir.to_path_buf());
    std::fs::read_to_string(cache.join(CACHE_USERS))
        .unwrap_or_default()
        .lines()
        .map(PathBuf::from)
        .filter(|run| *run != me && run.is_dir() && (has_checkpoints(run) || in_use(run)))
        .collect()
}

/// Whether another process holds the run folder's lock (a run training now).
fn in_use(run: &Path) -> bool {
    matches!(lock_folder(run, "run"), Err(DataError::Locked { .. }))
}

/// Adds `run_dir` to `cache`'s users file (see [`prepare_shared`]).
fn record_user(cache: &Path, run_dir: &Path) -> Result<(), TrainError> {
    let path = cache.join(CACHE_USERS);
    let me = run_dir.canonicalize().map_err(|source| TrainError::Io {
        path: run_dir.to_path_buf(),
        source,
    })?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(TrainError::Io { path, source }),
    };
    let me = me.display().to_string();
    if text.lines().any(|line| line == me) {
        return Ok(());
    }
    write_atomic(&path, &format!("{text}{me}\n"))
}

/// Checks that the cache at `cache` was prepared with `tokenizer`.
fn check_cache_tokenizer(cache: &Path, tokenizer: &MlmTokenizer) -> Result<(), TrainError> {
    let manifest = read_manifest(cache)?;
    if manifest.tokenizer_hash == tokenizer.hash && manifest.vocab_size != tokenizer.vocab_size() {
        return Err(TrainError::Config {
            key: "data.cache".to_string(),
            reason: format!(
                "{}/manifest.json says vocab_size {} but its tokenizer has ids up to {}; the \
                 manifest was edited or made by an older masklm: prepare the cache again",
                cache.display(),
                manifest.vocab_size,
                tokenizer.vocab_size().saturating_sub(1)
            ),
        });
    }
    if manifest.tokenizer_hash != tokenizer.hash {
        return Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: format!(
                "{} is not the tokenizer that prepared {}; prepare the cache again with it",
                tokenizer.dir.display(),
                cache.display()
            ),
        });
    }
    Ok(())
}

/// The tokenizer folder of a new run: `data.tokenizer`, else the `init_from` folder when it
/// holds a tokenizer. Either may name a masklm run folder or its `best`/`latest` pointer, as
/// everywhere a checkpoint is accepted, or a Hub model id (resolved in the Hub cache,
/// downloaded if missing).
fn tokenizer_dir(config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let resolve = |path: &Path, need| -> Result<PathBuf, TrainError> {
        let dir = masklm_hub::resolve_model(path, need).map_err(masklm_hub::HubError::from)?;
        Ok(resolve_checkpoint(&dir))
    };
    if let Some(dir) = &config.data.tokenizer {
        return resolve(dir, Need::Tokenizer);
    }
    let init_from = match config.model.init_from.as_deref() {
        Some(path) => Some(resolve(path, Need::Model)?),
        None => None,
    };
    match init_from {
        Some(dir) if dir.join("tokenizer.json").is_file() => Ok(dir),
        _ => Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: "no tokenizer: set data.tokenizer to the folder the cache was prepared with \
                     (or init_from a folder holding tokenizer.json)"
                .to_string(),
        }),
    }
}

/// Builds or loads the model the run starts from.
fn initial_model(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    device: &Device,
) -> Result<(ModelConfig, MaskedLm), TrainError> {
    // A continuing run may set only the dropout of the model it loads (TrainConfig::validate).
    let keys: serde_json::Map<String, serde_json::Value> = config
        .model
        .config
        .iter()
        .filter(|(key, _)| key.as_str() != "model_type")
        .filter_map(|(key, value)| Some((key.clone(), serde_json::to_value(value).ok()?)))
        .collect();
    let config_error = |e: masklm_model::ConfigError| TrainError::Config {
        key: "model".to_string(),
        reason: e.to_string(),
    };
    let check_keys = |model_config: &ModelConfig| match keys
        .keys()
        .find(|k| !model_config.dropout_keys().contains(&k.as_str()))
    {
        Some(key) => Err(TrainError::Config {
            key: format!("model.{key}"),
            reason: format!(
                "the {} model of model.init_from takes only {} here",
                model_config.family().name(),
                model_config.dropout_keys().join(", ")
            ),
        }),
        None => Ok(()),
    };
    let (model_config, model) = match config.model.init_from.as_deref() {
        Some(path) => {
            let source = Source::open(path)?;
            check_keys(source.config())?;
            let loaded = source
                .with_keys(&keys)
                .map_err(config_error)?
                .load_model(device)?;
            (loaded.config, loaded.model)
        }
        None => {
            let specials = masklm_model::SpecialIds {
                pad: tokenizer.pad_id as usize,
                start: tokenizer.bos_id as usize,
                end: tokenizer.eos_id as usize,
            };
            let model_config = config.model_config(tokenizer.vocab_size(), specials)?;
            // Initialise on the CPU backend, then move: each backend has its own random
            // generator, and this keeps the initial weights the same whatever the device.
            let host = Device::flex();
            host.seed(config.seed);
            let model = MaskedLm::new(&model_config, &host)
                .map_err(config_error)?
                .fork(device)
                // `train` turns on gradient tracking on the autodiff device.
                .train();
            (model_config, model)
        }
    };
    if tokenizer.vocab_size() > model_config.vocab_size() {
        return Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                model_config.vocab_size()
            ),
        });
    }
    Ok((model_config, model))
}

/// The held-out sets of a run: the data's validation split (when it has examples) and each
/// `[eval] sets` entry, prepared into RUN_DIR/eval-cache/NAME (reused while its inputs and the
/// tokenizer are unchanged) with the training cache's sequence length and packing; and the
/// name of the set `best` follows.
fn open_eval_sets(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    manifest: &masklm_data::Manifest,
    validations: Vec<SplitReader>,
    run_dir: &Path,
) -> Result<(Vec<EvalSet>, String), TrainError> {
    let mut sets = Vec::new();
    if validations.iter().any(|v| !v.is_empty()) {
        sets.push((VALIDATION.to_string(), validations));
    }
    for (name, inputs) in &config.eval.sets {
        let dir = run_dir.join("eval-cache").join(name);
        let options = PrepareOptions {
            max_seq_length: manifest.options.max_seq_length,
            packing: manifest.options.packing,
            validation: Validation::None,
            corpus: config.data.corpus_options(),
        };
        let prepared =
            prepare(tokenizer, &inputs.to_vec(), &options, &dir, &NoProgress).map_err(|e| {
                TrainError::Config {
                    key: format!("eval.sets.{name}"),
                    reason: e.to_string(),
                }
            })?;
        let split = SplitReader::open(&dir, &prepared.manifest, "train")?;
        if split.is_empty() {
            return Err(TrainError::Config {
                key: format!("eval.sets.{name}"),
                reason: "its inputs hold no text".to_string(),
            });
        }
        sets.push((name.clone(), vec![split]));
    }
    let tracked = match &config.eval.best {
        Some(name) if name == VALIDATION && sets.first().is_none_or(|(n, _)| n != VALIDATION) => {
            return Err(TrainError::Config {
                key: "eval.best".to_string(),
                reason: "the data has no validation split to follow; set data.validation_split \
                         or data.validation_inputs, or name one of [eval] sets"
                    .to_string(),
            });
        }
        Some(name) => name.clone(),
        None => sets
            .first()
            .map_or(VALIDATION.to_string(), |(name, _)| name.clone()),
    };
    Ok((sets, tracked))
}

/// Refuses a resume whose settings would change what the steps see (see
/// [`TrainConfig::frozen_differences`]), naming each key and both values.
fn check_resume_config(run_dir: &Path, config: &TrainConfig) -> Result<(), TrainError> {
    let saved_path = run_dir.join("config.toml");
    let saved = TrainConfig::load(&saved_path, &[])?;
    let differences = saved.frozen_differences(config);
    if differences.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = differences
        .iter()
        .map(|(key, old, new)| format!("`{key}` was {old}, now {new}"))
        .collect();
    Err(TrainError::Resume(format!(
        "cannot resume {} with other data, model or sampling settings: {}. A resume may change \
         training.max_steps/epochs, training.precision, [optimizer], [schedule], [eval], \
         [checkpoint] and [logging]; \
         start a new run (with model.init_from) to change the rest",
        run_dir.display(),
        list.join("; ")
    )))
}

/// Checks a checkpoint's recorded seed, tokenizer and cache against what the resume found.
fn check_resume_state(
    state: &TrainState,
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    data: &Data,
) -> Result<(), TrainError> {
    let (cache, cache_hash) = (&data.cache, &data.cache_hash);
    if state.seed != config.seed {
        return Err(TrainError::Resume(format!(
            "the checkpoint was trained with seed {} but the config says {}; a resume keeps the seed",
            state.seed, config.seed
        )));
    }
    if let Some(saved) = &state.tokenizer_hash
        && saved != &tokenizer.hash
    {
        return Err(TrainError::Resume(format!(
            "{}/tokenizer.json is not the tokenizer the run started with (sha256 {} vs {})",
            tokenizer.dir.display(),
            &tokenizer.hash[..12.min(tokenizer.hash.len())],
            &saved[..12.min(saved.len())]
        )));
    }
    if let Some(saved) = &state.cache_hash
        && saved != cache_hash
    {
        return Err(TrainError::Resume(format!(
            "the token cache {} changed since the run started (manifest sha256 {} vs {}); \
             restore it, or start a new run on the new data with model.init_from",
            cache.display(),
            &cache_hash[..12.min(cache_hash.len())],
            &saved[..12.min(saved.len())]
        )));
    }
    Ok(())
}
