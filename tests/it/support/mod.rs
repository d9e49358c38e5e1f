//! Test harness: the gateway in-process on ephemeral ports from a YAML string, a real upstream
//! HTTP server that echoes what it received, and a small HTTP client.

#![allow(dead_code)]

pub mod amqp;
pub mod grpc;
pub mod haproxy;
pub mod mqtt;
pub mod otlp;
pub mod redis;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::app::{self, Running};
use tokio::net::TcpListener;

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

/// A gateway running in this process.
pub struct Gateway {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
}

impl Gateway {
    /// Starts a gateway from `yaml` (written to `routes.yaml` in a fresh directory). The listen
    /// and admin addresses default to ephemeral ports when the YAML has no `server:` block.
    pub async fn start(yaml: &str) -> Gateway {
        Self::start_with(yaml, true).await
    }

    pub async fn start_with(yaml: &str, watch: bool) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), with_ephemeral_server(yaml)).unwrap();
        let config = dir.path().join("routes.yaml");
        Self::start_at(dir, config, watch).await
    }

    /// Starts a gateway on a config file already written at `config` inside `dir`.
    pub async fn start_at(dir: tempfile::TempDir, config: PathBuf, watch: bool) -> Gateway {
        let running = app::start(app::Options {
            config,
            watch,
            sighup: false,
            max_config_size: switchyard::config::DEFAULT_MAX_FILE_SIZE,
        })
        .await
        .expect("gateway starts");
        Gateway {
            listen: running.listen,
            admin: running.admin,
            dir,
            running: Some(running),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("routes.yaml")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The config version the admin API reports.
    pub async fn version(&self) -> u64 {
        let (_, _, b) = get(&self.admin_url("/config")).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["version"].as_u64().unwrap()
    }

    /// Waits until the admin API reports at least `version` (never a fixed sleep).
    pub async fn wait_version(&self, version: u64) {
        eventually(&format!("config version {version}"), || async {
            let v = self.version().await;
            if v >= version { Ok(()) } else { Err(v) }
        })
        .await
    }

    /// Waits until `/readyz` reports `backend` ready or not (`want`), and returns its entry.
    pub async fn wait_backend(&self, backend: &str, want: bool) -> serde_json::Value {
        eventually(&format!("backend {backend} ready={want}"), || async {
            let (_, v) = self.admin_json("/readyz").await;
            let entry = v["backends"][backend].clone();
            if entry["ready"].as_bool() == Some(want) {
                Ok(entry)
            } else {
                Err(v)
            }
        })
        .await
    }

    /// `POST /reload` on the admin API: the status and the body.
    pub async fn reload(&self) -> (StatusCode, Bytes) {
        let (s, _, b) = send(
            Request::post(self.admin_url("/reload"))
                .body(body(""))
                .unwrap(),
        )
        .await;
        (s, b)
    }

    pub async fn admin_json(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let (s, _, b) = get(&self.admin_url(path)).await;
        (s, serde_json::from_slice(&b).unwrap_or_default())
    }

    /// Waits for the first dead letter the admin API lists, and returns it.
    pub async fn first_dead_letter(&self) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = self.admin_json("/dead-letters").await;
            if let Some(d) = v["dead_letters"].as_array().filter(|a| !a.is_empty()) {
                return d[0].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead letter: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `POST /dead-letters/{id}/replay` on the admin API: the status and the body.
    pub async fn replay_dead_letter(&self, id: &str) -> (StatusCode, Bytes) {
        let (s, _, b) = send(
            Request::post(self.admin_url(&format!("/dead-letters/{id}/replay")))
                .body(body(""))
                .unwrap(),
        )
        .await;
        (s, b)
    }

    pub async fn shutdown(mut self) -> bool {
        self.running.take().unwrap().shutdown().await
    }
}

/// Polls `f` every 20 ms until it gives `Ok`, for at most 20 s, and returns what it gave;
/// panics with `what` and the last poll's state otherwise. The one way tests wait for
/// something to happen (never a fixed sleep).
pub async fn eventually<T, S, F, Fut>(what: &str, f: F) -> T
where
    S: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S>>,
{
    eventually_within(what, Duration::from_secs(20), f).await
}

/// [`eventually`] with another bound, for what takes longer by design (a drain behind backoffs).
pub async fn eventually_within<T, S, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    S: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(state) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}; last seen: {state:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds `server: { listen: 127.0.0.1:0, admin: 127.0.0.1:0 }` unless the YAML has a server block.
/// Starts a gateway from `yaml` (in a new directory) that must fail to start; the error's text.
pub async fn start_error(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, with_ephemeral_server(yaml)).unwrap();
    let opts = app::Options {
        config: path,
        watch: false,
        sighup: false,
        max_config_size: switchyard::config::DEFAULT_MAX_FILE_SIZE,
    };
    match app::start(opts).await {
        Ok(_) => panic!("this config must not load:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

pub fn with_ephemeral_server(yaml: &str) -> String {
    if yaml.contains("server:") {
        yaml.to_string()
    } else {
        format!("server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\" }}\n{yaml}")
    }
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub async fn send(req: Request<TestBody>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = client().request(req).await.expect("request sent");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body read").to_bytes();
    (parts.status, parts.headers, bytes)
}

pub async fn get(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(Request::get(url).body(body("")).unwrap()).await
}

pub fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

/// A backend `up` at `upstream` and one route, `users`: `GET /users/{id}` to it.
pub fn users_route(upstream: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: users
    match: {{ method: GET, path: "/users/{{id}}" }}
    backend: up
"#
    )
}

/// A real upstream that answers every request with JSON describing what it received.
/// `/slow/{ms}` waits before answering; `/status/{code}` answers with that status;
/// `/stream/{n}` streams n chunks of 1 KiB.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Upstream {
        Self::start_inner(addr, None).await
    }

    /// An upstream that answers every request with `status`.
    pub async fn fixed(status: u16) -> Upstream {
        Self::start_inner("127.0.0.1:0".parse().unwrap(), Some(status)).await
    }

    /// An upstream that accepts connections, reads, and never answers.
    pub async fn hanging() -> Upstream {
        Self::raw(false).await
    }

    /// An upstream that reads a request and closes the connection without answering.
    pub async fn resetting() -> Upstream {
        Self::raw(true).await
    }

    async fn raw(close: bool) -> Upstream {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hits, conns) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (h, c) = (hits.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                    if !close {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                });
            }
        });
        Upstream {
            addr,
            hits,
            conns,
            task,
        }
    }

    async fn start_inner(addr: SocketAddr, fixed: Option<u16>) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        async move {
                            match fixed {
                                Some(code) => {
                                    let mut r = http::Response::new(body(format!("fixed {code}")));
                                    *r.status_mut() = StatusCode::from_u16(code).unwrap();
                                    Ok(r)
                                }
                                None => echo(req, addr).await,
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            conns,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn echo(
    req: Request<Incoming>,
    me: SocketAddr,
) -> Result<http::Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut segs = path.trim_start_matches('/').split('/');
    match (segs.next(), segs.next()) {
        (Some("slow"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(100))).await;
        }
        (Some("status"), Some(code)) => {
            let mut r = http::Response::new(body(format!("status {code}")));
            *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            return Ok(r);
        }
        (Some("stream"), Some(n)) => {
            let n: usize = n.parse().unwrap_or(1);
            let chunks = futures_util::stream::iter((0..n).map(|_| {
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![b'x'; 1024])))
            }));
            return Ok(http::Response::new(
                http_body_util::StreamBody::new(chunks).boxed(),
            ));
        }
        _ => {}
    }
    let method = req.method().clone();
    let version = format!("{:?}", req.version());
    let uri = req.uri().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let out = serde_json::json!({
        "upstream": me.to_string(),
        "method": method.as_str(),
        "version": version,
        "uri": uri,
        "path": path,
        "headers": headers,
        "body_len": bytes.len(),
        "body_sum": bytes.iter().map(|&b| b as u64).sum::<u64>(),
    });
    let mut r = http::Response::new(body(out.to_string()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("connection", "keep-alive".parse().unwrap());
    r.headers_mut().insert("x-upstream", "1".parse().unwrap());
    Ok(r)
}

pub fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// A free TCP port on loopback (bound and released).
pub async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A free port below the kernel's ephemeral range (which starts at 32768), for a process
/// that is stopped and started again on the same port: while it is down, no other test can be
/// handed the port by `bind(0)` (and, binding it with `SO_REUSEPORT` as the gateway does,
/// share it). Each call gives another port.
pub async fn stable_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // The ports just below the ephemeral range: 8,000 of them, from a point this process
    // picks.
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    assert!(
        low > 9000,
        "the ephemeral port range starts at {low}; the tests need room below it"
    );
    let first = low - 8000 + (std::process::id() % 4000) as u16;
    let _ = NEXT.compare_exchange(0, first, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < low, "no stable port left below {low}");
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return l.local_addr().unwrap();
        }
    }
}

#[path = "../../../examples/worker/mod.rs"]
pub mod worker;

#[path = "../../../examples/device/mod.rs"]
pub mod device;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The real binary, run on `yaml` (a `server:` block on free ports added) in a directory of its
/// own, its standard output and error kept in a file: for what only the process shows (its
/// logs, its exit).
pub struct Binary {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
    child: std::process::Child,
    /// How it was started, to start it again ([`Binary::restart`]).
    command: Vec<std::ffi::OsString>,
    rust_log: Option<String>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// `args` come before `run` (`--log-format json`); `rust_log` is `RUST_LOG` (`None`:
    /// unset, the default level). Returns once the admin listener answers.
    pub async fn start(yaml: &str, args: &[&str], rust_log: Option<&str>) -> Binary {
        Self::start_with_files(yaml, &[], args, rust_log).await
    }

    /// [`Binary::start`] with `files` (path relative to the config's directory, content)
    /// written beside the config first.
    pub async fn start_with_files(
        yaml: &str,
        files: &[(&str, &str)],
        args: &[&str],
        rust_log: Option<&str>,
    ) -> Binary {
        Self::start_full(yaml, files, args, rust_log, "").await
    }

    /// [`Binary::start`] with more keys in its `server:` block (`drain_delay: 1s`).
    pub async fn start_with_server(yaml: &str, server_keys: &str) -> Binary {
        Self::start_full(yaml, &[], &[], None, server_keys).await
    }

    async fn start_full(
        yaml: &str,
        files: &[(&str, &str)],
        args: &[&str],
        rust_log: Option<&str>,
        server_keys: &str,
    ) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        // Ports it keeps while it restarts.
        let (listen, admin) = (stable_port().await, stable_port().await);
        let config = dir.path().join("routes.yaml");
        std::fs::write(
            &config,
            format!(
                "server: {{ listen: \"{listen}\", admin: \"{admin}\"{sep}{server_keys} }}\n{yaml}",
                sep = if server_keys.is_empty() { "" } else { ", " }
            ),
        )
        .unwrap();
        let mut command: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        command.extend(["run", "--no-watch", "--config"].map(Into::into));
        command.push(config.into_os_string());
        let rust_log = rust_log.map(str::to_string);
        let child = Self::spawn(dir.path(), &command, rust_log.as_deref());
        let b = Binary {
            listen,
            admin,
            dir,
            child,
            command,
            rust_log,
        };
        b.wait_healthy().await;
        b
    }

    fn spawn(
        dir: &std::path::Path,
        command: &[std::ffi::OsString],
        rust_log: Option<&str>,
    ) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("out.log"))
            .unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(command)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.spawn().unwrap()
    }

    async fn wait_healthy(&self) {
        let healthz = format!("http://{}/healthz", self.admin);
        eventually("the gateway's admin listener answers", || async {
            client()
                .request(Request::get(&healthz).body(body("")).unwrap())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
    }

    /// Sends it SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// Sends it SIGTERM and waits for it to exit (its drain included).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again, as it was started (same ports, same directory and state), once it
    /// has exited; returns once its admin listener answers.
    pub async fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), &self.command, self.rust_log.as_deref());
        self.wait_healthy().await;
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("out.log")).unwrap_or_default()
    }

    /// Stops it and returns its output.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

/// A WebSocket server that accepts every handshake and reads what it is sent: an upstream for
/// tests of what happens before the upgrade. Its address.
pub async fn websocket_sink() -> SocketAddr {
    use futures_util::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await {
                    while ws.next().await.is_some() {}
                }
            });
        }
    });
    addr
}
