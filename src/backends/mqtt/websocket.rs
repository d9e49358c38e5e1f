//! The WebSocket ↔ MQTT bridge, the bottom of a WebSocket route to an `mqtt` backend. It
//! shares the backend's one client: publishes go through its acknowledgement book, and
//! subscriptions share one broker subscription per filter with SSE clients and other sockets.
//!
//! Two modes. **Operations**: the client sends JSON frames (`subscribe`, `unsubscribe`,
//! `publish`) within the route's `allow`ed filters and gets `subscribed`, `ack`, `message` and
//! `error` frames. **Fixed topics**: the route subscribes to its filters when the socket opens
//! and pushes each message's payload as one frame; every client frame is published to the
//! route's topic.
//!
//! Broker outages are ridden out: the backend's session is persistent and it subscribes again
//! after a reconnect, so the socket stays open; publishes meanwhile get `error` frames
//! (`backend-unavailable`). A client that falls `buffer` messages behind is closed with 1008,
//! and a socket whose backend is removed by a reload is closed with 1011.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::Message;

use crate::backends::mqtt::{
    MqttHandle, Subscription, filter_covers, filter_matches, message_json, scripted, unfit_topic,
};
use crate::backends::values::{RequestValues, Target};
use crate::backends::websocket::{
    Ending, Inbound, Link, Session, WsSettings, close, error_frame, gateway_error_frame,
    payload_frame, read_only_frame,
};
use crate::config::WsMqttSpec;
use crate::config::template::ValueTemplate;
use crate::error::Problem;
use crate::middleware::context::RequestContext;

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A route's MQTT bridge settings, compiled at load.
pub struct MqttBridge {
    handle: MqttHandle,
    allow: Vec<ValueTemplate>,
    subscribe: Vec<ValueTemplate>,
    publish: Option<ValueTemplate>,
    qos: u8,
    retain: bool,
    acks: bool,
    multi_level: Vec<String>,
    max_subscriptions: usize,
}

impl MqttBridge {
    pub fn new(handle: MqttHandle, spec: &WsMqttSpec) -> Result<Self, String> {
        let parse = |v: &Vec<String>| -> Result<Vec<ValueTemplate>, String> {
            v.iter().map(|t| ValueTemplate::parse(t)).collect()
        };
        Ok(MqttBridge {
            handle,
            allow: parse(&spec.allow)?,
            subscribe: parse(&spec.subscribe)?,
            publish: spec
                .publish
                .as_deref()
                .map(ValueTemplate::parse)
                .transpose()?,
            qos: spec.qos,
            retain: spec.retain,
            acks: spec.acks,
            multi_level: spec.multi_level.clone(),
            max_subscriptions: spec.max_subscriptions,
        })
    }

    /// Resolves the route's topics for this request and, in fixed mode, subscribes, so that
    /// the handshake's answer says whether the bridge is in place.
    pub async fn prepare(
        &self,
        parts: &http::request::Parts,
        settings: &WsSettings,
    ) -> Result<Session, Problem> {
        if !self.handle.connected() {
            return Err(self.handle.unavailable("not connected to the broker"));
        }
        let empty = Bytes::new();
        let values = RequestValues::new(parts, &empty);
        let spans = &self.multi_level;
        let filter = |t: &ValueTemplate| values.render(t, Target::MqttFilter { spans });
        let allow = self
            .allow
            .iter()
            .map(filter)
            .collect::<Result<Vec<_>, _>>()?;
        let publish = self
            .publish
            .as_ref()
            .map(|t| values.render(t, Target::MqttTopic { spans }))
            .transpose()?;
        let mut subs = StreamMap::new();
        for t in &self.subscribe {
            let filter = filter(t)?;
            let sub = self
                .handle
                .subscribe(filter.clone(), settings.buffer)
                .await?;
            subs.insert(filter, sub_stream(sub));
        }
        let correlation = parts
            .extensions
            .get::<RequestContext>()
            .map(|c| Bytes::copy_from_slice(c.correlation_id.as_bytes()));
        Ok(Session::Mqtt(Box::new(MqttSession {
            handle: self.handle.clone(),
            ops: !allow.is_empty(),
            allow,
            publish,
            qos: self.qos,
            retain: self.retain,
            acks: self.acks,
            max_subscriptions: self.max_subscriptions,
            correlation,
            frames: crate::telemetry::otel::Frames::of(parts),
            hook: parts
                .extensions
                .get::<crate::plugins::script::MessageHook>()
                .cloned(),
            subs,
            sent: 0,
        })))
    }
}

/// A subscription as a stream of its messages; the subscription (and with it the broker
/// subscription, for the last client) ends when the stream is dropped.
type SubStream = BoxStream<'static, Result<Arc<Publish>, RecvError>>;

fn sub_stream(sub: Subscription) -> SubStream {
    futures_util::stream::unfold(sub, |mut sub| async move {
        let r = sub.rx.recv().await;
        Some((r, sub))
    })
    .boxed()
}

/// A client operation (operations mode).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Op {
    op: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    /// `base64` when `payload` is a base64 string of binary data.
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    qos: Option<u8>,
    #[serde(default)]
    retain: Option<bool>,
    /// Echoed on the answer, so the client can match them.
    #[serde(default)]
    id: Option<Value>,
}

/// What a finished publish answers: the client's id (operations) or the frame's sequence
/// number (fixed topics), the topic, and the outcome.
type Acked = (Value, String, Result<(), Problem>);

/// Publishes waiting for the broker.
type Pending = FuturesUnordered<futures_util::future::BoxFuture<'static, Acked>>;

/// A publish about to start.
struct Outgoing {
    id: Value,
    topic: String,
    payload: Bytes,
    text: bool,
    json: bool,
    qos: u8,
    retain: bool,
}

/// One connection's MQTT side.
pub struct MqttSession {
    handle: MqttHandle,
    ops: bool,
    allow: Vec<String>,
    publish: Option<String>,
    qos: u8,
    retain: bool,
    acks: bool,
    max_subscriptions: usize,
    correlation: Option<Bytes>,
    /// Each frame's publish span, and the trace context its message carries.
    frames: crate::telemetry::otel::Frames,
    /// A script's `on_message`, run on each client frame's message before it is published.
    hook: Option<crate::plugins::script::MessageHook>,
    subs: StreamMap<String, SubStream>,
    /// Client frames published so far (fixed topics number their acks with it).
    sent: u64,
}

impl MqttSession {
    pub async fn run(mut self, mut link: Link) -> Option<Ending> {
        let mut pending = Pending::new();
        let inflight = link.settings.inflight;
        let handle = self.handle.clone();
        let gone = handle.gone();
        tokio::pin!(gone);
        let mode = (self.ops, self.acks);
        loop {
            let room = pending.len() < inflight;
            tokio::select! {
                Some((id, topic, outcome)) = pending.next(), if !pending.is_empty() => {
                    if let Some(f) = Self::ack_frame(mode, id, topic, outcome)
                        && !link.send_json(&f).await
                    {
                        return None;
                    }
                }
                Some((filter, item)) = self.subs.next(), if !self.subs.is_empty() => {
                    let msg = match item {
                        Ok(p) => self.message(&filter, &p),
                        Err(RecvError::Lagged(missed)) => {
                            return Some(Ending::slow(format!(
                                "client too slow: {missed} messages missed"
                            )));
                        }
                        // The broker subscription failed for every client of the filter.
                        Err(RecvError::Closed) if self.ops => {
                            self.subs.remove(&filter);
                            Message::text(
                                error_frame(
                                    "subscription-lost",
                                    "The broker subscription for this filter failed; subscribe again.",
                                    Some("topic"),
                                    None,
                                )
                                .to_string(),
                            )
                        }
                        Err(RecvError::Closed) => {
                            return Some(Ending::new(
                                close::INTERNAL,
                                "the subscription to the MQTT backend failed",
                            ));
                        }
                    };
                    if !link.send(msg).await {
                        return None;
                    }
                }
                _ = &mut gone => {
                    return Some(Ending::new(close::INTERNAL, "the MQTT backend was replaced; reconnect"));
                }
                inbound = link.recv(room) => {
                    let answer = match inbound {
                        Inbound::End(None) => return None,
                        Inbound::End(Some(end)) => {
                            // A clean end: publishes already with the broker get their answers
                            // first (within 5 s), so the client knows which to send again.
                            let drain = async {
                                while let Some((id, topic, outcome)) = pending.next().await {
                                    if let Some(f) = Self::ack_frame(mode, id, topic, outcome)
                                        && !link.send_json(&f).await
                                    {
                                        return;
                                    }
                                }
                            };
                            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
                            return Some(end);
                        }
                        Inbound::Text(t) if self.ops => self.operation(&t, &link, &mut pending).await,
                        Inbound::Binary(_) if self.ops => Some(error_frame(
                            "bad-frame",
                            "Binary frames carry no operations here; send JSON text frames.",
                            None,
                            None,
                        )),
                        Inbound::Text(t) => self.fixed(Bytes::from(t), true, &link, &mut pending),
                        Inbound::Binary(b) => self.fixed(b, false, &link, &mut pending),
                    };
                    if let Some(f) = answer && !link.send_json(&f).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The answer to a finished publish: `ack` (always in operations mode, with `acks` for
    /// fixed topics) or `error`, carrying the client's `id` or the frame's `seq`.
    fn ack_frame(
        (ops, acks): (bool, bool),
        id: Value,
        topic: String,
        outcome: Result<(), Problem>,
    ) -> Option<Value> {
        let key = if ops { "id" } else { "seq" };
        let mut v = match outcome {
            Ok(()) if ops || acks => serde_json::json!({ "op": "ack", "topic": topic }),
            Ok(()) => return None,
            Err(e) => gateway_error_frame(&e, None),
        };
        if !id.is_null() {
            v[key] = id;
        }
        Some(v)
    }

    /// A message for the client: the JSON envelope in operations mode, the payload itself
    /// (text when it is UTF-8) with fixed topics.
    fn message(&self, filter: &str, p: &Publish) -> Message {
        if self.ops {
            let mut v = message_json(p);
            v["op"] = "message".into();
            v["subscription"] = filter.into();
            Message::text(v.to_string())
        } else {
            payload_frame(p.payload.clone())
        }
    }

    fn start_publish(&mut self, link: &Link, pending: &mut Pending, out: Outgoing) {
        let Outgoing {
            id,
            topic,
            payload,
            text,
            json,
            qos,
            retain,
        } = out;
        let (span, context) = self.frames.publish("mqtt");
        let props = PublishProperties {
            payload_format_indicator: text.then_some(1),
            content_type: json.then(|| "application/json".to_string()),
            correlation_data: self.correlation.clone(),
            user_properties: context
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..Default::default()
        };
        let mut publish = Publish::new(topic.clone(), qos_of(qos), payload, Some(props));
        publish.retain = retain;
        let mut topic = topic;
        if let Some(hook) = &self.hook {
            match scripted(
                hook,
                topic.clone(),
                &mut publish,
                self.handle.payload_limit(),
            ) {
                Ok(t) => topic = t,
                Err(e) => {
                    // Answered as the frame's failed publish: an `error` frame with its id.
                    let problem = e
                        .downcast::<Problem>()
                        .map_or_else(|_| Problem::internal("the route's script failed"), |p| *p);
                    if let Some(span) = span {
                        span.fail(problem.kind.slug(), problem.detail.clone());
                        span.end();
                    }
                    self.sent += 1;
                    pending.push(Box::pin(async move { (id, topic, Err(problem)) }));
                    return;
                }
            }
        }
        if let Some(span) = &span {
            use crate::telemetry::otel::{Attr, semconv};
            span.published(&topic, || {
                vec![
                    Attr::new(
                        semconv::MESSAGING_MESSAGE_BODY_SIZE,
                        publish.payload.len() as i64,
                    ),
                    Attr::new("messaging.mqtt.qos", i64::from(qos)),
                    Attr::new("messaging.mqtt.retain", retain),
                ]
            });
        }
        let handle = self.handle.clone();
        let wait = link.settings.ack_wait;
        self.sent += 1;
        pending.push(Box::pin(async move {
            let outcome = handle.publish(publish, wait).await;
            if let Some(span) = span {
                if let Err(p) = &outcome {
                    span.fail(p.kind.slug(), p.detail.clone());
                }
                span.end();
            }
            (id, topic, outcome)
        }));
    }

    /// A client frame with fixed topics: published to the route's topic.
    fn fixed(
        &mut self,
        payload: Bytes,
        text: bool,
        link: &Link,
        pending: &mut Pending,
    ) -> Option<Value> {
        let Some(topic) = self.publish.clone() else {
            return Some(read_only_frame());
        };
        let out = Outgoing {
            id: Value::from(self.sent + 1),
            topic,
            payload,
            text,
            json: false,
            qos: self.qos,
            retain: self.retain,
        };
        self.start_publish(link, pending, out);
        None
    }

    /// A client frame in operations mode; the immediate answer, if any (publishes answer when
    /// the broker acknowledged).
    async fn operation(&mut self, text: &str, link: &Link, pending: &mut Pending) -> Option<Value> {
        let op: Op = match serde_json::from_str(text) {
            Ok(op) => op,
            Err(e) => {
                return Some(error_frame(
                    "bad-frame",
                    &format!("The frame is not an operation: {e}."),
                    None,
                    None,
                ));
            }
        };
        let id = op.id.clone();
        let fail = |error: &str, detail: &str, field: &str| {
            Some(error_frame(error, detail, Some(field), id.as_ref()))
        };
        if !matches!(op.op.as_str(), "subscribe" | "unsubscribe" | "publish") {
            return fail(
                "unknown-op",
                &format!(
                    "Unknown operation `{}`; use subscribe, unsubscribe or publish.",
                    op.op
                ),
                "op",
            );
        }
        let Some(topic) = op.topic.clone() else {
            return fail(
                "bad-frame",
                &format!("`{}` needs a `topic`.", op.op),
                "topic",
            );
        };
        if let Some(why) = unfit_topic(&topic, op.op != "publish") {
            return fail("bad-frame", &format!("Unfit topic: {why}."), "topic");
        }
        let answer = |op: &str| {
            let mut v = serde_json::json!({ "op": op, "topic": topic });
            if let Some(id) = &id {
                v["id"] = id.clone();
            }
            Some(v)
        };
        match op.op.as_str() {
            "subscribe" => {
                if !self.allow.iter().any(|a| filter_covers(a, &topic)) {
                    return fail(
                        "forbidden",
                        "This route does not allow that topic filter.",
                        "topic",
                    );
                }
                if self.subs.contains_key(&topic) {
                    return answer("subscribed");
                }
                if self.subs.len() >= self.max_subscriptions {
                    return fail(
                        "too-many-subscriptions",
                        &format!(
                            "A connection holds at most {} subscriptions here.",
                            self.max_subscriptions
                        ),
                        "topic",
                    );
                }
                match self
                    .handle
                    .subscribe(topic.clone(), link.settings.buffer)
                    .await
                {
                    Ok(sub) => {
                        self.subs.insert(topic.clone(), sub_stream(sub));
                        answer("subscribed")
                    }
                    Err(e) => Some(gateway_error_frame(&e, id.as_ref())),
                }
            }
            "unsubscribe" => {
                if self.subs.remove(&topic).is_some() {
                    answer("unsubscribed")
                } else {
                    fail(
                        "not-subscribed",
                        "This connection holds no such subscription.",
                        "topic",
                    )
                }
            }
            _ => {
                // publish
                if !self.allow.iter().any(|a| filter_matches(a, &topic)) {
                    return fail(
                        "forbidden",
                        "This route does not allow that topic.",
                        "topic",
                    );
                }
                let qos = op.qos.unwrap_or(self.qos);
                if qos > 2 {
                    return fail("bad-frame", "`qos` is 0, 1 or 2.", "qos");
                }
                let (payload, text, json) = match (op.payload, op.encoding.as_deref()) {
                    (None, _) => (Bytes::new(), false, false),
                    (Some(Value::String(s)), Some("base64")) => {
                        use base64::Engine;
                        match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                            Ok(b) => (Bytes::from(b), false, false),
                            Err(_) => {
                                return fail(
                                    "bad-frame",
                                    "`payload` is not valid base64.",
                                    "payload",
                                );
                            }
                        }
                    }
                    (Some(_), Some(e)) if e != "json" && e != "text" => {
                        return fail(
                            "bad-frame",
                            "`encoding` is `base64`, or absent for a JSON or text payload.",
                            "encoding",
                        );
                    }
                    (Some(Value::String(s)), _) => (Bytes::from(s), true, false),
                    (Some(v), _) => (Bytes::from(v.to_string()), true, true),
                };
                let retain = op.retain.unwrap_or(self.retain);
                let out = Outgoing {
                    id: id.unwrap_or(Value::Null),
                    topic,
                    payload,
                    text,
                    json,
                    qos,
                    retain,
                };
                self.start_publish(link, pending, out);
                None
            }
        }
    }
}
