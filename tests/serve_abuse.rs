//! `masklm serve` under abuse (issue #22): clients that leave get no work done for them, work
//! and answers are bounded before the model runs, a run's metrics come back thinned, SIGTERM
//! drains, and what the server echoes or splits stays sane. Each test is one case, named so a
//! failure says which.

mod common;
mod serve_support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use masklm_serve::Limits;
use serde_json::{Value, json};
use serve_support::{get, http, options, post, read_reply, reference_sentences, send, start};

/// A text of about a hundred tokens (well inside roberta-tiny's 128): scoring it is a hundred
/// masked copies through the model.
fn long_text() -> String {
    " the".repeat(100)
}

/// (received, finished, abandoned) jobs, from /healthz.
fn job_counts(addr: SocketAddr) -> (u64, u64, u64) {
    let (status, health) = get(addr, "/healthz");
    assert_eq!(status, 200, "{health}");
    let count = |key: &str| {
        health["jobs"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("/healthz has no jobs.{key}: {health}"))
    };
    (count("received"), count("finished"), count("abandoned"))
}

/// Waits (up to a minute) until the server has received `n` jobs.
fn wait_until_received(addr: SocketAddr, n: u64) {
    let started = Instant::now();
    while job_counts(addr).0 < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?} (received, finished, abandoned) after a minute; waiting for {n} received",
            job_counts(addr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server whose limits let one request be far more work than its timeout allows.
fn lenient_server(timeout: Duration) -> serve_support::Running {
    let mut opts = options(&[("tiny", common::fixture("roberta-tiny"))]);
    opts.limits = Limits {
        max_inputs: 2000,
        max_score_tokens: 1_000_000,
        request_timeout: timeout,
        ..Limits::default()
    };
    start(opts)
}

/// A document cut for a failure message.
fn short(doc: &Value) -> String {
    doc.to_string().chars().take(300).collect()
}

/// A fresh, small request: must be answered (200) within the server's timeout.
fn assert_fresh_request_served(addr: SocketAddr, what: &str) {
    let (status, doc) = post(
        addr,
        "/v1/fill-mask",
        &json!({"inputs": reference_sentences()[0]}),
    );
    assert_eq!(status, 200, "{what}: a fresh request was not served: {doc}");
}

#[test]
fn timed_out_request_stops_its_work_and_queued_abandoned_ones_get_none() {
    let server = lenient_server(Duration::from_secs(3));
    let addr = server.addr;
    // ~200,000 masked copies: minutes of work on the model thread.
    let big = std::thread::spawn(move || {
        let texts = vec![long_text(); 2000];
        post(addr, "/v1/score", &json!({ "inputs": texts }))
    });
    // While it runs, three fill requests queue behind it, and their clients leave.
    wait_until_received(addr, 1);
    let body = json!({"inputs": reference_sentences()}).to_string();
    let fills: Vec<_> = (0..3)
        .map(|_| {
            let bytes = body.as_bytes();
            send(
                addr,
                "POST",
                "/v1/fill-mask",
                Some("application/json"),
                bytes,
            )
        })
        .collect();
    wait_until_received(addr, 4);
    drop(fills);
    let (status, doc) = big.join().unwrap();
    assert_eq!(
        status,
        408,
        "the big request was expected to time out: {}",
        short(&doc)
    );
    assert_fresh_request_served(addr, "after a 408");
    assert_eq!(
        job_counts(addr),
        (5, 1, 4),
        "(received, finished, abandoned): the fresh request finished; the timed-out score and \
         the three fills whose clients left were abandoned"
    );
}

#[test]
fn a_flood_of_disconnected_clients_does_no_work_and_a_fresh_one_is_served() {
    // A timeout far beyond the time the fresh request needs: it must be served because the
    // flood's work is skipped, not because the flood timed out first.
    let server = lenient_server(Duration::from_secs(30));
    let addr = server.addr;
    let body = json!({ "inputs": vec![long_text(); 200] }).to_string();
    // Each: ~20,000 masked copies (minutes of work together); sent, then abandoned once the
    // server has queued it.
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let bytes = body.as_bytes();
            send(addr, "POST", "/v1/score", Some("application/json"), bytes)
        })
        .collect();
    wait_until_received(addr, 16);
    drop(flood);
    let started = Instant::now();
    assert_fresh_request_served(addr, "after 16 abandoned requests");
    println!("fresh request served in {:?}", started.elapsed());
    assert_eq!(
        job_counts(addr),
        (17, 1, 16),
        "(received, finished, abandoned): only the fresh request ran to its end"
    );
}

/// `n` copies of `text`, as a score request.
fn score_request(text: &str, n: usize) -> Value {
    json!({ "inputs": vec![text; n] })
}

#[test]
fn score_tokens_beyond_the_limit_are_413_naming_it_and_up_to_it_are_scored() {
    let server = start(options(&[("tiny", common::fixture("roberta-tiny"))]));
    let addr = server.addr;
    let limit = Limits::default().max_score_tokens;
    let text = long_text();
    let (status, one) = post(addr, "/v1/score", &score_request(&text, 1));
    assert_eq!(status, 200, "{one}");
    let per_text = one["tokens"].as_u64().unwrap() as usize;
    let fits = limit / per_text;
    assert!(
        fits < Limits::default().max_inputs,
        "the case needs the token limit to bind"
    );

    let (status, doc) = post(addr, "/v1/score", &score_request(&text, fits));
    assert_eq!(
        status,
        200,
        "{fits} texts, {} tokens: {doc}",
        fits * per_text
    );
    assert_eq!(doc["tokens"].as_u64().unwrap() as usize, fits * per_text);

    let (status, doc) = post(addr, "/v1/score", &score_request(&text, fits + 1));
    assert_eq!(status, 413, "{}", short(&doc));
    let error = doc["error"].as_str().unwrap();
    let expected = format!(
        "{} tokens to score in this request; the limit is {limit} (the server's \
         --max-score-tokens)",
        (fits + 1) * per_text
    );
    assert!(error.contains(&expected), "{error:?} lacks {expected:?}");
}

/// `n` inputs of `masks` mask tokens each, after a few words.
fn masked_inputs(n: usize, masks: usize) -> Vec<String> {
    vec![format!("The cell{}.", " <mask>".repeat(masks)); n]
}

#[test]
fn fill_work_and_answer_are_bounded_before_the_model_runs() {
    let server = start(options(&[("tiny", common::fixture("roberta-tiny"))]));
    let addr = server.addr;
    let limits = Limits::default();
    // (case, request, status, what the error says)
    let cases = [
        (
            "masks beyond --max-masks",
            json!({"inputs": masked_inputs(8, 40), "top_k": 1}),
            "320 masks in this request; the limit is 256 (the server's --max-masks)",
        ),
        (
            "candidates beyond --max-candidates",
            json!({"inputs": masked_inputs(64, 2), "top_k": 100}),
            "asks for 12800 candidates (128 masks x top_k 100); the limit is 6400 (the \
             server's --max-candidates)",
        ),
        (
            "the issue's 56 KB request: 64 inputs x 120 masks x top_k 100",
            json!({"inputs": masked_inputs(64, 120), "top_k": 100}),
            "7680 masks in this request",
        ),
    ];
    for (case, request, message) in &cases {
        let started = Instant::now();
        let (status, doc) = post(addr, "/v1/fill-mask", request);
        assert_eq!(status, 413, "{case}: {}", short(&doc));
        let error = doc["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(message),
            "{case}: {error:?} lacks {message:?}"
        );
        println!("{case}: 413 in {:?}", started.elapsed());
    }
    assert_eq!(
        job_counts(addr),
        (0, 0, 0),
        "a refused request reached the model"
    );

    // At the bounds: every input one mask at the largest top_k; answered whole, and small.
    let inputs = masked_inputs(limits.max_inputs, 1);
    let body = json!({"inputs": inputs, "top_k": limits.max_top_k}).to_string();
    let (status, text) = http(
        addr,
        "POST",
        "/v1/fill-mask",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    let lists = doc.as_array().unwrap();
    assert_eq!(lists.len(), limits.max_inputs);
    assert!(
        lists
            .iter()
            .all(|l| l.as_array().unwrap().len() == limits.max_top_k)
    );
    assert!(text.len() < 8 << 20, "a {} byte answer", text.len());

    // `targets` caps the candidates per mask (as the pipeline does): inside the bound.
    let (status, doc) = post(
        addr,
        "/v1/fill-mask",
        &json!({"inputs": masked_inputs(64, 2), "top_k": 100, "targets": ["Ġthe", "Ġof"]}),
    );
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc[0][0].as_array().unwrap().len(), 2, "{doc}");
}

#[test]
fn a_long_run_metrics_file_comes_back_thinned_with_its_extremes_and_evaluations() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("long");
    std::fs::create_dir(&run).unwrap();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(run.join("metrics.jsonl")).unwrap());
    const STEPS: u64 = 50_000;
    for step in 1..=STEPS {
        let loss = if step == 31_337 {
            50.0
        } else {
            8.0 - step as f64 / 10_000.0
        };
        let record = json!({"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_second": 1000.0});
        writeln!(file, "{record}").unwrap();
        if step % 1000 == 0 {
            let eval = json!({"step": step, "eval_loss": 7.0, "eval_perplexity": 1000.0, "eval_accuracy": 0.1});
            writeln!(file, "{eval}").unwrap();
        }
    }
    drop(file);
    let size = std::fs::metadata(run.join("metrics.jsonl")).unwrap().len();

    let mut opts = options(&[("tiny", common::fixture("roberta-tiny"))]);
    opts.runs = vec![("long".to_string(), run)];
    let server = start(opts);
    let (status, text) = http(server.addr, "GET", "/v1/runs/long", None, b"");
    assert_eq!(status, 200, "{text}");
    println!(
        "metrics.jsonl of {size} bytes -> {} byte answer",
        text.len()
    );
    assert!(text.len() < 1 << 20, "a {} byte answer", text.len());
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["step"], STEPS);
    for panel in view["panels"].as_array().unwrap() {
        for (name, points) in panel["series"].as_object().unwrap() {
            let n = points.as_object().unwrap().len();
            assert!(n <= masklm_serve::runs::MAX_POINTS, "{name}: {n} points");
        }
    }
    let train = view["panels"][0]["series"]["train"].as_object().unwrap();
    assert_eq!(train["1"], 8.0 - 1e-4, "the first point is kept");
    assert_eq!(train[&STEPS.to_string()], 3.0, "the last point is kept");
    assert_eq!(train["31337"], 50.0, "a spike is kept");
    let evaluations = view["panels"][0]["series"]["validation"]
        .as_object()
        .unwrap();
    assert_eq!(evaluations.len(), 50, "every evaluation is kept");
    assert_eq!(view["last_eval"]["eval_loss"], 7.0);
}

/// `masklm serve ARGS --port 0` as a process, and the address it printed.
struct ServeProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_process(args: &[&str]) -> ServeProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_masklm"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, address) = std::sync::mpsc::channel();
    // Reads stderr to its end, so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("serving on http://") {
                let addr = rest.split('/').next().unwrap_or_default().parse();
                let _ = found.send(addr.map_err(|e| format!("{e}: {line}")));
            }
            seen.push(line);
        }
        let _ = found.send(Err(seen.join("\n")));
    });
    match address.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(addr)) => ServeProcess { child, addr },
        Ok(Err(stderr)) => panic!("masklm serve did not start:\n{stderr}"),
        Err(e) => panic!("masklm serve did not start: {e}"),
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The process's exit status, waiting up to `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let tiny = common::fixture("roberta-tiny");
    let model = format!("tiny={}", tiny.display());
    let mut server = serve_process(&["--model", &model]);
    let body = json!({"inputs": reference_sentences()[0]}).to_string();
    let (first, rest) = body.as_bytes().split_at(10);
    // In flight: its body is half sent when the signal comes.
    let mut slow = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        slow,
        "POST /v1/fill-mask HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&server.child);
    // Draining: no new connections, while the half-sent request is still in flight.
    let started = Instant::now();
    while std::net::TcpStream::connect(server.addr).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still accepting"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    slow.write_all(rest).unwrap();
    let reply = read_reply(&mut slow);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let doc: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc.as_array().map(Vec::len), Some(5), "{doc}");
    let status = exit_within(&mut server.child, Duration::from_secs(30));
    assert!(
        status.success(),
        "masklm serve ended with {status} on SIGTERM"
    );
}

#[test]
fn a_run_folder_with_an_equals_sign_is_a_path_not_name_equals_dir() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("lr=3e-4");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 5.0}\n").unwrap();
    let tiny = common::fixture("roberta-tiny");
    let model = format!("tiny={}", tiny.display());
    let run_arg = run.display().to_string();
    let named_arg = format!("named={}", run.display());
    let server = serve_process(&["--model", &model, "--run", &run_arg, "--run", &named_arg]);
    let (_, models) = get(server.addr, "/v1/models");
    assert_eq!(
        models["models"][0]["name"], "tiny",
        "NAME=DIR still names a model"
    );
    assert_eq!(
        get(server.addr, "/v1/runs"),
        (200, json!({"runs": ["lr=3e-4", "named"]}))
    );
    for name in ["lr=3e-4", "named"] {
        let (status, view) = get(server.addr, &format!("/v1/runs/{name}"));
        assert_eq!(status, 200, "{name}: {view}");
        assert_eq!(view["step"], 1, "{name}");
    }
}

#[test]
fn an_unknown_name_is_not_echoed_whole() {
    let server = start(options(&[("tiny", common::fixture("roberta-tiny"))]));
    let name = "m".repeat(900_000);
    let (status, doc) = post(
        server.addr,
        "/v1/fill-mask",
        &json!({"inputs": reference_sentences()[0], "model": name}),
    );
    assert_eq!(status, 404);
    let error = doc["error"].as_str().unwrap();
    assert!(error.len() < 500, "a {} byte error", error.len());
    assert!(
        error.contains("(900000 bytes)") && error.contains("this server has: tiny"),
        "{error}"
    );
    let (status, doc) = get(server.addr, &format!("/v1/runs/{}", "r".repeat(10_000)));
    assert_eq!(status, 404);
    let error = doc["error"].as_str().unwrap();
    assert!(error.len() < 500, "a {} byte error: {error}", error.len());
}

#[test]
fn a_target_of_several_tokens_is_answered_with_a_warning_as_the_cli_gives() {
    let server = start(options(&[("tiny", common::fixture("roberta-tiny"))]));
    let sentence = reference_sentences()[0].clone();
    let body = json!({"inputs": sentence, "targets": ["the", "Ġof"], "top_k": 2}).to_string();
    let mut stream = send(
        server.addr,
        "POST",
        "/v1/fill-mask",
        Some("application/json"),
        body.as_bytes(),
    );
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let warnings = reply.headers("warning");
    assert_eq!(warnings.len(), 1, "{}", reply.head);
    assert!(
        warnings[0].starts_with("299 masklm \"target \\\"the\\\" is not a single token")
            && warnings[0].contains("using its first piece"),
        "{}",
        warnings[0]
    );
    let doc: Value = serde_json::from_str(&reply.body).unwrap();
    assert!(doc.is_array(), "the body keeps the pipeline's shape: {doc}");

    // Single-token targets: no warning.
    let body = json!({"inputs": sentence, "targets": ["Ġof"]}).to_string();
    let mut stream = send(
        server.addr,
        "POST",
        "/v1/fill-mask",
        Some("application/json"),
        body.as_bytes(),
    );
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.headers("warning").is_empty(), "{}", reply.head);
}
