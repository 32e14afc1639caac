//! Helpers: the server started in-process on 127.0.0.1:0 (HTTP and gRPC), a
//! raw HTTP/1.1 client (every byte as written), policy trees in temp folders.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tenantgate_serve::{Config, Server, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The example policy tree of the repository.
pub fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// A running server; stopped (gracefully) when dropped.
pub struct Running {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Running {
    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start(source: &Path) -> Running {
    let config = Config {
        source: source.to_path_buf(),
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        xds: None,
    };
    let server = Server::bind(&config).await.unwrap();
    let http = server.http_addr().unwrap();
    let grpc = server.grpc_addr().unwrap();
    let state = server.state();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    Running {
        http,
        grpc,
        state,
        stop: Some(tx),
        task: Some(task),
    }
}

/// An HTTP answer: status, lowercase header pairs, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` with `body` on a fresh connection (`connection: close`).
pub async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    if let Some(b) = body {
        // The server may answer 413 and close before reading it all.
        let _ = s.write_all(b).await;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

pub async fn decide(addr: SocketAddr, spec: &serde_json::Value) -> Answer {
    send(
        addr,
        "POST",
        "/v1/decide",
        Some(spec.to_string().as_bytes()),
    )
    .await
}

/// A policy tree in a temp folder: `tenantgate.json` and `(file, text)` pairs
/// under `tenants/`.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new(settings: &str, files: &[(&str, &str)]) -> Tree {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        t.write(settings, files);
        t
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the tree's content.
    pub fn write(&self, settings: &str, files: &[(&str, &str)]) {
        let tenants = self.dir.path().join("tenants");
        let _ = std::fs::remove_dir_all(&tenants);
        std::fs::create_dir_all(&tenants).unwrap();
        std::fs::write(self.dir.path().join("tenantgate.json"), settings).unwrap();
        for (file, text) in files {
            let p = tenants.join(file);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }
}
