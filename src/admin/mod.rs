//! The admin listener (127.0.0.1:9901 by default), beside the request path rather than on it:
//! health, readiness, Prometheus metrics, the loaded config's status, the compiled routes, and
//! `POST /reload`, and the spool and dead letters ([`state`]).

pub mod state;
pub mod ui;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::error::{Fault, Kind, Problem};
use crate::router::reload::{Outcome, Trigger};
use crate::{Response, full_body};

/// A JSON answer.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let body = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
    let mut r = http::Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// An admin error, as problem+json: `not-found`, `method-not-allowed` (with `Allow`),
/// `conflict`, `store-unavailable` or `internal`, by status.
pub(crate) fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let (kind, fault) = match status {
        StatusCode::NOT_FOUND => (Kind::NOT_FOUND, Fault::Client),
        StatusCode::CONFLICT => (Kind::CONFLICT, Fault::Client),
        StatusCode::SERVICE_UNAVAILABLE => (Kind::STORE_UNAVAILABLE, Fault::Gateway),
        _ => (Kind::INTERNAL, Fault::Gateway),
    };
    crate::error::problem_json(&Problem::new(kind, status, fault, detail), None)
}

/// 405, naming the methods the path takes.
pub(crate) fn not_allowed(allow: &[Method]) -> Response {
    crate::error::problem_json(&Problem::method_not_allowed(allow), None)
}

fn time(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_millis(t).to_string())
}

/// `GET /readyz`.
#[derive(Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// The gateway is shutting down (`server.drain_delay`): still serving, not ready.
    pub draining: bool,
    pub config_version: u64,
    pub backends: BTreeMap<String, BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ready: bool,
    pub used_by_routes: bool,
    /// `closed`, `open` or `half_open`; absent when the backend has no breaker.
    pub breaker: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `GET /config`.
#[derive(Serialize)]
pub struct ConfigStatus {
    pub version: u64,
    pub path: String,
    pub hash: String,
    pub last_reload: Option<String>,
    pub last_attempt: Option<String>,
    /// Why the last reload was rejected, until one is applied (or the file is reverted).
    pub last_error: Option<String>,
}

pub fn config_status(shared: &Shared) -> ConfigStatus {
    let s = shared.status();
    ConfigStatus {
        version: s.version,
        path: s.path.display().to_string(),
        hash: s.hash,
        last_reload: time(s.last_reload),
        last_attempt: time(s.last_attempt),
        last_error: s.last_error,
    }
}

/// `GET /routes`.
#[derive(Serialize)]
struct Routes<'a> {
    version: u64,
    routes: Vec<RouteView<'a>>,
    /// Routes the backends would make but cannot serve, and why.
    unserved: &'a [crate::backends::bridge::Unserved],
}

#[derive(Serialize)]
struct RouteView<'a> {
    id: &'a str,
    methods: Option<Vec<&'a str>>,
    path: &'a str,
    host: Option<&'a str>,
    headers: &'a BTreeMap<String, String>,
    backend: &'a str,
    backend_type: Option<&'static str>,
    timeout: String,
    max_body_size: u64,
    plugins: Vec<&'a str>,
}

/// `POST /reload`.
#[derive(Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
enum ReloadAnswer {
    Applied { version: u64 },
    Unchanged { version: u64 },
    Rejected { errors: Vec<String> },
}

/// Whether the gateway can serve: config loaded and every backend a route uses is ready.
pub fn readiness(shared: &Shared) -> Readiness {
    let table = shared.table.load();
    let mut ready = true;
    let mut backends = BTreeMap::new();
    for (name, b) in &table.backends.by_name {
        let used = table.routes.iter().any(|r| r.spec.backend == *name);
        let up = b.ready();
        shared.metrics.backend_ready(name, up);
        ready &= up || !used;
        backends.insert(
            name.clone(),
            BackendStatus {
                kind: b.kind(),
                ready: up,
                used_by_routes: used,
                breaker: b.policy.breaker.as_ref().map(|br| br.state().name()),
                problem: b.problem().filter(|_| !up),
            },
        );
    }
    let draining = shared.draining.load(std::sync::atomic::Ordering::Relaxed);
    Readiness {
        ready: ready && !draining,
        draining,
        config_version: table.version,
        backends,
    }
}

/// The admin API described (OpenAPI 3.1), served at `/openapi.json`; a test checks it
/// against the answers.
const OPENAPI: &str = include_str!("openapi.json");

/// Whether `req` may use the admin API: the health checks always; everything else only with
/// `server.admin_token` as a bearer token when one is set (compared in constant time).
fn authorized(shared: &Shared, req: &http::Request<Incoming>) -> bool {
    if matches!(req.uri().path(), "/healthz" | "/readyz") || ui::is_asset(req.uri().path()) {
        return true;
    }
    let table = shared.table.load();
    let Some(token) = table.spec.server.admin_token.as_deref() else {
        return true;
    };
    use subtle::ConstantTimeEq;
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, t)| bool::from(t.trim().as_bytes().ct_eq(token.as_bytes())))
}

async fn handle(shared: Arc<Shared>, req: http::Request<Incoming>) -> Response {
    if !authorized(&shared, &req) {
        return crate::error::problem_json(
            &crate::error::Problem::unauthorized(
                "The admin API needs `Authorization: Bearer <server.admin_token>`.",
                "Bearer realm=\"switchyard-admin\"",
            ),
            None,
        );
    }
    if let Some(r) = ui::handle(&shared, req.method(), req.uri().path(), req.uri().query()) {
        return r;
    }
    if let Some(r) = state::handle(&shared, req.method(), req.uri().path(), req.uri().query()).await
    {
        return r;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/openapi.json") => {
            let mut r = http::Response::new(crate::full_body(bytes::Bytes::from_static(
                OPENAPI.as_bytes(),
            )));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &BTreeMap::from([("status", "ok")]))
        }
        (&Method::GET, "/readyz") => {
            let r = readiness(&shared);
            let status = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &r)
        }
        (&Method::GET, "/metrics") => {
            readiness(&shared);
            if let Some(state) = &shared.table.load().state {
                state.spool.status();
            }
            let mut r = http::Response::new(full_body(shared.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/config") => json_response(StatusCode::OK, &config_status(&shared)),
        (&Method::GET, "/routes") => {
            let table = shared.table.load();
            let routes = table
                .routes
                .iter()
                .map(|r| RouteView {
                    id: &r.id,
                    methods: r
                        .methods
                        .as_ref()
                        .map(|m| m.iter().map(Method::as_str).collect()),
                    path: &r.spec.matcher.path,
                    host: r.spec.matcher.host.as_deref(),
                    headers: &r.spec.matcher.headers,
                    backend: &r.spec.backend,
                    backend_type: r.backend.as_ref().map(|b| b.kind()),
                    timeout: humantime::format_duration(
                        r.spec.timeout.unwrap_or(table.spec.defaults.timeout).0,
                    )
                    .to_string(),
                    max_body_size: r.max_body_size,
                    plugins: r.spec.plugins.iter().map(|p| p.name.as_str()).collect(),
                })
                .collect();
            json_response(
                StatusCode::OK,
                &Routes {
                    version: table.version,
                    routes,
                    unserved: &table.unserved,
                },
            )
        }
        (&Method::POST, "/reload") => match shared.reloader().reload(Trigger::Admin).await {
            Outcome::Applied { version } => {
                json_response(StatusCode::OK, &ReloadAnswer::Applied { version })
            }
            Outcome::Unchanged { version } => {
                json_response(StatusCode::OK, &ReloadAnswer::Unchanged { version })
            }
            Outcome::Rejected { errors } => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &ReloadAnswer::Rejected { errors },
            ),
        },
        (_, "/reload") => not_allowed(&[Method::POST]),
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/routes" | "/openapi.json") => {
            not_allowed(&[Method::GET])
        }
        (_, path) => problem(
            StatusCode::NOT_FOUND,
            format!("The admin API has no `{path}`."),
        ),
    }
}

/// Serves the admin API until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.cancelled() => break,
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
