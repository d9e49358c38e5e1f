//! The serde model of routes.yaml: what operators write. Parsed and validated at load time;
//! the request path only ever sees the compiled route table built from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::state::{
    AsyncSpec, IdempotencySpec, JobsSpec, OnTimeout, RedisStoreSpec, RouteMode, SentinelSpec,
    SpoolSpec, StateSpec, StoreKind, WebhookSpec,
};
use super::types::{Dur, OneOrMany, Size};

pub use crate::backends::amqp::spec::*;
pub use crate::backends::grpc::spec::*;
pub use crate::backends::http::spec::*;
pub use crate::backends::mqtt::spec::*;

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
    /// Traces: OpenTelemetry export over OTLP.
    #[serde(default)]
    pub telemetry: crate::telemetry::otel::spec::TelemetrySpec,
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
    /// After SIGTERM/SIGINT, how long the gateway goes on serving before it stops accepting,
    /// while `/readyz` answers 503 (`draining`) and HTTP/1.1 answers close their connection:
    /// time for a load balancer's health check to take it out of rotation, so that no request
    /// meets a closed port. `0s` stops accepting at once.
    #[serde(default = "default_drain_delay")]
    pub drain_delay: Dur,
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
    /// How the public listener's requests are run: `per_core` (one single-threaded runtime per
    /// worker, each with its own listening socket, the kernel spreading connections over them;
    /// the default) or `shared` (one work-stealing runtime). Read at start.
    #[serde(default)]
    pub runtime: RuntimeMode,
    /// The workers of `runtime: per_core`; the number of cores when absent.
    #[serde(default)]
    pub workers: Option<usize>,
    /// A bearer token the admin API requires (all but `/healthz` and `/readyz`); write it as
    /// `${ADMIN_TOKEN}` so that it stays out of the file. None: the admin API is open to
    /// whoever reaches its address.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// How requests are run ([`ServerSpec::runtime`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeMode {
    /// One work-stealing runtime runs connections, backends and the admin API.
    Shared,
    /// Each worker thread runs its own connections, accepted on its own `SO_REUSEPORT` socket;
    /// backends, brokers and the admin API run on the shared runtime. The default: it serves
    /// 1.2 to 1.5 times the requests of `shared` (docs/benchmarks.md).
    #[default]
    PerCore,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            listen: default_listen(),
            admin: default_admin(),
            shutdown_grace: default_grace(),
            drain_delay: default_drain_delay(),
            correlation_header: default_correlation_header(),
            encoded_slash: EncodedSlash::default(),
            limits: LimitsSpec::default(),
            tls: None,
            runtime: RuntimeMode::default(),
            workers: None,
            admin_token: None,
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
fn default_drain_delay() -> Dur {
    Dur::secs(0)
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
    /// Client certificates (mutual TLS): the CAs that sign them, and whether one is required.
    #[serde(default)]
    pub client_auth: Option<ClientAuthSpec>,
}

/// Mutual TLS on the public listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthSpec {
    /// PEM bundle of the CAs that sign client certificates, relative to routes.yaml's directory.
    pub ca: PathBuf,
    /// `required`: a client without a certificate the CAs signed cannot connect; `optional`:
    /// it can, and routes decide (the `client_cert` plugin).
    #[serde(default)]
    pub mode: ClientAuthMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    #[default]
    Required,
    Optional,
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
    /// `local`: each replica counts in its own memory. `cluster`: one count for every replica
    /// sharing the state store (`state.store: redis`), kept there.
    #[serde(default)]
    pub scope: RateScope,
    /// With `scope: cluster`, what a request gets while Redis does not answer within
    /// `store_timeout`: `local` (this replica's own bucket, with the whole quota), `open` (let
    /// through) or `closed` (503).
    #[serde(default)]
    pub fallback: RateFallback,
    /// With `scope: cluster`, the longest a request waits for Redis's count.
    #[serde(default = "default_rate_store_timeout")]
    pub store_timeout: Dur,
}

fn default_rate_store_timeout() -> Dur {
    Dur::millis(100)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    #[default]
    Local,
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateFallback {
    #[default]
    Local,
    Open,
    Closed,
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

pub(crate) fn yes() -> bool {
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

pub(crate) fn default_connect_timeout() -> Dur {
    Dur::secs(2)
}

pub(crate) fn default_amqp_connect_timeout() -> Dur {
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

pub(crate) fn default_accepted() -> u16 {
    202
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
    /// Other backends, of the same type as `backend`, that a `script` plugin of the route may
    /// send a request to instead (`req.backend = "name"`): a canary, a blue/green switch. Each
    /// gets the route's own tries, breaker and limits.
    #[serde(default)]
    pub alternatives: Vec<String>,
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
    /// The `google.api.http` template the path was read as (`path` holds it as written); set
    /// only on routes made from annotations, which the router matches by this template.
    #[serde(skip)]
    #[schemars(skip)]
    pub rule: Option<std::sync::Arc<crate::config::template::RuleTemplate>>,
}

/// A WebSocket endpoint: handshake policy, connection care, and the bridge's settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSpec {
    /// Origins allowed to connect (`https://app.example.com`, compared without case;
    /// `https://*.example.com` for every subdomain); any origin, and clients that send none,
    /// when empty.
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
