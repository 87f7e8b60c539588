//! HTTP load generator for `scripts/bench_serve.sh`: N concurrent clients POST fill-mask
//! requests (one text each, taken round-robin from a file) for a fixed time over keep-alive
//! connections, then print one JSON line: requests/s, p50/p99 latency, errors.
//!
//!     cargo run --release -p masklm-serve --example load -- URL INPUTS CLIENTS SECONDS [MODEL]

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: load URL INPUTS CLIENTS SECONDS [MODEL]");
        std::process::exit(2);
    }
    let url = format!("{}/v1/fill-mask", args[0].trim_end_matches('/'));
    let texts: Vec<String> = std::fs::read_to_string(&args[1])
        .unwrap_or_else(|e| panic!("{}: {e}", args[1]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let clients: usize = args[2].parse().expect("CLIENTS is a number");
    let seconds: f64 = args[3].parse().expect("SECONDS is a number");
    let model = args.get(4).cloned();
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http::<Full<Bytes>>();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url, model) = (client.clone(), url.clone(), model.clone());
            let texts = texts.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0usize);
                let mut i = c;
                while Instant::now() < deadline {
                    let mut body = json!({"inputs": texts[i % texts.len()], "top_k": 5});
                    if let Some(m) = &model {
                        body["model"] = json!(m);
                    }
                    i += clients;
                    let request = hyper::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("a valid request");
                    let sent = Instant::now();
                    let ok = match client.request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await;
                            status.is_success() && body.is_ok()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies.push(sent.elapsed().as_secs_f64());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.expect("a client task");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |s| s * 1e3)
    };
    println!(
        "{}",
        json!({
            "clients": clients,
            "seconds": elapsed,
            "requests": latencies.len(),
            "errors": errors,
            "requests_per_second": latencies.len() as f64 / elapsed,
            "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99),
        })
    );
}
