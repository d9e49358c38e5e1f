//! The WebSocket ↔ AMQP bridge, the bottom of a WebSocket route to an `amqp` backend. Client
//! frames are published to the route's exchange through the backend's confirm-mode channel
//! pool (answered with `ack` frames when asked, `error` frames always). Messages are pushed
//! from a queue on a channel of the connection's own: a named queue, or an exclusive queue
//! made for the connection and bound as the route says. A message is acknowledged to the broker
//! only once its frame was written to the socket, and at most `prefetch` are unacknowledged, so
//! a slow client holds back its own deliveries and nothing else.
//!
//! When the broker connection drops, the socket is closed with 1011: the exclusive queue died
//! with the connection, and the messages that were not written are delivered again by the
//! broker (to the next consumer of a named queue).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use serde_json::Value;

use crate::backends::amqp::{AmqpBackend, AmqpRouteService};
use crate::backends::values::{RequestValues, Target};
use crate::backends::websocket::{
    Ending, Inbound, Link, Session, close, error_frame, gateway_error_frame, payload_frame,
    read_only_frame,
};
use crate::config::WsAmqpSpec;
use crate::config::template::ValueTemplate;
use crate::error::Problem;
use crate::middleware::context::RequestContext;

/// A route's AMQP bridge settings, compiled at load.
pub struct AmqpBridge {
    backend: Arc<AmqpBackend>,
    publisher: AmqpRouteService,
    exchange: Option<(ValueTemplate, ValueTemplate)>,
    acks: bool,
    queue: Option<ValueTemplate>,
    bind: Vec<(ValueTemplate, ValueTemplate)>,
    prefetch: Option<u16>,
    multi_word: Vec<String>,
}

impl AmqpBridge {
    pub fn new(backend: Arc<AmqpBackend>, spec: &WsAmqpSpec) -> Result<Self, String> {
        let exchange = match &spec.exchange {
            Some(e) => Some((
                ValueTemplate::parse(e)?,
                ValueTemplate::parse(&spec.routing_key)?,
            )),
            None => None,
        };
        let consume = spec.consume.as_ref();
        Ok(AmqpBridge {
            publisher: backend.publisher()?,
            backend,
            exchange,
            acks: spec.acks,
            queue: consume
                .and_then(|c| c.queue.as_deref())
                .map(ValueTemplate::parse)
                .transpose()?,
            bind: consume
                .map(|c| {
                    c.bind
                        .iter()
                        .map(|b| {
                            Ok((
                                ValueTemplate::parse(&b.exchange)?,
                                ValueTemplate::parse(&b.routing_key)?,
                            ))
                        })
                        .collect::<Result<Vec<_>, String>>()
                })
                .transpose()?
                .unwrap_or_default(),
            prefetch: consume.map(|c| c.prefetch),
            multi_word: spec.multi_word.clone(),
        })
    }

    fn unavailable(&self, reason: &'static str, source: Option<lapin::Error>) -> Problem {
        let p = Problem::backend_unavailable(self.backend.name(), reason);
        match source {
            Some(e) => p.with_source(e),
            None => p,
        }
    }

    /// Renders the route's names for this request and, when the route pushes messages, opens
    /// the connection's channel and starts consuming, so a 101 means deliveries will come.
    pub async fn prepare(&self, parts: &http::request::Parts) -> Result<Session, Problem> {
        let empty = Bytes::new();
        let values = RequestValues::new(parts, &empty);
        let spans = &self.multi_word;
        let target = match &self.exchange {
            Some((e, k)) => Some((
                values.render(e, Target::AmqpExchange { spans })?,
                values.render(k, Target::AmqpRoutingKey { spans })?,
            )),
            None => None,
        };
        // Every name is rendered (and checked) before anything reaches the broker.
        let queue = self
            .queue
            .as_ref()
            .map(|q| values.render(q, Target::AmqpQueue { spans }))
            .transpose()?;
        let binds = self
            .bind
            .iter()
            .map(|(e, k)| {
                Ok((
                    values.render(e, Target::AmqpExchange { spans })?,
                    values.render(k, Target::AmqpBindingKey)?,
                ))
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        let consumer = match self.prefetch {
            None => None,
            Some(prefetch) => {
                let conn = self
                    .backend
                    .connection()
                    .ok_or_else(|| self.unavailable("not connected to the broker", None))?;
                let fail =
                    |e: lapin::Error| self.unavailable("the broker refused the consumer", Some(e));
                let ch = conn.create_channel().await.map_err(fail)?;
                ch.basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(fail)?;
                let queue = match queue {
                    Some(name) => {
                        // Passive: the queue must exist; the route does not make it.
                        ch.queue_declare(
                            name.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .map_err(|e| {
                            Problem::bad_gateway(
                                self.backend.name(),
                                "the route's queue does not exist on the broker",
                            )
                            .with_source(e)
                        })?;
                        name
                    }
                    None => {
                        let q = ch
                            .queue_declare(
                                "".into(),
                                QueueDeclareOptions {
                                    exclusive: true,
                                    auto_delete: true,
                                    ..Default::default()
                                },
                                FieldTable::default(),
                            )
                            .await
                            .map_err(fail)?;
                        let name = q.name().to_string();
                        for (e, k) in &binds {
                            ch.queue_bind(
                                name.as_str().into(),
                                e.as_str().into(),
                                k.as_str().into(),
                                QueueBindOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                            .map_err(|e| Problem::bad_gateway(self.backend.name(), "the broker refused the route's binding (does the exchange exist?)").with_source(e))?;
                        }
                        name
                    }
                };
                let consumer = ch
                    .basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(fail)?;
                Some((ch, consumer))
            }
        };
        let correlation = parts
            .extensions
            .get::<RequestContext>()
            .map(|c| c.correlation_id.to_string());
        Ok(Session::Amqp(Box::new(AmqpSession {
            publisher: self.publisher.clone(),
            target,
            acks: self.acks,
            consumer,
            correlation,
            frames: crate::telemetry::otel::Frames::of(parts),
            hook: parts
                .extensions
                .get::<crate::plugins::script::MessageHook>()
                .cloned(),
            sent: 0,
        })))
    }
}

/// The largest delivery pushed to a client (the socket's write buffer holds twice this).
const MAX_DELIVERY: usize = 16 << 20;

/// A finished publish: the frame's sequence number and the outcome.
type Confirmed = (u64, Result<(), crate::BoxError>);

/// One connection's AMQP side.
pub struct AmqpSession {
    publisher: AmqpRouteService,
    target: Option<(String, String)>,
    acks: bool,
    consumer: Option<(Channel, Consumer)>,
    correlation: Option<String>,
    /// Each frame's publish span, and the trace context its message carries.
    frames: crate::telemetry::otel::Frames,
    /// A script's `on_message`, run on each client frame's message before it is published.
    hook: Option<crate::plugins::script::MessageHook>,
    sent: u64,
}

/// The answer to a finished publish: `ack` when the route asks for them, `error` always.
fn confirm_frame(acks: bool, seq: u64, outcome: Result<(), crate::BoxError>) -> Option<Value> {
    let mut v = match outcome {
        Ok(()) if acks => serde_json::json!({ "op": "ack" }),
        Ok(()) => return None,
        Err(e) => match e.downcast_ref::<Problem>() {
            Some(g) => gateway_error_frame(g, None),
            None => error_frame("internal", "The publish failed.", None, None),
        },
    };
    v["seq"] = seq.into();
    Some(v)
}

impl AmqpSession {
    pub async fn run(mut self, mut link: Link) -> Option<Ending> {
        let mut pending: FuturesUnordered<futures_util::future::BoxFuture<'static, Confirmed>> =
            FuturesUnordered::new();
        let mut acking: FuturesUnordered<futures_util::future::BoxFuture<'static, ()>> =
            FuturesUnordered::new();
        let inflight = link.settings.inflight;
        let acks = self.acks;
        let write_timeout = link.settings.write_timeout;
        let sender = link.sender();
        let (channel, mut deliveries) = match self.consumer.take() {
            Some((ch, c)) => (Some(ch), Some(c)),
            None => (None, None),
        };
        let ending = loop {
            let room = pending.len() < inflight;
            tokio::select! {
                Some((seq, outcome)) = pending.next(), if !pending.is_empty() => {
                    if let Some(f) = confirm_frame(acks, seq, outcome) && !link.send_json(&f).await {
                        break None;
                    }
                }
                Some(()) = acking.next(), if !acking.is_empty() => {}
                d = async { deliveries.as_mut()?.next().await }, if deliveries.is_some() => {
                    let delivery = match d {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "The AMQP consumer failed.");
                            break Some(Ending::new(close::INTERNAL, "the AMQP connection was lost"));
                        }
                        None => break Some(Ending::new(close::INTERNAL, "the AMQP consumer was cancelled")),
                    };
                    if delivery.data.len() > MAX_DELIVERY {
                        // It would cut the client off, and come back to the next one: it goes
                        // to the dead-letter exchange, if the queue has one.
                        let _ = delivery.acker.reject(BasicRejectOptions { requeue: false }).await;
                        let f = error_frame(
                            "too-large",
                            &format!("A message of {} bytes was too large to deliver and was rejected.", delivery.data.len()),
                            None,
                            None,
                        );
                        if !link.send_json(&f).await {
                            break None;
                        }
                        continue;
                    }
                    let msg = payload_frame(Bytes::from(delivery.data.clone()));
                    let Some(written) = sender.send_tracked(msg).await else {
                        break None;
                    };
                    // Acknowledged only once on the socket; if the connection ends first, the
                    // broker delivers it again when the channel closes.
                    acking.push(Box::pin(async move {
                        if written.await.is_ok() {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        }
                    }));
                }
                inbound = link.recv(room) => match inbound {
                    Inbound::End(None) => break None,
                    Inbound::End(Some(end)) => {
                        let drain = async {
                            while let Some((seq, outcome)) = pending.next().await {
                                if let Some(f) = confirm_frame(acks, seq, outcome)
                                    && !link.send_json(&f).await
                                {
                                    return;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                        break Some(end);
                    }
                    Inbound::Text(t) => {
                        if let Some(f) = self.publish(Bytes::from(t), true, &mut pending)
                            && !link.send_json(&f).await
                        {
                            break None;
                        }
                    }
                    Inbound::Binary(b) => {
                        if let Some(f) = self.publish(b, false, &mut pending)
                            && !link.send_json(&f).await
                        {
                            break None;
                        }
                    }
                },
            }
        };
        // The writer goes on sending what is queued: those frames get their acks as they are
        // written (within the write timeout); the rest go back to the queue with the channel.
        let _ = tokio::time::timeout(write_timeout, async {
            while acking.next().await.is_some() {}
        })
        .await;
        if let Some(ch) = channel {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    ch.close(200, "websocket closed".into()),
                )
                .await;
            });
        }
        ending
    }

    /// Starts publishing a client frame; an immediate answer when it cannot be.
    fn publish(
        &mut self,
        payload: Bytes,
        text: bool,
        pending: &mut FuturesUnordered<futures_util::future::BoxFuture<'static, Confirmed>>,
    ) -> Option<Value> {
        let Some((exchange, routing_key)) = self.target.clone() else {
            return Some(read_only_frame());
        };
        self.sent += 1;
        let seq = self.sent;
        let mut props = BasicProperties::default()
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_delivery_mode(2)
            .with_app_id("switchyard".into())
            .with_content_type(if text {
                "text/plain; charset=utf-8".into()
            } else {
                "application/octet-stream".into()
            });
        if let Some(c) = &self.correlation {
            props = props.with_correlation_id(c.as_str().into());
        }
        let (span, context) = self.frames.publish("rabbitmq");
        let mut headers = FieldTable::default();
        for (k, v) in context {
            headers.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
        }
        props = props.with_headers(headers);
        let (mut routing_key, mut payload) = (routing_key, payload);
        if let Some(hook) = &self.hook {
            let key = match ShortString::try_new(routing_key) {
                Ok(k) => k,
                Err(_) => {
                    let e = Problem::internal("the routing key is longer than 255 bytes");
                    return confirm_frame(true, seq, Err(e.into()));
                }
            };
            match super::scripted(hook, &exchange.as_str().into(), key, payload, props) {
                Ok((k, p, pr)) => (routing_key, payload, props) = (k.to_string(), p, pr),
                Err(e) => {
                    let failed = Err(e);
                    if let Some(span) = span {
                        span.end_with(&failed);
                    }
                    return confirm_frame(true, seq, failed);
                }
            }
        }
        if let Some(span) = &span {
            use crate::telemetry::otel::{Attr, semconv};
            let destination = if exchange.is_empty() {
                "amq.default"
            } else {
                exchange.as_str()
            };
            span.published(destination, || {
                let mut attrs = vec![
                    Attr::new(
                        semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
                        routing_key.clone(),
                    ),
                    Attr::new(semconv::MESSAGING_MESSAGE_BODY_SIZE, payload.len() as i64),
                ];
                if let Some(id) = props.message_id() {
                    attrs.push(Attr::new(semconv::MESSAGING_MESSAGE_ID, id.to_string()));
                }
                attrs
            });
        }
        let publisher = self.publisher.clone();
        pending.push(Box::pin(async move {
            let outcome = publisher
                .publish(
                    &exchange.as_str().into(),
                    &routing_key.as_str().into(),
                    &payload,
                    props,
                )
                .await;
            if let Some(span) = span {
                span.end_with(&outcome);
            }
            (seq, outcome)
        }));
        None
    }
}
