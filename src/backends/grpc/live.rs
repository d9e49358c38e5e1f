//! `validate --live` for a gRPC backend: each endpoint is connected to and asked for its
//! services by reflection; each route's method must be served with the request and response
//! types the config's descriptors give it. A server without reflection is asked instead with
//! an empty call to each unary or server-streaming method, which the server refuses before the
//! method runs (UNIMPLEMENTED when it has no such method); client-streaming methods are then
//! left unchecked, since an empty stream would run them.

use std::time::Duration;

use super::transport::Transport;
use http_body_util::BodyExt;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use tower::ServiceExt;

use crate::backends::live::{Findings, Verdict};
use crate::config::{GrpcBackendSpec, RouteSpec};

pub async fn check(
    name: &str,
    spec: &GrpcBackendSpec,
    routes: &[&RouteSpec],
    base: &std::path::Path,
) -> Findings {
    let mut f = Findings::new(name);
    let methods: Vec<(&str, &str)> = routes
        .iter()
        .filter_map(|r| {
            let m = r.grpc.as_ref().map(|g| g.method.as_str()).or_else(|| {
                r.websocket
                    .as_ref()
                    .and_then(|w| w.grpc.as_ref())
                    .map(|g| g.method.as_str())
            })?;
            Some((r.id.as_str(), m))
        })
        .collect();
    let within = spec.connect_timeout.0 + Duration::from_secs(5);
    let mut local: Option<DescriptorPool> = None;
    for ep in &spec.endpoints {
        let at = if spec.endpoints.len() > 1 {
            format!(" at {ep}")
        } else {
            String::new()
        };
        let one = GrpcBackendSpec {
            endpoints: vec![ep.clone()],
            ..spec.clone()
        };
        let channel = match Transport::new(name, &one, base) {
            Ok(c) => c,
            Err(e) => {
                f.backend(format!("endpoint {ep}"), Verdict::Fail, &e);
                continue;
            }
        };
        let served = super::reflection::fetch(channel.clone(), within).await;
        let server = match served {
            Ok(files) => {
                let only_reflected = GrpcBackendSpec {
                    protos: Vec::new(),
                    descriptor_set: None,
                    ..one.clone()
                };
                match super::load_descriptors_with(&only_reflected, base, &files, &mut Vec::new()) {
                    Ok(pool) => {
                        let services = pool.services().count();
                        f.backend(
                            format!("endpoint {ep}"),
                            Verdict::Ok,
                            &format!("connected; reflection lists {services} services"),
                        );
                        if local.is_none() && spec.reflection {
                            local =
                                super::load_descriptors_with(spec, base, &files, &mut Vec::new())
                                    .ok();
                        }
                        Some(pool)
                    }
                    Err(e) => {
                        f.backend(format!("endpoint {ep}"), Verdict::Fail, &e);
                        continue;
                    }
                }
            }
            Err(e) if e.contains("does not offer gRPC reflection") => {
                f.backend(
                    format!("endpoint {ep}"),
                    Verdict::Ok,
                    "connected; the server offers no reflection",
                );
                None
            }
            Err(e) => {
                f.backend(format!("endpoint {ep}"), Verdict::Fail, &e);
                continue;
            }
        };
        if local.is_none() {
            match super::load_descriptors(spec, base) {
                Ok(pool) => local = Some(pool),
                Err(e) => {
                    f.backend("descriptors", Verdict::Fail, &e);
                    return f;
                }
            }
        }
        let Some(pool) = &local else { continue };
        for (route, full) in &methods {
            let check = format!("method {full}{at}");
            let Some(mine) = method(pool, full) else {
                f.route(
                    route,
                    check,
                    Verdict::Fail,
                    "not in the config's descriptors",
                );
                continue;
            };
            let (result, detail) = match &server {
                Some(theirs) => compare(&mine, method(theirs, full)),
                None if mine.is_client_streaming() => (
                    Verdict::Warn,
                    "not checked: the server offers no reflection, and an empty call would run a client-streaming method".into(),
                ),
                None => match probe(channel.clone(), full, within).await {
                    Ok(tonic::Code::Unimplemented) => (
                        Verdict::Fail,
                        "the server answered UNIMPLEMENTED: it does not serve this method".into(),
                    ),
                    Ok(code) => (
                        Verdict::Ok,
                        format!(
                            "served (an empty call was refused with {})",
                            super::status::code_name(code)
                        ),
                    ),
                    Err(e) => (Verdict::Fail, e),
                },
            };
            f.route(route, check, result, &detail);
        }
    }
    f
}

/// `package.Service/Method` in a pool.
fn method(pool: &DescriptorPool, full: &str) -> Option<MethodDescriptor> {
    let (service, name) = full.split_once('/')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == name)
}

/// The server's method against the config's: same request and response types, same streaming.
fn compare(mine: &MethodDescriptor, theirs: Option<MethodDescriptor>) -> (Verdict, String) {
    let Some(theirs) = theirs else {
        return (
            Verdict::Fail,
            "the server does not serve this method (not in its reflection)".into(),
        );
    };
    let shape = |m: &MethodDescriptor| {
        format!(
            "{}{} -> {}{}",
            if m.is_client_streaming() {
                "stream "
            } else {
                ""
            },
            m.input().full_name(),
            if m.is_server_streaming() {
                "stream "
            } else {
                ""
            },
            m.output().full_name()
        )
    };
    let (a, b) = (shape(mine), shape(&theirs));
    if a == b {
        (Verdict::Ok, format!("served: {b}"))
    } else {
        (
            Verdict::Fail,
            format!("the server's method is {b}; the config's descriptors say {a}"),
        )
    }
}

/// An empty call to a method: the gRPC status the server answers with.
async fn probe(channel: Transport, full: &str, within: Duration) -> Result<tonic::Code, String> {
    let req = http::Request::post(format!("/{full}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let call = async {
        let resp = channel.oneshot(req).await.map_err(|e| e.to_string())?;
        let code = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<i32>().ok())
                .map(tonic::Code::from)
        };
        if let Some(c) = code(resp.headers()) {
            return Ok(c);
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        body.trailers()
            .and_then(code)
            .ok_or_else(|| "the answer carries no grpc-status".to_string())
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| "no answer in time".to_string())?
}
