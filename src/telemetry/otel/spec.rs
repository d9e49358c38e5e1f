//! The `telemetry` section of routes.yaml: where the gateway's traces go. Read at load time;
//! the request path sees only the exporter built from it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::model::ClientTlsSpec;
use crate::config::types::Dur;

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySpec {
    /// Export traces over OTLP (OpenTelemetry). Off when absent; the W3C trace context
    /// (`traceparent`, `tracestate`) is carried to backends either way.
    #[serde(default)]
    pub otlp: Option<OtlpSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpSpec {
    /// The collector: `http://127.0.0.1:4317` for `grpc`; for `http_protobuf`,
    /// `http://127.0.0.1:4318` (`/v1/traces` is added to a URL without a path) or the full URL.
    pub endpoint: String,
    /// `grpc` (default) or `http_protobuf`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Headers (gRPC metadata) sent with every export, such as an API key; write secrets as
    /// `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The share of new traces recorded, from 0 to 1. A request that arrives with a
    /// `traceparent` follows its sampled flag (parent-based sampling).
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// More resource attributes (`deployment.environment.name: prod`, `service.instance.id`).
    #[serde(default)]
    pub resource: BTreeMap<String, String>,
    /// Time allowed for one export.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// How long finished spans wait to be sent in one batch.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: Dur,
    /// Most finished spans waiting to be sent; more are dropped (and counted) while the
    /// collector is slow or away, so that tracing never holds a request.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// TLS to an `https://` collector: the CAs to trust, the name to check, a client
    /// certificate.
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
}

/// The OTLP transport ([`OtlpSpec::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

fn default_sampling() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "switchyard".into()
}
fn default_timeout() -> Dur {
    Dur::secs(10)
}
fn default_flush_interval() -> Dur {
    Dur::secs(5)
}
fn default_max_queue() -> usize {
    2048
}

/// The checks of `telemetry`, pure.
pub(crate) fn validate(cx: &mut crate::config::validate::Checks, t: &TelemetrySpec) {
    let Some(o) = &t.otlp else {
        return;
    };
    let uri = o.endpoint.parse::<http::Uri>().ok().filter(|u| {
        matches!(u.scheme_str(), Some("http" | "https"))
            && u.authority().is_some()
            && u.query().is_none()
    });
    match &uri {
        None => cx.err(
            "telemetry.otlp.endpoint",
            None,
            format!(
                "`{}` is not a collector URL like `http://127.0.0.1:4317`",
                o.endpoint
            ),
        ),
        Some(u) if crate::config::validate::has_userinfo(u) => cx.err(
            "telemetry.otlp.endpoint",
            None,
            "credentials do not belong in the URL; send them in `headers`",
        ),
        Some(u) if o.protocol == OtlpProtocol::Grpc && u.path() != "/" => cx.err(
            "telemetry.otlp.endpoint",
            None,
            "an OTLP/gRPC endpoint has no path; write `http://host:4317`",
        ),
        Some(_) => {}
    }
    if !(0.0..=1.0).contains(&o.sampling) {
        cx.err(
            "telemetry.otlp.sampling",
            None,
            "a share from 0 to 1, like 0.1 for one trace in ten",
        );
    }
    if o.service_name.trim().is_empty() {
        cx.err("telemetry.otlp.service_name", None, "may not be empty");
    }
    for (name, value) in &o.headers {
        let path = format!("telemetry.otlp.headers.{name}");
        let valid = match o.protocol {
            OtlpProtocol::Grpc => {
                tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(name.as_bytes())
                    .is_ok()
                    && !name.ends_with("-bin")
            }
            OtlpProtocol::HttpProtobuf => http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
        };
        if !valid {
            cx.err(&path, None, "not a valid header name");
        } else if http::HeaderValue::from_str(value).is_err() {
            cx.err(
                &path,
                None,
                "the value holds a character a header may not (a control character or non-ASCII)",
            );
        }
    }
    if o.resource.keys().any(|k| k.trim().is_empty()) {
        cx.err(
            "telemetry.otlp.resource",
            None,
            "a resource attribute needs a name",
        );
    }
    for (key, d) in [
        ("telemetry.otlp.timeout", o.timeout),
        ("telemetry.otlp.flush_interval", o.flush_interval),
    ] {
        if d.0.is_zero() {
            cx.err(key, None, "must be above zero");
        }
    }
    if o.max_queue == 0 {
        cx.err("telemetry.otlp.max_queue", None, "must be at least 1");
    }
    if let Some(tls) = &o.tls {
        if uri.is_some_and(|u| u.scheme_str() != Some("https")) {
            cx.err(
                "telemetry.otlp.tls",
                None,
                "`tls` applies to an `https://` endpoint",
            );
        }
        crate::backends::http::validate::validate_client_tls(cx, "telemetry.otlp.tls", tls, true);
    }
}
