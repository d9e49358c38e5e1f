//! The serde model of routes.yaml: what operators write. Parsed and validated at load time;
//! the request path only ever sees the compiled route table built from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::state::{
    AsyncSpec, IdempotencySpec, JobsSpec, OnTimeout, RedisStoreSpec, RouteMode, SpoolSpec,
    StateSpec, StoreKind, WebhookSpec,
};
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
    /// Where idempotency records, jobs, dead letters and the spool are kept. Needed only by
    /// routes that use `idempotency`, `mode: async` or `spool`.
    #[serde(default)]
    pub state: StateSpec,
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
    /// Deadline of each attempt (retries included in `timeout`); none by default.
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// Retry policy for routes that set none; no retries by default.
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

impl Default for DefaultsSpec {
    fn default() -> Self {
        DefaultsSpec {
            timeout: default_timeout(),
            max_body_size: default_max_body_size(),
            per_try_timeout: None,
            retry: None,
        }
    }
}

/// When and how often a failed call is tried again.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total tries, the first included (`1` disables retries).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Base of the exponential backoff; each wait is random between 0 and
    /// `min(max_backoff, backoff × 2^retry)` (full jitter).
    #[serde(default = "default_backoff")]
    pub backoff: Dur,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Dur,
    /// Conditions that are retried: `connect-failure` (the backend was never reached),
    /// `reset` (the connection failed mid-request), `timeout` (a per-try timeout),
    /// `unavailable` (gRPC UNAVAILABLE), and HTTP statuses 500–599 (a gRPC status counts as the
    /// HTTP status it maps to).
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Request bodies up to this size are buffered so they can be sent again; larger bodies
    /// (or bodies of unknown length) are not retried.
    #[serde(default = "default_retry_buffer")]
    pub max_buffer: Size,
}

fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> Dur {
    Dur::millis(25)
}
fn default_max_backoff() -> Dur {
    Dur::secs(1)
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::Condition(RetryCondition::ConnectFailure),
        RetryOn::Condition(RetryCondition::Reset),
        RetryOn::Status(502),
        RetryOn::Status(503),
        RetryOn::Status(504),
    ]
}
fn default_retry_buffer() -> Size {
    Size(64 * 1024)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RetryOn {
    Status(u16),
    Condition(RetryCondition),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryCondition {
    ConnectFailure,
    Reset,
    Timeout,
    /// A gRPC backend answered UNAVAILABLE.
    Unavailable,
}

/// A token bucket per route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests allowed per `per`.
    pub requests: u32,
    #[serde(default = "default_rate_per")]
    pub per: Dur,
    /// Bucket size (requests that may come at once); `requests` when absent.
    #[serde(default)]
    pub burst: Option<u32>,
    /// What a bucket belongs to: `global`, `client_ip`, or `{ header: name }`.
    #[serde(default)]
    pub key: RateLimitKey,
}

fn default_rate_per() -> Dur {
    Dur::secs(1)
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(try_from = "RateLimitKeyRepr", into = "RateLimitKeyRepr")]
#[schemars(with = "RateLimitKeyRepr")]
pub enum RateLimitKey {
    #[default]
    Global,
    ClientIp,
    Header(String),
}

/// How a rate-limit key is written: `global`, `client_ip`, or `{ header: x-api-key }`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RateLimitKeyRepr {
    Name(String),
    Header { header: String },
}

impl TryFrom<RateLimitKeyRepr> for RateLimitKey {
    type Error = String;
    fn try_from(r: RateLimitKeyRepr) -> Result<Self, String> {
        match r {
            RateLimitKeyRepr::Name(n) if n == "global" => Ok(RateLimitKey::Global),
            RateLimitKeyRepr::Name(n) if n == "client_ip" => Ok(RateLimitKey::ClientIp),
            RateLimitKeyRepr::Name(n) => Err(format!(
                "unknown rate-limit key `{n}`: write `global`, `client_ip` or `{{ header: <name> }}`"
            )),
            RateLimitKeyRepr::Header { header } => Ok(RateLimitKey::Header(header)),
        }
    }
}

impl From<RateLimitKey> for RateLimitKeyRepr {
    fn from(k: RateLimitKey) -> Self {
        match k {
            RateLimitKey::Global => RateLimitKeyRepr::Name("global".into()),
            RateLimitKey::ClientIp => RateLimitKeyRepr::Name("client_ip".into()),
            RateLimitKey::Header(header) => RateLimitKeyRepr::Header { header },
        }
    }
}

/// Circuit breaking for a backend.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `consecutive`: open after `consecutive_failures` failures in a row; `rate`: open when at
    /// least `min_requests` calls in `window` failed at `failure_rate` or more.
    #[serde(default)]
    pub mode: BreakerMode,
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    #[serde(default = "default_window")]
    pub window: Dur,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// How long the breaker stays open before letting probes through.
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
    /// Trial requests let through while half-open; all must succeed to close.
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            enabled: true,
            mode: BreakerMode::default(),
            consecutive_failures: default_consecutive(),
            failure_rate: default_failure_rate(),
            window: default_window(),
            min_requests: default_min_requests(),
            open_for: default_open_for(),
            half_open_probes: default_probes(),
        }
    }
}

// f64 fields: specs are compared with ==, never hashed by value.
impl Eq for BreakerSpec {}
impl std::hash::Hash for BreakerSpec {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.consecutive_failures.hash(h);
        self.failure_rate.to_bits().hash(h);
    }
}

fn yes() -> bool {
    true
}
fn default_consecutive() -> u32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_window() -> Dur {
    Dur::secs(10)
}
fn default_min_requests() -> u32 {
    20
}
fn default_open_for() -> Dur {
    Dur::secs(5)
}
fn default_probes() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    #[default]
    Consecutive,
    Rate,
}

/// Retries to a backend may add at most `ratio` of the recent request rate, plus
/// `min_per_second`, counted over `ttl`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    #[serde(default = "default_budget_min")]
    pub min_per_second: u32,
    #[serde(default = "default_window")]
    pub ttl: Dur,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        RetryBudgetSpec {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_min(),
            ttl: default_window(),
        }
    }
}

impl Eq for RetryBudgetSpec {}
impl std::hash::Hash for RetryBudgetSpec {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.ratio.to_bits().hash(h);
        self.min_per_second.hash(h);
    }
}

fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min() -> u32 {
    10
}

/// Protection shared by every route of a backend, kept across reloads that don't change it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BackendPolicy {
    pub breaker: BreakerSpec,
    pub retry_budget: RetryBudgetSpec,
    pub concurrency_limit: Option<usize>,
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
    /// A gRPC service reached by transcoding JSON requests with descriptors loaded at run time.
    Grpc(GrpcBackendSpec),
    /// A RabbitMQ broker (AMQP 0-9-1): confirmed publishes and request/reply.
    Amqp(AmqpBackendSpec),
    /// An MQTT 5 or 3.1.1 broker: acknowledged publishes.
    Mqtt(MqttBackendSpec),
}

impl BackendSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Http(_) => "http",
            BackendSpec::Grpc(_) => "grpc",
            BackendSpec::Amqp(_) => "amqp",
            BackendSpec::Mqtt(_) => "mqtt",
        }
    }

    pub fn policy(&self) -> BackendPolicy {
        match self {
            BackendSpec::Http(h) => BackendPolicy {
                breaker: h.breaker.clone(),
                retry_budget: h.retry_budget.clone(),
                concurrency_limit: h.concurrency_limit,
            },
            BackendSpec::Grpc(g) => BackendPolicy {
                breaker: g.breaker.clone(),
                retry_budget: g.retry_budget.clone(),
                concurrency_limit: g.concurrency_limit,
            },
            BackendSpec::Amqp(a) => BackendPolicy {
                breaker: a.breaker.clone(),
                retry_budget: a.retry_budget.clone(),
                concurrency_limit: a.concurrency_limit,
            },
            BackendSpec::Mqtt(m) => BackendPolicy {
                breaker: m.breaker.clone(),
                retry_budget: m.retry_budget.clone(),
                concurrency_limit: m.concurrency_limit,
            },
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

fn default_connect_timeout() -> Dur {
    Dur::secs(2)
}
fn default_eject_for() -> Dur {
    Dur::secs(5)
}
fn default_keepalive() -> Dur {
    Dur::secs(30)
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcBackendSpec {
    /// Server URLs (`http://host:port`, HTTP/2 cleartext), balanced.
    pub endpoints: Vec<String>,
    /// `.proto` files compiled when the config loads (relative to routes.yaml's directory).
    /// `google/protobuf/*` well-known types are always available.
    #[serde(default)]
    pub protos: Vec<PathBuf>,
    /// Directories searched for imports (relative to routes.yaml's directory); the directory of
    /// routes.yaml when empty.
    #[serde(default)]
    pub import_paths: Vec<PathBuf>,
    /// A binary `FileDescriptorSet` (`protoc --include_imports -o`), instead of or beside `protos`.
    #[serde(default)]
    pub descriptor_set: Option<PathBuf>,
    /// Ask the server for its descriptors by gRPC server reflection (v1, else v1alpha) at load
    /// and on every reload, instead of or beside `protos`.
    #[serde(default)]
    pub reflection: bool,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Interval of HTTP/2 keep-alive pings on idle channels.
    #[serde(default = "default_keepalive")]
    pub keepalive: Dur,
    /// TLS settings for `https://` endpoints (the system's roots when absent).
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    /// Make a route of every method that carries a `google.api.http` annotation (ids
    /// `<backend>.<Method>`, `#n` for additional bindings).
    #[serde(default)]
    pub annotated_routes: bool,
    /// Make a `POST /<package.Service>/<Method>` route of every method, so gRPC and gRPC-Web
    /// clients reach the service through the gateway (ids `<backend>/<package.Service>/<Method>`).
    /// JSON requests to those paths are transcoded with the whole body as the request message.
    #[serde(default)]
    pub native_routes: bool,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
}

/// A RabbitMQ broker: one connection, a pool of channels in publisher-confirm mode, and the
/// gateway's own reconnect loop.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpBackendSpec {
    /// `amqp://user:pass@host:5672/vhost` (`%2f` for `/`), or `amqps://` for TLS.
    pub url: String,
    /// Channels in confirm mode that publishes are spread over.
    #[serde(default = "default_amqp_channels")]
    pub channels: usize,
    /// AMQP heartbeat interval negotiated with the broker.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Dur,
    #[serde(default = "default_amqp_connect_timeout")]
    pub connect_timeout: Dur,
    /// Longest wait for the broker's confirm of one publish; then 503.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: Dur,
    /// Reconnect backoff: from `min`, doubling up to `max`, with full jitter.
    #[serde(default)]
    pub reconnect: BackoffSpec,
    /// TLS settings for `amqps://` (the system's roots when absent).
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    /// Exchanges, queues and bindings declared on every connect.
    #[serde(default)]
    pub topology: TopologySpec,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
}

fn default_amqp_channels() -> usize {
    4
}
fn default_heartbeat() -> Dur {
    Dur::secs(10)
}
fn default_amqp_connect_timeout() -> Dur {
    Dur::secs(5)
}
fn default_confirm_timeout() -> Dur {
    Dur::secs(5)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(default = "default_backoff_min")]
    pub min: Dur,
    #[serde(default = "default_backoff_max")]
    pub max: Dur,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        BackoffSpec {
            min: default_backoff_min(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_min() -> Dur {
    Dur(std::time::Duration::from_millis(100))
}
fn default_backoff_max() -> Dur {
    Dur::secs(10)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    #[serde(default)]
    pub exchanges: Vec<ExchangeSpec>,
    #[serde(default)]
    pub queues: Vec<QueueSpec>,
    #[serde(default)]
    pub bindings: Vec<BindingSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSpec {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: ExchangeKindSpec,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeKindSpec {
    Direct,
    #[default]
    Topic,
    Fanout,
    Headers,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: QueueKindSpec,
    #[serde(default = "yes")]
    pub durable: bool,
    /// Messages expire after this long in the queue (`x-message-ttl`).
    #[serde(default)]
    pub message_ttl: Option<Dur>,
    /// Most messages the queue holds (`x-max-length`).
    #[serde(default)]
    pub max_length: Option<u64>,
    /// Where expired and rejected messages go (`x-dead-letter-exchange`).
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    #[serde(default)]
    pub dead_letter_routing_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueueKindSpec {
    #[default]
    Classic,
    Quorum,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingSpec {
    pub queue: String,
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
}

/// How a route publishes to an `amqp` backend.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpRouteSpec {
    /// Exchange template (`""` is the default exchange, routing by queue name).
    #[serde(default)]
    pub exchange: String,
    /// Routing key template: `{param}`, `{query.x}`, `{header.x}`, `{body.a.b}`.
    #[serde(default)]
    pub routing_key: String,
    /// Ask the broker to return messages no queue takes.
    #[serde(default = "yes")]
    pub mandatory: bool,
    /// The answer when the broker returned the message as unroutable: 404 or 502.
    #[serde(default = "default_unroutable")]
    pub unroutable_status: u16,
    /// Delivery mode 2 (written to disk by durable queues).
    #[serde(default = "yes")]
    pub persistent: bool,
    /// Wrap the request in a JSON envelope (method, path, params, query, headers, body).
    #[serde(default)]
    pub envelope: bool,
    /// The message's `type` property.
    #[serde(default, rename = "type")]
    pub message_type: Option<String>,
    #[serde(default = "default_app_id")]
    pub app_id: String,
    /// Per-message TTL (`expiration` property).
    #[serde(default)]
    pub expiration: Option<Dur>,
    #[serde(default)]
    pub priority: Option<u8>,
    /// Request headers copied into the message's headers (never `CC` or `BCC`).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Template values (as written: `region`, `body.path`) that may hold `.` and so span
    /// words of the routing key (or exchange name); any other value is one word.
    #[serde(default)]
    pub multi_word: Vec<String>,
    /// The answer once the broker confirmed the message.
    #[serde(default = "default_accepted")]
    pub status: u16,
    /// Wait for a reply message and answer with it (request/reply).
    #[serde(default)]
    pub reply: Option<ReplySpec>,
}

fn default_unroutable() -> u16 {
    502
}
fn default_app_id() -> String {
    "switchyard".into()
}
fn default_accepted() -> u16 {
    202
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplySpec {
    /// Where replies come back: RabbitMQ's direct reply-to (the default) or a named queue the
    /// gateway consumes.
    #[serde(default = "default_reply_queue")]
    pub queue: String,
    /// The reply header that carries the HTTP status (200 when absent).
    #[serde(default = "default_status_header")]
    pub status_header: String,
}

pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn default_reply_queue() -> String {
    DIRECT_REPLY_TO.into()
}
fn default_status_header() -> String {
    "x-status".into()
}

/// An MQTT 5 or 3.1.1 broker: one client with a persistent session, its event loop polled in its own
/// task, every QoS 1/2 publish tracked until the broker acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttBackendSpec {
    /// `mqtt://host:1883`.
    pub url: String,
    /// `v5` (the default) or `v3.1.1`. MQTT 3.1.1 carries no properties: routes to a 3.1.1
    /// backend publish without content type, correlation data, user properties or expiry, and
    /// cannot wait for a response.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// The client id (the session's name); `switchyard-<backend>` when absent. Two gateways on
    /// one broker need different ids.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_mqtt_keep_alive")]
    pub keep_alive: Dur,
    /// Largest packet sent or accepted (rumqttc's own default is only 10 KiB).
    #[serde(default = "default_mqtt_packet")]
    pub max_packet_size: Size,
    /// How long the broker keeps the session (and the messages for it) after a disconnect.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: Dur,
    /// Publishes in flight (sent, not yet acknowledged) at most.
    #[serde(default = "default_mqtt_inflight")]
    pub inflight: u16,
    #[serde(default = "default_amqp_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default)]
    pub reconnect: BackoffSpec,
    /// TLS settings for `mqtts://` (the system's roots when absent).
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
}

fn default_mqtt_keep_alive() -> Dur {
    Dur::secs(30)
}
fn default_mqtt_packet() -> Size {
    Size(1024 * 1024)
}
fn default_session_expiry() -> Dur {
    Dur::secs(3600)
}
fn default_mqtt_inflight() -> u16 {
    100
}

/// How a route publishes to an `mqtt` backend.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttRouteSpec {
    /// Topic template: `{param}`, `{query.x}`, `{header.x}`, `{body.a.b}`.
    pub topic: String,
    /// 0, 1 or 2.
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    /// Template variables whose values may span topic levels (may contain `/`).
    #[serde(default)]
    pub multi_level: Vec<String>,
    /// Message expiry; the request's remaining deadline when absent.
    #[serde(default)]
    pub message_expiry: Option<Dur>,
    /// Request headers sent as MQTT 5 user properties (besides `traceparent`).
    #[serde(default)]
    pub headers: Vec<String>,
    /// The answer once the broker acknowledged (QoS 1, 2) or the message was written (QoS 0).
    #[serde(default = "default_accepted")]
    pub status: u16,
    /// Instead of publishing, answer with the message retained on the topic (a last-value
    /// read); 404 when none comes within `wait`.
    #[serde(default)]
    pub last_value: bool,
    /// Stream the messages on the topic filter (`+` and `#` allowed) to the client as
    /// Server-Sent Events until it leaves.
    #[serde(default)]
    pub subscribe: bool,
    /// Messages a subscriber may fall behind by before it is cut off.
    #[serde(default = "default_sse_buffer")]
    pub buffer: usize,
    /// How long a last-value read waits for the retained message.
    #[serde(default = "default_last_value_wait")]
    pub wait: Dur,
    /// Wait for a response message (MQTT 5 request/response) and answer with it.
    #[serde(default)]
    pub response: Option<MqttResponseSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttResponseSpec {
    /// The response's user property that carries the HTTP status (200 when absent).
    #[serde(default = "default_status_property")]
    pub status_property: String,
}

fn default_status_property() -> String {
    "status".into()
}

fn default_sse_buffer() -> usize {
    64
}

fn default_last_value_wait() -> Dur {
    Dur::secs(1)
}

fn default_qos() -> u8 {
    1
}

/// TLS towards a backend: whom to trust, the name to check, and an optional client identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSpec {
    /// PEM bundle of the CAs to trust, instead of the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry; the endpoint's host by default.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate (PEM chain) for mutual TLS, with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The MQTT protocol version a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1", alias = "v311")]
    V311,
}

/// How a route maps HTTP/JSON to one gRPC method.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// The method, `package.Service/Method`.
    pub method: String,
    /// Where the JSON body goes: `"*"` (the whole request message), a top-level field name, or
    /// `""` for no body. Default: `"*"` for POST, PUT and PATCH, no body otherwise.
    #[serde(default)]
    pub body: Option<String>,
    /// Answer with this response field instead of the whole message.
    #[serde(default)]
    pub response_body: Option<String>,
    /// Include fields that hold their default value in JSON answers.
    #[serde(default)]
    pub emit_defaults: bool,
    /// Use the proto field names (`order_id`) instead of lowerCamelCase (`orderId`) in answers.
    #[serde(default)]
    pub proto_names: bool,
    /// Request headers forwarded as gRPC metadata (besides `x-request-id` and `traceparent`,
    /// which always are).
    #[serde(default)]
    pub metadata_headers: Vec<String>,
    /// Request fields assembled from path variables (`name` ← `shelves/{v0_1}`); set only on
    /// routes made from `google.api.http` annotations. Otherwise each variable names its field.
    #[serde(skip)]
    pub path_fields: Vec<(String, String)>,
    /// Set only on native routes (`native_routes`): bidirectional methods are allowed, for
    /// gRPC and gRPC-Web clients only.
    #[serde(skip)]
    pub native: bool,
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
    /// Settings for a `grpc` backend.
    #[serde(default)]
    pub grpc: Option<GrpcRouteSpec>,
    /// Settings for an `amqp` backend.
    #[serde(default)]
    pub amqp: Option<AmqpRouteSpec>,
    /// Settings for an `mqtt` backend.
    #[serde(default)]
    pub mqtt: Option<MqttRouteSpec>,
    /// Makes the route a WebSocket endpoint: the request is upgraded and frames are bridged
    /// to the backend (MQTT, AMQP, gRPC streams, or an upstream WebSocket for `http`).
    #[serde(default)]
    pub websocket: Option<WebSocketSpec>,
    /// Overall deadline (defaults.timeout when absent).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Largest request body (defaults.max_body_size when absent).
    #[serde(default)]
    pub max_body_size: Option<Size>,
    /// Deadline of each attempt (defaults.per_try_timeout when absent).
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// Retry policy (defaults.retry when absent).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// The route's calls are idempotent whatever their method, so they may be retried even
    /// after the backend may have acted.
    #[serde(default)]
    pub idempotent: bool,
    /// Token-bucket rate limit; 429 with `Retry-After` and `RateLimit` headers when exceeded.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Requests in flight on this route beyond this fail fast with 503.
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
    /// Plugins applied in order, outermost first. Each entry is `- <plugin name>: <config>`.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Honour `Idempotency-Key` (`idempotency: {}` for the defaults).
    #[serde(default)]
    pub idempotency: Option<IdempotencySpec>,
    /// When the backend is unreachable or its breaker is open, keep the request in the local
    /// spool, answer 202, and forward it in order once the backend is back (AMQP and MQTT).
    #[serde(default)]
    pub spool: bool,
    /// `sync` (the backend's answer) or `async` (202 and a job to poll).
    #[serde(default)]
    pub mode: RouteMode,
    /// For sync routes: `fail` (504) or `accept` (202 and a job that keeps the late answer)
    /// when `timeout` passes.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// The background call of `mode: async` and `on_timeout: accept`: deadline, webhook.
    #[serde(default, rename = "async")]
    pub background: Option<AsyncSpec>,
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
    /// A custom verb the last path variable must end with (`:cancel`); set only on routes made
    /// from `google.api.http` annotations.
    #[serde(skip)]
    pub verb: Option<String>,
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

/// A WebSocket endpoint: handshake policy, connection care, and the bridge's settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSpec {
    /// Origins allowed to connect (`https://app.example.com`, compared without case); any
    /// origin, and clients that send none, when empty.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Subprotocols the route speaks, preferred first. When set, the client must offer one.
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// How often the gateway pings the client.
    #[serde(default = "default_ws_ping")]
    pub ping_interval: Dur,
    /// A connection the client sent nothing on (pongs count) for this long is closed.
    #[serde(default = "default_ws_idle")]
    pub idle_timeout: Dur,
    /// Largest message a client may send (close 1009 beyond).
    #[serde(default = "default_ws_message")]
    pub max_message_size: Size,
    /// Largest single frame a client may send; `max_message_size` when absent.
    #[serde(default)]
    pub max_frame_size: Option<Size>,
    /// Messages queued towards the client; a client further behind is cut off (close 1008)
    /// or, where the backend can wait (AMQP), the backend is paused.
    #[serde(default = "default_ws_buffer")]
    pub buffer: usize,
    /// Client messages waiting for the backend's acknowledgement; beyond this the gateway
    /// stops reading the socket until acknowledgements come.
    #[serde(default = "default_ws_inflight")]
    pub inflight: usize,
    /// A client that takes no data for this long while the gateway writes is cut off.
    #[serde(default = "default_ws_write_timeout")]
    pub write_timeout: Dur,
    /// The bridge to an `mqtt` backend.
    #[serde(default)]
    pub mqtt: Option<WsMqttSpec>,
    /// The bridge to an `amqp` backend.
    #[serde(default)]
    pub amqp: Option<WsAmqpSpec>,
    /// The bridge to a `grpc` backend.
    #[serde(default)]
    pub grpc: Option<WsGrpcSpec>,
}

/// A WebSocket bridged to one gRPC method: one JSON frame per protobuf message each way.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsGrpcSpec {
    /// `package.Service/Method`: unary, server-, client- or bidirectional-streaming.
    pub method: String,
    /// Write fields that hold their default value in response frames.
    #[serde(default)]
    pub emit_defaults: bool,
    /// Name fields as in the .proto file instead of lowerCamelCase in response frames.
    #[serde(default)]
    pub proto_names: bool,
}

/// A WebSocket bridged to AMQP: client frames published to an exchange (confirmed), and
/// messages from a queue pushed to the client (acknowledged once written to the socket).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsAmqpSpec {
    /// Exchange (template; `""` is the default exchange) every client frame is published to;
    /// without it, client frames are not published.
    #[serde(default)]
    pub exchange: Option<String>,
    /// Routing key (template) of the publishes.
    #[serde(default)]
    pub routing_key: String,
    /// Answer each published frame with an `ack` frame once the broker confirmed it.
    /// Failures are always answered with an `error` frame.
    #[serde(default)]
    pub acks: bool,
    /// Messages pushed to the client.
    #[serde(default)]
    pub consume: Option<WsConsumeSpec>,
    /// Template values that may hold `.` and so span words of the publishes' routing key,
    /// exchange or the consumed queue's name; never of a binding key, whose values are
    /// always one word.
    #[serde(default)]
    pub multi_word: Vec<String>,
}

/// Where a WebSocket's messages come from: a named queue, or a queue of the connection's own
/// (exclusive, deleted with it) bound as listed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsConsumeSpec {
    /// A queue (template) to consume; it must exist (declare it under `topology`).
    #[serde(default)]
    pub queue: Option<String>,
    /// Bindings of the connection's own queue.
    #[serde(default)]
    pub bind: Vec<WsBindSpec>,
    /// Messages delivered to the connection and not yet written to its socket.
    #[serde(default = "default_ws_prefetch")]
    pub prefetch: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsBindSpec {
    /// Exchange (template).
    pub exchange: String,
    /// Binding key (template; `*` and `#` allowed on topic exchanges).
    #[serde(default)]
    pub routing_key: String,
}

fn default_ws_prefetch() -> u16 {
    16
}

/// A WebSocket bridged to MQTT: either JSON operations within the `allow`ed topic filters, or
/// fixed topics where every frame is a payload.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsMqttSpec {
    /// Operations mode: topic filters (templates of path values) within which the client may
    /// `subscribe` and `publish` through JSON frames.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Fixed mode: topic filters (templates) whose messages are pushed to the client as they
    /// are, one frame per message.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Fixed mode: the topic (a template) every client frame is published to.
    #[serde(default)]
    pub publish: Option<String>,
    /// QoS of the gateway's publishes and subscriptions: 0, 1 or 2.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish with the retain flag (fixed mode; in operations mode the client says).
    #[serde(default)]
    pub retain: bool,
    /// Fixed mode: answer each published frame with an `ack` frame once the broker
    /// acknowledged it. Failures are always answered with an `error` frame.
    #[serde(default)]
    pub acks: bool,
    /// Path values that may span topic levels (may contain `/`).
    #[serde(default)]
    pub multi_level: Vec<String>,
    /// Operations mode: subscriptions one connection may hold.
    #[serde(default = "default_ws_max_subscriptions")]
    pub max_subscriptions: usize,
}

fn default_ws_max_subscriptions() -> usize {
    32
}

fn default_ws_ping() -> Dur {
    Dur::secs(30)
}

fn default_ws_idle() -> Dur {
    Dur::secs(90)
}

fn default_ws_message() -> Size {
    Size(64 * 1024)
}

fn default_ws_buffer() -> usize {
    64
}

fn default_ws_inflight() -> usize {
    16
}

fn default_ws_write_timeout() -> Dur {
    Dur::secs(10)
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
