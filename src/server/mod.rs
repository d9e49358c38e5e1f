//! The public front end (hyper 1 + hyper-util): accepts connections, speaks HTTP/1.1 and HTTP/2
//! (h2c prior knowledge, h2 via ALPN over TLS), enforces connection limits, header-read and idle
//! timeouts, and drains on shutdown. Each request goes to [`dispatch::handle`].

pub mod body;
pub mod dispatch;
pub mod io;
pub mod tls;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;
use dispatch::ConnInfo;
use io::{Activity, ActivityIo};

/// Accepts connections until `shutdown` is cancelled. Connections are tracked by `tracker` so
/// the caller can wait for them to drain.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let max = shared.table.load().spec.server.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
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
    let io = ActivityIo::new(stream, activity.clone());
    match tls {
        None => {
            serve_conn(
                io,
                ConnInfo { remote, tls: false },
                None,
                shared,
                shutdown,
                activity,
            )
            .await
        }
        Some(acceptor) => {
            let accepted =
                tokio::time::timeout(limits.header_read_timeout.0, acceptor.accept(io)).await;
            let Ok(Ok(stream)) = accepted else {
                tracing::debug!(%remote, "TLS handshake failed or timed out.");
                return;
            };
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            serve_conn(
                stream,
                ConnInfo { remote, tls: true },
                alpn,
                shared,
                shutdown,
                activity,
            )
            .await
        }
    }
}

async fn serve_conn<I>(
    io: I,
    info: ConnInfo,
    alpn: Option<Vec<u8>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.table.load().spec.server.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size(limits.max_header_size.0.max(8192) as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_size.0.min(u32::MAX as u64) as u32)
        .max_concurrent_streams(256)
        // RFC 8441: WebSockets over HTTP/2 streams.
        .enable_connect_protocol();
    let builder = match alpn.as_deref() {
        Some(b"h2") => builder.http2_only(),
        Some(_) => builder.http1_only(),
        None if info.tls => builder.http1_only(),
        None => builder,
    };
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(dispatch::handle(shared, info, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = limits.idle_timeout.0;
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(remote = %info.remote, error = %e, "Connection ended with an error.");
                }
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for() >= idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
