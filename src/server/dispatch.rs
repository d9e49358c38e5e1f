//! The front end's request handler, the outermost part of the request path: correlation ID and
//! trace context, request hygiene (control characters, path normalisation), routing, the body
//! limit, the route's stack, and finally THE error edge (`error::rescue`) and the access log.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use http::{HeaderValue, Request as HttpRequest, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::ServiceExt;
use tracing::Instrument;

use super::body::{DrainingSse, LimitedBody};
use crate::app::Shared;
use crate::error::{PayloadLimit, Problem, rescue};
use crate::middleware::context::{BodyProgress, RequestContext};
use crate::middleware::correlation;
use crate::router::{Lookup, normalize::normalize};
use crate::telemetry::access::{AccessEntry, AccessLogBody, Tries, Upstream};
use crate::telemetry::otel::{Attr, Trace, semconv};
use crate::{BoxError, Response};

static X_FORWARDED_CLIENT_CERT: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

/// Facts about the connection a request came in on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The client's verified certificate (mutual TLS).
    pub client_cert: Option<Arc<crate::server::client_cert::ClientCert>>,
}

fn host_of(req: &HttpRequest<Incoming>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)?
                .to_str()
                .ok()
                .map(str::to_string)
        })?;
    Some(raw)
}

/// Host name without port, lower-cased, for matching.
fn host_name(host: &str) -> Cow<'_, str> {
    let h = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

fn has_control_chars(req: &HttpRequest<Incoming>) -> bool {
    req.headers().values().any(|v| {
        v.as_bytes()
            .iter()
            .any(|&b| b == 0 || b == b'\r' || b == b'\n')
    })
}

/// Framing and host rules the front end enforces before anything else reads the request:
/// one `Host` (RFC 9112 §3.2), an HTTP/2 `host` that agrees with `:authority` (RFC 9113
/// §8.3.1), and no transfer coding but `chunked` alone (RFC 9112 §6.1: 501 for the others,
/// which hyper would otherwise leave undecoded).
fn check_framing(req: &HttpRequest<Incoming>) -> Result<(), Problem> {
    let bad = |detail: &str, field: &str| Problem::bad_request(detail).with_field(field);
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad(
            "The request has more than one Host header.",
            "header.host",
        ));
    }
    if req.version() == http::Version::HTTP_2
        && let (Some(h), Some(a)) = (host, req.uri().authority())
        && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
    {
        return Err(bad(
            "The request's Host header differs from its :authority.",
            "header.host",
        ));
    }
    let mut codings = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    if let Some(first) = codings.next()
        && (!first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some())
    {
        return Err(Problem::not_implemented(
            "The only transfer coding the gateway accepts is `chunked` alone.",
        )
        .with_field("header.transfer-encoding"));
    }
    Ok(())
}

/// The route id of a request no route took (404, 405, 400 before routing).
static NO_ROUTE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("-"));

/// The `Connection` options the front end keeps: the protocol's own (`close`, `keep-alive`,
/// the WebSocket `upgrade`, gRPC's `te`), which backends strip themselves when they forward.
const CONNECTION_KEPT: [&str; 4] = ["close", "keep-alive", "upgrade", "te"];

/// Removes, as the request arrives, the headers its `Connection` header names as hop-by-hop
/// (RFC 9110 §7.6.1), and the names from `Connection`, so that a client can neither hide its
/// own headers from the gateway's checks nor make a backend strip the headers the gateway adds
/// later (correlation ID, `traceparent`, `x-forwarded-*`, plugins' headers). `Host` is never
/// removed: the request is routed by it.
fn strip_connection_named(headers: &mut http::HeaderMap) {
    // The common cases (no `Connection`, or only the protocol's own options) allocate nothing.
    let only_kept = headers.get_all(header::CONNECTION).iter().all(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .all(|t| {
                t.is_empty()
                    || CONNECTION_KEPT
                        .iter()
                        .any(|k| t.eq_ignore_ascii_case(k.as_bytes()))
            })
    });
    if only_kept {
        return;
    }
    let tokens = |v: &HeaderValue| -> Vec<String> {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let kept = |t: &str| CONNECTION_KEPT.contains(&t);
    let all: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .collect();
    for name in all.iter().filter(|t| !kept(t) && t.as_str() != "host") {
        if let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
    let left: Vec<&str> = all.iter().map(String::as_str).filter(|t| kept(t)).collect();
    headers.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&left.join(", "))
        && !left.is_empty()
    {
        headers.insert(header::CONNECTION, v);
    }
}

/// Handles one request end to end. Never fails: every error becomes a problem+json answer.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    mut req: HttpRequest<Incoming>,
) -> Response {
    strip_connection_named(req.headers_mut());
    let started = Instant::now();
    let table = shared.table.load_full();
    let cid = correlation::correlation_id(req.headers(), &table.correlation_header);
    // The request's server span, in the client's trace or a new one (exported with
    // `telemetry.otlp`): its ids are in every log line of the request.
    let trace = Trace::server(table.otel.as_ref(), req.headers(), req.method(), || {
        server_attributes(&req, &conn)
    });
    // Written once, as the backends receive it; the log lines take the ids from it.
    let carried = trace.carried();
    let (trace_id, span_id) = carried.ids();
    let span = tracing::info_span!("request", correlation_id = %cid, trace_id, span_id, route = tracing::field::Empty);
    let method = req.method().clone();
    let raw_uri = req.uri().clone();
    // gRPC clients understand only gRPC answers, errors included.
    let wire = crate::error::Wire::of(req.headers());
    let cid_header = HeaderValue::from_str(&cid).ok();
    let mut route_id: Arc<str> = NO_ROUTE.clone();
    let mut counters = None;
    let mut backend_name = None;
    let mut template = None;
    let mut body_progress = None;
    let logged = crate::telemetry::access::enabled();
    let user_agent = logged
        .then(|| req.headers().get(header::USER_AGENT).cloned())
        .flatten();
    // The retry layer counts its tries here, for the access line (answer or error).
    let tries = logged.then(Tries::default);

    let result: Result<Response, BoxError> = async {
        if has_control_chars(&req) {
            return Err(Problem::bad_request(
                "a header value holds a NUL, CR or LF character",
            )
            .into());
        }
        check_framing(&req)?;
        let path = normalize(req.uri().path(), table.spec.server.encoded_slash)
            .map_err(|e| Problem::bad_request(format!("{e}.")))?;
        let host = host_of(&req);
        let host_key = host.as_deref().map(host_name);
        // An HTTP/2 WebSocket (extended CONNECT, RFC 8441) is routed like the GET of an
        // HTTP/1.1 handshake.
        let websocket_h2 = req.method() == http::Method::CONNECT
            && req
                .extensions()
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        let lookup_method = if websocket_h2 {
            &http::Method::GET
        } else {
            req.method()
        };
        let mut found = table.lookup(host_key.as_deref(), lookup_method, &path, req.headers());
        // HEAD is served wherever GET is (RFC 9110 §9.3.2), by the GET route when no route
        // takes HEAD itself; its answer loses its body below.
        if req.method() == http::Method::HEAD
            && matches!(&found, Lookup::MethodNotAllowed(allow) if allow.contains(&http::Method::GET))
        {
            found = table.lookup(
                host_key.as_deref(),
                &http::Method::GET,
                &path,
                req.headers(),
            );
        }
        // A CORS preflight goes to the route the actual request would take (its method in
        // `Access-Control-Request-Method`), when that route answers preflights (`cors`).
        if let Lookup::MethodNotAllowed(_) = &found
            && req.method() == http::Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
            && let Some(asked) = req
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok())
            && let Lookup::Found { route, params } =
                table.lookup(host_key.as_deref(), &asked, &path, req.headers())
            && route.spec.plugins.iter().any(|p| p.name == "cors")
        {
            found = Lookup::Found { route, params };
        }
        let (route, params) = match found {
            Lookup::Found { route, params } => (route.clone(), params),
            Lookup::MethodNotAllowed(allow) => {
                return Err(Problem::method_not_allowed(&allow).into());
            }
            Lookup::NotFound => return Err(Problem::not_found().into()),
        };
        if websocket_h2 && route.spec.websocket.is_none() {
            return Err(Problem::bad_request("This route is not a WebSocket endpoint.").with_field("protocol")
            .into());
        }
        route_id = route.id.clone();
        template = Some(route.template.clone());
        counters = Some(route.counters.clone());
        // The job endpoint's generated route has no backend of its own.
        backend_name = (!route.spec.backend.is_empty()).then(|| route.spec.backend.clone());
        tracing::Span::current().record("route", &*route.id);
        let limit = route.max_body_size;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(PayloadLimit(limit).into());
        }
        // The route's stack sees the normalised path (most paths already are: then the
        // request's own URI is kept).
        let rewritten = match path {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        };
        let (mut parts, body) = req.into_parts();
        let progress = (!http_body::Body::is_end_stream(&body)).then(BodyProgress::default);
        if let Some(p) = &progress {
            parts.extensions.insert(p.clone());
        }
        body_progress = progress.clone();
        let body = LimitedBody::new(body, limit, progress).boxed_unsync();
        // The request's own path and query, when they start with the path as matched.
        let own = parts
            .uri
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .cloned();
        match (rewritten, own) {
            (None, Some(pq)) => {
                // An absolute-form target (`GET http://host/path`, and every HTTP/2 request):
                // the stack sees only the path and query, as for the origin form.
                if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                    parts.uri = http::Uri::from(pq);
                }
            }
            (rewritten, _) => {
                let path = rewritten.unwrap_or_else(|| parts.uri.path().to_string());
                let path_and_query = match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                parts.uri = path_and_query.parse().map_err(|_| {
                    Problem::bad_request("the request target is not a valid URI")
                })?;
            }
        }
        carried.insert(&mut parts.headers);
        // Backends and layers add spans and events only to a recorded trace; otherwise the
        // context in the headers is all they pass on.
        if trace.recording() {
            parts.extensions.insert(trace.clone());
        }
        if let Some(v) = &cid_header {
            parts
                .headers
                .insert(table.correlation_header.clone(), v.clone());
        }
        if let Some(t) = &tries {
            parts.extensions.insert(t.clone());
        }
        if websocket_h2 || parts.headers.contains_key(header::UPGRADE) {
            parts.extensions.insert(shared.sessions.clone());
        }
        // `X-Forwarded-Client-Cert` says who the client's certificate names, and only the
        // gateway says it: a client's own is removed (Envoy's SANITIZE_SET).
        match conn.client_cert.as_ref().and_then(|c| c.xfcc.clone()) {
            Some(v) => {
                parts.headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v);
            }
            None => {
                parts.headers.remove(&X_FORWARDED_CLIENT_CERT);
            }
        }
        parts.extensions.insert(RequestContext {
            correlation_id: cid.clone(),
            client_addr: conn.remote,
            tls: conn.tls,
            host,
            route_id: route.id.clone(),
            params,
            client_cert: conn.client_cert.clone(),
        });
        route
            .service
            .clone()
            .oneshot(http::Request::from_parts(parts, body))
            .await
    }
    .instrument(span.clone())
    .await;

    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            let resp = rescue(err.as_ref(), &cid, wire);
            let status = resp.status();
            if status.is_server_error() {
                trace.event("exception", || {
                    vec![Attr::new(
                        semconv::EXCEPTION_MESSAGE,
                        error_chain(err.as_ref()),
                    )]
                });
                if let Some(b) = &backend_name {
                    shared.metrics.backend_error(b, status.as_u16());
                }
                let _enter = span.enter();
                // A cause logged once where it was found (a failing TLS handshake) is not
                // logged again per request.
                if crate::error::classify(err.as_ref()).logged {
                    tracing::debug!(status = status.as_u16(), error = %error_chain(err.as_ref()), "Request failed.");
                } else {
                    tracing::warn!(status = status.as_u16(), error = %error_chain(err.as_ref()), "Request failed.");
                }
            }
            resp
        }
    };
    if let Some(v) = cid_header {
        resp.headers_mut()
            .insert(table.correlation_header.clone(), v);
    }
    if method == http::Method::HEAD {
        // The headers of the GET answer, no body (a stream behind it ends here).
        *resp.body_mut() = crate::empty_body();
    } else if resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    {
        // Event streams end with a final event when the gateway shuts down.
        let (parts, body) = resp.into_parts();
        let body = DrainingSse::new(body, shared.sessions.shutdown.clone());
        resp = http::Response::from_parts(parts, body.boxed_unsync());
    }
    let status = resp.status().as_u16();
    // An exported trace is its latency bucket's exemplar.
    let exemplar = trace
        .recording()
        .then(|| u128::from_be_bytes(trace.span_context().trace_id().to_bytes()));
    trace.finish_server(&method, status, &route_id, template.as_deref());
    let seconds = started.elapsed().as_secs_f64();
    match &counters {
        Some(c) => c.record(&method, status, seconds, exemplar),
        None => shared.metrics.request(&route_id, &method, status, seconds),
    }
    if !tracing::enabled!(target: "switchyard::access", tracing::Level::INFO) {
        return resp;
    }
    let entry = AccessEntry {
        route: route_id,
        template,
        method,
        path: raw_uri.path().to_string(),
        status,
        started,
        correlation_id: cid,
        trace_id: trace_id.into(),
        backend: backend_name,
        client: conn.remote,
        user_agent,
        request_body: body_progress,
        upstream: resp.extensions().get::<Upstream>().cloned(),
        tries: tries.map_or(1, |t| t.get()),
    };
    let (parts, body) = resp.into_parts();
    http::Response::from_parts(parts, AccessLogBody::new(body, entry).boxed_unsync())
}

/// The cause chain of an error, for logs (never for clients), with credentials redacted.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    crate::telemetry::redact::secrets(&out).into_owned()
}

/// The attributes a request's server span starts with (HTTP server semantic conventions).
fn server_attributes(req: &HttpRequest<Incoming>, conn: &ConnInfo) -> Vec<Attr> {
    let mut attrs = vec![
        Attr::new(
            semconv::HTTP_REQUEST_METHOD,
            req.method().as_str().to_owned(),
        ),
        Attr::new(semconv::URL_PATH, req.uri().path().to_owned()),
        Attr::new(semconv::URL_SCHEME, if conn.tls { "https" } else { "http" }),
        Attr::new(
            semconv::NETWORK_PROTOCOL_VERSION,
            match req.version() {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
        Attr::new(semconv::CLIENT_ADDRESS, conn.remote.ip().to_string()),
        Attr::new(semconv::CLIENT_PORT, i64::from(conn.remote.port())),
    ];
    if let Some(host) = host_of(req) {
        attrs.push(Attr::new(
            semconv::SERVER_ADDRESS,
            host_name(&host).to_string(),
        ));
    }
    if let Some(ua) = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        attrs.push(Attr::new(semconv::USER_AGENT_ORIGINAL, ua.to_owned()));
    }
    attrs
}
