//! `masklm serve` on a loopback port started by the test: its answers against the CLI's (and so
//! transformers', whose pipeline the CLI matches in fill_mask_parity.rs), each request limit
//! with its status and message, slow clients, batching under concurrency, graceful shutdown,
//! and the run charts / `masklm report`.

mod common;
mod serve_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use masklm_serve::{Batching, Limits, ServeOptions, Server};
use serde_json::{Value, json};
use serve_support::{
    fixture_sentences, get, http, options, post, read_response, reference_sentences, start,
};

/// Same tokens, strings and sequences; scores within `tol` (batching pads a sequence next to
/// others, which changes float rounding, not results).
fn assert_same_fill(ours: &Value, theirs: &Value, tol: f64, what: &str) {
    match (ours, theirs) {
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(
                a.len(),
                b.len(),
                "{what}: lengths differ: {ours} vs {theirs}"
            );
            for (x, y) in a.iter().zip(b) {
                assert_same_fill(x, y, tol, what);
            }
        }
        (Value::Object(_), Value::Object(_)) => {
            for key in ["token", "token_str", "sequence"] {
                assert_eq!(ours[key], theirs[key], "{what}: {key}");
            }
            let diff = (ours["score"].as_f64().unwrap() - theirs["score"].as_f64().unwrap()).abs();
            assert!(diff <= tol, "{what}: score differs by {diff}");
        }
        _ => panic!("{what}: shapes differ: {ours} vs {theirs}"),
    }
}

#[test]
fn fill_mask_and_score_equal_the_cli_alone_and_under_concurrency() {
    let tiny = common::fixture("roberta-tiny");
    // A second model with another tokenizer (WordPiece, [MASK]) and its own sentences.
    let other = common::fixture("bert-tiny");
    // And a model of another family: ModernBERT ([MASK] that swallows the space before it).
    let modern = common::fixture("modernbert-tiny");
    let opts = options(&[
        ("tiny", tiny.clone()),
        ("other", other.clone()),
        ("modern", modern.clone()),
    ]);
    // Pseudo-perplexity runs a line's masked copies `max_batch` at a time; the CLI below uses
    // the same batches. (Across batch sizes the figure moves by float rounding, ~2e-7 here:
    // the CPU kernels' results depend on how many rows a batch has.)
    let max_batch = opts.batching.max_batch.to_string();
    let server = start(opts);
    let addr = server.addr;

    let (status, models) = get(addr, "/v1/models");
    assert_eq!(status, 200);
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny", "other", "modern"]);
    let masks: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mask_token"].as_str().unwrap())
        .collect();
    assert_eq!(masks, ["<mask>", "[MASK]", "[MASK]"]);
    let (status, health) = get(addr, "/healthz");
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");

    for (name, dir) in [("tiny", &tiny), ("other", &other), ("modern", &modern)] {
        let sentences = fixture_sentences(dir.file_name().unwrap().to_str().unwrap());
        let dir_arg = dir.display().to_string();
        let mut args = vec!["fill-mask", "--model", &dir_arg, "--json", "--top-k", "5"];
        args.extend(sentences.iter().map(String::as_str));
        let cli: Vec<Value> = common::masklm_ok(args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // One text per request: the CLI's line exactly (same code, same single-sequence batch).
        for (sentence, expected) in sentences.iter().zip(&cli) {
            let (status, doc) = post(
                addr,
                "/v1/fill-mask",
                &json!({"inputs": sentence, "top_k": 5, "model": name}),
            );
            assert_eq!(status, 200, "{doc}");
            assert_eq!(&doc, expected, "{name}: {sentence}");
        }
        // All texts in one request: one padded batch, a list of the CLI's answers.
        let (status, doc) = post(
            addr,
            "/v1/fill-mask",
            &json!({"inputs": sentences, "model": name}),
        );
        assert_eq!(status, 200, "{doc}");
        assert_same_fill(&doc, &Value::Array(cli.clone()), 1e-5, name);

        // Concurrent clients, each a different sentence: batched together by the model thread.
        let n = sentences.len();
        let answers: Vec<(usize, Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let sentence = &sentences[i % n];
                    scope.spawn(move || {
                        let (status, doc) = post(
                            addr,
                            "/v1/fill-mask",
                            &json!({"inputs": sentence, "model": name}),
                        );
                        assert_eq!(status, 200, "{doc}");
                        (i % n, doc)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, doc) in answers {
            assert_same_fill(
                &doc,
                &cli[i],
                1e-5,
                &format!("{name}, concurrent, {}", sentences[i]),
            );
        }
    }

    // The first model answers requests that name none.
    let sentences = reference_sentences();
    let (_, default) = post(addr, "/v1/fill-mask", &json!({"inputs": sentences[0]}));
    let (_, named) = post(
        addr,
        "/v1/fill-mask",
        &json!({"inputs": sentences[0], "model": "tiny"}),
    );
    assert_eq!(default, named);

    // targets, as the pipeline's.
    let (status, doc) = post(
        addr,
        "/v1/fill-mask",
        &json!({"inputs": sentences[0], "targets": ["the", "of"], "top_k": 2, "model": "tiny"}),
    );
    assert_eq!(status, 200, "{doc}");
    let tiny_arg = tiny.display().to_string();
    let cli: Value = serde_json::from_str(
        common::masklm_ok([
            "fill-mask",
            "--model",
            &tiny_arg,
            "--json",
            "--top-k",
            "2",
            "--targets",
            "the,of",
            &sentences[0],
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(doc, cli);

    // Pseudo-perplexity: transformers' figure (pseudo_perplexity.json, scripts/make_reference.py)
    // and `masklm eval --pseudo-perplexity` on the same lines.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny.join("pseudo_perplexity.json")).unwrap(),
    )
    .unwrap();
    let lines: Vec<&str> = reference["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let (status, scored) = post(
        addr,
        "/v1/score",
        &json!({"inputs": lines, "model": "tiny"}),
    );
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["tokens"], reference["tokens"]);
    let ours = scored["pseudo_perplexity"].as_f64().unwrap();
    let theirs = reference["pseudo_perplexity"].as_f64().unwrap();
    assert!(
        (ours / theirs - 1.0).abs() < 1e-5,
        "pseudo-perplexity {ours} vs transformers {theirs}"
    );
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("lines.txt");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let eval: Value = serde_json::from_str(
        common::masklm_ok([
            "eval",
            "--model",
            &tiny_arg,
            "--input",
            input.to_str().unwrap(),
            "--packing",
            "line",
            "--pseudo-perplexity",
            "--batch-size",
            &max_batch,
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let cli = eval["pseudo_perplexity"].as_f64().unwrap();
    assert!(
        (ours / cli - 1.0).abs() < 1e-9,
        "server {ours} vs masklm eval {cli}"
    );
    // Each line's own figure, and the overall one is their token-weighted mean.
    let per_line: Vec<(f64, u64)> = scored["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["pseudo_log_likelihood"].as_f64().unwrap(),
                s["tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    let (ll, n) = per_line
        .iter()
        .fold((0.0, 0), |(a, b), &(l, t)| (a + l, b + t));
    assert!(((-ll / n as f64).exp() / ours - 1.0).abs() < 1e-9);
    let (status, one) = post(
        addr,
        "/v1/score",
        &json!({"inputs": lines[0], "model": "tiny"}),
    );
    assert_eq!(status, 200);
    assert_eq!(one["scores"][0], scored["scores"][0]);
}

#[test]
fn every_limit_answers_its_status_and_the_server_survives() {
    let mut options = options(&[("tiny", common::fixture("roberta-tiny"))]);
    options.limits = Limits {
        max_body_bytes: 4096,
        max_inputs: 3,
        max_top_k: 50,
        request_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    options.header_timeout = Duration::from_secs(1);
    let server = start(options);
    let addr = server.addr;
    let sentence = reference_sentences()[0].clone();

    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"inputs": "no mask in this text"}),
            422,
            "no mask token in \"no mask in this text\"",
        ),
        (json!({"inputs": "   "}), 422, "empty text"),
        (
            json!({"inputs": sentence, "top_k": 0}),
            422,
            "top_k is 0; it must be between 1 and 50",
        ),
        (
            json!({"inputs": sentence, "top_k": 51}),
            422,
            "top_k is 51; it must be between 1 and 50",
        ),
        (
            json!({"inputs": sentence, "model": "base"}),
            404,
            "unknown model \"base\"; this server has: tiny",
        ),
        (
            json!({"inputs": [sentence, sentence, sentence, sentence]}),
            422,
            "4 inputs in one request; the limit is 3",
        ),
        (json!({"inputs": []}), 422, "`inputs` is an empty list"),
        (
            json!({"inputs": [sentence, "no mask"]}),
            422,
            "inputs[1]: no mask token",
        ),
        (json!({"inputs": sentence, "top_k": "five"}), 422, "top_k"),
        (
            json!({"inputs": sentence, "topk": 3}),
            422,
            "unknown field `topk`",
        ),
        (json!({"top_k": 3}), 422, "missing field `inputs`"),
        (
            json!({"inputs": sentence, "targets": []}),
            422,
            "`targets` is an empty list",
        ),
        (
            json!({"inputs": format!("{} <mask>", "word ".repeat(300))}),
            422,
            "tokens long; this model takes at most 128",
        ),
    ];
    let score_cases: Vec<(Value, u16, &str)> = vec![
        (json!({"inputs": ""}), 422, "has no token to score"),
        (
            json!({"inputs": "a", "model": "x"}),
            404,
            "unknown model \"x\"",
        ),
        (
            json!({"inputs": format!("{}", "word ".repeat(300))}),
            422,
            "this model takes at most 128",
        ),
    ];
    for (route, cases) in [("/v1/fill-mask", &cases), ("/v1/score", &score_cases)] {
        for (body, status, message) in cases {
            let (got, doc) = post(addr, route, body);
            assert_eq!(got, *status, "{route} {body}: {doc}");
            let error = doc["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{route}: no error field: {doc}"));
            assert!(
                error.contains(message),
                "{route} {body}: {error:?} lacks {message:?}"
            );
        }
    }

    let check = |(status, body): (u16, String), want: u16, message: &str| {
        assert_eq!(status, want, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert!(
            doc["error"].as_str().unwrap().contains(message),
            "{doc} lacks {message:?}"
        );
    };
    check(
        http(
            addr,
            "POST",
            "/v1/fill-mask",
            Some("application/json"),
            b"{\"inputs\": ",
        ),
        400,
        "Failed to parse the request body as JSON",
    );
    check(
        http(
            addr,
            "POST",
            "/v1/fill-mask",
            Some("text/plain"),
            b"{\"inputs\": \"<mask>\"}",
        ),
        415,
        "Content-Type: application/json",
    );
    check(
        http(
            addr,
            "POST",
            "/v1/fill-mask",
            None,
            b"{\"inputs\": \"<mask>\"}",
        ),
        415,
        "Content-Type: application/json",
    );
    let big = format!("{{\"inputs\": \"{} <mask>\"}}", "a".repeat(8000));
    check(
        http(
            addr,
            "POST",
            "/v1/fill-mask",
            Some("application/json"),
            big.as_bytes(),
        ),
        413,
        "--max-body-bytes",
    );
    check(
        http(addr, "GET", "/v1/nothing", None, b""),
        404,
        "no such route",
    );
    check(
        http(addr, "GET", "/v1/runs/none", None, b""),
        404,
        "unknown run \"none\"",
    );

    // A client that sends half its body: answered 408 after the request timeout, and meanwhile
    // other requests are served.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(
        format!("POST /v1/fill-mask HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"inputs\"").as_bytes(),
    )
    .unwrap();
    let (status, _) = post(addr, "/v1/fill-mask", &json!({"inputs": sentence}));
    assert_eq!(status, 200, "a slow client blocked another request");
    let started = std::time::Instant::now();
    let (status, body) = read_response(&mut slow);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("longer than 2 s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A client that never finishes its headers is disconnected after the header timeout.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stalled
        .write_all(b"POST /v1/fill-mask HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stalled connection was held"
    );

    // Still healthy, still answering.
    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, doc) = post(addr, "/v1/fill-mask", &json!({"inputs": sentence}));
    assert_eq!(status, 200, "{doc}");
}

#[test]
fn shutdown_finishes_in_flight_requests() {
    let mut opts = options(&[("tiny", common::fixture("roberta-tiny"))]);
    // A long collection window keeps the request in flight while the stop arrives.
    opts.batching = Batching {
        max_batch: 64,
        window: Duration::from_millis(1500),
        queue: 16,
    };
    let mut server = start(opts);
    let addr = server.addr;
    let sentence = reference_sentences()[0].clone();
    let client =
        std::thread::spawn(move || post(addr, "/v1/fill-mask", &json!({"inputs": sentence})));
    std::thread::sleep(Duration::from_millis(400));
    let _ = server.stop.take().unwrap().send(());
    let (status, doc) = client.join().unwrap();
    assert_eq!(status, 200, "{doc}");
    assert!(doc.as_array().is_some_and(|a| a.len() == 5), "{doc}");
    server.thread.take().unwrap().join().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn bad_models_and_names_are_refused_at_start() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let work = tempfile::tempdir().unwrap();
    let error = |options: ServeOptions| match Server::load(options, burn::tensor::Device::flex()) {
        Ok(_) => panic!("started"),
        Err(e) => e.to_string(),
    };
    let tiny = common::fixture("roberta-tiny");
    let message = error(options(&[("a", tiny.clone()), ("a", tiny.clone())]));
    assert!(message.contains("two models are named \"a\""), "{message}");
    let message = error(options(&[("nothing", work.path().join("absent"))]));
    assert!(
        message.contains("model \"nothing\"") && message.contains("absent"),
        "{message}"
    );
    let mut with_run = options(&[("tiny", tiny)]);
    with_run.runs = vec![("r".to_string(), work.path().join("no-run"))];
    let message = error(with_run);
    assert!(
        message.contains("run \"r\"") && message.contains("is not a folder"),
        "{message}"
    );
}

/// A run's metrics as the trainer writes them (train records, evaluations with a named set and
/// probes), a repeated step from a resume, and a half-written last line.
fn write_run(dir: &std::path::Path) {
    let mut lines = Vec::new();
    for step in (10..=200).step_by(10) {
        lines.push(json!({"step": step, "loss": 8.0 - step as f64 / 50.0, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_second": 5000.0, "skipped": false}).to_string());
        if step % 50 == 0 {
            lines.push(json!({"step": step, "eval_loss": 7.0 - step as f64 / 100.0, "eval_perplexity": (7.0 - step as f64 / 100.0f64).exp(), "eval_accuracy": step as f64 / 1000.0, "eval_tokens": 300, "eval/pubmed/loss": 6.5, "eval/pubmed/perplexity": 665.0, "eval/pubmed/accuracy": 0.1, "eval/pubmed/tokens": 200, "probes/mrr": step as f64 / 400.0, "probes/top1": 0.0, "probes/top5": 0.25, "probes": []}).to_string());
        }
    }
    // A resume that redid step 200: its later value wins.
    lines.push(json!({"step": 200, "loss": 3.25, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 5000.0, "skipped": false}).to_string());
    std::fs::write(
        dir.join("metrics.jsonl"),
        lines.join("\n") + "\n{\"step\": 21",
    )
    .unwrap();
    std::fs::write(
        dir.join("config.toml"),
        "seed = 42\n[model]\nhidden_size = 128 # <b>\n",
    )
    .unwrap();
}

#[test]
fn run_charts_and_the_report_show_every_curve() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("demo");
    std::fs::create_dir(&run).unwrap();
    write_run(&run);

    let mut opts = options(&[("tiny", common::fixture("roberta-tiny"))]);
    opts.runs = vec![("demo".to_string(), run.clone())];
    let server = start(opts);
    assert_eq!(
        get(server.addr, "/v1/runs"),
        (200, json!({"runs": ["demo"]}))
    );
    let (status, view) = get(server.addr, "/v1/runs/demo");
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["step"], 200);
    let panels: Vec<&str> = view["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        panels,
        [
            "loss",
            "perplexity",
            "masked-token accuracy",
            "knowledge probes",
            "learning rate",
            "gradient norm",
            "tokens per second"
        ]
    );
    let loss = &view["panels"][0];
    assert_eq!(loss["series"]["train"].as_object().unwrap().len(), 20);
    assert_eq!(loss["series"]["train"]["200"], 3.25);
    assert_eq!(loss["series"]["validation"].as_object().unwrap().len(), 4);
    assert_eq!(loss["series"]["pubmed"].as_object().unwrap().len(), 4);
    let svg = loss["svg"].as_str().unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains(r#"data-series="train" data-points="20""#),
        "{svg}"
    );
    assert!(view["panels"][1]["log_y"].as_bool().unwrap());
    assert_eq!(view["last_eval"]["probes/mrr"], 0.5);
    assert_eq!(view["last_eval"]["eval/pubmed/perplexity"], 665.0);

    // The report: the same charts, the last evaluation, the config escaped.
    let out = work.path().join("report.html");
    common::masklm_ok([
        "report",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(html.matches("<svg").count(), 7);
    assert!(html.contains(r#"data-series="pubmed" data-points="4""#));
    assert!(html.contains("<td>eval/pubmed/perplexity</td><td class=\"num\">665.000000</td>"));
    assert!(html.contains("hidden_size = 128 # &lt;b&gt;"));
    assert!(
        !html.contains("<script"),
        "the report must not need scripts"
    );

    // A damaged line before the last is an error naming it.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        text.replacen("{\"step\":20,", "{\"step\":20", 1),
    )
    .unwrap();
    let (status, doc) = get(server.addr, "/v1/runs/demo");
    assert_eq!(status, 500);
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("metrics.jsonl:2: not a metrics record"),
        "{doc}"
    );
}

/// The web page in a real browser: scripts/check_browser.py drives Debian's chromium through
/// Selenium, compares the rendered top-k of each model with the API and checks the run tab
/// draws its charts; screenshots land in CARGO_TARGET_TMPDIR/serve-browser (a CI artefact).
#[test]
fn the_page_works_in_a_real_browser() {
    let Some(python) = common::reference_python("selenium") else {
        return;
    };
    let missing: Vec<&str> = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "{missing:?} not installed (apt-get install chromium chromium-driver; .ci/run does)"
        );
        assert!(
            std::env::var("CI").map_or(true, |ci| ci != "true"),
            "{message}"
        );
        println!("skipped: {message}");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("demo");
    std::fs::create_dir(&run).unwrap();
    write_run(&run);
    // A RoBERTa (<mask>) and a BERT ([MASK]) side by side: the page writes each one's token.
    let mut opts = options(&[
        ("roberta", common::fixture("roberta-tiny")),
        ("bert", common::fixture("bert-tiny")),
    ]);
    opts.runs = vec![("demo".to_string(), run)];
    let server = start(opts);
    let screenshots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-browser");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_browser.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(["--url", &format!("http://{}", server.addr), "--run", "demo"])
        .args([
            "--text",
            "Catalysis of the reaction: ATP + H2O = ADP + <mask>.",
        ])
        .arg("--screenshots")
        .arg(&screenshots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("roberta: page top-5 = API") && stdout.contains("bert: page top-5 = API"),
        "{stdout}"
    );
    assert!(stdout.contains("run tab: 7 charts"), "{stdout}");
    for shot in ["fill-mask.png", "run.png"] {
        let bytes = std::fs::read(screenshots.join(shot)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{shot}: {} bytes",
            bytes.len()
        );
    }
    println!("screenshots: {}", screenshots.display());
}
