//! The floor peer of the proxy benchmark (`bench/proxy.sh`): the least an HTTP/1.1 reverse
//! proxy built on hyper and hyper-util can do (no routing, no headers added, no limits, no
//! metrics), on Tokio's work-stealing runtime or, with `MODE=per-core`, on one single-threaded
//! runtime per CPU, each accepting from its own `SO_REUSEPORT` listener with its own upstream
//! pool (`MODE=per-core-one-socket`: all accepting from one listening socket). Usage: `hyper_proxy LISTEN_ADDR UPSTREAM_URL` (e.g. `http://127.0.0.1:18081`).
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

type C = Client<HttpConnector, Incoming>;

async fn accept_loop(l: tokio::net::TcpListener, up: String, client: C) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let client = client.clone();
        let up = up.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let uri = format!(
                    "{}{}",
                    up,
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                async move {
                    let status = |s| {
                        let mut r =
                            Response::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed());
                        *r.status_mut() = s;
                        r
                    };
                    let Ok(uri) = uri.parse() else {
                        return Ok::<_, Infallible>(status(hyper::StatusCode::BAD_REQUEST));
                    };
                    *req.uri_mut() = uri;
                    req.headers_mut().remove("host");
                    Ok(match client.request(req).await {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => status(hyper::StatusCode::BAD_GATEWAY),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// A listener on `addr` that other threads can share (`SO_REUSEPORT`): the kernel spreads the
/// connections over them.
fn listener(addr: SocketAddr) -> tokio::net::TcpListener {
    let bound = || -> std::io::Result<tokio::net::TcpListener> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseport(true)?;
        s.set_reuseaddr(true)?;
        s.bind(addr)?;
        s.listen(1024)
    };
    bound().unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"))
}

fn client() -> C {
    Client::builder(TokioExecutor::new()).build_http()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(up)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_proxy LISTEN_ADDR UPSTREAM_URL");
        std::process::exit(64);
    };
    let addr: SocketAddr = addr.parse().expect("LISTEN_ADDR is an address");
    let mode = std::env::var("MODE").unwrap_or_default();
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if mode == "per-core" || mode == "per-core-one-socket" {
        // `per-core-one-socket`: every thread accepts on the same listening socket (as nginx's
        // workers do), instead of one `SO_REUSEPORT` socket each.
        let one = (mode == "per-core-one-socket").then(|| {
            std::net::TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"))
        });
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let up = up.clone();
                let own = one
                    .as_ref()
                    .map(|l| l.try_clone().expect("a listener clone"));
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a Tokio runtime");
                    rt.block_on(async move {
                        let l = match own {
                            Some(l) => {
                                l.set_nonblocking(true).expect("a non-blocking listener");
                                tokio::net::TcpListener::from_std(l).expect("a listener")
                            }
                            None => listener(addr),
                        };
                        accept_loop(l, up, client()).await
                    })
                })
            })
            .collect();
        for h in hs {
            let _ = h.join();
        }
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        rt.block_on(async move { accept_loop(listener(addr), up, client()).await });
    }
}
