//! The HTTP backend: the reverse-proxy bridge at the bottom of a route's stack. Pooled
//! connections to one or more endpoints (round robin, failed endpoints skipped for a while),
//! HTTP/1.1, h2c, or TLS with HTTP/2 by ALPN upstream, path rewrite, hop-by-hop removal,
//! `X-Forwarded-*`, streamed bodies.

pub mod bridge;
pub mod live;
pub mod spec;
pub mod validate;
pub mod websocket;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::balance::Balancer;
use super::tls::{self, Alpn};
use super::{AbortOnDrop, spawn_probe};
use crate::config::template::Template;
use crate::config::{HttpBackendSpec, HttpProtocol, HttpRouteSpec};
use crate::error::Problem;
use crate::middleware::context::RequestContext;
use crate::telemetry::otel::{Attr, Kind, Resend, Trace, semconv};
use crate::{Body, BodyError, BoxError, Request, Response};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

struct Endpoint {
    scheme_authority: String,
    /// `scheme_authority`, shared with the access log.
    addr: Arc<str>,
    scheme: http::uri::Scheme,
    uri_authority: http::uri::Authority,
    base_path: String,
    authority: HeaderValue,
}

pub struct HttpBackend {
    name: String,
    endpoints: Arc<Vec<Endpoint>>,
    /// Which endpoint takes the next call; failed calls (connect failure, reset, 5xx) eject.
    balancer: Balancer,
    /// The connection pools.
    pool: Pool,
    protocol: HttpProtocol,
    /// The TLS client of WebSocket pass-through to `https://` endpoints (ALPN `http/1.1`).
    ws_tls: Option<tls::Client>,
    /// The TLS failures logged, per endpoint.
    tls_failures: Arc<tls::Failures>,
    eject_for: Duration,
    connect_timeout: Duration,
    /// Result of the latest background probe: some endpoint accepted a TCP connection.
    reachable: Arc<AtomicBool>,
    _probe: Option<AbortOnDrop>,
}

impl HttpProtocol {
    /// What a TLS connection of this protocol offers by ALPN.
    pub(crate) fn alpn(self) -> Alpn {
        match self {
            HttpProtocol::Auto => Alpn::Both,
            HttpProtocol::Http1 => Alpn::Http1,
            HttpProtocol::Http2 => Alpn::H2,
        }
    }
}

/// The connection pools, one per per-core worker (`server.runtime: per_core`), so that a
/// worker's requests use connections its own runtime drives: in clear when every endpoint is
/// `http://` (nothing between the pool and the socket), else through the HTTPS connector.
enum Pool {
    Plain(crate::server::percore::PerWorker<Client<HttpConnector, Body>>),
    Tls(crate::server::percore::PerWorker<Client<tls::WatchedConnector, Body>>),
}

impl Pool {
    fn clients<C>(
        connector: C,
        spec: &HttpBackendSpec,
    ) -> crate::server::percore::PerWorker<Client<C, Body>>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let (idle, max_idle, h2) = (
            spec.pool_idle_timeout.0,
            spec.pool_max_idle_per_endpoint,
            spec.protocol == HttpProtocol::Http2,
        );
        crate::server::percore::PerWorker::new(move || {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(idle)
                .pool_max_idle_per_host(max_idle)
                .http2_only(h2)
                .build(connector.clone())
        })
    }

    fn request(&self, req: Request) -> ResponseFuture {
        match self {
            Pool::Plain(c) => c.get().request(req),
            Pool::Tls(c) => c.get().request(req),
        }
    }
}

impl HttpBackend {
    /// Builds the pool and starts the readiness probe. Nothing here waits for the network; the
    /// TLS files of `https://` endpoints are read (relative to `base`), and a missing or broken
    /// one fails the build.
    pub fn new(
        name: &str,
        spec: &HttpBackendSpec,
        base: &std::path::Path,
        gate: &super::StartGate,
    ) -> Result<Self, String> {
        let endpoints: Vec<Endpoint> = spec
            .endpoints
            .iter()
            .filter_map(|e| e.parse::<Uri>().ok())
            .filter_map(|u| {
                let authority = u.authority()?.clone();
                let scheme_authority = format!("{}://{}", u.scheme_str()?, authority);
                Some(Endpoint {
                    addr: scheme_authority.as_str().into(),
                    scheme_authority,
                    scheme: u.scheme()?.clone(),
                    uri_authority: authority.clone(),
                    base_path: u.path().trim_end_matches('/').to_string(),
                    authority: HeaderValue::from_str(authority.as_str()).ok()?,
                })
            })
            .collect();
        let endpoints = Arc::new(endpoints);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(spec.connect_timeout.0));
        connector.set_nodelay(true);
        let https = endpoints
            .iter()
            .any(|e| e.scheme == http::uri::Scheme::HTTPS);
        let tls_failures = Arc::new(tls::Failures::new(
            name,
            endpoints.iter().map(|e| e.scheme_authority.clone()),
        ));
        let (pool, ws_tls) = if https {
            let config = tls::rustls_client(spec.tls.as_ref(), base)?;
            let server_name = spec.tls.as_ref().and_then(|t| t.server_name.as_deref());
            let alpn = spec.protocol.alpn();
            // A WebSocket upgrade is HTTP/1.1; the session cache is the pool's.
            let mut ws = config.clone();
            ws.alpn_protocols = vec![b"http/1.1".to_vec()];
            let ws = tls::Client {
                config: Arc::new(ws),
                server_name: server_name.map(tls::server_name).transpose()?,
            };
            let connector = tls::WatchedConnector::new(
                tls::https_connector(connector, config, server_name, alpn)?,
                tls_failures.clone(),
            );
            (Pool::Tls(Pool::clients(connector, spec)), Some(ws))
        } else {
            (Pool::Plain(Pool::clients(connector, spec)), None)
        };
        let reachable = Arc::new(AtomicBool::new(false));
        let addrs = endpoints
            .iter()
            .filter_map(|e| e.authority.to_str().ok().map(str::to_string))
            .collect();
        let probe = spawn_probe(
            name,
            "http",
            addrs,
            reachable.clone(),
            spec.probe_interval.0,
            spec.connect_timeout.0,
            gate,
        );
        Ok(HttpBackend {
            name: name.to_string(),
            balancer: Balancer::new(endpoints.len(), spec.eject_for.0, spec.eject_after_failures),
            tls_failures,
            endpoints,
            pool,
            protocol: spec.protocol,
            ws_tls,
            eject_for: spec.eject_for.0,
            connect_timeout: spec.connect_timeout.0,
            reachable,
            _probe: probe,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn eject_for(&self) -> Duration {
        self.eject_for
    }

    /// Ready when at least one endpoint answered the latest probe.
    pub fn ready(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    fn pick(&self) -> usize {
        self.balancer.pick()
    }

    pub(crate) fn eject(&self, i: usize) {
        self.balancer.eject(i);
    }

    /// The TLS client of WebSocket pass-through, when the backend has `https://` endpoints.
    pub(crate) fn ws_tls(&self) -> Option<&tls::Client> {
        self.ws_tls.as_ref()
    }

    /// Endpoint `i` answered through TLS (or in clear): a failure logged before is over.
    pub(crate) fn tls_ok(&self, i: usize) {
        self.tls_failures.ok(i);
    }

    /// What a failed connect to endpoint `i` answers, the endpoint ejected for a while: a TLS
    /// handshake that failed is a 502 naming why (logged once per endpoint and reason, not per
    /// request); any other failure is a 503 (the endpoint never saw the request either way).
    pub(crate) fn connect_failed(&self, i: usize, e: BoxError) -> Problem {
        self.eject(i);
        if let Some(reason) = tls::failure(e.as_ref()) {
            self.tls_failures.failed(i, &reason);
            return Problem::upstream_tls(&self.name, &reason).with_source(e);
        }
        Problem::backend_unavailable(&self.name, "cannot connect to the backend")
            .with_retry_after(self.eject_for.as_secs().max(1))
            .with_source(e)
    }

    /// Records a call's outcome on endpoint `i`; enough failures in a row eject it, but only
    /// when another endpoint is left to take its traffic.
    pub(crate) fn record(&self, i: usize, ok: bool) {
        if self.balancer.record(i, ok) {
            let ep = &self.endpoints[i];
            tracing::warn!(backend = %self.name, endpoint = %ep.scheme_authority, "Endpoint ejected after repeated failures.");
        }
    }
}

enum PathRewrite {
    Keep,
    StripPrefix(String),
    Template(Template),
}

/// One route's service on top of a shared [`HttpBackend`].
#[derive(Clone)]
pub struct HttpRouteService {
    backend: Arc<HttpBackend>,
    rewrite: Arc<PathRewrite>,
    preserve_host: bool,
}

impl HttpRouteService {
    pub fn backend(&self) -> &Arc<HttpBackend> {
        &self.backend
    }

    pub fn new(backend: Arc<HttpBackend>, spec: HttpRouteSpec) -> Self {
        let rewrite = match (spec.strip_prefix, spec.rewrite) {
            (Some(p), _) => PathRewrite::StripPrefix(p.trim_end_matches('/').to_string()),
            (None, Some(t)) => Template::parse(&t).map_or(PathRewrite::Keep, PathRewrite::Template),
            (None, None) => PathRewrite::Keep,
        };
        HttpRouteService {
            backend,
            rewrite: Arc::new(rewrite),
            preserve_host: spec.preserve_host,
        }
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(n);
    }
}

impl HttpRouteService {
    fn upstream_path<'p>(
        &self,
        path: &'p str,
        ctx: Option<&RequestContext>,
    ) -> Result<Cow<'p, str>, Problem> {
        let path = match &*self.rewrite {
            PathRewrite::Keep => Cow::Borrowed(path),
            PathRewrite::StripPrefix(p) => match path.strip_prefix(p.as_str()) {
                Some("") => Cow::Borrowed("/"),
                Some(rest) if rest.starts_with('/') => Cow::Borrowed(rest),
                _ => Cow::Borrowed(path),
            },
            PathRewrite::Template(t) => Cow::Owned(super::values::render_path(t, ctx)?),
        };
        Ok(path)
    }
}

super::route_service!(HttpRouteService);

impl HttpRouteService {
    /// Points `parts` at an endpoint (chosen round robin) and makes its headers fit to leave:
    /// the rewritten path, hop-by-hop headers removed, `X-Forwarded-*`, `Host` for HTTP/1.1.
    /// Returns the endpoint's index. Shared by plain requests and WebSocket pass-through.
    pub(crate) fn prepare(
        &self,
        parts: &mut http::request::Parts,
        protocol: HttpProtocol,
    ) -> Result<usize, Problem> {
        let backend = &self.backend;
        if backend.endpoints.is_empty() {
            return Err(Problem::internal("backend has no endpoints"));
        }
        let ctx = parts.extensions.get::<RequestContext>();
        let i = backend.pick();
        let ep = &backend.endpoints[i];
        let path = self.upstream_path(parts.uri.path(), ctx)?;
        // The client's own path and query are passed on as they are (a reference count) when
        // neither a rewrite nor the endpoint's base path changes them.
        let path_and_query = match (&path, parts.uri.path_and_query()) {
            (Cow::Borrowed(p), Some(pq))
                if ep.base_path.is_empty() && *p == pq.path() && pq.as_str().starts_with('/') =>
            {
                pq.clone()
            }
            _ => {
                let mut pq = String::with_capacity(ep.base_path.len() + path.len() + 32);
                pq.push_str(&ep.base_path);
                pq.push_str(&path);
                if let Some(q) = parts.uri.query() {
                    pq.push('?');
                    pq.push_str(q);
                }
                PathAndQuery::try_from(pq)
                    .map_err(|_| Problem::bad_request("the request path cannot be forwarded"))?
            }
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(ep.scheme.clone());
        uri.authority = Some(ep.uri_authority.clone());
        uri.path_and_query = Some(path_and_query);
        let uri = Uri::from_parts(uri)
            .map_err(|_| Problem::bad_request("the request path cannot be forwarded"))?;
        // What the client asked for, for X-Forwarded-Host and a preserved Host: the Host
        // header itself (a reference count) when that is where it came from.
        let client = ctx.map(|c| {
            let host = c
                .host
                .as_deref()
                .and_then(|h| match parts.headers.get(header::HOST) {
                    Some(v) if v.as_bytes() == h.as_bytes() => Some(v.clone()),
                    _ => HeaderValue::from_str(h).ok(),
                });
            (c.client_addr.ip(), c.tls, host)
        });
        parts.uri = uri;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some((ip, tls, host)) = &client {
            let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(prev) => crate::header_value(format_args!("{prev}, {ip}")),
                None => crate::header_value(format_args!("{ip}")),
            };
            if let Some(v) = xff {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
            headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if *tls { "https" } else { "http" }),
            );
            if let Some(host) = host {
                headers.insert(X_FORWARDED_HOST.clone(), host.clone());
            }
        }
        match protocol {
            // With `auto`, HTTP/2 is known only once connected; a request made for HTTP/1.1
            // goes over HTTP/2 as it is (`Host` the same as `:authority`, RFC 9113 §8.3.1).
            HttpProtocol::Auto | HttpProtocol::Http1 => {
                parts.version = Version::HTTP_11;
                if !self.preserve_host || !headers.contains_key(header::HOST) {
                    let host = match (client, self.preserve_host) {
                        (Some((_, _, Some(h))), true) => h,
                        _ => ep.authority.clone(),
                    };
                    headers.insert(header::HOST, host);
                }
            }
            HttpProtocol::Http2 => {
                parts.version = Version::HTTP_2;
                headers.remove(header::HOST);
            }
        }
        Ok(i)
    }

    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let backend = &self.backend;
        let (mut parts, body) = req.into_parts();
        let i = self.prepare(&mut parts, backend.protocol)?;
        // The try's client span, whose context the endpoint receives.
        let span = Trace::of(&parts.extensions).map(|t| {
            t.child(parts.method.as_str().to_owned(), Kind::Client, || {
                client_attributes(&parts)
            })
        });
        if let Some(span) = &span {
            span.inject_if_recorded(&mut parts.headers);
        }
        let req = http::Request::from_parts(parts, body);
        let sent = crate::telemetry::access::enabled().then(std::time::Instant::now);
        let result = backend.pool.request(req).await;
        if let Some(span) = &span {
            match &result {
                Ok(resp) => span.answered(resp.status().as_u16(), 400),
                Err(e) => span.fail("connection", crate::server::dispatch::error_chain(e)),
            }
            span.end();
        }
        match result {
            Ok(resp) => {
                backend.record(i, !resp.status().is_server_error());
                backend.tls_failures.ok(i);
                let (mut parts, body) = resp.into_parts();
                if let Some(sent) = sent {
                    parts.extensions.insert(crate::telemetry::access::Upstream {
                        addr: backend.endpoints[i].addr.clone(),
                        took: sent.elapsed(),
                    });
                }
                strip_hop_by_hop(&mut parts.headers);
                let body = body.map_err(BodyError::new).boxed_unsync();
                Ok(http::Response::from_parts(parts, body))
            }
            Err(e) if e.is_connect() => Err(backend.connect_failed(i, e.into()).into()),
            // A TLS failure after the connection was made: a refused client certificate shows
            // at the first read (TLS 1.3), and HTTP/2 does not pass its connection's error to
            // the requests on it (the watched connection recorded it). Named as a TLS failure,
            // but the request may have left, so it is retried only when safe to repeat.
            Err(e)
                if crate::error::classify(&e).fault != crate::error::Fault::Client
                    && let Some(reason) =
                        tls::failure(&e).or_else(|| backend.tls_failures.current(i)) =>
            {
                backend.eject(i);
                backend.tls_failures.failed(i, &reason);
                let mut p = Problem::upstream_tls(&backend.name, &reason);
                p.retry = crate::error::RetryClass::Reset;
                Err(p.with_source(e).into())
            }
            Err(e) => {
                // A body the client broke is not the endpoint's failure.
                if crate::error::classify(&e).fault != crate::error::Fault::Client {
                    backend.record(i, false);
                }
                Err(
                    Problem::bad_gateway(&backend.name, "the upstream request failed")
                        .with_source(e)
                        .into(),
                )
            }
        }
    }
}

/// The attributes of an HTTP try's client span (HTTP client semantic conventions).
fn client_attributes(parts: &http::request::Parts) -> Vec<Attr> {
    let uri = &parts.uri;
    let mut attrs = vec![
        Attr::new(
            semconv::HTTP_REQUEST_METHOD,
            parts.method.as_str().to_owned(),
        ),
        // Without the query, which may hold credentials (as in the access log).
        Attr::new(
            semconv::URL_FULL,
            format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            ),
        ),
        Attr::new(semconv::SERVER_ADDRESS, uri.host().unwrap_or("").to_owned()),
        Attr::new(
            semconv::SERVER_PORT,
            i64::from(uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            })),
        ),
    ];
    if let Some(Resend(n)) = parts.extensions.get::<Resend>() {
        attrs.push(Attr::new(semconv::HTTP_REQUEST_RESEND_COUNT, i64::from(*n)));
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
