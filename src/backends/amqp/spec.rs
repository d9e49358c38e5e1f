//! The `amqp` backend's section of routes.yaml (connection, topology), a route's `amqp:` settings
//! and a WebSocket route's `websocket.amqp` (read at load time, before the request path exists).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::model::{
    BackoffSpec, BreakerSpec, ClientTlsSpec, RetryBudgetSpec, default_accepted,
    default_amqp_connect_timeout, yes,
};
use crate::config::types::Dur;

/// A RabbitMQ broker: one connection, a pool of channels in publisher-confirm mode, and the
/// gateway's own reconnect loop.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpBackendSpec {
    /// `amqp://user:pass@host:5672/vhost` (`%2f` for `/`), or `amqps://` for TLS.
    pub url: String,
    /// More brokers (the other nodes of a cluster), tried in order when the ones before them
    /// cannot be reached: on every connect and reconnect the gateway starts again from `url`.
    /// Same scheme as `url`; `tls` applies to each.
    #[serde(default)]
    pub failover: Vec<String>,
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

fn default_confirm_timeout() -> Dur {
    Dur::secs(5)
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
