//! `validate --live` for an HTTP backend: one GET to each endpoint's base URL, through TLS for
//! `https://` ones as the gateway would connect. Any answer means the endpoint is there; only a
//! failure to connect (a TLS handshake the gateway would refuse included, with its reason) or
//! to answer in time fails.

use std::time::Duration;

use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::backends::live::{Findings, Verdict};
use crate::backends::tls;
use crate::config::{HttpBackendSpec, HttpProtocol, RouteSpec};

pub async fn check(
    name: &str,
    spec: &HttpBackendSpec,
    _routes: &[&RouteSpec],
    base: &std::path::Path,
) -> Findings {
    let mut f = Findings::new(name);
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(spec.connect_timeout.0));
    connector.set_nodelay(true);
    let alpn = spec.protocol.alpn();
    let connector =
        match tls::connector_for(&spec.endpoints, spec.tls.as_ref(), base, connector, alpn) {
            Ok(c) => c,
            Err(e) => {
                f.backend("tls".to_string(), Verdict::Fail, &e);
                return f;
            }
        };
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(spec.protocol == HttpProtocol::Http2)
        .build(connector);
    let within = spec.connect_timeout.0 + Duration::from_secs(5);
    for ep in &spec.endpoints {
        let check = format!("endpoint {ep}");
        let Ok(uri) = ep.parse::<http::Uri>() else {
            f.backend(check, Verdict::Fail, "not a URL");
            continue;
        };
        let req = http::Request::get(uri)
            .header(http::header::USER_AGENT, "switchyard-validate")
            .body(Empty::new());
        let Ok(req) = req else {
            f.backend(check, Verdict::Fail, "not a URL");
            continue;
        };
        match tokio::time::timeout(within, client.request(req)).await {
            Ok(Ok(resp)) => f.backend(
                check,
                Verdict::Ok,
                &format!("answered {} to GET", resp.status()),
            ),
            Ok(Err(e)) => f.backend(
                check,
                Verdict::Fail,
                &tls::failure(&e).unwrap_or_else(|| crate::server::dispatch::error_chain(&e)),
            ),
            Err(_) => f.backend(
                check,
                Verdict::Fail,
                &format!(
                    "no answer to GET within {}",
                    humantime::format_duration(within)
                ),
            ),
        }
    }
    f
}
