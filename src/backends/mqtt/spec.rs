//! The `mqtt` backend's section of routes.yaml, a route's `mqtt:` settings and a WebSocket route's
//! `websocket.mqtt` (read at load time, before the request path exists).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::model::{
    BackoffSpec, BreakerSpec, ClientTlsSpec, RetryBudgetSpec, default_accepted,
    default_amqp_connect_timeout,
};
use crate::config::types::{Dur, Size};

/// An MQTT 5 or 3.1.1 broker: one client with a persistent session, its event loop polled in its own
/// task, every QoS 1/2 publish tracked until the broker acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttBackendSpec {
    /// `mqtt://host:1883`.
    pub url: String,
    /// More brokers (the other nodes of a cluster), tried in order when the one before cannot
    /// be reached; once connected, a lost connection starts again from `url`. Same scheme as
    /// `url`; `tls` applies to each.
    #[serde(default)]
    pub failover: Vec<String>,
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

/// The MQTT protocol version a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1", alias = "v311")]
    V311,
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
