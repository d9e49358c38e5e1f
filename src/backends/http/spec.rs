//! The `http` backend's section of routes.yaml and a route's `http:` settings (read at load time,
//! before the request path exists).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::model::{BreakerSpec, ClientTlsSpec, RetryBudgetSpec, default_connect_timeout};
use crate::config::types::Dur;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpBackendSpec {
    /// Base URLs (`http://host:port[/base]`), used round robin.
    pub endpoints: Vec<String>,
    /// Upstream protocol: `auto` (HTTP/2 when an `https://` endpoint offers it by ALPN, else
    /// HTTP/1.1), `http1`, or `http2` (h2c with prior knowledge on `http://`).
    #[serde(default)]
    pub protocol: HttpProtocol,
    /// TLS to `https://` endpoints: the CAs to trust, the name to check, a client certificate.
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    /// Time allowed to open a TCP connection to an endpoint.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// How long an endpoint that failed to connect is skipped.
    #[serde(default = "default_eject_for")]
    pub eject_for: Dur,
    /// An endpoint that fails this many calls in a row (connect failure, reset, 5xx) is skipped
    /// for `eject_for`: the per-endpoint breaker of a multi-endpoint backend.
    #[serde(default = "default_eject_after")]
    pub eject_after_failures: u32,
    /// How often endpoints are probed (TCP connect) for readiness.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Dur,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: Dur,
    /// Most idle pooled connections kept per endpoint.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_endpoint: usize,
    /// Circuit breaking for this backend (on by default: 5 consecutive failures).
    #[serde(default)]
    pub breaker: BreakerSpec,
    /// Limit on retries to this backend.
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    /// Calls in flight to this backend beyond this fail fast with 503.
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
}

fn default_eject_for() -> Dur {
    Dur::secs(5)
}

fn default_eject_after() -> u32 {
    5
}

fn default_probe_interval() -> Dur {
    Dur::secs(2)
}

fn default_pool_idle() -> Dur {
    Dur::secs(90)
}

fn default_pool_max_idle() -> usize {
    256
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HttpProtocol {
    /// HTTP/1.1 to `http://` endpoints; HTTP/2 to `https://` ones that offer `h2` by ALPN,
    /// HTTP/1.1 to those that do not.
    #[default]
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Remove this prefix from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Forward to this path template instead (`/api/{id}`; `{*rest}` variables allowed).
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Send the client's Host header upstream instead of the endpoint's authority.
    #[serde(default)]
    pub preserve_host: bool,
}
