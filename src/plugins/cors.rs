//! The `cors` plugin: the outermost layer of a route's plugin chain (whatever its place in the
//! list), so that a browser's preflight is answered before authentication asks for
//! credentials a preflight never carries. The front end sends a preflight (`OPTIONS` with
//! `Origin` and `Access-Control-Request-Method`) to the route the actual request would take.
//!
//! A preflight is answered here from the route's settings and never reaches the backend. An
//! actual request from an allowed origin goes on, and its answer gets
//! `Access-Control-Allow-Origin` (and credentials and exposed headers when configured); one
//! from another origin goes on without them, so the browser keeps the answer from the page, as
//! Envoy, Kong and APISIX do. A WebSocket handshake is different: browsers do not protect it, so
//! one from an origin that is not allowed is refused here (403), before the upgrade. Every
//! answer carries `Vary: Origin`.
//!
//! [`Origins`] is also what a WebSocket route's `origins` list is checked with.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::Deserialize;

use super::Guard;
use crate::config::types::Dur;
use crate::error::Problem;
use crate::{Request, ResponseFuture, RouteService, fail};

pub struct CorsPlugin;

/// One allowed origin: any (`*`), the opaque `null`, one origin, or every subdomain of a
/// domain (`https://*.example.com`).
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Any,
    Exact(String),
    /// The scheme with `://`, the domain with its leading dot, and `:port` or nothing.
    Subdomains(String, String, String),
}

/// A list of allowed origins, compared without case.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origins(Vec<Rule>);

impl Origins {
    /// Reads `list`; an entry that is not an origin is refused with its index and why.
    pub fn parse(list: &[String]) -> Result<Origins, (usize, String)> {
        list.iter()
            .enumerate()
            .map(|(i, o)| rule(o).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()
            .map(Origins)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any origin is allowed (`*`).
    fn any(&self) -> bool {
        self.0.contains(&Rule::Any)
    }

    /// Whether `origin` (an `Origin` header's value) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.0.iter().any(|r| match r {
            Rule::Any => true,
            Rule::Exact(o) => *o == origin,
            Rule::Subdomains(scheme, domain, port) => origin
                .strip_prefix(scheme.as_str())
                .and_then(|rest| rest.strip_suffix(port.as_str()))
                .is_some_and(|host| {
                    host.len() > domain.len()
                        && host.ends_with(domain.as_str())
                        && !host.contains([':', '/'])
                }),
        })
    }
}

/// What an entry must look like, for the messages that refuse one.
const ORIGIN_FORM: &str = "write `https://host` or `https://host:port` (no path), `https://*.example.com` for every subdomain, `null`, or `*` for any origin";

fn rule(o: &str) -> Result<Rule, String> {
    if o == "*" {
        return Ok(Rule::Any);
    }
    if o == "null" {
        return Ok(Rule::Exact("null".into()));
    }
    let lower = o.to_ascii_lowercase();
    let refused = || format!("`{o}` is not an origin: {ORIGIN_FORM}");
    let (scheme, rest) = lower.split_once("://").ok_or_else(refused)?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', '@'])
    {
        return Err(refused());
    }
    // The host (an IPv6 address in brackets) and `:port` or nothing.
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let end = v6.find(']').ok_or_else(refused)? + 2;
            rest.split_at(end)
        }
        None => match rest.rfind(':') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        },
    };
    if let Some(p) = port.strip_prefix(':') {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(refused());
        }
    } else if !port.is_empty() {
        return Err(refused());
    }
    let port = port.to_string();
    let valid_host = |h: &str| {
        !h.is_empty()
            && (h.starts_with('[') && h.ends_with(']') && h.len() > 2
                || h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
    };
    match host.strip_prefix("*.") {
        Some(domain) if valid_host(domain) && !domain.starts_with('[') => Ok(Rule::Subdomains(
            format!("{scheme}://"),
            format!(".{domain}"),
            port,
        )),
        Some(_) => Err(refused()),
        None if valid_host(host) => Ok(Rule::Exact(lower)),
        None => Err(refused()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorsConfig {
    /// Allowed origins.
    origins: Vec<String>,
    /// Methods a preflight may ask for; by default any the route takes.
    #[serde(default)]
    methods: Option<Vec<String>>,
    /// Request headers a preflight may ask for; by default whatever it asks.
    #[serde(default)]
    headers: Option<Vec<String>>,
    /// Response headers the page may read besides the safelisted ones.
    #[serde(default)]
    expose_headers: Vec<String>,
    /// Whether the page may send and read credentials (cookies, `Authorization`).
    #[serde(default)]
    credentials: bool,
    /// How long a browser may keep a preflight's answer.
    #[serde(default)]
    max_age: Option<Dur>,
}

const USAGE: &str = "write `cors: { origins: [\"https://app.example.com\"] }`, optionally with `methods`, `headers`, `expose_headers`, `credentials` and `max_age`";

pub struct Compiled {
    origins: Origins,
    methods: Option<Vec<Method>>,
    /// Lower-case header names.
    headers: Option<Vec<HeaderName>>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: CorsConfig =
        serde_json::from_value(config.clone()).map_err(|e| format!("{e}; {USAGE}"))?;
    if cfg.origins.is_empty() {
        return Err(format!("`origins` lists no origin; {USAGE}"));
    }
    let origins = Origins::parse(&cfg.origins).map_err(|(i, e)| format!("origins[{i}]: {e}"))?;
    if cfg.credentials && origins.any() {
        return Err(
            "`credentials: true` with the origin `*` would let every site act with the user's cookies; list the origins that may"
                .into(),
        );
    }
    let methods = cfg
        .methods
        .map(|ms| {
            ms.iter()
                .enumerate()
                .map(|(i, m)| {
                    if m.is_empty() || m.bytes().any(|b| b.is_ascii_lowercase()) {
                        return Err(format!(
                            "methods[{i}]: `{m}` is not a method in capitals, like `GET` or `POST`"
                        ));
                    }
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| format!("methods[{i}]: `{m}` is not a method"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let names = |list: &[String], key: &str| {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("{key}[{i}]: `{h}` is not a header name"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let headers = cfg
        .headers
        .as_deref()
        .map(|h| names(h, "headers"))
        .transpose()?;
    let expose = names(&cfg.expose_headers, "expose_headers")?;
    let expose = (!expose.is_empty())
        .then(|| HeaderValue::from_str(&join(expose.iter().map(HeaderName::as_str))))
        .transpose()
        .map_err(|_| "expose_headers: not a header value".to_string())?;
    Ok(Compiled {
        origins,
        methods,
        headers,
        expose,
        credentials: cfg.credentials,
        max_age: cfg
            .max_age
            .and_then(|d| HeaderValue::from_str(&d.0.as_secs().to_string()).ok()),
    })
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

impl Compiled {
    /// The answer to a preflight from `origin` asking for `method`.
    fn preflight(&self, req: &Request, origin: &HeaderValue, method: &Method) -> ResponseFuture {
        let c = self;
        let allowed = origin.to_str().is_ok_and(|o| c.origins.allows(o));
        if !allowed {
            return fail(
                Problem::forbidden("This origin may not call this route (CORS).")
                    .with_field("header.origin"),
            );
        }
        if c.methods.as_ref().is_some_and(|ms| !ms.contains(method)) {
            return fail(
                Problem::forbidden(format!(
                    "The method {method} may not be used across origins on this route (CORS)."
                ))
                .with_field("header.access-control-request-method"),
            );
        }
        let asked = req
            .headers()
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect::<Vec<_>>();
        if let Some(allowed) = &c.headers
            && let Some(h) = asked
                .iter()
                .find(|h| !allowed.iter().any(|a| a.as_str() == h.as_str()))
        {
            return fail(
                Problem::forbidden(format!(
                    "The header `{h}` may not be sent across origins on this route (CORS)."
                ))
                .with_field("header.access-control-request-headers"),
            );
        }
        let mut resp = http::Response::new(crate::full_body(bytes::Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        self.allow_origin(h, origin);
        let methods = match &c.methods {
            Some(ms) => join(ms.iter().map(Method::as_str)),
            None => method.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&methods) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if !asked.is_empty()
            && let Ok(v) = HeaderValue::from_str(&join(asked.iter().map(String::as_str)))
        {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &c.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Box::pin(async move { Ok(resp) })
    }

    /// `Access-Control-Allow-Origin` (and `-Credentials`) for an allowed `origin`, and
    /// `Vary: Origin`.
    fn allow_origin(&self, h: &mut http::HeaderMap, origin: &HeaderValue) {
        let c = self;
        // `*` is answered as `*` only when credentials are off (browsers refuse the pair);
        // every other rule echoes the origin.
        if c.origins.any() && !c.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if c.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

impl Guard for CorsPlugin {
    const NAME: &'static str = "cors";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
            // Not a cross-origin request (or not from a browser): nothing to add but `Vary`.
            let inner = inner.clone().oneshot(req);
            return Box::pin(async move {
                let mut resp = inner.await?;
                resp.headers_mut()
                    .append(header::VARY, HeaderValue::from_static("Origin"));
                Ok(resp)
            });
        };
        if req.method() == Method::OPTIONS
            && let Some(m) = req
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        {
            return c.preflight(&req, &origin, &m);
        }
        let allowed = origin.to_str().is_ok_and(|o| c.origins.allows(o));
        let upgrade =
            req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT;
        if !allowed && upgrade {
            return fail(
                Problem::forbidden("This origin may not open WebSockets on this route.")
                    .with_field("header.origin"),
            );
        }
        let this = c.clone();
        let inner = inner.clone().oneshot(req);
        Box::pin(async move {
            let headers = |h: &mut http::HeaderMap| {
                if allowed {
                    this.allow_origin(h, &origin);
                    if let Some(v) = &this.expose {
                        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                    }
                } else {
                    h.append(header::VARY, HeaderValue::from_static("Origin"));
                }
            };
            match inner.await {
                Ok(mut resp) => {
                    headers(resp.headers_mut());
                    Ok(resp)
                }
                // A refusal or failure of the layers inside (401, 429, 502…) reaches the page
                // too, so its answer carries the same headers.
                Err(e) => match e.downcast::<Problem>() {
                    Ok(mut p) => {
                        headers(&mut p.headers);
                        Err(p as crate::BoxError)
                    }
                    Err(e) => Err(e),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        Origins::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn origins_match_exactly_by_subdomain_or_any() {
        let o = origins(&["https://app.example.com", "https://*.example.org:8443"]);
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("HTTPS://APP.example.com"));
        assert!(!o.allows("http://app.example.com"));
        assert!(!o.allows("https://app.example.com:444"));
        assert!(!o.allows("https://app.example.com.evil.net"));
        assert!(o.allows("https://a.b.example.org:8443"));
        assert!(!o.allows("https://example.org:8443"));
        assert!(!o.allows("https://a.example.org"));
        assert!(!o.allows("https://evil-example.org:8443"));
        assert!(!o.allows("https://x.example.org:8443/path"));
        assert!(origins(&["*"]).allows("https://anything.test"));
        assert!(origins(&["null"]).allows("null"));
        assert!(origins(&["http://[::1]:8080"]).allows("http://[::1]:8080"));
        assert!(origins(&["http://[::1]"]).allows("http://[::1]"));
    }

    #[test]
    fn entries_that_are_not_origins_are_refused() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/x",
            "ftp://app.example.com",
            "https://*",
            "https://a.*.example.com",
            "https://user@app.example.com",
            "https://app.example.com:99999",
            "https://",
        ] {
            assert!(Origins::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
