//! Webhooks: a finished job's result POSTed to its callback URL, signed, retried with
//! backoff, then dead-lettered. Runs off the request path, from the job runner.
//!
//! The signature header is `Switchyard-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is
//! HMAC-SHA256 with the route's secret over `<t>.<body>`. Receivers recompute it and refuse a
//! `t` too far from their clock, which stops replays.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderValue, Method, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use crate::config::WebhookSpec;

pub const SIGNATURE_HEADER: &str = "switchyard-signature";
pub const JOB_HEADER: &str = "switchyard-job-id";
pub const EVENT_HEADER: &str = "switchyard-event";

/// `t=<t>,v1=<hex hmac over "<t>.<body>">`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client webhooks are sent with (HTTP, and HTTPS with the system's roots).
#[derive(Clone)]
pub struct Sender {
    client: HttpsClient,
}

impl Default for Sender {
    fn default() -> Self {
        Self::new()
    }
}

impl Sender {
    pub fn new() -> Sender {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match builder.with_native_roots() {
            Ok(b) => b.https_or_http().enable_http1().wrap_connector(http),
            Err(e) => {
                tracing::warn!(error = %e, "No system root certificates; webhooks to https URLs will fail.");
                let roots = rustls::RootCertStore::empty();
                let config = rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(config)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http)
            }
        };
        Sender {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// One delivery: Ok when the receiver answered 2xx; otherwise why not.
    pub async fn send(
        &self,
        url: &str,
        spec: &WebhookSpec,
        job_id: &str,
        event: &str,
        body: Bytes,
        trace: &crate::telemetry::otel::Trace,
    ) -> Result<(), String> {
        use crate::telemetry::otel::{Attr, Kind, semconv};
        let t = crate::store::now_ms() / 1000;
        let sig = signature(spec.secret.as_bytes(), t, &body);
        let span = trace.child("POST", Kind::Client, || {
            vec![
                Attr::new(semconv::HTTP_REQUEST_METHOD, "POST"),
                // The query may hold a receiver's token: never recorded.
                Attr::new(
                    semconv::URL_FULL,
                    url.split('?').next().unwrap_or("").to_owned(),
                ),
            ]
        });
        let result = match request(url, job_id, event, body, sig) {
            Ok(mut req) => {
                span.inject(req.headers_mut());
                self.post(req, spec.timeout.0).await
            }
            Err(e) => Err(e),
        };
        match &result {
            // A receiver that does not take the webhook fails the attempt.
            Ok(status) => span.answered(status.as_u16(), 300),
            Err(e) => span.fail("connection", e.clone()),
        }
        span.end();
        let answer = result?;
        if answer.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {answer}"))
        }
    }

    /// One POST, bounded by `timeout`; its answer's status.
    async fn post(
        &self,
        req: http::Request<Full<Bytes>>,
        timeout: std::time::Duration,
    ) -> Result<http::StatusCode, String> {
        tokio::time::timeout(timeout, async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut s = e.to_string();
                let mut cur = std::error::Error::source(&e);
                while let Some(c) = cur {
                    s.push_str(": ");
                    s.push_str(&c.to_string());
                    cur = c.source();
                }
                s
            })?;
            // The body is not read: a receiver's answer is its status.
            Ok::<_, String>(resp.status())
        })
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
    }
}

/// A webhook's signed POST.
fn request(
    url: &str,
    job_id: &str,
    event: &str,
    body: Bytes,
    sig: String,
) -> Result<http::Request<Full<Bytes>>, String> {
    http::Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "switchyard-webhook")
        .header(SIGNATURE_HEADER, sig)
        .header(
            JOB_HEADER,
            HeaderValue::from_str(job_id).map_err(|e| e.to_string())?,
        )
        .header(EVENT_HEADER, event)
        .body(Full::new(body))
        .map_err(|e| format!("bad callback request: {e}"))
}

/// Whether `url` may be a callback given the route's allow-list: the same scheme, host and
/// port as an entry, and a path under the entry's (on a segment boundary). The path is compared
/// as written, so a URL whose meaning a receiver could change after the comparison is refused
/// first: user info, dot segments (`..`, `%2e%2e`, `.%2E`), encoded slashes or backslashes
/// (`%2F`, `%5C`) and backslashes. The error says why, for the client.
pub fn allowed(url: &str, allow: &[String]) -> Result<(), &'static str> {
    let not_listed = "it is not one this route may call back";
    let u = url.parse::<http::Uri>().map_err(|_| not_listed)?;
    let authority = u.authority().ok_or(not_listed)?;
    if authority.as_str().contains('@') {
        return Err("it holds user info (`user@`)");
    }
    let path = u.path();
    if path.contains('\\') || ["%2f", "%5c"].iter().any(|e| contains_ci(path, e)) {
        return Err("its path holds an encoded slash or a backslash");
    }
    if path.split('/').any(|seg| {
        let seg = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        seg == "." || seg == ".."
    }) {
        return Err("its path holds a dot segment (`.` or `..`)");
    }
    let port = |x: &http::Uri| {
        x.port_u16().unwrap_or(if x.scheme_str() == Some("https") {
            443
        } else {
            80
        })
    };
    let listed = allow.iter().any(|entry| {
        let Ok(a) = entry.parse::<http::Uri>() else {
            return false;
        };
        let (Some(ah), Some(uh)) = (a.host(), u.host()) else {
            return false;
        };
        if a.scheme_str() != u.scheme_str() || !ah.eq_ignore_ascii_case(uh) || port(&a) != port(&u)
        {
            return false;
        }
        let ap = a.path();
        match path.strip_prefix(ap) {
            Some(rest) => ap.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    });
    if listed { Ok(()) } else { Err(not_listed) }
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_ascii_lowercase().contains(needle)
}

/// Whether `url` is an absolute http(s) URL with a host and no user info.
pub fn valid_url(url: &str) -> bool {
    url.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https"))
            && u.host().is_some_and(|h| !h.is_empty())
            && u.authority().is_some_and(|a| !a.as_str().contains('@'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_over_time_and_body() {
        // HMAC-SHA256("key", "1700000000.{}"), computed with Python's hmac module.
        let s = signature(b"key", 1_700_000_000, b"{}");
        assert_eq!(
            s,
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(s, signature(b"key", 1_700_000_001, b"{}"));
        assert_ne!(s, signature(b"other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn callback_urls_are_checked() {
        let allow = vec![
            "https://hooks.example.com/in/".to_string(),
            "http://127.0.0.1:8080".to_string(),
        ];
        let ok = |u: &str| allowed(u, &allow).is_ok();
        assert!(ok("https://hooks.example.com/in/a"));
        assert!(ok("https://HOOKS.example.com:443/in/a?x=1"));
        assert!(ok("https://hooks.example.com/in/a..b/c.d"));
        assert!(!ok("https://hooks.example.com/inside"));
        assert!(!ok("https://hooks.example.com.evil/in/a"));
        assert!(!ok("https://hooks.example.com@evil.net/in/a"));
        assert!(!ok("https://hooks.example.com:6379/in/a"));
        assert!(!ok("http://hooks.example.com/in/a"));
        assert!(!ok("https://hooks.example.com/in/../admin"));
        assert!(!ok("https://hooks.example.com/in/%2E%2e/admin"));
        assert!(!ok("https://hooks.example.com/in/..%2Fadmin"));
        assert!(ok("http://127.0.0.1:8080/any"));
        assert!(!ok("http://127.0.0.1:8081/any"));
        assert!(valid_url("http://127.0.0.1:8080/x"));
        assert!(!valid_url("ftp://x/y"));
        assert!(!valid_url("/relative"));
        assert!(!valid_url("http://user:pass@127.0.0.1:8080/x"));
    }
}
