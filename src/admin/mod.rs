//! The admin listener (127.0.0.1:9901 by default), beside the request path rather than on it:
//! health, readiness, Prometheus metrics, the loaded config's status, the compiled routes, and
//! `POST /reload`, and the spool and dead letters ([`state`]).

pub mod state;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::router::reload::{Outcome, Trigger};
use crate::{Response, full_body};

pub(crate) fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = http::Response::new(full_body(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn time(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        humantime::format_rfc3339_millis(t).to_string().into()
    })
}

/// Whether the gateway can serve: config loaded and every backend a route uses is ready.
pub fn readiness(shared: &Shared) -> (bool, Value) {
    let table = shared.table.load();
    let mut all = true;
    let mut backends = serde_json::Map::new();
    let mut names: Vec<_> = table.backends.by_name.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, b) in names {
        let used = table.routes.iter().any(|r| r.spec.backend == *name);
        let ready = b.ready();
        shared.metrics.backend_ready(name, ready);
        all &= ready || !used;
        let breaker = b.policy.breaker.as_ref().map(|br| br.state().name());
        backends.insert(
            name.clone(),
            {
                let mut v = json!({ "type": b.kind(), "ready": ready, "used_by_routes": used, "breaker": breaker });
                if let Some(p) = b.problem().filter(|_| !ready) {
                    v["problem"] = p.into();
                }
                v
            },
        );
    }
    (
        all,
        json!({ "ready": all, "config_version": table.version, "backends": backends }),
    )
}

async fn handle(shared: Arc<Shared>, req: http::Request<Incoming>) -> Response {
    if let Some(r) = state::handle(&shared, req.method(), req.uri().path(), req.uri().query()).await
    {
        return r;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => {
            let (ready, body) = readiness(&shared);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, body)
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
        (&Method::GET, "/config") => {
            let s = shared.status();
            json_response(
                StatusCode::OK,
                json!({
                    "version": s.version,
                    "path": s.path.display().to_string(),
                    "hash": s.hash,
                    "last_reload": time(s.last_reload),
                    "last_attempt": time(s.last_attempt),
                    "last_error": s.last_error,
                }),
            )
        }
        (&Method::GET, "/routes") => {
            let table = shared.table.load();
            let routes: Vec<Value> = table
                .routes
                .iter()
                .map(|r| {
                    json!({
                        "id": &*r.id,
                        "methods": r.methods.as_ref().map(|m| m.iter().map(|x| x.as_str().to_string()).collect::<Vec<_>>()),
                        "path": r.template.raw,
                        "host": r.spec.matcher.host,
                        "headers": r.spec.matcher.headers,
                        "backend": r.spec.backend,
                        "backend_type": r.backend.kind(),
                        "timeout": humantime::format_duration(r.spec.timeout.unwrap_or(table.spec.defaults.timeout).0).to_string(),
                        "max_body_size": r.max_body_size,
                        "plugins": r.spec.plugins.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "version": table.version, "routes": routes }),
            )
        }
        (&Method::POST, "/reload") => match shared.reloader().reload(Trigger::Admin).await {
            Outcome::Applied { version } => json_response(
                StatusCode::OK,
                json!({ "result": "applied", "version": version }),
            ),
            Outcome::Unchanged { version } => json_response(
                StatusCode::OK,
                json!({ "result": "unchanged", "version": version }),
            ),
            Outcome::Rejected { errors } => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "result": "rejected", "errors": errors }),
            ),
        },
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/routes" | "/reload") => {
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "method not allowed" }),
            )
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({ "error": "not found" })),
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
