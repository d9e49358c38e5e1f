//! The gRPC backend's connections, at the very bottom of a gRPC route's stack (under the
//! transcoder and the pass-through): one multiplexed HTTP/2 connection per endpoint, shared by
//! every route and call of the backend, with keep-alive pings, reconnects on demand, TLS for
//! `https://` endpoints, and round robin over the endpoints that are not ejected.
//!
//! A call goes from the request's own task straight to the connection's task. tonic's
//! `Channel` puts a `Buffer` (one more task, two more wake-ups per call) in between, which is
//! most of what a gateway adds to a unary call at low load.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::config::GrpcBackendSpec;

type Connector = crate::backends::tls::HttpsConnector;

/// How long an endpoint that refused a connection is skipped (while another one is left).
const EJECT_FOR: Duration = Duration::from_secs(5);

struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority`, for the access log.
    addr: Arc<str>,
}

struct Shared {
    endpoints: Vec<Endpoint>,
    /// Which endpoint takes the next call; one that refused a connection is skipped.
    balancer: crate::backends::balance::Balancer,
    /// The TLS failures logged, per endpoint.
    tls_failures: crate::backends::tls::Failures,
}

/// A backend's calls, over its endpoints' shared HTTP/2 connections. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    /// One per per-core worker (`server.runtime: per_core`), so that a worker's calls use
    /// connections its own runtime drives.
    client: Arc<crate::server::percore::PerWorker<Client<Connector, tonic::body::Body>>>,
    shared: Arc<Shared>,
}

impl Transport {
    /// The connections of a backend: nothing connects until the first call.
    pub fn new(name: &str, spec: &GrpcBackendSpec, base: &std::path::Path) -> Result<Self, String> {
        let endpoints = spec
            .endpoints
            .iter()
            .map(|e| {
                let uri: Uri = e
                    .parse()
                    .map_err(|_| format!("endpoint `{e}`: not a URL"))?;
                let parts = uri.into_parts();
                match (parts.scheme, parts.authority) {
                    (Some(scheme), Some(authority)) => Ok(Endpoint {
                        addr: format!("{scheme}://{authority}").into(),
                        scheme,
                        authority,
                    }),
                    _ => Err(format!("endpoint `{e}`: needs a scheme and a host")),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        if endpoints.is_empty() {
            return Err("a gRPC backend needs at least one endpoint".into());
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(spec.connect_timeout.0));
        // Plain `http://` endpoints never use the TLS settings; `https://` ones get the
        // backend's CA, client identity and `server_name`, and ALPN `h2`.
        let connector = crate::backends::tls::connector_for(
            &spec.endpoints,
            spec.tls.as_ref(),
            base,
            http,
            crate::backends::tls::Alpn::H2,
        )?;
        let (keepalive, connect_timeout) = (spec.keepalive.0, spec.connect_timeout.0);
        let client = crate::server::percore::PerWorker::new(move || {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                // Like a gRPC channel, an idle connection stays (its pings keep it honest).
                .pool_idle_timeout(None)
                // HTTP/2 pings find dead connections before a call does.
                .http2_keep_alive_interval(keepalive)
                .http2_keep_alive_timeout(connect_timeout.max(Duration::from_secs(1)))
                .http2_keep_alive_while_idle(true)
                .build(connector.clone())
        });
        Ok(Transport {
            client: Arc::new(client),
            shared: Arc::new(Shared {
                balancer: crate::backends::balance::Balancer::new(endpoints.len(), EJECT_FOR, 1),
                tls_failures: crate::backends::tls::Failures::new(
                    name,
                    endpoints
                        .iter()
                        .map(|e| format!("{}://{}", e.scheme, e.authority)),
                ),
                endpoints,
            }),
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Transport {
    type Response = http::Response<hyper::body::Incoming>;
    /// A failed connect is a `tonic::Status` UNAVAILABLE whose source is the cause, which the
    /// callers report as a backend that cannot be reached; other failures pass as they are.
    type Error = crate::BoxError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let i = self.shared.balancer.pick();
        let ep = &self.shared.endpoints[i];
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(ep.scheme.clone());
        parts.authority = Some(ep.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
        if let Some(span) = crate::telemetry::otel::Trace::of(req.extensions()) {
            let (host, port) = (ep.authority.host(), ep.authority.port_u16());
            span.set(|| {
                use crate::telemetry::otel::{Attr, semconv};
                let port = port.unwrap_or(if ep.scheme == http::uri::Scheme::HTTPS {
                    443
                } else {
                    80
                });
                vec![
                    Attr::new(semconv::SERVER_ADDRESS, host.to_owned()),
                    Attr::new(semconv::SERVER_PORT, i64::from(port)),
                ]
            });
        }
        let shared = self.shared.clone();
        let call = self.client.get().request(req);
        let sent = crate::telemetry::access::enabled().then(std::time::Instant::now);
        Box::pin(async move {
            match call.await {
                Ok(mut resp) => {
                    shared.tls_failures.ok(i);
                    if let Some(sent) = sent {
                        resp.extensions_mut()
                            .insert(crate::telemetry::access::Upstream {
                                addr: shared.endpoints[i].addr.clone(),
                                took: sent.elapsed(),
                            });
                    }
                    Ok(resp)
                }
                Err(e) => Err(Self::failed(&shared, i, e)),
            }
        })
    }
}

impl Transport {
    /// A failed call on endpoint `i`; a failed connect ejects the endpoint, and a failed TLS
    /// handshake is logged once per endpoint and reason.
    fn failed(shared: &Shared, i: usize, e: hyper_util::client::legacy::Error) -> crate::BoxError {
        if let Some(reason) = crate::backends::tls::failure(&e) {
            shared.tls_failures.failed(i, &reason);
        }
        if e.is_connect() {
            shared.balancer.eject(i);
            let mut status = tonic::Status::unavailable("cannot connect to the backend");
            status.set_source(Arc::new(e));
            status.into()
        } else {
            e.into()
        }
    }
}

/// Whether a call failed because its endpoint could not be connected to (so the backend never
/// saw it): the `Status` this transport makes of a failed connect, or hyper-util's own error.
pub fn is_connect_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|e| e.is_connect())
        {
            return true;
        }
        cur = e.source();
    }
    false
}
