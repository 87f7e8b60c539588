//! A stand-in for the Hugging Face Hub on 127.0.0.1, serving model folders in the Hub's URL
//! layout with the headers huggingface_hub (`file_download.py`, `utils/_http.py`) and hf-hub
//! (`api/sync.rs`) read:
//!
//! - `GET|HEAD /{org}/{name}/resolve/{revision}/{file}` (and `/{name}/resolve/...`):
//!   `X-Repo-Commit`, `ETag` (a content hash standing in for the git blob id), `Content-Length`,
//!   `Accept-Ranges`, and for a `Range: bytes=a-b` request 206 with `Content-Range`;
//! - weights (`*.safetensors`, `*.bin`) are LFS files, as on the Hub: 302 to an absolute
//!   `/lfs/{sha256}` URL on another origin (a second port: the CDN, whose answers carry none of
//!   the Hub's headers and to which clients send no token), with `X-Linked-Etag` (the sha256)
//!   and `X-Linked-Size`;
//! - errors as the Hub gives them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound`
//!   or `EntryNotFound` (this one with `X-Repo-Commit`), and for a gated repo 401 (no token)
//!   or 403 (another token) with `X-Error-Code: GatedRepo`.
//!
//! A revision is `main`, `v1` (a tag) or the repo's commit. One thread per connection, each
//! answer closing it: enough for tests. It binds 127.0.0.1 only.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// One repository: its files and commit.
#[derive(Clone)]
pub struct HubRepo {
    pub files: BTreeMap<String, Vec<u8>>,
    pub commit: String,
    /// A gated repo answers only `Authorization: Bearer TOKEN`.
    pub gated_token: Option<String>,
    /// Send only the first half of each LFS file's content, then hold the connection silent.
    pub stall_downloads: bool,
}

impl HubRepo {
    /// The `files` of folder `dir` (those it has), at a commit derived from their content.
    pub fn from_folder(dir: &Path, files: &[&str]) -> Self {
        let files: BTreeMap<String, Vec<u8>> = files
            .iter()
            .filter_map(|f| Some((f.to_string(), std::fs::read(dir.join(f)).ok()?)))
            .collect();
        Self::new(files)
    }

    pub fn new(files: BTreeMap<String, Vec<u8>>) -> Self {
        let mut hasher = Sha256::new();
        for (name, data) in &files {
            hasher.update(name.as_bytes());
            hasher.update(data);
        }
        let commit = format!("{:x}", hasher.finalize())[..40].to_string();
        HubRepo {
            files,
            commit,
            gated_token: None,
            stall_downloads: false,
        }
    }
}

/// The files a masklm model folder holds for the Hub (the fixtures' reference files are not
/// part of a model repo).
pub const MODEL_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub struct HubServer {
    addr: SocketAddr,
    cdn: SocketAddr,
    requests: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

impl HubServer {
    /// Serves `repos` (id -> repo) on a free port of 127.0.0.1, their LFS files on another.
    pub fn start(repos: Vec<(&str, HubRepo)>) -> Self {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let (hub, cdn) = (bind(), bind());
        let (addr, cdn_addr) = (hub.local_addr().unwrap(), cdn.local_addr().unwrap());
        let repos: Arc<BTreeMap<String, HubRepo>> = Arc::new(
            repos
                .into_iter()
                .map(|(id, r)| (id.to_string(), r))
                .collect(),
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [hub, cdn]
            .into_iter()
            .map(|listener| {
                let (repos, requests, log, stop) =
                    (repos.clone(), requests.clone(), log.clone(), stop.clone());
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let (repos, requests, log) = (repos.clone(), requests.clone(), log.clone());
                        std::thread::spawn(move || {
                            let _ = answer(stream, cdn_addr, &repos, &requests, &log);
                        });
                    }
                })
            })
            .collect();
        HubServer {
            addr,
            cdn: cdn_addr,
            requests,
            log,
            stop,
            threads,
        }
    }

    /// `http://127.0.0.1:PORT`, for HF_ENDPOINT.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// "METHOD PATH" of each request so far (the Hub's and the CDN's).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Stops listening: both ports refuse connections from now on.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loops so that they see the flag and drop their listeners.
        for addr in [self.addr, self.cdn] {
            let _ = TcpStream::connect(addr);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port of 127.0.0.1 that nothing listens on (connections are refused).
pub fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A server on 127.0.0.1 that accepts connections and never answers; the connections stay
/// open for as long as the test runs.
pub fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    // Requests here have no body (GET, HEAD).
    Some(Request {
        method,
        path,
        headers,
    })
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send half the body, then stay silent.
    stall: bool,
}

impl Answer {
    fn error(status: u16, code: &str, message: &str) -> Self {
        Answer {
            status,
            headers: vec![
                ("X-Error-Code".into(), code.into()),
                ("X-Error-Message".into(), message.into()),
            ],
            body: message.as_bytes().to_vec(),
            stall: false,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn answer(
    mut stream: TcpStream,
    cdn: SocketAddr,
    repos: &BTreeMap<String, HubRepo>,
    requests: &AtomicUsize,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let Some(request) = read_request(&stream) else {
        return Ok(());
    };
    requests.fetch_add(1, Ordering::SeqCst);
    log.lock()
        .unwrap()
        .push(format!("{} {}", request.method, request.path));
    let mut answer = route(&request, cdn, repos);
    answer.headers.push(("Connection".into(), "close".into()));
    let head = request.method == "HEAD";
    let mut out = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
    if !answer.headers.iter().any(|(n, _)| n == "Content-Length") {
        out += &format!("Content-Length: {}\r\n", answer.body.len());
    }
    for (name, value) in &answer.headers {
        out += &format!("{name}: {value}\r\n");
    }
    out += "\r\n";
    stream.write_all(out.as_bytes())?;
    if head {
        return stream.flush();
    }
    if answer.stall {
        stream.write_all(&answer.body[..answer.body.len() / 2])?;
        stream.flush()?;
        std::thread::sleep(std::time::Duration::from_secs(600));
        return Ok(());
    }
    stream.write_all(&answer.body)?;
    stream.flush()
}

/// The bytes of `data` a `Range` header asks for: (status, body, extra headers).
fn ranged(data: &[u8], range: Option<&String>) -> Answer {
    let total = data.len();
    let mut headers = vec![("Accept-Ranges".to_string(), "bytes".to_string())];
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        headers.push(("Content-Length".into(), total.to_string()));
        return Answer {
            status: 200,
            headers,
            body: data.to_vec(),
            stall: false,
        };
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end.parse().map_or(total.saturating_sub(1), |e: usize| {
        e.min(total.saturating_sub(1))
    });
    if start >= total || start > end {
        headers.push(("Content-Range".into(), format!("bytes */{total}")));
        return Answer {
            status: 416,
            headers,
            body: Vec::new(),
            stall: false,
        };
    }
    headers.push(("Content-Length".into(), (end + 1 - start).to_string()));
    headers.push((
        "Content-Range".into(),
        format!("bytes {start}-{end}/{total}"),
    ));
    Answer {
        status: 206,
        headers,
        body: data[start..=end].to_vec(),
        stall: false,
    }
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

fn route(request: &Request, cdn: SocketAddr, repos: &BTreeMap<String, HubRepo>) -> Answer {
    let path = request.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let range = request.headers.get("range");
    // The CDN: LFS content by its sha256.
    if let ["lfs", sha] = segments[..] {
        let found = repos.values().find_map(|r| {
            let data = r.files.values().find(|data| sha256_hex(data) == sha)?;
            Some((data, r.stall_downloads))
        });
        return match found {
            Some((data, stall)) => {
                let mut answer = ranged(data, range);
                answer.headers.push(("ETag".into(), format!("\"{sha}\"")));
                // The metadata request (bytes=0-0) is answered; the content stalls.
                answer.stall = stall && range.is_none_or(|r| r != "bytes=0-0");
                answer
            }
            None => Answer::error(404, "NotFound", "no such object"),
        };
    }
    let Some(at) = segments.iter().position(|s| *s == "resolve") else {
        return Answer::error(404, "NotFound", "not a resolve URL");
    };
    if at == 0 || at > 2 || segments.len() < at + 3 {
        return Answer::error(404, "NotFound", "not a resolve URL");
    }
    let id = segments[..at].join("/");
    let revision = segments[at + 1].replace("%2F", "/");
    let file = segments[at + 2..].join("/");
    let Some(repo) = repos.get(&id) else {
        return Answer::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(token) = &repo.gated_token {
        match request.headers.get("authorization") {
            None => {
                return Answer::error(
                    401,
                    "GatedRepo",
                    "Access to this model is restricted: you must be authenticated",
                );
            }
            Some(given) if *given != format!("Bearer {token}") => {
                return Answer::error(403, "GatedRepo", "Access to this model is restricted");
            }
            Some(_) => {}
        }
    }
    if !["main", "v1", repo.commit.as_str()].contains(&revision.as_str()) {
        return Answer::error(404, "RevisionNotFound", "Invalid rev id");
    }
    let commit = ("X-Repo-Commit".to_string(), repo.commit.clone());
    let Some(data) = repo.files.get(&file) else {
        let mut answer = Answer::error(404, "EntryNotFound", "Entry not found");
        answer.headers.push(commit);
        return answer;
    };
    let sha = sha256_hex(data);
    // A stand-in for the git blob id the Hub gives as the ETag of a regular file.
    let oid = {
        let mut hasher = Sha256::new();
        hasher.update(format!("blob {}\0", data.len()));
        hasher.update(data);
        format!("{:x}", hasher.finalize())[..40].to_string()
    };
    if is_lfs(&file) {
        return Answer {
            status: 302,
            headers: vec![
                commit,
                ("ETag".into(), format!("\"{oid}\"")),
                ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                ("X-Linked-Size".into(), data.len().to_string()),
                ("Location".into(), format!("http://{cdn}/lfs/{sha}")),
            ],
            body: Vec::new(),
            stall: false,
        };
    }
    let mut answer = ranged(data, range);
    answer.headers.push(commit);
    answer.headers.push(("ETag".into(), format!("\"{oid}\"")));
    answer
}
