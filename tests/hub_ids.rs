//! Hub model ids (`org/name[@revision]`) wherever a model folder is accepted: resolved in a
//! Hub cache that huggingface_hub itself laid out, downloaded from a local stand-in for the
//! Hub (tests/common/hub_server.rs, 127.0.0.1 only) into a cache huggingface_hub then reads,
//! and every way that can fail named.
//!
//! The models are the fixtures `roberta-tiny` and `modernbert-tiny` (scripts/make_reference.py);
//! "equal" means `masklm fill-mask --json` prints the same text as for the fixture folder.
//! The huggingface_hub side is scripts/make_hub_cache.py, run with the reference Python.

mod common;
#[path = "common/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hub_server::{HubRepo, HubServer, MODEL_FILES, closed_port, silent_server};

const ROBERTA: &str = "masklm-test/roberta-tiny";
const MODERNBERT: &str = "masklm-test/modernbert-tiny";

/// Every variable that steers huggingface_hub or masklm's resolver: unset in each masklm run,
/// so that the machine's own settings (a token, a cache, offline mode) cannot leak in.
const HUB_VARS: [&str; 14] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "MASKLM_HUB_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HUGGINGFACE_CO_STAGING",
];

/// `masklm` with HF_HOME = `home` (so the cache is `home/hub` and no token file exists unless a
/// test writes one) and HF_ENDPOINT = `endpoint`.
fn masklm(home: &Path, endpoint: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_masklm"));
    for var in HUB_VARS {
        command.env_remove(var);
    }
    command
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("MASKLM_HUB_TIMEOUT", "5");
    command
}

fn run(mut command: Command, args: &[&str]) -> Output {
    command.args(args).output().expect("the masklm binary runs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "masklm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of_failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "masklm succeeded but should not: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The first sentence of a fixture's fill-mask reference (it holds the fixture's mask token).
fn sentence(fixture: &str) -> String {
    let path = common::fixture(fixture).join("fill_mask_reference.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    reference["sentences"][0].as_str().unwrap().to_string()
}

/// `fill-mask --json` of `model` on the fixture's sentence, with `command`'s environment.
fn fill(command: Command, model: &str, fixture: &str) -> Output {
    run(
        command,
        &["fill-mask", "--json", "--model", model, &sentence(fixture)],
    )
}

/// The same for the fixture folder itself: what every id must reproduce.
fn expected_fill(fixture: &str) -> String {
    let dir = common::fixture(fixture).display().to_string();
    common::masklm_ok(["fill-mask", "--json", "--model", &dir, &sentence(fixture)])
}

fn fixture_repo(fixture: &str) -> HubRepo {
    HubRepo::from_folder(&common::fixture(fixture), &MODEL_FILES)
}

fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// scripts/make_hub_cache.py with `args`; its JSON answer.
fn hub_cache_script(python: &str, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make_hub_cache.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("the reference Python runs");
    assert!(
        out.status.success(),
        "make_hub_cache.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("make_hub_cache.py prints JSON")
}

#[test]
fn a_cache_laid_out_by_huggingface_hub_resolves_offline() {
    let Some(python) = common::reference_python("huggingface_hub") else {
        return;
    };
    let server = HubServer::start(vec![(ROBERTA, fixture_repo("roberta-tiny"))]);
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().display().to_string();
    let endpoint = server.endpoint();
    // vocab.json is not in the repo: huggingface_hub records it in .no_exist/.
    let mut args = vec![
        "download",
        "--endpoint",
        &endpoint,
        "--cache",
        &cache_arg,
        "--repo",
        ROBERTA,
    ];
    args.extend(MODEL_FILES);
    args.push("vocab.json");
    let made = hub_cache_script(&python, &args);
    let commit = made["commit"].as_str().unwrap().to_string();
    assert_eq!(commit, fixture_repo("roberta-tiny").commit);
    server.stop();

    let expected = expected_fill("roberta-tiny");
    let home = tempfile::tempdir().unwrap();
    let offline = || {
        let mut command = masklm(home.path(), &closed_port());
        command
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1");
        command
    };
    for id in [
        ROBERTA.to_string(),
        format!("{ROBERTA}@main"),
        format!("{ROBERTA}@{commit}"),
    ] {
        let out = fill(offline(), &id, "roberta-tiny");
        assert_eq!(stdout(&out), expected, "{id}");
    }
    // huggingface_hub recorded refs/main only: a tag it never saw is not in the cache.
    let msg = stderr_of_failure(&fill(offline(), &format!("{ROBERTA}@v1"), "roberta-tiny"));
    assert!(
        msg.contains(&format!(
            "model {ROBERTA}@v1: config.json is not in the Hub cache"
        )) && msg.contains(&cache_arg)
            && msg.contains("offline mode is on"),
        "{msg}"
    );
}

#[test]
fn a_download_loads_equal_to_the_folder_and_huggingface_hub_reads_the_cache() {
    let server = HubServer::start(vec![
        (ROBERTA, fixture_repo("roberta-tiny")),
        (MODERNBERT, fixture_repo("modernbert-tiny")),
    ]);
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let models = [(ROBERTA, "roberta-tiny"), (MODERNBERT, "modernbert-tiny")];
    for (id, fixture) in models {
        let out = fill(masklm(home.path(), &server.endpoint()), id, fixture);
        assert_eq!(stdout(&out), expected_fill(fixture), "{id}");
    }
    assert!(server.requests() > 0);

    // huggingface_hub's layout: refs/main -> commit, snapshot files linked to blobs named by
    // their ETag (the sha256 for LFS weights), absent files in .no_exist/.
    for (id, fixture) in models {
        let repo = repo_dir(&cache, id);
        let commit = fixture_repo(fixture).commit;
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            commit
        );
        assert!(
            !repo.join("refs").join(&commit).exists(),
            "a ref named by its commit"
        );
        let weights = repo
            .join("snapshots")
            .join(&commit)
            .join("model.safetensors");
        let link = std::fs::read_link(&weights).unwrap();
        let bytes = std::fs::read(common::fixture(fixture).join("model.safetensors")).unwrap();
        let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(link, Path::new("../../blobs").join(sha));
        assert_eq!(std::fs::read(&weights).unwrap(), bytes);
    }
    let modernbert = repo_dir(&cache, MODERNBERT);
    let commit = fixture_repo("modernbert-tiny").commit;
    assert!(
        modernbert
            .join(".no_exist")
            .join(&commit)
            .join("special_tokens_map.json")
            .is_file()
    );

    if let Some(python) = common::reference_python("huggingface_hub") {
        for (id, fixture) in models {
            let cache_arg = cache.display().to_string();
            let mut args = vec!["check", "--cache", &cache_arg, "--repo", id];
            args.extend(MODEL_FILES);
            let seen = hub_cache_script(&python, &args);
            let commit = fixture_repo(fixture).commit;
            let snapshot = repo_dir(&cache, id).join("snapshots").join(&commit);
            assert_eq!(
                seen["snapshot"].as_str().unwrap(),
                snapshot.to_str().unwrap()
            );
            for file in MODEL_FILES {
                let found = &seen["files"][file];
                if common::fixture(fixture).join(file).is_file() {
                    let path = snapshot.join(file);
                    assert_eq!(found.as_str(), path.to_str(), "{id} {file}");
                } else {
                    assert_eq!(found.as_str(), Some("no_exist"), "{id} {file}");
                }
            }
            let repo = seen["repos"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["repo_id"] == id)
                .unwrap_or_else(|| panic!("scan_cache_dir lacks {id}: {seen}"));
            assert_eq!(repo["refs"], serde_json::json!(["main"]), "{seen}");
            assert_eq!(repo["revisions"], serde_json::json!([commit]), "{seen}");
            assert_eq!(seen["warnings"], serde_json::json!([]), "{seen}");
        }
    }

    // A second run needs the Hub no more: it is gone.
    let endpoint = server.endpoint();
    server.stop();
    for (id, fixture) in models {
        let out = fill(masklm(home.path(), &endpoint), id, fixture);
        assert_eq!(stdout(&out), expected_fill(fixture), "second run of {id}");
    }
}

#[test]
fn offline_mode_with_an_empty_cache_refuses_to_download() {
    let server = HubServer::start(vec![(ROBERTA, fixture_repo("roberta-tiny"))]);
    let home = tempfile::tempdir().unwrap();
    let mut command = masklm(home.path(), &server.endpoint());
    command.env("HF_HUB_OFFLINE", "1");
    let msg = stderr_of_failure(&fill(command, ROBERTA, "roberta-tiny"));
    let cache = repo_dir(&home.path().join("hub"), ROBERTA);
    assert!(
        msg.contains(&format!(
            "model {ROBERTA}@main: config.json is not in the Hub cache"
        )) && msg.contains(cache.to_str().unwrap())
            && msg.contains("offline mode is on (HF_HUB_OFFLINE=1)"),
        "{msg}"
    );
    assert_eq!(server.requests(), 0, "{:?}", server.log());
}

/// A repo holding the fixture's `files` only.
fn partial_repo(fixture: &str, files: &[&str]) -> HubRepo {
    HubRepo::from_folder(&common::fixture(fixture), files)
}

#[test]
fn hub_errors_say_which_and_what_to_do() {
    let tokenizer = ["tokenizer.json", "tokenizer_config.json"];
    let no_weights = partial_repo("roberta-tiny", &["config.json", tokenizer[0], tokenizer[1]]);
    let no_config = partial_repo("roberta-tiny", &["model.safetensors", tokenizer[0]]);
    let mut gated = fixture_repo("roberta-tiny");
    gated.gated_token = Some("hf_secret".to_string());
    let server = HubServer::start(vec![
        (ROBERTA, fixture_repo("roberta-tiny")),
        ("masklm-test/no-weights", no_weights),
        ("no-config", no_config),
        ("masklm-test/gated", gated),
    ]);
    let home = tempfile::tempdir().unwrap();
    let failure = |model: &str| {
        let command = masklm(home.path(), &server.endpoint());
        stderr_of_failure(&fill(command, model, "roberta-tiny"))
    };
    let endpoint = server.endpoint();

    let msg = failure("masklm-test/nope");
    assert!(
        msg.contains(&format!(
            "model masklm-test/nope: no such repository on {endpoint} (HTTP 404)"
        )) && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    let msg = failure(&format!("{ROBERTA}@v9"));
    assert!(
        msg.contains("no revision v9") && msg.contains("HTTP 404"),
        "{msg}"
    );
    let msg = failure("masklm-test/no-weights");
    assert!(
        msg.contains("has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"),
        "{msg}"
    );
    let msg = failure("no-config");
    assert!(
        msg.contains("model no-config@main on") && msg.contains("has no config.json"),
        "{msg}"
    );
    let msg = failure("masklm-test/gated");
    assert!(
        msg.contains("model masklm-test/gated is gated (HTTP 401)")
            && msg.contains(&format!(
                "accept its conditions at {endpoint}/masklm-test/gated"
            ))
            && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    let mut wrong = masklm(home.path(), &endpoint);
    wrong.env("HF_TOKEN", "hf_wrong");
    let msg = stderr_of_failure(&fill(wrong, "masklm-test/gated", "roberta-tiny"));
    assert!(msg.contains("is gated (HTTP 403)"), "{msg}");
    let msg = failure("a/b/c");
    assert!(
        msg.contains("a/b/c: no such folder, and not a Hugging Face model id"),
        "{msg}"
    );
    // The token file huggingface_hub's login writes (HF_HOME/token) opens the gated repo.
    std::fs::write(home.path().join("token"), "hf_secret\n").unwrap();
    let out = fill(
        masklm(home.path(), &endpoint),
        "masklm-test/gated",
        "roberta-tiny",
    );
    assert_eq!(stdout(&out), expected_fill("roberta-tiny"));
}

#[test]
fn an_unreachable_or_silent_hub_fails_within_the_timeout() {
    let home = tempfile::tempdir().unwrap();
    let closed = closed_port();
    let start = Instant::now();
    let msg = stderr_of_failure(&fill(masklm(home.path(), &closed), ROBERTA, "roberta-tiny"));
    assert!(
        msg.contains(&format!(
            "model {ROBERTA}: cannot reach the Hub at {closed}"
        )) && msg.contains(&format!("no folder {ROBERTA} exists here"))
            && msg.contains("HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let silent = silent_server();
    let mut command = masklm(home.path(), &silent);
    command.env("MASKLM_HUB_TIMEOUT", "1");
    let start = Instant::now();
    let msg = stderr_of_failure(&fill(command, ROBERTA, "roberta-tiny"));
    assert!(
        msg.contains(&format!(
            "no answer from {silent} for 1s while fetching config.json"
        )) && msg.contains("MASKLM_HUB_TIMEOUT"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );

    // A Hub that answers the metadata, then stalls in the middle of the weights: hf-hub's own
    // client has no timeout; masklm gives up when its progress stops.
    let mut stalling = fixture_repo("roberta-tiny");
    stalling.stall_downloads = true;
    let server = HubServer::start(vec![(ROBERTA, stalling)]);
    let mut command = masklm(home.path(), &server.endpoint());
    command.env("MASKLM_HUB_TIMEOUT", "1");
    let start = Instant::now();
    let msg = stderr_of_failure(&fill(command, ROBERTA, "roberta-tiny"));
    assert!(
        msg.contains("for 1s while fetching model.safetensors"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
}

/// Writes `fixture`'s weights into `out` as two shards and `model.safetensors.index.json`
/// (tensors split in name order, as transformers' `save_pretrained(max_shard_size=...)` does),
/// with the fixture's config and tokenizer files.
fn shard_fixture(fixture: &str, out: &Path) {
    use safetensors::SafeTensors;
    use safetensors::tensor::TensorView;
    let dir = common::fixture(fixture);
    for file in MODEL_FILES.iter().filter(|f| **f != "model.safetensors") {
        if dir.join(file).is_file() {
            std::fs::copy(dir.join(file), out.join(file)).unwrap();
        }
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    let half = names.len() / 2;
    let shards = [
        ("model-00001-of-00002.safetensors", &names[..half]),
        ("model-00002-of-00002.safetensors", &names[half..]),
    ];
    let mut weight_map = serde_json::Map::new();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    for (shard, names) in shards {
        let views: Vec<(String, TensorView<'_>)> = names
            .iter()
            .map(|name| (name.to_string(), file.tensor(name).unwrap()))
            .collect();
        for name in names.iter() {
            weight_map.insert(name.to_string(), shard.into());
        }
        safetensors::serialize_to_file(views, metadata.clone(), &out.join(shard)).unwrap();
    }
    let index =
        serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_safetensors_load_equal_to_unsharded() {
    let dirs = tempfile::tempdir().unwrap();
    let mut repos = Vec::new();
    for fixture in ["roberta-tiny", "modernbert-tiny"] {
        let sharded = dirs.path().join(fixture);
        std::fs::create_dir(&sharded).unwrap();
        shard_fixture(fixture, &sharded);
        let model = sharded.display().to_string();
        let out = common::masklm_ok(["fill-mask", "--json", "--model", &model, &sentence(fixture)]);
        assert_eq!(out, expected_fill(fixture), "{fixture} sharded");
        let mut files: Vec<String> = std::fs::read_dir(&sharded)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        repos.push((fixture, HubRepo::from_folder(&sharded, &files)));
    }
    // A shard missing from the folder is named.
    let broken = dirs.path().join("roberta-tiny");
    let shard = broken.join("model-00002-of-00002.safetensors");
    std::fs::rename(&shard, dirs.path().join("aside")).unwrap();
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_masklm")),
        &[
            "fill-mask",
            "--json",
            "--model",
            broken.to_str().unwrap(),
            "a <mask>",
        ],
    );
    let msg = stderr_of_failure(&out);
    assert!(
        msg.contains(
            "names the shard model-00002-of-00002.safetensors, which is not in the folder"
        ),
        "{msg}"
    );

    // Downloaded by id: the index, then each shard.
    let (roberta, modernbert) = (repos.remove(0).1, repos.remove(0).1);
    let server = HubServer::start(vec![(ROBERTA, roberta), (MODERNBERT, modernbert)]);
    let home = tempfile::tempdir().unwrap();
    for (id, fixture) in [(ROBERTA, "roberta-tiny"), (MODERNBERT, "modernbert-tiny")] {
        let out = fill(masklm(home.path(), &server.endpoint()), id, fixture);
        assert_eq!(
            stdout(&out),
            expected_fill(fixture),
            "{id} sharded, downloaded"
        );
    }
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.ends_with("/model-00002-of-00002.safetensors")),
        "{log:?}"
    );
}

#[test]
fn ids_work_for_vocab_prepare_and_train() {
    let server = HubServer::start(vec![(ROBERTA, fixture_repo("roberta-tiny"))]);
    let home = tempfile::tempdir().unwrap();
    let corpus = common::fixture("tokenizer-corpus.txt")
        .display()
        .to_string();

    // A tokenizer alone: only the tokenizer files are fetched.
    let out = run(
        masklm(home.path(), &server.endpoint()),
        &[
            "vocab", "audit", "--model", ROBERTA, "--input", &corpus, "--json",
        ],
    );
    stdout(&out);
    let log = server.log();
    assert!(
        !log.iter().any(|l| l.contains("model.safetensors")),
        "{log:?}"
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let out = run(
        masklm(home.path(), &server.endpoint()),
        &[
            "prepare",
            "--tokenizer",
            ROBERTA,
            "--input",
            &corpus,
            "--out",
            cache.to_str().unwrap(),
        ],
    );
    stdout(&out);

    // init_from and data.tokenizer by id; the weights are fetched now.
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
seed = 7
[model]
init_from = "{ROBERTA}"
[data]
tokenizer = "{ROBERTA}"
inputs = ["{corpus}"]
cache = "{cache}"
max_seq_length = 64
validation_split = 0.05
[optimizer]
lr = 1e-4
[training]
batch_size = 4
max_steps = 2
[eval]
eval_steps = 0
"#,
            cache = work.path().join("train-cache").display(),
        ),
    )
    .unwrap();
    let run_dir = work.path().join("run");
    let out = run(
        masklm(home.path(), &server.endpoint()),
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            run_dir.to_str().unwrap(),
        ],
    );
    stdout(&out);
    assert!(run_dir.join("checkpoints/step-0000002/model.bpk").is_file());
}
