//! Model ids: `org/name[@revision]` resolved in the local Hugging Face Hub cache, downloading
//! what is missing.
//!
//! Every place that takes a model folder (`--model`, `init_from`, `[data] tokenizer`,
//! `serve --model`, `vocab`) passes what the user wrote to [`resolve_model`]:
//!
//! 1. an existing path keeps its meaning (a folder, a run, a `best`/`latest` pointer);
//! 2. otherwise `org/name` or `name`, with an optional `@revision` (a branch, a tag or a
//!    40-hex commit; `main` when absent), is a Hub model id, looked up in the cache exactly as
//!    huggingface_hub does (`try_to_load_from_cache`): `CACHE/models--org--name/refs/REVISION`
//!    holds a commit, whose files are in `snapshots/COMMIT/`, and `.no_exist/COMMIT/FILE`
//!    records a file the repo does not have;
//! 3. what the model needs and the cache lacks is downloaded from `HF_ENDPOINT` into the same
//!    layout (see `download.rs`), unless `HF_HUB_OFFLINE` is on;
//! 4. anything else is an error saying that no such folder exists.
//!
//! The cache folder is found as huggingface_hub's `constants.py` finds it: `HF_HUB_CACHE`,
//! else the legacy `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (`~` and `$VAR`
//! expanded, as Python's `expanduser`/`expandvars` do).
//!
//! A model needs `config.json`; `model.safetensors`, else `model.safetensors.index.json` and
//! its shards, else `pytorch_model.bin`; and the tokenizer files the repo has
//! (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`). A tokenizer alone
//! (`[data] tokenizer`) needs only the tokenizer files, `tokenizer.json` required.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::download;

/// Why a model path or id could not be resolved to a folder.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Neither an existing path nor a well-formed model id.
    #[error(
        "{}: no such folder, and not a Hugging Face model id ({reason}); give an existing \
         folder, or an id such as FacebookAI/roberta-base or org/name@revision",
        path.display()
    )]
    NoSuchFolder { path: PathBuf, reason: String },
    /// A file the model needs is not in the cache, and offline mode forbids downloading it.
    #[error(
        "model {id}@{revision}: {file} is not in the Hub cache ({cache}) and offline mode is on \
         (HF_HUB_OFFLINE=1), and no folder {id} exists here; unset HF_HUB_OFFLINE to download \
         it, or fill the cache where the Hub is reachable (e.g. `hf download {id} --revision \
         {revision}`)",
        cache = cache.display()
    )]
    NotCached {
        id: String,
        revision: String,
        cache: PathBuf,
        file: String,
    },
    /// The Hub has no repository of that id (or it is private and no valid token was sent).
    #[error(
        "model {id}: no such repository on {endpoint} (HTTP {status}), and no folder {id} \
         exists here; check the id, and for a private repository set HF_TOKEN (or log in with \
         `hf auth login`)"
    )]
    RepoNotFound {
        id: String,
        endpoint: String,
        status: u16,
    },
    /// The repository exists but not the revision.
    #[error(
        "model {id}: no revision {revision} on {endpoint} (HTTP {status}); give a branch, a \
         tag or a commit of the repository, or leave out @{revision} for main"
    )]
    RevisionNotFound {
        id: String,
        revision: String,
        endpoint: String,
        status: u16,
    },
    /// A file the model needs is not in the repository.
    #[error(
        "model {id}@{revision} on {endpoint} has no {file} (HTTP {status}); masklm needs \
         config.json, model.safetensors (or model.safetensors.index.json and its shards, or \
         pytorch_model.bin) and, to read text, tokenizer.json: the repository is not a \
         transformers model masklm can load"
    )]
    EntryNotFound {
        id: String,
        revision: String,
        endpoint: String,
        file: String,
        status: u16,
    },
    /// The repository holds none of the weight files.
    #[error(
        "model {id}@{revision} on {endpoint} has no model.safetensors, \
         model.safetensors.index.json or pytorch_model.bin: masklm cannot load its weights"
    )]
    NoWeights {
        id: String,
        revision: String,
        endpoint: String,
    },
    /// A gated repository whose conditions this token has not accepted (or no token sent).
    #[error(
        "model {id} is gated (HTTP {status}): accept its conditions at {endpoint}/{id} with \
         your account, then set HF_TOKEN to a token of that account (or log in with \
         `hf auth login`)"
    )]
    Gated {
        id: String,
        endpoint: String,
        status: u16,
    },
    /// The Hub refused the request (401/403): no token, a wrong token, or a token without
    /// access to this repository.
    #[error(
        "model {id}: {endpoint} refused access (HTTP {status}{detail}); set HF_TOKEN to a \
         token with read access to the repository (or log in with `hf auth login`)"
    )]
    Unauthorized {
        id: String,
        endpoint: String,
        status: u16,
        detail: String,
    },
    /// Any other HTTP error (a 5xx: the Hub is down).
    #[error("model {id}: {url} answered HTTP {status}{detail}; try again later")]
    Http {
        id: String,
        url: String,
        status: u16,
        detail: String,
    },
    /// The endpoint answered without the headers of a Hub (a proxy page, another server).
    #[error(
        "model {id}: {url} did not answer as a Hugging Face Hub (no {header} header); check \
         HF_ENDPOINT and any proxy"
    )]
    NotAHub {
        id: String,
        url: String,
        header: &'static str,
    },
    /// The Hub could not be reached (connection refused, no route, DNS).
    #[error(
        "model {id}: cannot reach the Hub at {endpoint} (and no folder {id} exists here); check \
         the path, or the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the \
         models in the cache"
    )]
    Unreachable {
        id: String,
        endpoint: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The Hub stopped answering for longer than the timeout.
    #[error(
        "model {id}: no answer from {endpoint} for {seconds}s while fetching {file}; check the \
         network, or raise the limit with MASKLM_HUB_TIMEOUT=SECONDS"
    )]
    Timeout {
        id: String,
        endpoint: String,
        file: String,
        seconds: f64,
    },
    /// The download of a file failed after it began (hf-hub's error).
    #[error("model {id}: downloading {file} from {endpoint} failed")]
    Download {
        id: String,
        endpoint: String,
        file: String,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },
    /// The downloading thread ended without an answer (a bug in the client).
    #[error("model {id}: downloading {file} stopped without an answer (the client panicked)")]
    DownloadPanicked { id: String, file: String },
    /// Reading or writing the cache failed.
    #[error("Hub cache {}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A sharded model's index is unreadable.
    #[error("model {id}@{revision}: {reason}")]
    Index {
        id: String,
        revision: String,
        reason: String,
    },
    /// An environment variable holds a value that cannot be used.
    #[error("{var}={value:?}: {reason}")]
    Setting {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    /// No cache folder can be named: no HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME nor home folder.
    #[error(
        "no Hugging Face cache folder: set HF_HUB_CACHE (or HF_HOME), as no home folder is known"
    )]
    NoCacheFolder,
}

/// What a caller needs from a model id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A model: config, weights, and the tokenizer files the repo has.
    Model,
    /// A tokenizer: the tokenizer files (`tokenizer.json` required).
    Tokenizer,
}

/// A Hub model id: `org/name` or `name`, and a revision (`main` unless `@revision` is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    pub repo: String,
    pub revision: String,
}

/// Whether `text` is a full commit hash (huggingface_hub's `REGEX_COMMIT_HASH`).
pub fn is_commit(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ModelId {
    /// Parses `org/name[@revision]`, with huggingface_hub's `validate_repo_id` rules: at most
    /// one `/`; each part 1-96 ASCII letters, digits, `-`, `_` or `.`, starting and ending
    /// with a letter, digit or `_`; no `--` or `..`; not ending in `.git`. A revision is a
    /// branch, tag or commit: letters, digits, `-_./`, no empty or `..` component (it names a
    /// file under `refs/`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, "main"),
        };
        check_repo(repo)?;
        check_revision(revision)?;
        Ok(ModelId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repo's folder in the cache: `models--org--name` (huggingface_hub's
    /// `repo_folder_name`).
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

fn check_repo(repo: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() > 2 {
        return Err("an id has at most one '/'".to_string());
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for part in &parts {
        let bytes = part.as_bytes();
        if bytes.is_empty() || bytes.len() > 96 {
            return Err("each part of an id has 1 to 96 characters".to_string());
        }
        if !bytes.iter().all(|&b| word(b) || matches!(b, b'-' | b'.')) {
            return Err("an id uses only letters, digits, '-', '_' and '.'".to_string());
        }
        if !word(bytes[0]) || !word(bytes[bytes.len() - 1]) {
            return Err("a part of an id cannot start or end with '-' or '.'".to_string());
        }
    }
    if repo.contains("--") || repo.contains("..") {
        return Err("an id cannot hold '--' or '..'".to_string());
    }
    if repo.ends_with(".git") {
        return Err("an id cannot end in '.git'".to_string());
    }
    Ok(())
}

fn check_revision(revision: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/');
    if revision.is_empty() || revision.len() > 255 || !revision.bytes().all(allowed) {
        return Err(
            "a revision is a branch, tag or commit of letters, digits, '-', '_', '.' and '/'"
                .to_string(),
        );
    }
    if revision
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("a revision has no empty, '.' or '..' component".to_string());
    }
    Ok(())
}

/// Where and how to reach the Hub, from the environment as huggingface_hub reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    /// The cache folder (holding `models--org--name/`).
    pub cache: PathBuf,
    /// The Hub's base URL, without a trailing `/` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` (`HF_TOKEN`, else the token file).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use the cache only.
    pub offline: bool,
    /// How long the Hub may stay silent: connecting, waiting for an answer, or between two
    /// pieces of a download (`MASKLM_HUB_TIMEOUT`, else `HF_HUB_DOWNLOAD_TIMEOUT`, else 10 s,
    /// huggingface_hub's default).
    pub timeout: Duration,
}

/// huggingface_hub's default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl HubSettings {
    /// The settings the process environment gives.
    pub fn from_env() -> Result<Self, ResolveError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings that the variables `var` returns give (`None`: unset). Empty values count
    /// as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ResolveError> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = || std::env::home_dir().filter(|h| !h.as_os_str().is_empty());
        let expand = |path: String| -> Option<PathBuf> {
            Some(PathBuf::from(expand_vars(&expand_user(&path, home)?, &var)))
        };
        // constants.py: HF_HOME = expand(HF_HOME or $XDG_CACHE_HOME/huggingface or
        // ~/.cache/huggingface); HF_HUB_CACHE = expand(HF_HUB_CACHE or HUGGINGFACE_HUB_CACHE
        // or HF_HOME/hub).
        let hf_home = || -> Option<PathBuf> {
            let path = match var("HF_HOME") {
                Some(home) => home,
                None => {
                    let cache = match var("XDG_CACHE_HOME") {
                        Some(xdg) => xdg,
                        None => home()?.join(".cache").to_string_lossy().into_owned(),
                    };
                    format!("{cache}/huggingface")
                }
            };
            expand(path)
        };
        let cache = match var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
            Some(cache) => expand(cache),
            None => hf_home().map(|home| home.join("hub")),
        }
        .ok_or(ResolveError::NoCacheFolder)?;
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let truthy = |name: &str| {
            var(name).is_some_and(|v| {
                ["1", "ON", "YES", "TRUE"].contains(&v.to_ascii_uppercase().as_str())
            })
        };
        let offline = truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE");
        // utils/_auth.py: HF_TOKEN, else HUGGING_FACE_HUB_TOKEN, else the token file
        // (HF_TOKEN_PATH, else HF_HOME/token); HF_HUB_DISABLE_IMPLICIT_TOKEN sends none.
        let clean = |token: String| {
            let token = token.replace(['\r', '\n'], "").trim().to_string();
            (!token.is_empty()).then_some(token)
        };
        let token = if truthy("HF_HUB_DISABLE_IMPLICIT_TOKEN") {
            None
        } else {
            var("HF_TOKEN")
                .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
                .and_then(clean)
                .or_else(|| {
                    let path = match var("HF_TOKEN_PATH") {
                        Some(path) => expand(path),
                        None => hf_home().map(|home| home.join("token")),
                    }?;
                    std::fs::read_to_string(path).ok().and_then(clean)
                })
        };
        let timeout = match var("MASKLM_HUB_TIMEOUT").map(|v| ("MASKLM_HUB_TIMEOUT", v)) {
            Some(setting) => Some(setting),
            None => var("HF_HUB_DOWNLOAD_TIMEOUT").map(|v| ("HF_HUB_DOWNLOAD_TIMEOUT", v)),
        };
        let timeout = match timeout {
            None => Duration::from_secs(10),
            Some((name, value)) => value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                .map(Duration::from_secs_f64)
                .ok_or(ResolveError::Setting {
                    var: name,
                    value,
                    reason: "give the timeout in seconds, a number above 0",
                })?,
        };
        Ok(HubSettings {
            cache,
            endpoint,
            token,
            offline,
            timeout,
        })
    }
}

/// Python's `os.path.expanduser` for a leading `~` or `~/` (`~user` is left as is). `None`
/// when the path needs a home folder and none is known.
fn expand_user(path: &str, home: impl Fn() -> Option<PathBuf>) -> Option<String> {
    match path.strip_prefix('~') {
        Some("") => Some(home()?.to_string_lossy().into_owned()),
        Some(rest) if rest.starts_with('/') => {
            let home = home()?.to_string_lossy().into_owned();
            Some(format!("{}{rest}", home.trim_end_matches('/')))
        }
        _ => Some(path.to_string()),
    }
}

/// Python's `os.path.expandvars`: `$NAME` and `${NAME}` replaced by set variables, anything
/// else (unset names, a lone `$`) left as written.
fn expand_vars(path: &str, var: &impl Fn(&str) -> Option<String>) -> String {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after.find(|c: char| !word(c)).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match var(name).filter(|_| !name.is_empty()) {
            Some(value) => out.push_str(&value),
            None => out.push_str(&rest[at..at + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// What a download reports, for a progress bar: handed in by the front end, which owns the
/// terminal.
pub trait DownloadProgress: Sync {
    /// A file of `total` bytes starts downloading.
    fn start(&self, _file: &str, _total: u64) {}
    /// `bytes` more bytes arrived.
    fn advance(&self, _bytes: u64) {}
    /// The file is complete.
    fn finish(&self) {}
}

/// A [`DownloadProgress`] that shows nothing.
pub struct NoDownloadProgress;
impl DownloadProgress for NoDownloadProgress {}

static PROGRESS: OnceLock<Box<dyn DownloadProgress + Send>> = OnceLock::new();

/// Installs the progress sink that downloads started by [`resolve_model`] report to. The CLI
/// installs its progress bar once at start: models are resolved deep inside loaders that many
/// front ends call (a run's `init_from`, the server's models), and threading a sink through
/// each would change every signature on the way. Later calls are ignored.
pub fn set_download_progress(sink: Box<dyn DownloadProgress + Send>) {
    let _ = PROGRESS.set(sink);
}

/// The one entry point for a model path or id: an existing path is returned as is; a model
/// id is resolved in the Hub cache (downloading what is missing, per [`HubSettings::from_env`])
/// to its snapshot folder; anything else is [`ResolveError::NoSuchFolder`].
pub fn resolve_model(path: &Path, need: Need) -> Result<PathBuf, ResolveError> {
    if is_path(path) {
        return Ok(path.to_path_buf());
    }
    // Settings are read only for an id, so a bad variable never stops a command on folders.
    let id = parse_id(path)?;
    let progress: &dyn DownloadProgress = match PROGRESS.get() {
        Some(sink) => sink.as_ref(),
        None => &NoDownloadProgress,
    };
    Resolver::new(HubSettings::from_env()?, progress).resolve_id(&id, need)
}

/// Whether something exists at `path`, a dangling symlink included (the loader then says what
/// is wrong with it, rather than the Hub being asked for a model of that name).
fn is_path(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// `path` as a model id, or why it is neither a folder nor an id.
fn parse_id(path: &Path) -> Result<ModelId, ResolveError> {
    let no_folder = |reason: String| ResolveError::NoSuchFolder {
        path: path.to_path_buf(),
        reason,
    };
    let spec = path
        .to_str()
        .ok_or_else(|| no_folder("an id is ASCII text".to_string()))?;
    ModelId::parse(spec).map_err(no_folder)
}

/// Resolves model ids with explicit settings and progress sink ([`resolve_model`] takes both
/// from the environment).
pub struct Resolver<'a> {
    pub(crate) settings: HubSettings,
    pub(crate) progress: &'a dyn DownloadProgress,
}

/// One repository's folder in the cache.
pub(crate) struct RepoCache {
    pub dir: PathBuf,
}

impl RepoCache {
    /// The commit `revision` names in the cache: itself when a commit hash, else the content
    /// of `refs/REVISION` (written by a download) when that is a commit hash.
    pub fn commit(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// Whether the snapshot of `commit` holds `file` (through its symlink: a link to a missing
    /// blob does not count).
    pub fn has(&self, commit: &str, file: &str) -> bool {
        self.snapshot(commit).join(file).is_file()
    }

    /// Whether the cache records that the repo has no `file` at `commit`.
    pub fn known_missing(&self, commit: &str, file: &str) -> bool {
        self.dir.join(".no_exist").join(commit).join(file).is_file()
    }
}

/// The tokenizer files a model folder may hold: the first is required for [`Need::Tokenizer`].
const TOKENIZER_FILES: [&str; 3] = crate::TOKENIZER_FILES;

/// What a snapshot lacks for `need`: the first required file that is missing, and whether
/// some optional file is neither present nor known to be absent.
pub(crate) struct Gaps {
    pub required: Option<String>,
    pub unknown_optional: bool,
}

impl Gaps {
    pub fn complete(&self) -> bool {
        self.required.is_none() && !self.unknown_optional
    }
}

/// What the snapshot of `commit` lacks for `need`.
pub(crate) fn gaps(repo: &RepoCache, commit: &str, need: Need) -> Gaps {
    let unknown = |file: &&str| !repo.has(commit, file) && !repo.known_missing(commit, file);
    let (required, optional): (Option<String>, &[&str]) = match need {
        Need::Tokenizer => (
            (!repo.has(commit, TOKENIZER_FILES[0])).then(|| TOKENIZER_FILES[0].to_string()),
            &TOKENIZER_FILES[1..],
        ),
        Need::Model => {
            let required = if !repo.has(commit, "config.json") {
                Some("config.json".to_string())
            } else {
                missing_weights(repo, commit)
            };
            (required, &TOKENIZER_FILES[..])
        }
    };
    Gaps {
        required,
        unknown_optional: optional.iter().any(unknown),
    }
}

/// The weight file the snapshot lacks, if it has no complete set: `model.safetensors` when it
/// has none, a shard when its index names one it lacks.
fn missing_weights(repo: &RepoCache, commit: &str) -> Option<String> {
    let [single, index, bin] = crate::WEIGHT_FILES;
    if repo.has(commit, single) {
        return None;
    }
    if repo.has(commit, index) {
        let shards = crate::read_safetensors_index(&repo.snapshot(commit).join(index));
        return match shards {
            Ok(shards) => shards.into_iter().find(|shard| !repo.has(commit, shard)),
            // An unreadable index is the loader's to report, naming the file.
            Err(_) => None,
        };
    }
    if repo.has(commit, bin) {
        return None;
    }
    Some(single.to_string())
}

impl<'a> Resolver<'a> {
    pub fn new(settings: HubSettings, progress: &'a dyn DownloadProgress) -> Self {
        Resolver { settings, progress }
    }

    /// [`resolve_model`] with these settings.
    pub fn resolve(&self, path: &Path, need: Need) -> Result<PathBuf, ResolveError> {
        if is_path(path) {
            return Ok(path.to_path_buf());
        }
        self.resolve_id(&parse_id(path)?, need)
    }

    pub(crate) fn repo_cache(&self, id: &ModelId) -> RepoCache {
        RepoCache {
            dir: self.settings.cache.join(id.folder_name()),
        }
    }

    /// The snapshot folder of `id` holding what `need` needs: from the cache when complete,
    /// else downloaded (unless offline).
    pub fn resolve_id(&self, id: &ModelId, need: Need) -> Result<PathBuf, ResolveError> {
        let repo = self.repo_cache(id);
        let cached = repo.commit(&id.revision).map(|commit| {
            let gaps = gaps(&repo, &commit, need);
            (commit, gaps)
        });
        match cached {
            Some((commit, gaps)) if gaps.complete() => return Ok(repo.snapshot(&commit)),
            // Offline, optional files of unknown presence are simply absent.
            Some((commit, gaps)) if self.settings.offline && gaps.required.is_none() => {
                return Ok(repo.snapshot(&commit));
            }
            _ => {}
        }
        if self.settings.offline {
            let file = match cached {
                Some((_, gaps)) => gaps.required,
                None => None,
            };
            let first = match need {
                Need::Model => "config.json",
                Need::Tokenizer => TOKENIZER_FILES[0],
            };
            return Err(ResolveError::NotCached {
                id: id.repo.clone(),
                revision: id.revision.clone(),
                cache: repo.dir,
                file: file.unwrap_or_else(|| first.to_string()),
            });
        }
        download::fetch(self, id, &repo, need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_vars(|name| map.get(name).cloned()).unwrap()
    }

    #[test]
    fn ids_follow_huggingface_hub_validation() {
        let id = ModelId::parse("FacebookAI/roberta-base").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("FacebookAI/roberta-base", "main")
        );
        assert_eq!(id.folder_name(), "models--FacebookAI--roberta-base");
        let id = ModelId::parse("bert-base-uncased@v1.0").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("bert-base-uncased", "v1.0")
        );
        assert_eq!(id.folder_name(), "models--bert-base-uncased");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            ModelId::parse(&format!("a/b@{commit}")).unwrap().revision,
            commit
        );
        assert_eq!(
            ModelId::parse("a/b@refs/pr/1").unwrap().revision,
            "refs/pr/1"
        );
        for bad in [
            "/abs/path",
            "a/b/c",
            "./model",
            "-a/b",
            "a/b.",
            "a--b",
            "a/b..c",
            "a/b.git",
            "a b",
            "café",
            "a/b@",
            "a/b@../../etc",
            "a/b@x//y",
            "",
            &"x".repeat(97),
        ] {
            assert!(ModelId::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(is_commit(commit));
        assert!(!is_commit(&commit.to_uppercase()));
        assert!(!is_commit("main"));
    }

    #[test]
    fn cache_folder_in_huggingface_hub_order() {
        let home = std::env::home_dir().unwrap();
        let cache = |vars: &[(&str, &str)]| settings(vars).cache;
        assert_eq!(cache(&[]), home.join(".cache/huggingface/hub"));
        assert_eq!(
            cache(&[("XDG_CACHE_HOME", "/x")]),
            PathBuf::from("/x/huggingface/hub")
        );
        let hf_home = [("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/h")];
        assert_eq!(cache(&hf_home), PathBuf::from("/h/hub"));
        let legacy = [("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/legacy")];
        assert_eq!(cache(&legacy), PathBuf::from("/legacy"));
        let all = [
            ("HF_HOME", "/h"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "/c"),
        ];
        assert_eq!(cache(&all), PathBuf::from("/c"));
        // Empty counts as unset; `~` and `$VAR` expand as in Python.
        assert_eq!(
            cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/h")]),
            PathBuf::from("/h/hub")
        );
        assert_eq!(cache(&[("HF_HOME", "~/hf")]), home.join("hf/hub"));
        let vars = [
            ("HF_HUB_CACHE", "$BASE/${SUB}/$UNSET/c"),
            ("BASE", "/b"),
            ("SUB", "s"),
        ];
        assert_eq!(cache(&vars), PathBuf::from("/b/s/$UNSET/c"));
    }

    #[test]
    fn endpoint_token_offline_and_timeout() {
        let s = settings(&[]);
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert!(!s.offline);
        assert_eq!(s.timeout, Duration::from_secs(10));
        let s = settings(&[
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_TOKEN", " hf_abc\n"),
            ("MASKLM_HUB_TIMEOUT", "0.5"),
        ]);
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("hf_abc"));
        assert_eq!(s.timeout, Duration::from_millis(500));
        assert!(settings(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!settings(&[("HF_HUB_OFFLINE", "0")]).offline);

        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
        let hf_home = home.path().to_str().unwrap();
        let s = settings(&[("HF_HOME", hf_home)]);
        assert_eq!(s.token.as_deref(), Some("hf_from_file"));
        let s = settings(&[("HF_HOME", hf_home), ("HF_TOKEN", "hf_env")]);
        assert_eq!(s.token.as_deref(), Some("hf_env"));
        let s = settings(&[("HF_HOME", hf_home), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")]);
        assert_eq!(s.token, None);

        let bad = HubSettings::from_vars(|name| {
            (name == "MASKLM_HUB_TIMEOUT").then(|| "soon".to_string())
        });
        let msg = bad.unwrap_err().to_string();
        assert!(
            msg.contains("MASKLM_HUB_TIMEOUT") && msg.contains("soon"),
            "{msg}"
        );
    }

    /// Writes a cache entry for `repo`: `refs/main` -> `commit`, the snapshot's `files`.
    fn cached(cache: &Path, repo: &str, commit: &str, files: &[&str]) -> PathBuf {
        let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), commit).unwrap();
        let snapshot = dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        for file in files {
            std::fs::write(snapshot.join(file), "{}").unwrap();
        }
        snapshot
    }

    fn offline(cache: &Path) -> HubSettings {
        settings(&[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ])
    }

    #[test]
    fn cache_lookup_follows_refs_and_commits() {
        let cache = tempfile::tempdir().unwrap();
        let (old, new) = ("a".repeat(40), "b".repeat(40));
        let files = ["config.json", "model.safetensors", "tokenizer.json"];
        let old_snapshot = cached(cache.path(), "org/m", &old, &files);
        let new_snapshot = cached(cache.path(), "org/m", &new, &files);
        let resolver = Resolver::new(offline(cache.path()), &NoDownloadProgress);
        let resolve = |spec: &str| resolver.resolve(Path::new(spec), Need::Model);
        // refs/main names the newer commit; the older one is reached by its hash.
        assert_eq!(resolve("org/m").unwrap(), new_snapshot);
        assert_eq!(resolve("org/m@main").unwrap(), new_snapshot);
        assert_eq!(resolve(&format!("org/m@{old}")).unwrap(), old_snapshot);
        let msg = resolve("org/m@v2").unwrap_err().to_string();
        assert!(
            msg.contains("org/m@v2")
                && msg.contains("config.json")
                && msg.contains("HF_HUB_OFFLINE"),
            "{msg}"
        );
        // An existing path keeps its meaning, whatever it looks like.
        let here = cache.path().to_str().unwrap();
        assert_eq!(resolve(here).unwrap(), cache.path());
        let msg = resolve("/no/such/folder").unwrap_err().to_string();
        assert!(msg.contains("/no/such/folder: no such folder"), "{msg}");
    }

    #[test]
    fn weights_and_tokenizer_needs() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "c".repeat(40);
        let snapshot = cached(cache.path(), "org/m", &commit, &["config.json"]);
        let resolver = Resolver::new(offline(cache.path()), &NoDownloadProgress);
        let resolve = |need| resolver.resolve(Path::new("org/m"), need);
        let msg = resolve(Need::Model).unwrap_err().to_string();
        assert!(
            msg.contains("model.safetensors is not in the Hub cache"),
            "{msg}"
        );
        let msg = resolve(Need::Tokenizer).unwrap_err().to_string();
        assert!(
            msg.contains("tokenizer.json is not in the Hub cache"),
            "{msg}"
        );
        std::fs::write(snapshot.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(resolve(Need::Tokenizer).unwrap(), snapshot);
        // A sharded checkpoint is complete only with every shard its index names.
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(snapshot.join("model.safetensors.index.json"), index).unwrap();
        std::fs::write(snapshot.join("model-00001-of-00002.safetensors"), "").unwrap();
        let msg = resolve(Need::Model).unwrap_err().to_string();
        assert!(
            msg.contains("model-00002-of-00002.safetensors is not in"),
            "{msg}"
        );
        std::fs::write(snapshot.join("model-00002-of-00002.safetensors"), "").unwrap();
        assert_eq!(resolve(Need::Model).unwrap(), snapshot);
        // pytorch_model.bin alone is a complete set too.
        let other = cached(
            cache.path(),
            "bin",
            &commit,
            &["config.json", "pytorch_model.bin"],
        );
        let bin = resolver.resolve(Path::new("bin"), Need::Model).unwrap();
        assert_eq!(bin, other);
    }

    #[test]
    fn expand_like_python() {
        let var = |name: &str| (name == "A").then(|| "x".to_string());
        assert_eq!(expand_vars("$A/${A}/$B/${B}/$/$", &var), "x/x/$B/${B}/$/$");
        assert_eq!(expand_vars("${A", &var), "${A");
        let home = || Some(PathBuf::from("/home/u/"));
        assert_eq!(expand_user("~", home).unwrap(), "/home/u/");
        assert_eq!(expand_user("~/a", home).unwrap(), "/home/u/a");
        assert_eq!(expand_user("~other/a", home).unwrap(), "~other/a");
    }
}
