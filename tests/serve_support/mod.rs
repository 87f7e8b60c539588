//! What the server tests share: a server on a free loopback port, raw HTTP/1.1 exchanges (so a
//! test controls exactly what is sent, and when the connection closes), the fixture sentences.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use masklm_serve::{ServeOptions, Server};
use serde_json::Value;

use crate::common;

/// A server on a free loopback port, stopped (gracefully) when dropped. It runs on the CPU
/// (flex) device, as the CLI does by default: `Device::default()` picks another backend when
/// the build has wgpu/tch compiled in (CI).
pub struct Running {
    pub addr: SocketAddr,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn options(models: &[(&str, PathBuf)]) -> ServeOptions {
    let mut options = ServeOptions::new(
        models
            .iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect(),
    );
    options.port = 0;
    options
}

pub fn start(options: ServeOptions) -> Running {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let server = Server::load(options, burn::tensor::Device::flex()).unwrap();
            addr_tx.send(server.local_addr().unwrap()).unwrap();
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server starts");
    Running {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// One HTTP/1.1 exchange over a fresh connection: (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut stream = send(addr, method, path, content_type, body);
    read_response(&mut stream)
}

/// Opens a connection and writes one request on it (`Connection: close`), answer unread.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = content_type {
        head.push_str(&format!("Content-Type: {t}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) and close before reading a large body: not our failure.
    let _ = stream.write_all(body);
    stream
}

/// An answer as read off the wire.
pub struct Reply {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The values of header `name` (case-insensitive), in order.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }
}

pub fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

pub fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let reply = read_reply(stream);
    (reply.status, reply.body)
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(
        addr,
        "POST",
        path,
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, text) = http(addr, "GET", path, None, b"");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

pub fn reference_sentences() -> Vec<String> {
    fixture_sentences("roberta-tiny")
}

/// The sentences of a fixture's fill_mask_reference.json (scripts/make_reference.py).
pub fn fixture_sentences(fixture: &str) -> Vec<String> {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(fixture).join("fill_mask_reference.json"))
            .unwrap(),
    )
    .unwrap();
    reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}
