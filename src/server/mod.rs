//! The public front end (hyper 1 + hyper-util): accepts connections, speaks HTTP/1.1 and HTTP/2
//! (h2c prior knowledge, h2 via ALPN over TLS), enforces connection limits, header-read and idle
//! timeouts, and drains on shutdown. Each request goes to [`dispatch::handle`].

pub mod body;
pub mod client_cert;
pub mod dispatch;
pub mod io;
pub mod percore;
pub mod sse;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;
use dispatch::ConnInfo;
use io::{Activity, ActivityIo};

/// Accepts connections until `shutdown` is cancelled. Connections are tracked by `tracker` so
/// the caller can wait for them to drain; each holds one of `slots` (`server.limits.
/// max_connections`, or a per-core worker's share of it).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
) {
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shared.metrics.open_connections.inc();
            serve_tcp(stream, remote, shared.clone(), tls, shutdown).await;
            shared.metrics.open_connections.dec();
            drop(permit);
        });
    }
}

async fn serve_tcp(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let limits = shared.table.load().spec.server.limits.clone();
    let activity = Activity::new();
    match tls {
        None => {
            // Prior knowledge: an HTTP/2 client opens with the preface, anything else is
            // HTTP/1. Decided here, by peeking and within the header-read deadline, so the
            // connection is served by the HTTP/1 or HTTP/2 server directly instead of through
            // hyper-util's version-sniffing wrapper, which has no deadline and cost a bare hyper
            // proxy about 10 % of its req/s (docs/benchmarks.md).
            let Some(proto) = sniff(&stream, limits.header_read_timeout.0).await else {
                tracing::debug!(%remote, "The connection sent no request in time.");
                return;
            };
            let io = ActivityIo::new(stream, activity.clone());
            let info = ConnInfo {
                remote,
                tls: false,
                client_cert: None,
            };
            serve_conn(io, info, proto, shared, shutdown, activity).await
        }
        Some(acceptor) => {
            let io = ActivityIo::new(stream, activity.clone());
            let accepted =
                tokio::time::timeout(limits.header_read_timeout.0, acceptor.accept(io)).await;
            let Ok(Ok(stream)) = accepted else {
                tracing::debug!(%remote, "TLS handshake failed or timed out.");
                return;
            };
            // ALPN decides; a client that offered none speaks HTTP/1.1.
            let proto = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Proto::H2,
                _ => Proto::H1,
            };
            // A verified client certificate (mutual TLS), read once for the connection.
            let client_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| client_cert::ClientCert::parse(c))
                .map(Arc::new);
            let info = ConnInfo {
                remote,
                tls: true,
                client_cert,
            };
            serve_conn(stream, info, proto, shared, shutdown, activity).await
        }
    }
}

/// The HTTP version a connection speaks, known before its server starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plaintext connection opens with the HTTP/2 preface, read with `peek` so the bytes
/// stay in the socket for the server. `None`: closed, failed, or not decided `within` (a
/// client that connects and sends nothing).
async fn sniff(stream: &TcpStream, within: Duration) -> Option<Proto> {
    let decide = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(Proto::H1);
            }
            if n == H2_PREFACE.len() {
                return Some(Proto::H2);
            }
            // Part of the preface so far (split across segments, rare): `peek` would return
            // at once with the same bytes, so wait a little for the rest.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(within, decide).await.ok().flatten()
}

async fn serve_conn<I>(
    io: I,
    info: ConnInfo,
    proto: Proto,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.table.load().spec.server.limits.clone();
    let remote = info.remote;
    let h1 = matches!(proto, Proto::H1);
    let svc = service_fn(move |req| {
        let (shared, info) = (shared.clone(), info.clone());
        async move {
            let mut resp = dispatch::handle(shared.clone(), info, req).await;
            // Draining: an HTTP/1.1 client reconnects (through its load balancer) for its
            // next request, instead of finding this connection closed under it later.
            if h1 && shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let io = TokioIo::new(io);
    let idle = limits.idle_timeout.0;
    match proto {
        Proto::H1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout.0)
                .max_buf_size(limits.max_header_size.0.max(8192) as usize)
                .serve_connection(io, svc)
                .with_upgrades();
            drive(conn, remote, &shutdown, &activity, idle, |c| {
                c.graceful_shutdown()
            })
            .await
        }
        Proto::H2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_size.0.min(u32::MAX as u64) as u32)
                .max_concurrent_streams(256)
                // RFC 8441: WebSockets over HTTP/2 streams.
                .enable_connect_protocol()
                .serve_connection(io, svc);
            drive(conn, remote, &shutdown, &activity, idle, |c| {
                c.graceful_shutdown()
            })
            .await
        }
    }
}

/// Runs one connection to its end: shut down gracefully (in-flight requests finish, no new
/// ones) when the gateway drains or when no bytes moved for `idle`.
async fn drive<C, E>(
    conn: C,
    remote: std::net::SocketAddr,
    shutdown: &CancellationToken,
    activity: &Activity,
    idle: Duration,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%remote, error = %e, "Connection ended with an error.");
                }
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
            _ = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for() >= idle {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}
