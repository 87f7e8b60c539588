//! Downloading the files a model id needs into the Hub cache, with the `hf-hub` crate (the
//! client candle uses), in huggingface_hub's layout: `blobs/ETAG`, `snapshots/COMMIT/FILE` a
//! relative symlink to its blob, `refs/REVISION` holding the commit, and
//! `.no_exist/COMMIT/FILE` for a file the repo does not have.
//!
//! hf-hub 0.5 (the newest release with a synchronous client; 1.0 is async, on reqwest) falls
//! short in ways this module works around:
//!
//! - its ureq agent has no timeouts and no way to set them, so a server that accepts and never
//!   answers blocks it forever. Each of its downloads runs on a worker thread that reports
//!   every piece through hf-hub's `Progress` over a channel; the caller gives up when the
//!   channel stays silent for the timeout (the worker is left blocked on its socket until the
//!   process ends). Our own requests (below) set ureq's timeouts;
//! - a 404 or 403 reaches us as a bare status (ureq drops the response), so the Hub's
//!   `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`) is
//!   lost. Each file is first asked for with a HEAD request of our own, as huggingface_hub's
//!   `get_hf_file_metadata` does, which reads it and the commit the revision points to;
//! - it does not record missing files (`.no_exist/`): done here, so that a second run knows
//!   without asking the Hub;
//! - it writes `refs/REVISION` for whatever revision it is given, even a commit hash, where
//!   huggingface_hub writes refs only for branches and tags. Every file is downloaded at the
//!   commit the first answer named (so a snapshot never mixes two commits if the branch moves
//!   meanwhile); the `refs/COMMIT` hf-hub writes is removed and `refs/REVISION` written here;
//! - it reads neither `HF_HUB_CACHE` nor `XDG_CACHE_HOME`, nor `HF_TOKEN`, nor
//!   `HF_HUB_OFFLINE` (and panics without a home folder): [`HubSettings`] reads them as
//!   huggingface_hub does and hands hf-hub the folder, endpoint and token;
//! - its lock and partial files are `blobs/ETAG.lock` and `blobs/ETAG.part`, where
//!   huggingface_hub uses `.locks/` and `ETAG.incomplete`. The lock files stay (removing a
//!   lock file another process may hold is racy); huggingface_hub ignores both.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::ids::{ModelId, Need, RepoCache, ResolveError, Resolver, is_commit};
use crate::{SAFETENSORS_INDEX, TOKENIZER_FILES, read_safetensors_index};

/// What the Hub says of one file at a revision.
enum Remote {
    /// It exists; the revision is at `commit`.
    Found { commit: String },
    /// The repo has no such file (`X-Error-Code: EntryNotFound`).
    Missing { status: u16 },
}

/// One model id's conversation with the Hub.
struct Client<'r, 'p> {
    resolver: &'r Resolver<'p>,
    id: &'r ModelId,
    agent: ureq::Agent,
    api: Api,
}

/// What hf-hub's worker thread reports.
enum Event {
    Start(u64),
    Advance(u64),
    Done(Result<PathBuf, ApiError>),
}

/// hf-hub's progress, forwarded to the waiting thread: every message is also a sign of life.
struct Forward(mpsc::Sender<Event>);

impl hf_hub::api::Progress for Forward {
    fn init(&mut self, size: usize, _filename: &str) {
        let _ = self.0.send(Event::Start(size as u64));
    }
    fn update(&mut self, size: usize) {
        let _ = self.0.send(Event::Advance(size as u64));
    }
    fn finish(&mut self) {}
}

const USER_AGENT: &str = concat!("masklm/", env!("CARGO_PKG_VERSION"));

impl<'r, 'p> Client<'r, 'p> {
    fn new(resolver: &'r Resolver<'p>, id: &'r ModelId) -> Result<Self, ResolveError> {
        let settings = &resolver.settings;
        let timeout = Some(settings.timeout);
        let agent = ureq::Agent::config_builder()
            .timeout_resolve(timeout)
            .timeout_connect(timeout)
            .timeout_send_request(timeout)
            .timeout_recv_response(timeout)
            .timeout_recv_body(timeout)
            .http_status_as_error(false)
            // Redirects are followed by hand (see `probe`).
            .max_redirects(0)
            .user_agent(USER_AGENT)
            .build()
            .into();
        let api = ApiBuilder::from_cache(Cache::new(settings.cache.clone()))
            .with_endpoint(settings.endpoint.clone())
            .with_token(settings.token.clone())
            .with_progress(false)
            .with_retries(0)
            .with_user_agent("masklm", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|source| ResolveError::Download {
                id: id.repo.clone(),
                endpoint: settings.endpoint.clone(),
                file: "(client)".to_string(),
                source: Box::new(source),
            })?;
        Ok(Client {
            resolver,
            id,
            agent,
            api,
        })
    }

    fn endpoint(&self) -> String {
        self.resolver.settings.endpoint.clone()
    }

    /// huggingface_hub's `hf_hub_url`: the revision's `/` escaped.
    fn url(&self, revision: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{file}",
            self.resolver.settings.endpoint,
            self.id.repo,
            revision.replace('/', "%2F")
        )
    }

    /// A HEAD request for `file` at `revision`, following redirects that stay on the Hub's
    /// origin (a renamed repo), as huggingface_hub's `get_hf_file_metadata` does: a redirect
    /// elsewhere is the LFS storage, and the Hub's headers are on the redirect itself.
    fn probe(&self, revision: &str, file: &str) -> Result<Remote, ResolveError> {
        let mut url = self.url(revision, file);
        for _ in 0..10 {
            let mut request = self.agent.head(&url).header("Accept-Encoding", "identity");
            if let Some(token) = &self.resolver.settings.token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let response = request.call().map_err(|e| self.transport(e, file))?;
            let header = |name: &str| {
                let value = response.headers().get(name)?.to_str().ok()?;
                Some(value.to_string())
            };
            let status = response.status().as_u16();
            if response.status().is_redirection()
                && let Some(target) = header("location").and_then(|l| same_origin(&url, &l))
            {
                url = target;
                continue;
            }
            if status < 400 {
                let commit = header("x-repo-commit")
                    .filter(|c| is_commit(c))
                    .ok_or_else(|| self.not_a_hub(&url, "X-Repo-Commit"))?;
                if header("x-linked-etag").or_else(|| header("etag")).is_none() {
                    return Err(self.not_a_hub(&url, "ETag"));
                }
                return Ok(Remote::Found { commit });
            }
            return self.refused(
                status,
                header("x-error-code"),
                header("x-error-message"),
                &url,
            );
        }
        Err(ResolveError::Http {
            id: self.id.repo.clone(),
            url,
            status: 310,
            detail: ": too many redirects".to_string(),
        })
    }

    /// An error answer, read as huggingface_hub's `hf_raise_for_status` reads it.
    fn refused(
        &self,
        status: u16,
        code: Option<String>,
        message: Option<String>,
        url: &str,
    ) -> Result<Remote, ResolveError> {
        let (id, endpoint) = (self.id.repo.clone(), self.endpoint());
        let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
        Err(match code.as_deref() {
            Some("EntryNotFound") => return Ok(Remote::Missing { status }),
            Some("RevisionNotFound") => ResolveError::RevisionNotFound {
                id,
                revision: self.id.revision.clone(),
                endpoint,
                status,
            },
            Some("GatedRepo") => ResolveError::Gated {
                id,
                endpoint,
                status,
            },
            Some("RepoNotFound") => ResolveError::RepoNotFound {
                id,
                endpoint,
                status,
            },
            _ if status == 401 || status == 403 => ResolveError::Unauthorized {
                id,
                endpoint,
                status,
                detail,
            },
            _ => ResolveError::Http {
                id,
                url: url.to_string(),
                status,
                detail,
            },
        })
    }

    fn not_a_hub(&self, url: &str, header: &'static str) -> ResolveError {
        ResolveError::NotAHub {
            id: self.id.repo.clone(),
            url: url.to_string(),
            header,
        }
    }

    fn timeout(&self, file: &str) -> ResolveError {
        ResolveError::Timeout {
            id: self.id.repo.clone(),
            endpoint: self.endpoint(),
            file: file.to_string(),
            seconds: self.resolver.settings.timeout.as_secs_f64(),
        }
    }

    /// A failure below HTTP: a timeout, or the Hub unreachable.
    fn transport(&self, error: ureq::Error, file: &str) -> ResolveError {
        use std::io::ErrorKind;
        match error {
            ureq::Error::Timeout(_) => self.timeout(file),
            ureq::Error::Io(e)
                if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) =>
            {
                self.timeout(file)
            }
            error => ResolveError::Unreachable {
                id: self.id.repo.clone(),
                endpoint: self.endpoint(),
                source: Box::new(error),
            },
        }
    }

    /// Downloads `file` at `commit` with hf-hub, into the cache, reporting progress; gives up
    /// when hf-hub reports nothing for the timeout (see the module doc).
    fn download(&self, commit: &str, file: &str) -> Result<(), ResolveError> {
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, commit.to_string());
        let api = self.api.repo(repo);
        let (tx, rx) = mpsc::channel();
        let name = file.to_string();
        let worker = std::thread::Builder::new()
            .name(format!("download {file}"))
            .spawn(move || {
                let result = api.download_with_progress(&name, Forward(tx.clone()));
                let _ = tx.send(Event::Done(result));
            });
        if let Err(source) = worker {
            return Err(ResolveError::Cache {
                path: self.resolver.settings.cache.clone(),
                source,
            });
        }
        let progress = self.resolver.progress;
        let mut started = false;
        let outcome = loop {
            match rx.recv_timeout(self.resolver.settings.timeout) {
                // hf-hub announces a file twice (before its request, and again with a resumed
                // offset): one bar.
                Ok(Event::Start(total)) => {
                    if !started {
                        progress.start(file, total);
                        started = true;
                    }
                }
                Ok(Event::Advance(bytes)) => progress.advance(bytes),
                Ok(Event::Done(result)) => break result.map_err(|e| self.api_error(e, file)),
                Err(mpsc::RecvTimeoutError::Timeout) => break Err(self.timeout(file)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(ResolveError::DownloadPanicked {
                        id: self.id.repo.clone(),
                        file: file.to_string(),
                    });
                }
            }
        };
        if started {
            progress.finish();
        }
        outcome.map(|_| ())
    }

    fn api_error(&self, error: ApiError, file: &str) -> ResolveError {
        match error {
            ApiError::RequestError(error) => match *error {
                ureq::Error::StatusCode(status) => ResolveError::Http {
                    id: self.id.repo.clone(),
                    url: self.url(&self.id.revision, file),
                    status,
                    detail: String::new(),
                },
                error => self.transport(error, file),
            },
            error => ResolveError::Download {
                id: self.id.repo.clone(),
                endpoint: self.endpoint(),
                file: file.to_string(),
                source: Box::new(error),
            },
        }
    }
}

/// `scheme://host:port` of an absolute http(s) URL, the port made explicit.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    Some(match has_port {
        true => format!("{scheme}://{authority}"),
        false => format!("{scheme}://{authority}:{default}"),
    })
}

/// The URL a redirect from `url` to `location` leads to, when it stays on `url`'s origin (an
/// absolute path, or an absolute URL of the same scheme, host and port).
fn same_origin(url: &str, location: &str) -> Option<String> {
    if location.starts_with('/') && !location.starts_with("//") {
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next()?;
        return Some(format!("{scheme}://{authority}{location}"));
    }
    (origin(location)? == origin(url)?).then(|| location.to_string())
}

/// The files of one commit, fetched into its snapshot.
struct Fetch<'c, 'r, 'p> {
    client: &'c Client<'r, 'p>,
    repo: &'c RepoCache,
    commit: &'c str,
}

impl Fetch<'_, '_, '_> {
    /// Makes sure the snapshot has `file` when the repo does: `false` when it does not (and
    /// the cache now says so in `.no_exist/`).
    fn get(&self, file: &str) -> Result<bool, ResolveError> {
        Ok(self.get_or_status(file)?.is_none())
    }

    /// [`Fetch::get`], with the HTTP status of a missing file's answer (0 when the cache
    /// already knew).
    fn get_or_status(&self, file: &str) -> Result<Option<u16>, ResolveError> {
        let (repo, commit) = (self.repo, self.commit);
        if repo.has(commit, file) {
            return Ok(None);
        }
        if repo.known_missing(commit, file) {
            return Ok(Some(0));
        }
        match self.client.probe(commit, file)? {
            Remote::Found { .. } => {
                self.client.download(commit, file)?;
                Ok(None)
            }
            Remote::Missing { status } => {
                // As huggingface_hub does after an EntryNotFound: an empty marker file.
                let marker = repo.dir.join(".no_exist").join(commit).join(file);
                create_file(&marker, "")?;
                Ok(Some(status))
            }
        }
    }

    fn entry_not_found(&self, file: &str, status: u16) -> ResolveError {
        ResolveError::EntryNotFound {
            id: self.client.id.repo.clone(),
            revision: self.client.id.revision.clone(),
            endpoint: self.client.endpoint(),
            file: file.to_string(),
            status,
        }
    }

    /// `model.safetensors`, else the index and its shards, else `pytorch_model.bin`.
    fn weights(&self) -> Result<(), ResolveError> {
        let [single, index, bin] = crate::WEIGHT_FILES;
        if self.get(single)? {
            return Ok(());
        }
        if self.get(index)? {
            let path = self.repo.snapshot(self.commit).join(SAFETENSORS_INDEX);
            let shards = read_safetensors_index(&path).map_err(|e| ResolveError::Index {
                id: self.client.id.repo.clone(),
                revision: self.client.id.revision.clone(),
                reason: e.to_string(),
            })?;
            for shard in shards {
                if let Some(status) = self.get_or_status(&shard)? {
                    return Err(self.entry_not_found(&shard, status));
                }
            }
            return Ok(());
        }
        if self.get(bin)? {
            return Ok(());
        }
        Err(ResolveError::NoWeights {
            id: self.client.id.repo.clone(),
            revision: self.client.id.revision.clone(),
            endpoint: self.client.endpoint(),
        })
    }
}

/// Writes `path` (creating its folder) through a temporary file renamed into place.
fn create_file(path: &Path, text: &str) -> Result<(), ResolveError> {
    let io = |source| ResolveError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::fs::write(tmp.path(), text).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Fetches into the snapshot of `commit` what `need` needs (`first` is known to exist).
fn fetch_files(
    client: &Client<'_, '_>,
    repo: &RepoCache,
    commit: &str,
    need: Need,
    first: &str,
) -> Result<(), ResolveError> {
    let fetch = Fetch {
        client,
        repo,
        commit,
    };
    if !repo.has(commit, first) {
        client.download(commit, first)?;
    }
    let optional = match need {
        Need::Model => {
            fetch.weights()?;
            &TOKENIZER_FILES[..]
        }
        Need::Tokenizer => &TOKENIZER_FILES[1..],
    };
    for file in optional {
        fetch.get(file)?;
    }
    Ok(())
}

/// Downloads what `need` needs of `id` that the cache lacks, and returns the snapshot folder.
pub(crate) fn fetch(
    resolver: &Resolver<'_>,
    id: &ModelId,
    repo: &RepoCache,
    need: Need,
) -> Result<PathBuf, ResolveError> {
    let client = Client::new(resolver, id)?;
    let first = match need {
        Need::Model => "config.json",
        Need::Tokenizer => TOKENIZER_FILES[0],
    };
    // The first answer names the commit the revision is at; everything is fetched at it.
    let commit = match client.probe(&id.revision, first)? {
        Remote::Found { commit } => commit,
        Remote::Missing { status } => {
            return Err(ResolveError::EntryNotFound {
                id: id.repo.clone(),
                revision: id.revision.clone(),
                endpoint: client.endpoint(),
                file: first.to_string(),
                status,
            });
        }
    };
    let commit_ref = repo.dir.join("refs").join(&commit);
    let had_commit_ref = commit_ref.exists();
    let fetched = fetch_files(&client, repo, &commit, need, first);
    // hf-hub wrote refs/COMMIT (see the module doc); huggingface_hub writes refs only for a
    // branch or tag.
    if !had_commit_ref && commit_ref.exists() {
        std::fs::remove_file(&commit_ref).map_err(|source| ResolveError::Cache {
            path: commit_ref.clone(),
            source,
        })?;
    }
    fetched?;
    if id.revision != commit {
        create_file(&repo.dir.join("refs").join(&id.revision), &commit)?;
    }
    Ok(repo.snapshot(&commit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{HubSettings, NoDownloadProgress};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    fn settings(endpoint: &str, cache: &Path) -> HubSettings {
        HubSettings {
            cache: cache.to_path_buf(),
            endpoint: endpoint.to_string(),
            token: None,
            offline: false,
            timeout: Duration::from_millis(500),
        }
    }

    /// Resolves `org/m` against `endpoint` with an empty cache; the error.
    fn error(endpoint: &str) -> ResolveError {
        let cache = tempfile::tempdir().unwrap();
        let resolver = Resolver::new(settings(endpoint, cache.path()), &NoDownloadProgress);
        let id = ModelId::parse("org/m").unwrap();
        match resolver.resolve_id(&id, Need::Model) {
            Ok(path) => panic!("resolved to {}", path.display()),
            Err(e) => e,
        }
    }

    /// A server on 127.0.0.1 answering every request with `status` and `headers`.
    fn canned(status: u16, headers: &'static [(&'static str, &'static str)]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = Vec::new();
                let mut byte = [0u8];
                while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                let mut answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n");
                for (name, value) in headers {
                    answer += &format!("{name}: {value}\r\n");
                }
                let _ = stream.write_all(format!("{answer}Connection: close\r\n\r\n").as_bytes());
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn a_closed_port_is_unreachable_and_a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let start = Instant::now();
        let e = error(&closed);
        assert!(matches!(e, ResolveError::Unreachable { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3));

        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let start = Instant::now();
        let e = error(&endpoint);
        assert!(
            e.to_string().contains("no answer from http://127.0.0.1:"),
            "{e}"
        );
        assert!(matches!(e, ResolveError::Timeout { ref file, .. } if file == "config.json"));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(silent);
    }

    /// An answer's status and headers, and what the error must say.
    type Case = (u16, &'static [(&'static str, &'static str)], &'static str);

    #[test]
    fn error_answers_are_read_as_huggingface_hub_reads_them() {
        let cases: [Case; 7] = [
            (
                404,
                &[("X-Error-Code", "RepoNotFound")],
                "no such repository",
            ),
            (
                401,
                &[("X-Error-Code", "RepoNotFound")],
                "no such repository",
            ),
            (
                404,
                &[("X-Error-Code", "RevisionNotFound")],
                "no revision main",
            ),
            (401, &[("X-Error-Code", "GatedRepo")], "is gated (HTTP 401)"),
            (
                403,
                &[("X-Error-Message", "no")],
                "refused access (HTTP 403: no)",
            ),
            (503, &[], "answered HTTP 503"),
            (
                404,
                &[
                    ("X-Error-Code", "EntryNotFound"),
                    ("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567"),
                ],
                "has no config.json (HTTP 404)",
            ),
        ];
        for (status, headers, expected) in cases {
            let e = error(&canned(status, headers)).to_string();
            assert!(e.contains(expected), "{status} {headers:?}: {e}");
        }
        // A 200 without the Hub's headers is not a Hub.
        let e = error(&canned(200, &[("ETag", "\"x\"")])).to_string();
        assert!(e.contains("no X-Repo-Commit header"), "{e}");
    }

    #[test]
    fn redirects_are_followed_only_on_the_same_origin() {
        let url = "http://127.0.0.1:8000/a/resolve/main/x";
        assert_eq!(
            same_origin(url, "/b/resolve/main/x").as_deref(),
            Some("http://127.0.0.1:8000/b/resolve/main/x")
        );
        let same = "http://127.0.0.1:8000/c";
        assert_eq!(same_origin(url, same).as_deref(), Some(same));
        assert_eq!(same_origin(url, "http://127.0.0.1:8001/c"), None);
        assert_eq!(same_origin(url, "https://cdn.example/c"), None);
        assert_eq!(same_origin(url, "//cdn.example/c"), None);
        assert_eq!(
            origin("https://HF.co/x").as_deref(),
            Some("https://hf.co:443")
        );
    }
}
