//! WebSocket routes, at the bottom of a route's stack like any backend: the handshake (HTTP/1.1
//! `Upgrade` or HTTP/2 extended CONNECT, RFC 8441) with its origin and subprotocol policy, then
//! one session per connection that outlives the request and bridges frames to the backend.
//! Plugins, rate limits and the route's timeout run before the upgrade (the timeout bounds the
//! handshake); the session then runs under the app's shutdown signal and drain.
//!
//! A session is one task: a writer that owns the socket's sending half (bounded queue, ping
//! timer, write timeout) joined with the bridge's loop, which reads the client through [`Link`].
//! Neither side buffers without limit: the queue towards the client holds `buffer` messages,
//! and the bridge stops reading the client while `inflight` publishes wait for the backend.

// Each bridge lives in its protocol's folder.
use super::amqp::websocket as amqp;
use super::grpc::websocket as grpc;
use super::http::websocket as upstream;
use super::mqtt::websocket as mqtt;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{RouteSpec, WebSocketSpec};
use crate::error::Problem;
use crate::middleware::context::RequestContext;
use crate::telemetry::metrics::{Metrics, WsCounters};
use crate::{BoxError, Request, Response, empty_body};

/// Close codes the gateway sends (RFC 6455 §7.4.1 and the IANA registry).
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down, or the connection sat idle.
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A policy: the client fell too far behind, or took no data for the write timeout.
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// The backend went away or failed and the bridge cannot carry on without losing
    /// messages. (1014, "bad gateway", would say more, but tungstenite-based clients treat it
    /// as a protocol violation, so the gateway never sends it.)
    pub const INTERNAL: u16 = 1011;
}

/// What sessions need from the app: the shutdown signal (sessions close with 1001) and the
/// tracker the drain waits on. The front end puts it on upgrade requests.
#[derive(Clone, Default)]
pub struct Sessions {
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// A route's WebSocket settings, compiled at load.
pub struct WsSettings {
    pub route: Arc<str>,
    /// The origins allowed to connect; any, and none sent, when `None`.
    origins: Option<crate::plugins::cors::Origins>,
    subprotocols: Vec<String>,
    ping_interval: Duration,
    idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub buffer: usize,
    pub inflight: usize,
    /// How long a client message waits for the backend's acknowledgement.
    pub ack_wait: Duration,
    pub(crate) config: WebSocketConfig,
    metrics: Arc<Metrics>,
}

impl WsSettings {
    /// `outbound_max` is the largest message the backend can send towards the client.
    pub fn new(
        route: &RouteSpec,
        spec: &WebSocketSpec,
        metrics: &Arc<Metrics>,
        outbound_max: usize,
    ) -> Self {
        let max_message = spec.max_message_size.0 as usize;
        let max_frame = spec.max_frame_size.map_or(max_message, |s| s.0 as usize);
        // Small eager buffers keep an idle connection cheap; a frame larger than the read
        // buffer still arrives, the buffer grows for it. Messages towards the client are
        // written at once (no write buffer to fill); their size is bounded by the backend
        // (MQTT's maximum packet size), not by `max_message_size`, which is the client's.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            // Bounds what a client that sends pings and never reads can make the gateway hold
            // (one pong each), with room for the largest message either way.
            .max_write_buffer_size(2 * max_message.max(outbound_max) + 64 * 1024)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_frame));
        WsSettings {
            route: route.id.as_str().into(),
            // Validation refused entries that are not origins; were one left, nothing would
            // be allowed rather than everything.
            origins: (!spec.origins.is_empty())
                .then(|| crate::plugins::cors::Origins::parse(&spec.origins).unwrap_or_default()),
            subprotocols: spec.subprotocols.clone(),
            ping_interval: spec.ping_interval.0,
            idle_timeout: spec.idle_timeout.0,
            write_timeout: spec.write_timeout.0,
            buffer: spec.buffer,
            inflight: spec.inflight,
            ack_wait: route.timeout.map_or(Duration::from_secs(30), |t| t.0),
            config,
            metrics: metrics.clone(),
        }
    }
}

/// The bridges, one per backend kind that WebSocket routes support.
enum Bridge {
    Amqp(amqp::AmqpBridge),
    Grpc(grpc::GrpcBridge),
    Mqtt(mqtt::MqttBridge),
    Upstream(upstream::UpstreamBridge),
}

/// One WebSocket route's service: answers the handshake and starts the session.
#[derive(Clone)]
pub struct WsRouteService {
    settings: Arc<WsSettings>,
    bridge: Arc<Bridge>,
}

impl WsRouteService {
    pub fn mqtt(
        handle: super::mqtt::MqttHandle,
        route: &RouteSpec,
        spec: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let m = spec
            .mqtt
            .as_ref()
            .ok_or("a WebSocket route to an mqtt backend needs `websocket.mqtt:` settings")?;
        let outbound_max = handle.payload_limit();
        Ok(WsRouteService {
            settings: Arc::new(WsSettings::new(route, spec, metrics, outbound_max)),
            bridge: Arc::new(Bridge::Mqtt(mqtt::MqttBridge::new(handle, m)?)),
        })
    }

    pub fn amqp(
        backend: Arc<super::amqp::AmqpBackend>,
        route: &RouteSpec,
        spec: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let a = spec
            .amqp
            .as_ref()
            .ok_or("a WebSocket route to an amqp backend needs `websocket.amqp:` settings")?;
        // Deliveries of up to 16 MiB reach a client that reads slowly; larger ones cut it off.
        Ok(WsRouteService {
            settings: Arc::new(WsSettings::new(route, spec, metrics, 16 << 20)),
            bridge: Arc::new(Bridge::Amqp(amqp::AmqpBridge::new(backend, a)?)),
        })
    }

    pub fn grpc(
        backend: Arc<super::grpc::GrpcBackend>,
        route: &RouteSpec,
        spec: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let g = spec
            .grpc
            .as_ref()
            .ok_or("a WebSocket route to a grpc backend needs `websocket.grpc:` settings")?;
        // Replies are bounded by tonic's decoding limit (4 MiB).
        Ok(WsRouteService {
            settings: Arc::new(WsSettings::new(route, spec, metrics, 4 << 20)),
            bridge: Arc::new(Bridge::Grpc(grpc::GrpcBridge::new(backend, g)?)),
        })
    }

    pub fn upstream(
        route_service: super::http::HttpRouteService,
        route: &RouteSpec,
        spec: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Self {
        // The upstream's messages are held to `max_message_size` too.
        WsRouteService {
            settings: Arc::new(WsSettings::new(route, spec, metrics, 0)),
            bridge: Arc::new(Bridge::Upstream(upstream::UpstreamBridge::new(
                route_service,
            ))),
        }
    }

    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let accepted = handshake(&self.settings, &req)?;
        let (mut parts, _body) = req.into_parts();
        let sessions = parts
            .extensions
            .get::<Sessions>()
            .cloned()
            .ok_or(Problem::internal("the session tracker is missing"))?;
        let ctx = parts.extensions.get::<RequestContext>().cloned();
        // The bridge's setup (topics, subscriptions) happens before the answer, so its
        // failures are HTTP answers and a 101 means the bridge is in place.
        let (session, protocol) = match &*self.bridge {
            Bridge::Mqtt(b) => (b.prepare(&parts, &self.settings).await?, accepted.protocol),
            Bridge::Amqp(b) => (b.prepare(&parts).await?, accepted.protocol),
            Bridge::Grpc(b) => (b.prepare(&parts).await?, accepted.protocol),
            // The upstream chooses the subprotocol, or refuses with an answer of its own.
            Bridge::Upstream(b) => match b.open(&parts, &self.settings).await? {
                upstream::Opened::Open(session, protocol) => (*session, protocol),
                upstream::Opened::Refused(answer) => return Ok(answer),
            },
        };
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
            Problem::upgrade_required("This connection cannot be upgraded to a WebSocket.")
        })?;
        let cid: Arc<str> = ctx.map_or_else(|| Arc::from("-"), |c| c.correlation_id);
        let span =
            tracing::info_span!("websocket", correlation_id = %cid, route = %self.settings.route);
        let settings = self.settings.clone();
        sessions.tracker.spawn(
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(error = %e, "The WebSocket upgrade did not complete.");
                        return;
                    }
                };
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(settings.config),
                )
                .await;
                run(ws, settings, session, sessions.shutdown).await;
            }
            .instrument(span),
        );
        let mut resp = http::Response::new(empty_body());
        // HTTP/2 extended CONNECT: a 200 opens the stream.
        *resp.status_mut() = match accepted.accept {
            Some(_) => http::StatusCode::SWITCHING_PROTOCOLS,
            None => http::StatusCode::OK,
        };
        let h = resp.headers_mut();
        if let Some(accept) = accepted.accept {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).map_err(|_| Problem::internal("accept key"))?,
            );
        }
        if let Some(p) = protocol
            && let Ok(v) = HeaderValue::from_str(&p)
        {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
        Ok(resp)
    }
}

super::route_service!(WsRouteService);

/// What the handshake settled: the `Sec-WebSocket-Accept` value (HTTP/1.1 only) and the
/// chosen subprotocol.
struct Accepted {
    accept: Option<String>,
    protocol: Option<String>,
}

fn upgrade_required(detail: &str, field: Option<&str>) -> Problem {
    Problem::upgrade_required(detail).with_optional_field(field.map(str::to_string))
}

fn header_has_token(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks the handshake (RFC 6455 §4.2.1, RFC 8441 §5), the origin and the subprotocol.
fn handshake(settings: &WsSettings, req: &Request) -> Result<Accepted, Problem> {
    let h2 = req.method() == http::Method::CONNECT;
    let accept = if h2 {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        if !websocket {
            return Err(upgrade_required(
                "This route is a WebSocket endpoint: use extended CONNECT with `:protocol` websocket.",
                Some("protocol"),
            ));
        }
        None
    } else {
        if req.method() != http::Method::GET
            || req.version() < http::Version::HTTP_11
            || !header_has_token(req, header::UPGRADE, "websocket")
            || !header_has_token(req, header::CONNECTION, "upgrade")
        {
            return Err(upgrade_required(
                "This route is a WebSocket endpoint: send a GET with `Connection: Upgrade` and `Upgrade: websocket`.",
                Some("header.upgrade"),
            ));
        }
        let mut keys = req.headers().get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = keys
            .next()
            .filter(|_| keys.next().is_none())
            .filter(|k| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(k.as_bytes())
                    .is_ok_and(|b| b.len() == 16)
            })
            .ok_or_else(|| {
                Problem::bad_request(
                    "`Sec-WebSocket-Key` must be one header of 16 random bytes in base64.",
                )
                .with_field("header.sec-websocket-key")
            })?;
        Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
    };
    let mut versions = req.headers().get_all(header::SEC_WEBSOCKET_VERSION).iter();
    if versions.next().is_none_or(|v| v != "13") || versions.next().is_some() {
        return Err(upgrade_required(
            "Only WebSocket version 13 is spoken here: send `Sec-WebSocket-Version: 13`.",
            Some("header.sec-websocket-version"),
        ));
    }
    if let Some(origins) = &settings.origins {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| origins.allows(o)) {
            return Err(
                Problem::forbidden("This origin may not open WebSockets on this route.")
                    .with_field("header.origin"),
            );
        }
    }
    let protocol = if settings.subprotocols.is_empty() {
        None
    } else {
        let offered: Vec<String> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        let chosen = settings
            .subprotocols
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
            .cloned();
        if chosen.is_none() {
            return Err(Problem::bad_request(format!(
                "Offer one of these subprotocols in `Sec-WebSocket-Protocol`: {}.",
                settings.subprotocols.join(", ")
            ))
            .with_field("header.sec-websocket-protocol"));
        }
        chosen
    };
    Ok(Accepted { accept, protocol })
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How a session ended, as the close frame the gateway sends (or none when the client closed
/// or vanished).
pub struct Ending {
    pub code: u16,
    pub reason: String,
    /// Drop what is still queued for the client instead of sending it first (the client is
    /// too far behind to take it).
    pub discard_queue: bool,
}

impl Ending {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        // A close frame's reason is at most 123 bytes.
        while reason.len() > 123 {
            reason.pop();
        }
        Ending {
            code,
            reason,
            discard_queue: false,
        }
    }

    /// A client too slow for the messages: 1008, without sending what is queued.
    pub fn slow(reason: impl Into<String>) -> Self {
        Ending {
            discard_queue: true,
            ..Ending::new(close::POLICY, reason)
        }
    }
}

/// What the client side of a session produced next.
pub enum Inbound {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Binary(bytes::Bytes),
    /// The session is over: the client closed, broke a rule, went idle, or the gateway is
    /// shutting down. `None` means nothing more can be sent.
    End(Option<Ending>),
}

/// The bridge's view of its connection: frames from the client (with idle and shutdown
/// folded in), and a bounded queue towards it.
///
/// The timers and signals are made once per connection and polled again on every call, so a
/// busy connection does no timer or waiter-list work per message.
pub struct Link {
    stream: SplitStream<Socket>,
    out: LinkSender,
    last_seen: Instant,
    idle: Duration,
    /// Fires at the idle deadline as last set; moved on lazily when frames came meanwhile.
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Cancelled by the writer when the client took no data for the write timeout.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The code of the client's close frame, once it sent one.
    pub(crate) peer_code: Arc<AtomicU16>,
    pub settings: Arc<WsSettings>,
}

impl Link {
    /// The next data frame or the end. Cancel-safe: usable as a `select!` branch. With `read`
    /// false, frames stay unread (the bridge has no room for more) and only shutdown and the
    /// writer's cut-off are watched; the time spent so does not count as the client's idling.
    pub async fn recv(&mut self, read: bool) -> Inbound {
        loop {
            if !read {
                self.last_seen = Instant::now();
            }
            let msg = tokio::select! {
                m = self.stream.next(), if read => m,
                _ = self.idle_timer.as_mut(), if read => {
                    let idle_at = self.last_seen + self.idle;
                    if idle_at > Instant::now() {
                        self.idle_timer.as_mut().reset(idle_at);
                        continue;
                    }
                    return Inbound::End(Some(Ending::new(close::GOING_AWAY, "idle timeout")));
                }
                _ = self.shutdown.as_mut() => {
                    return Inbound::End(Some(Ending::new(close::GOING_AWAY, "the gateway is shutting down")));
                }
                _ = self.cut.as_mut() => return Inbound::End(None),
            };
            self.last_seen = Instant::now();
            match msg {
                Some(Ok(Message::Text(t))) => {
                    self.out.counters.received.inc();
                    return Inbound::Text(t);
                }
                Some(Ok(Message::Binary(b))) => {
                    self.out.counters.received.inc();
                    return Inbound::Binary(b);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map_or(close::NORMAL, |f| u16::from(f.code));
                    tracing::info!(code, "The client closed the WebSocket.");
                    self.peer_code.store(code, Ordering::Relaxed);
                    // Reading on sends tungstenite's close reply.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.next()).await;
                    return Inbound::End(None);
                }
                Some(Err(e)) => return Inbound::End(ending_for(&e)),
                None => return Inbound::End(None),
            }
        }
    }

    /// Queues a message for the client, waiting while the queue is full. False when the
    /// client is gone.
    pub async fn send(&self, msg: Message) -> bool {
        self.out.send(msg).await
    }

    /// A handle that queues messages for the client, for a loop of its own.
    pub fn sender(&self) -> LinkSender {
        self.out.clone()
    }

    /// Queues a JSON text frame.
    pub async fn send_json(&self, v: &serde_json::Value) -> bool {
        self.send(Message::text(v.to_string())).await
    }
}

/// Queues messages for the client (see [`Link::sender`]).
#[derive(Clone)]
pub struct LinkSender {
    out: mpsc::Sender<Out>,
    counters: Arc<WsCounters>,
}

/// A message queued for the client, and who wants to know once it was written to the socket.
pub struct Out {
    msg: Message,
    written: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LinkSender {
    /// Queues a message and returns a receiver that resolves once the message was written to
    /// the socket (flushed); it fails if the connection ends first. `None` when the client is
    /// gone.
    pub async fn send_tracked(&self, msg: Message) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let out = Out {
            msg,
            written: Some(tx),
        };
        self.out.send(out).await.ok()?;
        self.counters.sent.inc();
        Some(rx)
    }

    pub async fn send(&self, msg: Message) -> bool {
        let ok = self.out.send(Out { msg, written: None }).await.is_ok();
        if ok {
            self.counters.sent.inc();
        }
        ok
    }
}

/// The close a read error calls for; `None` when the connection is simply gone.
fn ending_for(e: &WsError) -> Option<Ending> {
    match e {
        WsError::Utf8(_) => Some(Ending::new(
            close::INVALID_DATA,
            "a text frame is not valid UTF-8",
        )),
        WsError::Capacity(c) => Some(Ending::new(close::TOO_BIG, format!("{c}"))),
        WsError::Protocol(p) => {
            tracing::debug!(error = %p, "WebSocket protocol error.");
            Some(Ending::new(close::PROTOCOL, format!("{p}")))
        }
        _ => None,
    }
}

/// An error frame: what went wrong, in the terms of the gateway's problem types.
pub fn error_frame(
    error: &str,
    detail: &str,
    field: Option<&str>,
    id: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut v = serde_json::json!({ "op": "error", "error": error, "detail": detail });
    if let Some(f) = field {
        v["field"] = f.into();
    }
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// A message's payload as one frame: text when it is UTF-8, else binary.
pub fn payload_frame(payload: bytes::Bytes) -> Message {
    match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(payload.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(payload),
    }
}

/// The answer to a client frame on a route that publishes nothing.
pub fn read_only_frame() -> serde_json::Value {
    error_frame(
        "read-only",
        "This route only delivers messages; frames from the client are not published.",
        None,
        None,
    )
}

/// The error frame for a gateway error.
pub fn gateway_error_frame(e: &Problem, id: Option<&serde_json::Value>) -> serde_json::Value {
    error_frame(e.kind.slug(), &e.detail, e.field.as_deref(), id)
}

/// A bridge's session, started once the socket is open.
pub enum Session {
    Amqp(Box<amqp::AmqpSession>),
    Grpc(Box<grpc::GrpcSession>),
    Mqtt(Box<mqtt::MqttSession>),
    Upstream(Box<upstream::UpstreamSession>),
}

/// Runs one connection until either side ends it, then closes the socket with the code that
/// says why.
async fn run(ws: Socket, settings: Arc<WsSettings>, session: Session, shutdown: CancellationToken) {
    let counters = Arc::new(settings.metrics.websocket(&settings.route));
    tracing::info!("WebSocket opened.");
    let (sink, stream) = ws.split();
    let (out, rx) = mpsc::channel(settings.buffer);
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let cut = CancellationToken::new();
    let peer_code = Arc::new(AtomicU16::new(0));
    let link = Link {
        stream,
        out: LinkSender {
            out,
            counters: counters.clone(),
        },
        last_seen: Instant::now(),
        idle: settings.idle_timeout,
        idle_timer: Box::pin(tokio::time::sleep(settings.idle_timeout)),
        shutdown: Box::pin(shutdown.cancelled_owned()),
        cut: Box::pin(cut.clone().cancelled_owned()),
        peer_code: peer_code.clone(),
        settings: settings.clone(),
    };
    let writer = write_loop(sink, rx, end_rx, settings.clone(), cut);
    let bridge = async move {
        let ending = match session {
            Session::Amqp(s) => s.run(link).await,
            Session::Grpc(s) => s.run(link).await,
            Session::Mqtt(s) => s.run(link).await,
            Session::Upstream(s) => s.run(link).await,
        };
        if let Some(end) = &ending {
            tracing::info!(code = end.code, reason = %end.reason, "Closing the WebSocket.");
        }
        let _ = end_tx.send(ending);
    };
    let (sent, ()) = tokio::join!(writer, bridge);
    // One close per connection: the code the gateway sent, else the client's, else 1006
    // (the connection ended without a close frame).
    let code = sent.unwrap_or_else(|| match peer_code.load(Ordering::Relaxed) {
        0 => 1006,
        c => c,
    });
    counters.closed(&settings.metrics, code);
    tracing::debug!(code, "WebSocket session over.");
}

/// Feeds one message, within the write timeout. False when the client took nothing for that
/// long or the socket failed.
async fn feed(sink: &mut SplitSink<Socket, Message>, m: Message, limit: Duration) -> bool {
    match tokio::time::timeout(limit, sink.feed(m)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebSocket write failed.");
            false
        }
        Err(_) => {
            tracing::info!(timeout = ?limit, "The client took no data within the write timeout; cutting it off.");
            false
        }
    }
}

async fn flush(sink: &mut SplitSink<Socket, Message>, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, sink.flush()).await, Ok(Ok(())))
}

/// Sends what the bridge queues (up to 32 messages per flush), pings on schedule, and cuts
/// the connection off when a write makes no progress for the write timeout. When the bridge
/// ends, sends what is still queued (unless the ending says to drop it) and the close frame.
/// Returns the close code sent, `Some(1006)` when the connection was cut, `None` when the
/// bridge ended without a close to send (the client closed or vanished).
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Out>,
    mut end_rx: tokio::sync::oneshot::Receiver<Option<Ending>>,
    settings: Arc<WsSettings>,
    cut: CancellationToken,
) -> Option<u16> {
    let limit = settings.write_timeout;
    let mut ping = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    // Who waits to hear that the current batch was written.
    let mut written = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            end = &mut end_rx => {
                let Some(end) = end.ok().flatten() else {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                    return None;
                };
                if !end.discard_queue {
                    while let Ok(m) = rx.try_recv() {
                        written.extend(m.written);
                        if !feed(&mut sink, m.msg, limit).await {
                            cut.cancel();
                            return Some(1006);
                        }
                    }
                }
                let frame = CloseFrame {
                    code: CloseCode::from(end.code),
                    reason: end.reason.into(),
                };
                if !feed(&mut sink, Message::Close(Some(frame)), limit).await
                    || !flush(&mut sink, limit).await
                {
                    cut.cancel();
                    return Some(1006);
                }
                for w in written.drain(..) {
                    let _ = w.send(());
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                return Some(end.code);
            }
            m = rx.recv() => match m {
                Some(m) => m,
                // Every sender is gone: the bridge is over and its ending comes next.
                None => continue,
            },
            _ = ping.tick() => Out { msg: Message::Ping(bytes::Bytes::new()), written: None },
        };
        written.extend(first.written);
        let mut ok = feed(&mut sink, first.msg, limit).await;
        let mut batch = 1;
        while ok && batch < 32 {
            match rx.try_recv() {
                Ok(m) => {
                    written.extend(m.written);
                    ok = feed(&mut sink, m.msg, limit).await;
                }
                Err(_) => break,
            }
            batch += 1;
        }
        if !ok || !flush(&mut sink, limit).await {
            cut.cancel();
            return Some(1006);
        }
        for w in written.drain(..) {
            let _ = w.send(());
        }
    }
}
