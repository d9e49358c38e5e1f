//! The serde model of routes.yaml: what operators write. Parsed and validated at load time;
//! the request path only ever sees the compiled route table built from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::types::{Dur, OneOrMany, Size};

/// The whole routes.yaml file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Listeners, limits and TLS. Changes here apply to new connections; a changed listen
    /// address needs a restart.
    #[serde(default)]
    pub server: ServerSpec,
    /// Settings every route inherits unless it sets its own.
    #[serde(default)]
    pub defaults: DefaultsSpec,
    /// Named backend connections, shared by routes and kept across reloads that don't change them.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendSpec>,
    /// The routes, matched by method, path, host and headers.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Address of the public listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener (health, metrics, config, reload). Keep it on loopback.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_grace")]
    pub shutdown_grace: Dur,
    /// Request header that carries the correlation ID (accepted, minted when absent, echoed).
    #[serde(default = "default_correlation_header")]
    pub correlation_header: String,
    /// What to do with `%2F` (an encoded slash) in a request path.
    #[serde(default)]
    pub encoded_slash: EncodedSlash,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Serve HTTPS (HTTP/2 via ALPN, and HTTP/1.1). Certificate files are reloaded when they change.
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            listen: default_listen(),
            admin: default_admin(),
            shutdown_grace: default_grace(),
            correlation_header: default_correlation_header(),
            encoded_slash: EncodedSlash::default(),
            limits: LimitsSpec::default(),
            tls: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_grace() -> Dur {
    Dur::secs(30)
}
fn default_correlation_header() -> String {
    "x-request-id".into()
}

/// Policy for `%2F` in paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlash {
    /// Keep `%2F` encoded: it is part of a segment, never a separator (default).
    #[default]
    Keep,
    /// Answer 400.
    Reject,
    /// Decode to `/` before matching and forwarding.
    Decode,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Open client connections beyond this wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slowloris protection).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Largest request head (request line and headers) accepted; larger → 431.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: Size,
    /// Keep-alive connections with no traffic for this long are closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            max_header_size: default_max_header_size(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> Dur {
    Dur::secs(10)
}
fn default_max_header_size() -> Size {
    Size(16 * 1024)
}
fn default_idle_timeout() -> Dur {
    Dur::secs(60)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM certificate chain, relative to routes.yaml's directory.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), relative to routes.yaml's directory.
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    /// Overall deadline of a request.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Largest request body a route accepts; larger → 413.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: Size,
}

impl Default for DefaultsSpec {
    fn default() -> Self {
        DefaultsSpec {
            timeout: default_timeout(),
            max_body_size: default_max_body_size(),
        }
    }
}

fn default_timeout() -> Dur {
    Dur::secs(30)
}
fn default_max_body_size() -> Size {
    Size(10 * 1024 * 1024)
}

/// A named backend. The `type` tag picks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackendSpec {
    /// Plain HTTP reverse proxy to one or more endpoints.
    Http(HttpBackendSpec),
}

impl BackendSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Http(_) => "http",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpBackendSpec {
    /// Base URLs (`http://host:port[/base]`), used round robin.
    pub endpoints: Vec<String>,
    /// Upstream protocol: `http1` or `http2` (h2c prior knowledge).
    #[serde(default)]
    pub protocol: HttpProtocol,
    /// Time allowed to open a TCP connection to an endpoint.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// How long an endpoint that failed to connect is skipped.
    #[serde(default = "default_eject_for")]
    pub eject_for: Dur,
    /// How often endpoints are probed (TCP connect) for readiness.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Dur,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: Dur,
    /// Most idle pooled connections kept per endpoint.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_endpoint: usize,
}

fn default_connect_timeout() -> Dur {
    Dur::secs(2)
}
fn default_eject_for() -> Dur {
    Dur::secs(5)
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
    #[default]
    Http1,
    Http2,
}

/// One route: how to match a request and where to send it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name, used in logs, metrics and errors.
    pub id: String,
    #[serde(rename = "match")]
    pub matcher: MatchSpec,
    /// Name of an entry under `backends`.
    pub backend: String,
    /// Settings for an `http` backend.
    #[serde(default)]
    pub http: Option<HttpRouteSpec>,
    /// Overall deadline (defaults.timeout when absent).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Largest request body (defaults.max_body_size when absent).
    #[serde(default)]
    pub max_body_size: Option<Size>,
    /// Plugins applied in order, outermost first. Each entry is `- <plugin name>: <config>`.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Path template: `/v1/orders/{id}`, catch-all `/static/{*rest}`.
    pub path: String,
    /// One method or a list; all methods when absent.
    #[serde(default)]
    pub method: Option<OneOrMany>,
    /// Host (without port) the request must be for; any host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
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

/// A plugin entry: a one-key map from plugin name to its settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(try_from = "BTreeMap<String, serde_json::Value>")]
#[schemars(with = "BTreeMap<String, serde_json::Value>")]
pub struct PluginSpec {
    pub name: String,
    pub config: serde_json::Value,
}

impl TryFrom<BTreeMap<String, serde_json::Value>> for PluginSpec {
    type Error = String;
    fn try_from(map: BTreeMap<String, serde_json::Value>) -> Result<Self, String> {
        let mut it = map.into_iter();
        match (it.next(), it.next()) {
            (Some((name, config)), None) => Ok(PluginSpec { name, config }),
            _ => Err(
                "a plugin entry is a map with exactly one key, the plugin's name, \
                 e.g. `- headers: { request: { set: { x-env: prod } } }`"
                    .into(),
            ),
        }
    }
}
