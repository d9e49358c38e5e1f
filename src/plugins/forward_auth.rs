//! The `forward_auth` plugin (Envoy's ext_authz, Traefik's ForwardAuth): asks an HTTP service
//! whether a request may go on, in a route's plugin chain before the middleware (a refusal
//! never reaches the backend, its breaker or its rate limit); on WebSocket routes before the
//! upgrade.
//!
//! The service gets the request's method and path (under the service URL's own path), the
//! headers the route names and `X-Forwarded-*`, never a body. A 2xx lets the request on, with
//! the answer's headers the route names copied onto it (a client's own copies removed first);
//! any other answer is the client's answer, as the service made it. A service that cannot be
//! reached or does not answer in time fails closed (503) unless `on_error: allow`. Decisions may
//! be cached for a while per key (the method, the path and the named headers, hashed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use sha2::Digest;

use super::Guard;
use crate::backends::BuildContext;
use crate::backends::tls::{self, HttpsConnector};
use crate::config::ClientTlsSpec;
use crate::config::types::Dur;
use crate::error::Problem;
use crate::middleware::context::RequestContext;
use crate::{Request, ResponseFuture, RouteService, full_body};

pub struct ForwardAuthPlugin;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardAuthConfig {
    /// The service: `http(s)://host[:port][/base]`.
    url: String,
    /// Request headers sent to the service.
    #[serde(default = "default_request_headers")]
    request_headers: Vec<String>,
    /// Headers of a 2xx answer copied onto the request.
    #[serde(default)]
    response_headers: Vec<String>,
    #[serde(default = "default_timeout")]
    timeout: Dur,
    #[serde(default)]
    cache: Option<CacheConfig>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    tls: Option<ClientTlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheConfig {
    ttl: Dur,
    #[serde(default = "default_cache_entries")]
    max_entries: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnError {
    #[default]
    Deny,
    Allow,
}

fn default_request_headers() -> Vec<String> {
    vec!["authorization".into(), "cookie".into()]
}
fn default_timeout() -> Dur {
    Dur::secs(2)
}
fn default_cache_entries() -> usize {
    10_000
}

const USAGE: &str = "write `forward_auth: { url: http://auth.internal:9000/check }`, optionally with `request_headers`, `response_headers`, `timeout`, `cache: { ttl: 30s }`, `on_error: allow` and `tls`";

/// The largest answer body relayed from the service.
const MAX_BODY: usize = 64 * 1024;

/// A cached decision.
#[derive(Clone)]
enum Decision {
    /// Go on, with these headers added.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// The service's answer.
    Deny(StatusCode, HeaderMap, Bytes),
}

pub struct Compiled {
    base: http::Uri,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    timeout: Duration,
    on_error: OnError,
    cache: Option<(Duration, usize)>,
    tls: Option<ClientTlsSpec>,
    client: Option<Client<HttpsConnector, Empty<Bytes>>>,
    decisions: Mutex<HashMap<[u8; 32], (Instant, Decision)>>,
}

fn names(list: &[String], key: &str) -> Result<Vec<HeaderName>, String> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("{key}[{i}]: `{h}` is not a header name"))
        })
        .collect()
}

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: ForwardAuthConfig =
        serde_json::from_value(config.clone()).map_err(|e| format!("{e}; {USAGE}"))?;
    let base: http::Uri = cfg
        .url
        .parse()
        .ok()
        .filter(|u: &http::Uri| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some()
                && u.query().is_none()
        })
        .ok_or_else(|| {
            format!(
                "`{}` is not a URL like `http://auth.internal:9000/check`",
                cfg.url
            )
        })?;
    if base.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("`url` holds user info; send credentials in `request_headers`".into());
    }
    if cfg.tls.is_some() && base.scheme_str() != Some("https") {
        return Err("`tls` applies to an `https://` url".into());
    }
    if let Some(t) = &cfg.tls {
        if t.cert.is_some() != t.key.is_some() {
            return Err("tls: a client certificate needs both `cert` and `key`".into());
        }
        if let Some(n) = &t.server_name {
            tls::server_name(n)?;
        }
    }
    if cfg.timeout.0.is_zero() {
        return Err("`timeout` must be above zero".into());
    }
    let response_headers = names(&cfg.response_headers, "response_headers")?;
    if let Some(h) = response_headers.iter().find(|h| {
        matches!(
            h.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding" | "te" | "upgrade"
        )
    }) {
        return Err(format!(
            "response_headers: `{h}` is a header the gateway or the protocol owns"
        ));
    }
    let cache = match cfg.cache {
        Some(c) if c.ttl.0.is_zero() => return Err("cache.ttl must be above zero".into()),
        Some(c) if c.max_entries == 0 => {
            return Err("cache.max_entries must be at least 1".into());
        }
        Some(c) => Some((c.ttl.0, c.max_entries)),
        None => None,
    };
    Ok(Compiled {
        base,
        request_headers: names(&cfg.request_headers, "request_headers")?,
        response_headers,
        timeout: cfg.timeout.0,
        on_error: cfg.on_error,
        cache,
        tls: cfg.tls,
        client: None,
        decisions: Mutex::new(HashMap::new()),
    })
}

impl Compiled {
    /// The cache key of a request: everything the service is sent (the method, the host, the
    /// path and query, the client's address and every `request_headers` value), so that a
    /// decision is reused only for a request the service would be asked about the same way.
    fn key(&self, req: &Request) -> Option<[u8; 32]> {
        self.cache.as_ref()?;
        let mut h = sha2::Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(req.method().as_str().as_bytes());
        field(
            req.uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        if let Some(c) = req.extensions().get::<RequestContext>() {
            field(c.client_addr.ip().to_string().as_bytes());
            field(c.host.as_deref().unwrap_or("").as_bytes());
        }
        for name in &self.request_headers {
            for v in req.headers().get_all(name) {
                field(v.as_bytes());
            }
            field(b"\0");
        }
        Some(h.finalize().into())
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Decision> {
        let d = self
            .decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        d.get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, d)| d.clone())
    }

    fn remember(&self, key: [u8; 32], decision: &Decision) {
        let Some((ttl, max)) = &self.cache else {
            return;
        };
        let mut d = self
            .decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if d.len() >= *max {
            d.retain(|_, (until, _)| *until > now);
        }
        if d.len() >= *max {
            // Still full of live decisions: drop the one closest to expiring.
            if let Some(k) = d
                .iter()
                .min_by_key(|(_, (until, _))| *until)
                .map(|(k, _)| *k)
            {
                d.remove(&k);
            }
        }
        d.insert(key, (now + *ttl, decision.clone()));
    }

    /// The check request: the method, the path under the service's, the named headers and
    /// `X-Forwarded-*`.
    fn check_request(&self, req: &Request) -> Result<http::Request<Empty<Bytes>>, Problem> {
        let base = self.base.path().trim_end_matches('/');
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = http::Uri::builder()
            .scheme(self.base.scheme_str().unwrap_or("http"))
            .authority(self.base.authority().map_or("", |a| a.as_str()))
            .path_and_query(format!("{base}{pq}"))
            .build()
            .map_err(|_| Problem::bad_request("the request target cannot be checked"))?;
        // An HTTP/2 WebSocket (extended CONNECT) is asked about as the GET of its handshake:
        // a CONNECT would open a tunnel to the service.
        let method = if req.method() == http::Method::CONNECT {
            http::Method::GET
        } else {
            req.method().clone()
        };
        let mut out = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::new())
            .map_err(|_| Problem::internal("the check request"))?;
        let h = out.headers_mut();
        for name in &self.request_headers {
            for v in req.headers().get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(
            HeaderName::from_static("x-forwarded-method"),
            HeaderValue::from_str(req.method().as_str())
                .map_err(|_| Problem::internal("method"))?,
        );
        if let Ok(v) = HeaderValue::from_str(pq) {
            h.insert(HeaderName::from_static("x-forwarded-uri"), v);
        }
        if let Some(c) = req.extensions().get::<RequestContext>() {
            if let Some(v) = crate::header_value(format_args!("{}", c.client_addr.ip())) {
                h.insert(HeaderName::from_static("x-forwarded-for"), v);
            }
            h.insert(
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static(if c.tls { "https" } else { "http" }),
            );
            if let Some(v) = c
                .host
                .as_deref()
                .and_then(|h| HeaderValue::from_str(h).ok())
            {
                h.insert(HeaderName::from_static("x-forwarded-host"), v);
            }
            if let Ok(v) = HeaderValue::from_str(&c.correlation_id) {
                h.insert(HeaderName::from_static("x-request-id"), v);
            }
        }
        Ok(out)
    }

    /// Asks the service. `Err` when it could not be asked or did not answer in time.
    async fn ask(&self, check: http::Request<Empty<Bytes>>) -> Result<Decision, String> {
        let client = self.client.as_ref().ok_or("not built")?;
        let asked = async {
            let resp = client
                .request(check)
                .await
                .map_err(|e| crate::server::dispatch::error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            if parts.status.is_success() {
                let add = self
                    .response_headers
                    .iter()
                    .flat_map(|n| {
                        parts
                            .headers
                            .get_all(n)
                            .iter()
                            .map(move |v| (n.clone(), v.clone()))
                    })
                    .collect();
                return Ok(Decision::Allow(add));
            }
            // A refusal stays a refusal whatever happens to its body (too large, cut off):
            // only its status decides.
            let body = http_body_util::Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut headers = parts.headers;
            crate::backends::http::strip_hop_by_hop(&mut headers);
            headers.remove(header::CONTENT_LENGTH);
            Ok(Decision::Deny(parts.status, headers, body))
        };
        tokio::time::timeout(self.timeout, asked)
            .await
            .map_err(|_| {
                format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )
            })?
    }
}

impl Guard for ForwardAuthPlugin {
    const NAME: &'static str = "forward_auth";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    /// The client (reads the `tls` files of an `https://` service).
    fn build(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Compiled, String> {
        let mut c = compile(config)?;
        // A changed TLS file reloads the config, which builds a new client.
        if let Some(t) = &c.tls {
            let files = [&t.ca, &t.cert, &t.key];
            let mut read = cx.read_files();
            for p in files.into_iter().flatten() {
                read.push(if p.is_absolute() {
                    p.clone()
                } else {
                    cx.base.join(p)
                });
            }
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(c.timeout));
        http.set_nodelay(true);
        let connector = tls::connector_for(
            &[c.base.to_string()],
            c.tls.as_ref(),
            cx.base,
            http,
            tls::Alpn::Both,
        )?;
        c.client = Some(Client::builder(TokioExecutor::new()).build(connector));
        Ok(c)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, mut req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let (c, inner) = (c.clone(), inner.clone());
        Box::pin(async move {
            let key = c.key(&req);
            let decision = match key.as_ref().and_then(|k| c.cached(k)) {
                Some(d) => Ok(d),
                None => {
                    let check = c.check_request(&req)?;
                    c.ask(check).await
                }
            };
            let decision = match decision {
                Ok(d) => {
                    if let Some(k) = key {
                        c.remember(k, &d);
                    }
                    d
                }
                Err(why) => {
                    tracing::warn!(auth = %c.base, error = %why, on_error = ?c.on_error, "The authorization service could not be asked.");
                    if c.on_error == OnError::Allow {
                        Decision::Allow(Vec::new())
                    } else {
                        return Err(Problem::new(
                            crate::error::Kind::BACKEND_UNAVAILABLE,
                            StatusCode::SERVICE_UNAVAILABLE,
                            crate::error::Fault::Gateway,
                            format!("The authorization service could not be asked: {why}."),
                        )
                        .with_retry_after(1)
                        .into());
                    }
                }
            };
            match decision {
                Decision::Allow(add) => {
                    let h = req.headers_mut();
                    for name in &c.response_headers {
                        while h.remove(name).is_some() {}
                    }
                    for (n, v) in add {
                        h.append(n, v);
                    }
                    inner.oneshot(req).await
                }
                Decision::Deny(status, headers, body) => {
                    let mut resp = http::Response::new(full_body(body));
                    *resp.status_mut() = status;
                    *resp.headers_mut() = headers;
                    Ok(resp)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        for (bad, why) in [
            (serde_json::json!({}), "missing field `url`"),
            (serde_json::json!({ "url": "ftp://a/check" }), "not a URL"),
            (
                serde_json::json!({ "url": "http://u:p@a/check" }),
                "user info",
            ),
            (
                serde_json::json!({ "url": "http://a/check", "tls": { "ca": "ca.pem" } }),
                "`https://`",
            ),
            (
                serde_json::json!({ "url": "http://a/check", "response_headers": ["host"] }),
                "owns",
            ),
            (
                serde_json::json!({ "url": "http://a/check", "cache": { "ttl": "0s" } }),
                "above zero",
            ),
            (
                serde_json::json!({ "url": "http://a/check", "cache": { "ttl": "1s", "key": ["x"] } }),
                "unknown field `key`",
            ),
            (
                serde_json::json!({ "url": "http://a/check", "on_error": "maybe" }),
                "unknown variant",
            ),
        ] {
            match compile(&bad) {
                Ok(_) => panic!("{bad} must be refused"),
                Err(e) => assert!(e.contains(why), "{bad}: want `{why}` in {e}"),
            }
        }
    }
}
