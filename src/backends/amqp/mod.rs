//! The AMQP backend (RabbitMQ, lapin): an HTTP request becomes a confirmed publish, answered
//! only after the broker's ack, or a request/reply exchange whose reply message is the HTTP
//! answer. Sits at the bottom of a route's stack. One connection per backend, kept by the
//! gateway's own reconnect loop (lapin's auto-recovery is not used), with a pool of channels in
//! confirm mode; each channel has at most one publish in flight, because lapin can hand a
//! returned message to the wrong confirm when publishes are pipelined on one channel.

pub mod bridge;
pub mod live;
pub mod spec;
pub mod validate;
pub mod websocket;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderValue};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{Mutex, Notify, oneshot};

use super::AbortOnDrop;
use super::values::{RequestValues, Target};
use crate::config::template::ValueTemplate;
use crate::config::{
    AmqpBackendSpec, AmqpRouteSpec, DIRECT_REPLY_TO, ExchangeKindSpec, QueueKindSpec,
};
use crate::error::Problem;
use crate::middleware::context::{Deadline, RequestContext};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otel::{Attr, Trace, semconv};
use crate::{BoxError, Request, Response, full_body};

/// Why a publish the broker nacked failed (the spool counts these as refusals).
pub const NACKED: &str = crate::error::REFUSED_BY_BROKER;

/// Waiters for replies, by correlation id. A reply nobody waits for is dropped and counted.
#[derive(Default)]
struct Replies {
    /// The sender, and whether the reply comes by direct reply-to (then it cannot outlive the
    /// connection).
    waiting: std::sync::Mutex<HashMap<String, (oneshot::Sender<Delivery>, bool)>>,
}

impl Replies {
    /// The connection died: direct replies can no longer come, so their waiters fail now.
    fn fail_direct(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.retain(|_, (_, direct)| !*direct);
        }
    }
}

/// Removes a waiter when the request ends, answered or not.
struct Waiting<'a> {
    replies: &'a Replies,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.replies.waiting.lock() {
            w.remove(&self.id);
        }
    }
}

/// A pooled channel in confirm mode, with its direct reply-to consumer when a route of the
/// backend asks for replies there.
struct SlotChannel {
    channel: Channel,
    replies: Option<AbortOnDrop>,
}

/// One pooled channel; the lock is held across a publish and its confirm, so a channel never
/// has two publishes in flight (but for the spool's ordered batches, which hold it for the
/// whole batch). A channel whose publish ended unconfirmed is discarded.
struct Slot {
    channel: Arc<Mutex<Option<SlotChannel>>>,
}

/// A live connection and what hangs on it.
struct Live {
    conn: Arc<Connection>,
    slots: Vec<Slot>,
    /// Consumers of named reply queues, by queue.
    named: std::sync::Mutex<HashMap<String, AbortOnDrop>>,
}

/// State shared by the backend, its routes and its connection task.
struct Shared {
    name: String,
    /// The broker as the access log names it (no credentials).
    addr: Arc<str>,
    spec: AmqpBackendSpec,
    /// The CA bundle and client identity for `amqps://`, read when the backend was built.
    tls: Option<lapin::tcp::OwnedTLSConfig>,
    metrics: Arc<Metrics>,
    /// `switchyard_broker_events_total{event="confirmed"}`, counted on every confirmed publish.
    confirmed: prometheus_client::metrics::counter::Counter,
    live: ArcSwapOption<Live>,
    /// Why the backend is not connected (shown on /readyz).
    problem: std::sync::Mutex<Option<String>>,
    /// Set by a publish that saw the connection fail; wakes the connection task.
    broken: Notify,
    replies: Replies,
    /// Named reply queues the routes use; consumed while connected.
    reply_queues: std::sync::Mutex<BTreeSet<String>>,
    /// Whether a serving route takes replies by direct reply-to: then channels opened at
    /// connect consume it from the start. A channel without the consumer starts consuming
    /// when such a route takes it, whatever this says.
    direct_replies: AtomicBool,
    next: AtomicUsize,
}

impl Shared {
    fn set_problem(&self, p: Option<String>) {
        let p = p.map(|p| crate::telemetry::redact::secrets(&p).into_owned());
        if let Ok(mut cur) = self.problem.lock() {
            *cur = p;
        }
    }
}

pub struct AmqpBackend {
    shared: Arc<Shared>,
    _task: Option<AbortOnDrop>,
}

impl Drop for AmqpBackend {
    /// A reload replaced or removed the backend: its consumers stop and its connection closes.
    fn drop(&mut self) {
        if let Some(live) = self.shared.live.swap(None)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    live.conn.close(200, "backend removed".into()),
                )
                .await;
            });
        }
    }
}

impl AmqpBackend {
    /// Reads the TLS files (relative to `base`, routes.yaml's directory) and starts the
    /// connection task; nothing here waits for the broker. Fails only on unreadable files.
    pub fn new(
        name: &str,
        spec: &AmqpBackendSpec,
        metrics: &Arc<Metrics>,
        base: &std::path::Path,
        gate: &super::StartGate,
    ) -> Result<Self, String> {
        let tls = tls_config(spec, base)?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            addr: super::broker_address(&spec.url),
            tls,
            spec: spec.clone(),
            metrics: metrics.clone(),
            confirmed: metrics.broker_event_counter(name, "confirmed"),
            live: ArcSwapOption::empty(),
            problem: std::sync::Mutex::new(Some("connecting".into())),
            broken: Notify::new(),
            replies: Replies::default(),
            reply_queues: std::sync::Mutex::new(BTreeSet::new()),
            direct_replies: AtomicBool::new(false),
            next: AtomicUsize::new(0),
        });
        let task = gate.spawn(run(shared.clone()));
        Ok(AmqpBackend {
            shared,
            _task: task,
        })
    }

    pub fn ready(&self) -> bool {
        self.shared.live.load().is_some()
    }

    /// Why the backend is not ready, when it is not.
    pub fn problem(&self) -> Option<String> {
        self.shared.problem.lock().ok().and_then(|p| p.clone())
    }

    /// The live connection, for bridges that open channels of their own (WebSocket
    /// consumers); `None` while disconnected.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.shared.live.load().as_ref().map(|l| l.conn.clone())
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A publisher on the backend's confirm-mode channel pool, for client frames of a
    /// WebSocket (the route's exchange and routing key are given per publish).
    pub fn publisher(&self) -> Result<AmqpRouteService, String> {
        let spec: AmqpRouteSpec = serde_json::from_value(serde_json::json!({}))
            .map_err(|e| format!("amqp publisher: {e}"))?;
        AmqpRouteService::new(self, &spec)
    }

    /// The named reply queues the serving routes use: the connection task consumes new ones
    /// within a second and stops consuming those no longer listed. Set when a table starts
    /// serving, so a reload that is rejected never starts a consumer. `direct`: whether a
    /// serving route takes replies by direct reply-to.
    pub fn set_reply_queues(&self, queues: BTreeSet<String>, direct: bool) {
        if let Ok(mut q) = self.shared.reply_queues.lock() {
            *q = queues;
        }
        self.shared.direct_replies.store(direct, Ordering::Relaxed);
    }
}

/// The connection task: connect, declare, open channels, serve until the connection dies, then
/// again after a backoff with full jitter. The backoff only starts over after a connection
/// that lasted, so a broker that drops every new connection is not hammered.
async fn run(shared: Arc<Shared>) {
    let spec = &shared.spec;
    let mut backoff = crate::backoff::Backoff::new(spec.reconnect.min.0, spec.reconnect.max.0);
    let health = super::health::Health::new(&shared.name, "amqp");
    loop {
        // Everything after the TCP connect (topology, channels, consumers) is bounded too.
        let setup = spec.connect_timeout.0.saturating_mul(3);
        match tokio::time::timeout(setup, connect(&shared)).await {
            Ok(Ok(live)) => {
                let live = Arc::new(live);
                shared.live.store(Some(live.clone()));
                shared.set_problem(None);
                shared.metrics.broker_event(&shared.name, "connected");
                shared.metrics.backend_ready(&shared.name, true);
                tracing::debug!(backend = %shared.name, "AMQP connection established.");
                health.up();
                let since = tokio::time::Instant::now();
                wait_for_death(&shared, &live).await;
                shared.live.store(None);
                shared.replies.fail_direct();
                shared.metrics.broker_event(&shared.name, "disconnected");
                shared.metrics.backend_ready(&shared.name, false);
                shared.set_problem(Some("connection lost; reconnecting".into()));
                health.down("the AMQP connection was lost; reconnecting");
                if since.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
                // Close what is left without waiting for a broker that may be gone.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    live.conn.close(200, "reconnecting".into()),
                )
                .await;
            }
            Ok(Err(e)) => {
                let error = crate::telemetry::redact::secrets(&e.message);
                if e.operator {
                    tracing::error!(backend = %shared.name, %error, "AMQP setup failed; fix the broker or the backend's topology.");
                }
                health.down(&error);
                shared.set_problem(Some(e.message));
            }
            Err(_) => {
                let msg = format!(
                    "the broker did not finish the setup within {}",
                    humantime::format_duration(setup)
                );
                health.down(&msg);
                shared.set_problem(Some(msg));
            }
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

pub(crate) struct SetupError {
    pub(crate) message: String,
    /// The operator must act (a topology mismatch, refused credentials), not just wait.
    operator: bool,
}

impl SetupError {
    fn transient(message: String) -> Self {
        SetupError {
            message,
            operator: false,
        }
    }
}

/// Resolves when the connection is dead: an error event with the connection no longer
/// connected, a publish that saw it fail, or a status check that finds it gone. Meanwhile, once
/// a second, it makes sure every named reply queue has a live consumer.
async fn wait_for_death(shared: &Arc<Shared>, live: &Live) {
    let conn = &live.conn;
    let mut events = conn.events_listener();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            e = events.next() => {
                if e.is_none() && !conn.status().connected() {
                    return;
                }
            }
            _ = shared.broken.notified() => {}
            _ = tick.tick() => consume_named_queues(shared, live).await,
        }
        if !conn.status().connected() {
            return;
        }
    }
}

/// Starts a consumer for each registered reply queue that has none (new, or whose consumer
/// ended), and stops those of queues no longer registered. A queue that cannot be consumed is reported; it fails only the routes that use it.
async fn consume_named_queues(shared: &Arc<Shared>, live: &Live) {
    let wanted: Vec<String> = shared
        .reply_queues
        .lock()
        .map(|q| q.iter().cloned().collect())
        .unwrap_or_default();
    // Queues no serving route uses any more: their consumers end (dropping one aborts it).
    if let Ok(mut n) = live.named.lock() {
        n.retain(|q, _| wanted.contains(q));
    }
    for q in wanted {
        let running = live
            .named
            .lock()
            .map(|n| n.get(&q).is_some_and(|p| !p.0.is_finished()))
            .unwrap_or(true);
        if running {
            continue;
        }
        let started = async {
            let ch = live.conn.create_channel().await?;
            consume_replies(shared, &ch, &q, false).await
        };
        match tokio::time::timeout(shared.spec.connect_timeout.0, started).await {
            Ok(Ok(pump)) => {
                if let Ok(mut n) = live.named.lock() {
                    n.insert(q, pump);
                }
            }
            Ok(Err(e)) => {
                tracing::error!(backend = %shared.name, queue = %q, error = %e, "Cannot consume the reply queue; its routes time out until it exists.");
            }
            Err(_) => {
                tracing::warn!(backend = %shared.name, queue = %q, "Consuming the reply queue timed out; trying again.");
            }
        }
    }
}

fn uri_with_heartbeat(url: &str, heartbeat: Duration) -> String {
    if url.contains("heartbeat=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={}", heartbeat.as_secs().max(1))
}

async fn connect(shared: &Arc<Shared>) -> Result<Live, SetupError> {
    let spec = &shared.spec;
    let conn = Arc::new(open_connection(&shared.name, spec, shared.tls.as_ref()).await?);
    declare_topology(&conn, spec).await?;
    let mut slots = Vec::with_capacity(spec.channels);
    let direct = shared.direct_replies.load(Ordering::Relaxed);
    for _ in 0..spec.channels {
        let ch = open_slot(shared, &conn, direct)
            .await
            .map_err(|e| SetupError::transient(format!("opening a channel: {e}")))?;
        slots.push(Slot {
            channel: Arc::new(Mutex::new(Some(ch))),
        });
    }
    let live = Live {
        conn,
        slots,
        named: std::sync::Mutex::new(HashMap::new()),
    };
    consume_named_queues(shared, &live).await;
    Ok(live)
}

/// Opens a connection to the backend's broker (TLS included): `url`, else each of `failover`
/// in order, each within the connect timeout. The last broker's error when none answers.
pub(crate) async fn open_connection(
    name: &str,
    spec: &AmqpBackendSpec,
    tls: Option<&lapin::tcp::OwnedTLSConfig>,
) -> Result<Connection, SetupError> {
    let mut failed = None;
    for (i, url) in std::iter::once(&spec.url).chain(&spec.failover).enumerate() {
        match connect_to(name, url, spec, tls).await {
            Ok(c) => {
                if i > 0 {
                    tracing::warn!(backend = name, broker = %super::broker_address(url), "Connected to a failover broker: the ones before it could not be reached.");
                }
                return Ok(c);
            }
            // A broker that refuses our credentials or vhost would refuse them again: the
            // others are tried, and the operator told.
            Err(e) => {
                if !spec.failover.is_empty() {
                    tracing::debug!(backend = name, broker = %super::broker_address(url), error = %e.message, "A broker could not be reached; trying the next.");
                }
                failed = Some(e);
            }
        }
    }
    Err(failed.expect("at least `url` was tried"))
}

/// [`open_connection`] to one broker.
async fn connect_to(
    name: &str,
    url: &str,
    spec: &AmqpBackendSpec,
    tls: Option<&lapin::tcp::OwnedTLSConfig>,
) -> Result<Connection, SetupError> {
    let uri = uri_with_heartbeat(url, spec.heartbeat.0);
    let props =
        ConnectionProperties::default().with_connection_name(format!("switchyard {name}").into());
    let connecting = async {
        let server_name = spec.tls.as_ref().and_then(|t| t.server_name.clone());
        match (tls, server_name) {
            (Some(tls), None) => {
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_with_config(&uri, props, tls.clone(), runtime).await
            }
            // The certificate must carry `tls.server_name` rather than the URL's host (a
            // broker reached by IP address or through an alias): the same connection, made
            // here so that the TLS handshake checks that name.
            (Some(tls), Some(name)) => {
                let runtime = lapin::runtime::default_runtime()?;
                let parsed: lapin::uri::AMQPUri = uri.parse().map_err(|e: String| {
                    lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?;
                let (tls, within) = (tls.clone(), spec.connect_timeout.0);
                let connect = async move |uri: lapin::uri::AMQPUri, runtime| {
                    // Bounded here too: lapin may run this apart from the caller's timeout.
                    let handshake = async {
                        let host = uri.authority.host.clone();
                        let addrs: Vec<std::net::SocketAddr> =
                            tokio::net::lookup_host((host.as_str(), uri.authority.port))
                                .await?
                                .collect();
                        let stream = lapin::AsyncTcpStream::connect(&runtime, addrs).await?;
                        stream.into_tls(&name, tls.as_ref()).await
                    };
                    match tokio::time::timeout(within, handshake).await {
                        Ok(stream) => Ok(stream?),
                        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
                    }
                };
                Connection::connector(parsed, runtime, connect, props).await
            }
            (None, _) => Connection::connect(&uri, props).await,
        }
    };
    let conn = match tokio::time::timeout(spec.connect_timeout.0, connecting).await {
        Err(_) => {
            return Err(SetupError::transient(format!(
                "no connection within {}",
                humantime::format_duration(spec.connect_timeout.0)
            )));
        }
        Ok(Err(e)) => {
            let operator = matches!(e.kind(), lapin::ErrorKind::ProtocolError(_));
            return Err(SetupError {
                message: format!("cannot connect: {e}"),
                operator,
            });
        }
        Ok(Ok(c)) => c,
    };
    Ok(conn)
}

/// The TLS settings of an `amqps://` backend, its files read relative to `base`.
pub(crate) fn tls_config(
    spec: &AmqpBackendSpec,
    base: &std::path::Path,
) -> Result<Option<lapin::tcp::OwnedTLSConfig>, String> {
    Ok(match &spec.tls {
        Some(t) => {
            let read = |p: &std::path::PathBuf, what: &str| {
                let p = base.join(p);
                super::must_exist(&format!("tls.{what}"), &p)?;
                std::fs::read(&p)
                    .map_err(|e| format!("cannot read `tls.{what}` ({}): {e}", p.display()))
            };
            let ca = match &t.ca {
                Some(p) => Some(
                    String::from_utf8(read(p, "ca")?)
                        .map_err(|_| "`tls.ca` is not a PEM file".to_string())?,
                ),
                None => None,
            };
            let identity = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: read(c, "cert")?,
                    key: read(k, "key")?,
                }),
                _ => None,
            };
            Some(lapin::tcp::OwnedTLSConfig {
                identity,
                cert_chain: ca,
            })
        }
        None => None,
    })
}

/// A channel in confirm mode, consuming direct reply-to when `direct` (the broker refuses a
/// publish whose `reply_to` is direct reply-to on a channel that does not consume it). Without
/// a route that needs it the consumer is left out: it costs the broker on every publish.
async fn open_slot(
    shared: &Arc<Shared>,
    conn: &Connection,
    direct: bool,
) -> lapin::Result<SlotChannel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let replies = match direct {
        true => Some(consume_replies(shared, &ch, DIRECT_REPLY_TO, true).await?),
        false => None,
    };
    Ok(SlotChannel {
        channel: ch,
        replies,
    })
}

/// Declares the backend's exchanges, queues and bindings. A declaration that does not match
/// what exists is reported with the broker's words; each check runs on a fresh channel, since
/// the broker closes the channel of a failed declaration.
async fn declare_topology(conn: &Connection, spec: &AmqpBackendSpec) -> Result<(), SetupError> {
    let t = &spec.topology;
    if t.exchanges.is_empty() && t.queues.is_empty() && t.bindings.is_empty() {
        return Ok(());
    }
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| SetupError::transient(format!("opening a channel: {e}")))?;
    let fail = |what: String| {
        move |e: lapin::Error| SetupError {
            operator: e.is_amqp_soft_error(),
            message: format!("{what}: {e}"),
        }
    };
    for x in &t.exchanges {
        declare_exchange(&ch, x, false)
            .await
            .map_err(fail(format!("declaring exchange `{}`", x.name)))?;
    }
    for q in &t.queues {
        declare_queue(&ch, q, false)
            .await
            .map_err(fail(format!("declaring queue `{}`", q.name)))?;
    }
    for b in &t.bindings {
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail(format!(
            "binding queue `{}` to exchange `{}`",
            b.queue, b.exchange
        )))?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Declares one exchange as the topology says; `passive` only asks whether it exists.
pub(crate) async fn declare_exchange(
    ch: &lapin::Channel,
    x: &crate::config::ExchangeSpec,
    passive: bool,
) -> lapin::Result<()> {
    let kind = match x.kind {
        ExchangeKindSpec::Direct => ExchangeKind::Direct,
        ExchangeKindSpec::Topic => ExchangeKind::Topic,
        ExchangeKindSpec::Fanout => ExchangeKind::Fanout,
        ExchangeKindSpec::Headers => ExchangeKind::Headers,
    };
    ch.exchange_declare(
        x.name.as_str().into(),
        kind,
        ExchangeDeclareOptions {
            durable: x.durable,
            auto_delete: x.auto_delete,
            passive,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declares one queue with its arguments as the topology says; `passive` only asks whether
/// it exists.
pub(crate) async fn declare_queue(
    ch: &lapin::Channel,
    q: &crate::config::QueueSpec,
    passive: bool,
) -> lapin::Result<lapin::Queue> {
    let mut args = FieldTable::default();
    if q.kind == QueueKindSpec::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if let Some(ttl) = q.message_ttl {
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(ttl.0.as_millis() as i64),
        );
    }
    if let Some(n) = q.max_length {
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(n.min(i64::MAX as u64) as i64),
        );
    }
    if let Some(dlx) = &q.dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.as_str().into()),
        );
    }
    if let Some(key) = &q.dead_letter_routing_key {
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(key.as_str().into()),
        );
    }
    ch.queue_declare(
        q.name.as_str().into(),
        QueueDeclareOptions {
            durable: q.durable,
            passive,
            ..Default::default()
        },
        args,
    )
    .await
}

/// Consumes replies from `queue` on `ch` and hands each to its waiter by correlation id. A
/// named queue is consumed exclusively: a second gateway on the same reply queue would take
/// replies meant for the first, so it fails loudly instead.
async fn consume_replies(
    shared: &Arc<Shared>,
    ch: &Channel,
    queue: &str,
    no_ack: bool,
) -> lapin::Result<AbortOnDrop> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                exclusive: !no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Weak: a consumer must not keep a removed backend's state alive.
    let weak = Arc::downgrade(shared);
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if !no_ack {
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            let Some(shared) = weak.upgrade() else {
                break;
            };
            let id = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            let waiter = id.and_then(|id| {
                shared
                    .replies
                    .waiting
                    .lock()
                    .ok()
                    .and_then(|mut w| w.remove(&id))
            });
            match waiter {
                Some((tx, _)) => {
                    let _ = tx.send(delivery);
                }
                None => {
                    shared.metrics.broker_event(&shared.name, "reply_unmatched");
                    tracing::debug!(backend = %shared.name, "A reply nobody waits for (late or unknown correlation id) was dropped.");
                }
            }
        }
    });
    Ok(AbortOnDrop(task.abort_handle()))
}

/// One route's service on top of a shared [`AmqpBackend`].
#[derive(Clone)]
pub struct AmqpRouteService {
    shared: Arc<Shared>,
    route: Arc<AmqpRouteSpec>,
    exchange: Arc<ValueTemplate>,
    routing_key: Arc<ValueTemplate>,
    headers: Arc<Vec<http::HeaderName>>,
    status: http::StatusCode,
    unroutable: http::StatusCode,
    /// Replies come by direct reply-to: the channel must consume it before the publish.
    direct_reply: bool,
}

impl AmqpRouteService {
    pub fn new(backend: &AmqpBackend, spec: &AmqpRouteSpec) -> Result<Self, String> {
        Ok(AmqpRouteService {
            shared: backend.shared.clone(),
            exchange: Arc::new(ValueTemplate::parse(&spec.exchange)?),
            routing_key: Arc::new(ValueTemplate::parse(&spec.routing_key)?),
            headers: Arc::new(
                spec.headers
                    .iter()
                    .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
            ),
            status: http::StatusCode::from_u16(spec.status).map_err(|e| e.to_string())?,
            unroutable: http::StatusCode::from_u16(spec.unroutable_status)
                .map_err(|e| e.to_string())?,
            direct_reply: spec
                .reply
                .as_ref()
                .is_some_and(|r| r.queue == DIRECT_REPLY_TO),
            route: Arc::new(spec.clone()),
        })
    }

    fn unavailable(&self, reason: &'static str, source: Option<BoxError>) -> Problem {
        let p = Problem::backend_unavailable(&self.shared.name, reason);
        match source {
            Some(e) => p.with_source(e),
            None => p,
        }
    }

    /// The message: body (or envelope), properties, exchange and routing key.
    fn message(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
    ) -> Result<(ShortString, ShortString, Bytes, BasicProperties), Problem> {
        let values = RequestValues::new(parts, body);
        let spans = &self.route.multi_word;
        let exchange = values.render(&self.exchange, Target::AmqpExchange { spans })?;
        let routing_key = values.render(&self.routing_key, Target::AmqpRoutingKey { spans })?;
        let short = |s: String, what: &str, field: &str| {
            ShortString::try_new(s).map_err(|_| {
                Problem::bad_request(format!("{what} would be longer than 255 bytes."))
                    .with_field(field.to_string())
            })
        };
        let exchange = short(exchange, "The exchange name", "exchange")?;
        let routing_key = short(routing_key, "The routing key", "routing_key")?;
        let ctx = parts.extensions.get::<RequestContext>();
        let route = &self.route;

        let mut headers = FieldTable::default();
        // The trace context (the publish span's, put in the request's headers by the caller).
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name.into(), AMQPValue::LongString(v.into()));
            }
        }
        for name in self.headers.iter() {
            if let Some(v) = parts.headers.get(name) {
                let v = v.to_str().map_err(|_| {
                    Problem::bad_request(format!(
                        "Header `{name}` must be visible ASCII to travel with the message."
                    ))
                    .with_field(format!("header.{name}"))
                })?;
                headers.insert(name.as_str().into(), AMQPValue::LongString(v.into()));
            }
        }
        let fixed_id = parts
            .extensions
            .get::<crate::middleware::context::MessageId>()
            .map(|m| m.0.to_string());
        let message_id = match (fixed_id, parts.headers.get("idempotency-key")) {
            (Some(id), _) => id,
            (None, Some(k)) => {
                let k = k
                    .to_str()
                    .ok()
                    .filter(|k| !k.is_empty() && k.len() <= 255)
                    .ok_or_else(|| {
                        Problem::bad_request(
                            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
                        )
                        .with_field("header.idempotency-key")
                    })?;
                k.to_string()
            }
            (None, None) => uuid::Uuid::now_v7().to_string(),
        };
        let request_id = ctx
            .map(|c| c.correlation_id.to_string())
            .unwrap_or_default();
        // Replies are matched on a fresh id: two requests may carry the same X-Request-Id.
        let correlation_id = if route.reply.is_some() {
            headers.insert(
                "x-request-id".into(),
                AMQPValue::LongString(request_id.as_str().into()),
            );
            uuid::Uuid::now_v7().to_string()
        } else {
            request_id
        };
        let (payload, content_type) = if route.envelope {
            (
                Bytes::from(envelope(parts, body, &values, &self.headers)),
                Some("application/json".to_string()),
            )
        } else {
            (
                body.clone(),
                parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            )
        };
        let mut props = BasicProperties::default()
            .with_message_id(message_id.into())
            .with_correlation_id(correlation_id.into())
            .with_timestamp(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            )
            .with_app_id(route.app_id.as_str().into())
            .with_headers(headers);
        if route.persistent {
            props = props.with_delivery_mode(2);
        }
        if let Some(ct) = content_type.and_then(|c| ShortString::try_new(c).ok()) {
            props = props.with_content_type(ct);
        }
        if let Some(enc) = (!route.envelope)
            .then(|| parts.headers.get(header::CONTENT_ENCODING))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| ShortString::try_new(v.to_string()).ok())
        {
            props = props.with_content_encoding(enc);
        }
        if let Some(t) = &route.message_type {
            props = props.with_type(t.as_str().into());
        }
        if let Some(e) = route.expiration {
            props = props.with_expiration(e.0.as_millis().to_string().into());
        }
        if let Some(p) = route.priority {
            props = props.with_priority(p);
        }
        if let Some(r) = &route.reply {
            props = props.with_reply_to(r.queue.as_str().into());
        }
        Ok((exchange, routing_key, payload, props))
    }

    /// An exclusive channel of the pool, open and in confirm mode. Nothing is sent yet, so
    /// running out of time here is a plain (retryable) 503.
    async fn take_channel(
        &self,
        exchange: &ShortString,
    ) -> Result<
        (
            tokio::sync::OwnedMutexGuard<Option<SlotChannel>>,
            lapin::Channel,
        ),
        BoxError,
    > {
        let live = self
            .shared
            .live
            .load_full()
            .ok_or_else(|| self.unavailable("not connected to the broker", None))?;
        if live.conn.status().blocked() {
            return Err(self
                .unavailable(
                    "the broker is blocking publishers (a memory or disk alarm)",
                    None,
                )
                .into());
        }
        let within = self.shared.spec.confirm_timeout.0;
        let n = live.slots.len();
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed);
        // A free channel if there is one; otherwise wait for the next in turn.
        let free = (0..n).find_map(|i| {
            live.slots[(start + i) % n]
                .channel
                .clone()
                .try_lock_owned()
                .ok()
        });
        let mut guard = match free {
            Some(g) => g,
            None => {
                tokio::time::timeout(within, live.slots[start % n].channel.clone().lock_owned())
                    .await
                    .map_err(|_| self.unavailable("every channel stayed busy", None))?
            }
        };
        let direct = self.direct_reply || self.shared.direct_replies.load(Ordering::Relaxed);
        // A channel the broker closed, or one discarded after an unconfirmed publish, is
        // replaced (with the reply consumer when a route needs it).
        if guard
            .as_ref()
            .is_none_or(|c| !c.channel.status().connected())
        {
            let opened = tokio::time::timeout(within, open_slot(&self.shared, &live.conn, direct))
                .await
                .map_err(|_| self.unavailable("opening a channel timed out", None))?
                .map_err(|e| self.publish_error(e, exchange, false))?;
            *guard = Some(opened);
        }
        let slot = guard.as_mut().expect("set above");
        // This route's replies come by direct reply-to, and the channel was opened before any
        // route needed that: it starts consuming now, before the publish.
        if self.direct_reply && slot.replies.is_none() {
            let consumer = consume_replies(&self.shared, &slot.channel, DIRECT_REPLY_TO, true);
            let pump = tokio::time::timeout(within, consumer)
                .await
                .map_err(|_| self.unavailable("consuming direct reply-to timed out", None))?
                .map_err(|e| self.publish_error(e, exchange, false))?;
            slot.replies = Some(pump);
        }
        let ch = slot.channel.clone();
        Ok((guard, ch))
    }

    /// The broker returned a mandatory message that no queue took.
    fn returned(&self, exchange: &ShortString, routing_key: &ShortString) -> BoxError {
        self.shared
            .metrics
            .broker_event(&self.shared.name, "returned");
        Problem::unroutable(
            &self.shared.name,
            exchange.as_str(),
            routing_key.as_str(),
            self.unroutable,
        )
        .into()
    }

    /// What the broker's answer to one publish means for the client.
    fn confirmation(
        &self,
        outcome: Result<Result<Confirmation, (bool, lapin::Error)>, tokio::time::error::Elapsed>,
        exchange: &ShortString,
        routing_key: &ShortString,
    ) -> Result<(), BoxError> {
        match outcome {
            Err(_) => {
                self.shared
                    .metrics
                    .broker_event(&self.shared.name, "confirm_timeout");
                Err(Problem::unconfirmed(
                    &self.shared.name,
                    "no confirm came within the confirm timeout",
                )
                .into())
            }
            Ok(Ok(Confirmation::Ack(None))) => {
                self.shared.confirmed.inc();
                Ok(())
            }
            Ok(Ok(Confirmation::NotRequested)) => {
                Err(Problem::internal("a channel of the pool was not in confirm mode").into())
            }
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(self.returned(exchange, routing_key)),
            Ok(Ok(Confirmation::Nack(_))) => {
                self.shared
                    .metrics
                    .broker_event(&self.shared.name, "nacked");
                Err(self.unavailable(NACKED, None).into())
            }
            Ok(Err((sent, e))) => Err(self.publish_error(e, exchange, sent)),
        }
    }

    /// Publishes and waits for the broker's confirm, on a pooled channel with nothing else in
    /// flight. Answers only for what the broker said: ack, return, nack, or nothing in time.
    pub(crate) async fn publish(
        &self,
        exchange: &ShortString,
        routing_key: &ShortString,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), BoxError> {
        let within = self.shared.spec.confirm_timeout.0;
        let (mut guard, ch) = self.take_channel(exchange).await?;
        let attempt = async {
            let confirm = ch
                .basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: self.route.mandatory,
                        immediate: false,
                    },
                    payload,
                    props,
                )
                .await
                .map_err(|e| (false, e))?;
            // From here on the broker may have the message, whatever happens next.
            confirm.await.map_err(|e| (true, e))
        };
        let outcome = tokio::time::timeout(within, attempt).await;
        if !matches!(outcome, Ok(Ok(_))) {
            // Its publish may still be pending: never reuse the channel, or a later publish
            // could be handed this one's confirm or return.
            discard(guard.take());
        }
        drop(guard);
        self.confirmation(outcome, exchange, routing_key)
    }

    /// Publishes `reqs` in order on one channel, all in flight at once, then waits for their
    /// confirms in order: the spool's forwarder drains this way. One answer per request, in
    /// order:
    /// - a returned (unroutable) message is known by its `message_id` (lapin hands returns to
    ///   whichever confirm completes next, so its place in the batch says nothing);
    /// - a nack is the broker refusing that message (its tag is exact);
    /// - a failure of the channel or of a send, or a confirm that does not come, makes that
    ///   message and every later one "unavailable": which of them the broker took is unknown,
    ///   so they are sent again (one at a time, by the forwarder).
    pub(crate) async fn publish_ordered(&self, reqs: Vec<Request>) -> Vec<Result<(), BoxError>> {
        let mut rendered = Vec::with_capacity(reqs.len());
        for req in reqs {
            let (parts, body) = req.into_parts();
            let r = match crate::collect_body(body).await {
                Ok(body) => self.message(&parts, &body).map_err(BoxError::from),
                Err(e) => Err(e),
            };
            rendered.push(r);
        }
        let broke = |why: &str| -> BoxError {
            self.unavailable(
                "the batch broke before this message was confirmed",
                Some(why.to_string().into()),
            )
            .into()
        };
        let exchange = rendered
            .iter()
            .find_map(|r| r.as_ref().ok().map(|m| m.0.clone()))
            .unwrap_or_else(|| ShortString::from(String::new()));
        let (mut guard, ch) = match self.take_channel(&exchange).await {
            Ok(x) => x,
            Err(e) => {
                let why = e.to_string();
                return rendered
                    .into_iter()
                    .map(|r| r.and_then(|_| Err(broke(&why))))
                    .collect();
            }
        };
        let within = self.shared.spec.confirm_timeout.0;
        let bytes: usize = rendered
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|m| m.2.len()))
            .sum();
        // Send every message, in order, all at once: lapin numbers a publish's confirm and
        // queues its frames when its future is first polled, and `join_all` first polls in
        // order, so the frames leave in order. Writing them may take a while for big batches.
        let send_within = within * (1 + (bytes / (1024 * 1024)) as u32);
        let sends = rendered.iter().map(|r| async {
            let (exchange, routing_key, payload, props) = r.as_ref().ok()?;
            let publish = ch.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: self.route.mandatory,
                    immediate: false,
                },
                payload,
                props.clone(),
            );
            Some(publish.await)
        });
        let sent = tokio::time::timeout(send_within, futures_util::future::join_all(sends)).await;
        let Ok(sent) = sent else {
            discard(guard.take());
            return rendered
                .into_iter()
                .map(|r| r.and_then(|_| Err(broke("sending the batch timed out"))))
                .collect();
        };
        // Confirms, in order; each may take `within` after the one before it.
        let mut confirmations = Vec::with_capacity(sent.len());
        let mut broken: Option<String> = None;
        for s in sent {
            let c = match (s, &broken) {
                (None, _) => None,
                (Some(_), Some(_)) => Some(Err(())),
                (Some(Err(e)), None) => {
                    broken = Some(e.to_string());
                    Some(Err(()))
                }
                (Some(Ok(confirm)), None) => match tokio::time::timeout(within, confirm).await {
                    Ok(Ok(c)) => Some(Ok(c)),
                    Ok(Err(e)) => {
                        broken = Some(e.to_string());
                        Some(Err(()))
                    }
                    Err(_) => {
                        self.shared
                            .metrics
                            .broker_event(&self.shared.name, "confirm_timeout");
                        broken = Some("no confirm came within the confirm timeout".into());
                        Some(Err(()))
                    }
                },
            };
            confirmations.push(c);
        }
        let returned: std::collections::HashSet<String> = confirmations
            .iter()
            .filter_map(|c| match c {
                Some(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => r
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string()),
                _ => None,
            })
            .collect();
        let clean = broken.is_none()
            && returned.is_empty()
            && confirmations
                .iter()
                .all(|c| matches!(c, None | Some(Ok(Confirmation::Ack(_)))));
        if !clean {
            discard(guard.take());
        }
        drop(guard);
        rendered
            .into_iter()
            .zip(confirmations)
            .map(|(r, c)| {
                let (exchange, routing_key, _, props) = r?;
                let id = props.message_id().as_ref().map(|m| m.to_string());
                match c {
                    None => Err(Problem::internal("a message of the batch was not sent").into()),
                    Some(Err(())) => Err(broke(broken.as_deref().unwrap_or("the channel failed"))),
                    Some(Ok(_)) if id.is_some_and(|id| returned.contains(&id)) => {
                        Err(self.returned(&exchange, &routing_key))
                    }
                    Some(Ok(Confirmation::Ack(_))) => {
                        self.shared.confirmed.inc();
                        Ok(())
                    }
                    Some(Ok(other)) => self.confirmation(Ok(Ok(other)), &exchange, &routing_key),
                }
            })
            .collect()
    }

    /// The error for a failed publish step. `sent`: the frames had left, so the broker may
    /// have the message (an unconfirmed outcome, never retried for the client) — unless the
    /// broker refused it on the channel, which says it did not take it.
    fn publish_error(&self, e: lapin::Error, exchange: &ShortString, sent: bool) -> BoxError {
        if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
            if amqp.get_id() == 404 {
                return Problem::unroutable(
                    &self.shared.name,
                    exchange.as_str(),
                    "",
                    self.unroutable,
                )
                .into();
            }
            if e.is_amqp_soft_error() {
                return Problem::bad_gateway(&self.shared.name, "the broker refused the message")
                    .with_source(e)
                    .into();
            }
        }
        self.shared.broken.notify_one();
        if sent {
            return Problem::unconfirmed(
                &self.shared.name,
                "the connection to the broker failed before its confirm",
            )
            .with_source(e)
            .into();
        }
        self.unavailable("the publish failed", Some(Box::new(e)))
            .into()
    }

    /// One publish (and its reply), in a producer span whose context the message carries.
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let (mut parts, body) = req.into_parts();
        let Some(span) = Trace::of(&parts.extensions).map(|t| t.publish("rabbitmq")) else {
            return self.exchange_messages(parts, body, None).await;
        };
        span.inject_if_recorded(&mut parts.headers);
        let result = self.exchange_messages(parts, body, Some(&span)).await;
        span.end_with(&result);
        result
    }

    async fn exchange_messages(
        self,
        parts: http::request::Parts,
        body: crate::Body,
        span: Option<&Trace>,
    ) -> Result<Response, BoxError> {
        let body = crate::collect_body(body).await?;
        let (exchange, mut routing_key, mut payload, mut props) = self.message(&parts, &body)?;
        // A script's `on_message` sees the message as made, and may change it.
        if let Some(hook) = parts
            .extensions
            .get::<crate::plugins::script::MessageHook>()
        {
            (routing_key, payload, props) = scripted(hook, &exchange, routing_key, payload, props)?;
        }
        let sent = crate::telemetry::access::enabled().then(std::time::Instant::now);
        if let Some(span) = span {
            let destination = if exchange.as_str().is_empty() {
                "amq.default"
            } else {
                exchange.as_str()
            };
            span.published(destination, || {
                message_attributes(Some(&routing_key), &props, payload.len())
            });
        }
        let Some(reply) = &self.route.reply else {
            // Written straight from the properties into one buffer: this answer goes out for
            // every publish.
            let answer = serde_json::to_vec(&Published {
                message_id: props.message_id().as_ref().map_or("", |m| m.as_str()),
                correlation_id: props.correlation_id().as_ref().map_or("", |c| c.as_str()),
                exchange: exchange.as_str(),
                routing_key: routing_key.as_str(),
            })
            .map_err(|_| Problem::internal("the answer could not be written"))?;
            self.publish(&exchange, &routing_key, &payload, props)
                .await?;
            let mut r = http::Response::new(full_body(answer));
            *r.status_mut() = self.status;
            crate::telemetry::access::mark_upstream(&mut r, &self.shared.addr, sent);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(r);
        };
        // Request/reply: wait for the reply after the broker took the request.
        let correlation_id = props
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        let (tx, rx) = oneshot::channel();
        let replies = &self.shared.replies;
        replies
            .waiting
            .lock()
            .map_err(|_| Problem::internal("the reply table is poisoned"))?
            .insert(correlation_id.clone(), (tx, reply.queue == DIRECT_REPLY_TO));
        let _waiting = Waiting {
            replies,
            id: correlation_id,
        };
        self.publish(&exchange, &routing_key, &payload, props)
            .await?;
        // The publish span covers the publish; the wait for the reply is the request's.
        if let Some(span) = span {
            span.end();
        }
        let deadline = parts.extensions.get::<Deadline>().copied();
        let wait = deadline.map_or(Duration::from_secs(30), |d| d.remaining());
        let delivery = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(d)) => d,
            Ok(Err(_)) => {
                return Err(Problem::bad_gateway(
                    &self.shared.name,
                    "the connection to the broker was lost before the reply came",
                )
                .into());
            }
            Err(_) => {
                return Err(Problem::timeout(deadline.map_or(wait, |d| d.total)).into());
            }
        };
        if let Some(request) = Trace::of(&parts.extensions) {
            request.reply_received(
                "rabbitmq",
                &reply.queue,
                reply_context(&delivery.properties),
                || message_attributes(None, &delivery.properties, delivery.data.len()),
            );
        }
        // A script's `on_reply` sees the reply before it becomes the answer.
        let (mut data, mut properties) = (Bytes::from(delivery.data), delivery.properties);
        if let Some(hook) = parts
            .extensions
            .get::<crate::plugins::script::MessageHook>()
        {
            let m = hook.reply(crate::plugins::script::Message {
                destination: reply.queue.clone(),
                exchange: String::new(),
                headers: text_headers(&properties),
                body: data,
                properties: property_texts(&properties),
                protocol: crate::plugins::script::Protocol::Amqp,
            })?;
            properties = with_text_headers(properties, m.headers);
            data = m.body;
        }
        let mut r = reply_response(&properties, &data, &reply.status_header).ok_or_else(|| {
            Problem::bad_gateway(
                &self.shared.name,
                "the reply's status header does not hold an HTTP status (200-599)",
            )
        })?;
        crate::telemetry::access::mark_upstream(&mut r, &self.shared.addr, sent);
        Ok(r)
    }
}

/// A message after a script's `on_message`: its routing key, body and text headers as the
/// script left them (other header values are kept).
pub(super) fn scripted(
    hook: &crate::plugins::script::MessageHook,
    exchange: &ShortString,
    routing_key: ShortString,
    payload: Bytes,
    props: BasicProperties,
) -> Result<(ShortString, Bytes, BasicProperties), BoxError> {
    let headers = text_headers(&props);
    let properties = property_texts(&props);
    let m = hook.run(crate::plugins::script::Message {
        destination: routing_key.to_string(),
        exchange: exchange.to_string(),
        headers,
        body: payload,
        properties: properties.clone(),
        protocol: crate::plugins::script::Protocol::Amqp,
    })?;
    let mut props = with_text_headers(props, m.headers);
    // What the script set: the values were checked when it set them.
    for (name, value) in m.properties.iter().filter(|p| !properties.contains(p)) {
        let text = || ShortString::from(value.as_str());
        props = match *name {
            "content_type" => props.with_content_type(text()),
            "content_encoding" => props.with_content_encoding(text()),
            "type" => props.with_type(text()),
            "expiration" => props.with_expiration(text()),
            "priority" => props.with_priority(value.parse().unwrap_or_default()),
            _ => props,
        };
    }
    let key = ShortString::try_new(m.destination)
        .map_err(|_| Problem::internal("the script's routing key is longer than 255 bytes"))?;
    Ok((key, m.body, props))
}

/// A message's properties that are set, as text, as a script sees them.
fn property_texts(props: &BasicProperties) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut text = |name: &'static str, v: &Option<ShortString>| {
        if let Some(v) = v {
            out.push((name, v.to_string()));
        }
    };
    text("content_type", props.content_type());
    text("content_encoding", props.content_encoding());
    text("type", props.kind());
    text("expiration", props.expiration());
    text("message_id", props.message_id());
    text("correlation_id", props.correlation_id());
    text("app_id", props.app_id());
    text("reply_to", props.reply_to());
    if let Some(p) = props.priority() {
        out.push(("priority", p.to_string()));
    }
    if let Some(d) = props.delivery_mode() {
        out.push(("delivery_mode", d.to_string()));
    }
    if let Some(t) = props.timestamp() {
        out.push(("timestamp", t.to_string()));
    }
    out
}

fn header_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A message's headers with text values, as a script sees them.
fn text_headers(props: &BasicProperties) -> Vec<(String, String)> {
    props.headers().as_ref().map_or_else(Vec::new, |t| {
        t.inner()
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), header_text(v)?)))
            .collect()
    })
}

/// `props` with its text headers replaced by `headers` (other values kept).
fn with_text_headers(props: BasicProperties, headers: Vec<(String, String)>) -> BasicProperties {
    let table = props.headers().clone().unwrap_or_default();
    let mut out = FieldTable::default();
    for (k, v) in table.inner() {
        if header_text(v).is_none() {
            out.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in headers {
        out.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    props.with_headers(out)
}

/// The messaging attributes of a message (RabbitMQ semantic conventions).
fn message_attributes(
    routing_key: Option<&ShortString>,
    props: &BasicProperties,
    size: usize,
) -> Vec<Attr> {
    let mut attrs = vec![Attr::new(semconv::MESSAGING_MESSAGE_BODY_SIZE, size as i64)];
    if let Some(key) = routing_key {
        attrs.push(Attr::new(
            semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
            key.to_string(),
        ));
    }
    if let Some(id) = props.message_id() {
        attrs.push(Attr::new(semconv::MESSAGING_MESSAGE_ID, id.to_string()));
    }
    if let Some(c) = props.correlation_id() {
        attrs.push(Attr::new(
            semconv::MESSAGING_MESSAGE_CONVERSATION_ID,
            c.to_string(),
        ));
    }
    attrs
}

/// The trace context a reply carries in its headers (`traceparent`, `tracestate`), when the
/// replier sent one.
fn reply_context(p: &BasicProperties) -> Option<opentelemetry::trace::SpanContext> {
    let headers = p.headers().as_ref()?;
    let text = |name: &str| {
        headers.inner().iter().find_map(|(k, v)| match v {
            AMQPValue::LongString(s) if k.as_str().eq_ignore_ascii_case(name) => {
                std::str::from_utf8(s.as_bytes()).ok()
            }
            AMQPValue::ShortString(s) if k.as_str().eq_ignore_ascii_case(name) => Some(s.as_str()),
            _ => None,
        })
    };
    crate::telemetry::otel::remote(text("traceparent")?, text("tracestate"))
}

/// The answer to a confirmed publish.
#[derive(serde::Serialize)]
struct Published<'a> {
    message_id: &'a str,
    correlation_id: &'a str,
    exchange: &'a str,
    routing_key: &'a str,
}

/// The HTTP answer made of a reply message: its body, its content type, and the status its
/// status header carries (200 when absent; `None` when it holds no status from 200 to 599).
fn reply_response(p: &BasicProperties, data: &[u8], status_header: &str) -> Option<Response> {
    let header = p.headers().as_ref().and_then(|h| {
        h.inner()
            .iter()
            .find(|(k, _)| k.as_str().eq_ignore_ascii_case(status_header))
            .map(|(_, v)| v.clone())
    });
    let status = match header {
        None => http::StatusCode::OK,
        Some(v) => match v {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
            AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
            AMQPValue::LongInt(n) => u16::try_from(n).ok(),
            AMQPValue::LongLongInt(n) => u16::try_from(n).ok(),
            AMQPValue::ShortInt(n) => u16::try_from(n).ok(),
            AMQPValue::ShortShortInt(n) => u16::try_from(n).ok(),
            AMQPValue::LongUInt(n) => u16::try_from(n).ok(),
            AMQPValue::ShortUInt(n) => Some(n),
            _ => None,
        }
        .filter(|n: &u16| (200..600).contains(n))
        .and_then(|n| http::StatusCode::from_u16(n).ok())?,
    };
    let mut r = http::Response::new(full_body(Bytes::copy_from_slice(data)));
    *r.status_mut() = status;
    let ct = p
        .content_type()
        .as_ref()
        .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    r.headers_mut().insert(header::CONTENT_TYPE, ct);
    if let Some(id) = p
        .message_id()
        .as_ref()
        .and_then(|m| HeaderValue::from_str(m.as_str()).ok())
    {
        r.headers_mut().insert("x-reply-message-id", id);
    }
    Some(r)
}

/// The documented JSON envelope: method, path, path params, query, allow-listed headers and
/// the body (JSON when it is JSON, else a string, else base64 in `body_base64`).
fn envelope(
    parts: &http::request::Parts,
    body: &Bytes,
    values: &RequestValues<'_>,
    allowed: &[http::HeaderName],
) -> Vec<u8> {
    let params: serde_json::Map<String, serde_json::Value> = parts
        .extensions
        .get::<RequestContext>()
        .map(|c| {
            c.params
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned()
                            .into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut query = serde_json::Map::new();
    let pairs = parts
        .uri
        .query()
        .map(|q| crate::backends::grpc::transcode::query_pairs(q, true))
        .unwrap_or_default();
    for (k, v) in pairs {
        query.entry(k).or_insert_with(|| v.into());
    }
    let headers: serde_json::Map<String, serde_json::Value> = allowed
        .iter()
        .filter_map(|h| {
            let v = parts.headers.get(h)?.to_str().ok()?;
            Some((h.as_str().to_string(), v.into()))
        })
        .collect();
    let mut env = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "params": params,
        "query": query,
        "headers": headers,
    });
    if body.is_empty() {
        env["body"] = serde_json::Value::Null;
    } else if let Ok(v) = values.json() {
        env["body"] = v.clone();
    } else if let Ok(s) = std::str::from_utf8(body) {
        env["body"] = s.into();
    } else {
        use base64::Engine;
        env["body_base64"] = base64::engine::general_purpose::STANDARD
            .encode(body)
            .into();
    }
    env.to_string().into_bytes()
}

/// Closes a channel that must not be used again, in the background and bounded in time.
fn discard(slot: Option<SlotChannel>) {
    if let Some(old) = slot
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        rt.spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                old.channel.close(200, "discarded".into()),
            )
            .await;
        });
    }
}

super::route_service!(AmqpRouteService);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_joins_the_url() {
        assert_eq!(
            uri_with_heartbeat("amqp://h:5672/%2f", Duration::from_secs(10)),
            "amqp://h:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            uri_with_heartbeat("amqp://h/v?frame_max=8192", Duration::from_secs(3)),
            "amqp://h/v?frame_max=8192&heartbeat=3"
        );
        assert_eq!(
            uri_with_heartbeat("amqp://h/v?heartbeat=5", Duration::from_secs(3)),
            "amqp://h/v?heartbeat=5"
        );
    }

    #[test]
    fn reply_status_comes_from_the_header() {
        let mut h = FieldTable::default();
        h.insert("x-status".into(), AMQPValue::LongString("201".into()));
        let p = BasicProperties::default()
            .with_headers(h)
            .with_content_type("text/plain".into());
        let r = reply_response(&p, b"made", "X-Status").unwrap();
        assert_eq!(r.status(), 201);
        let mut h = FieldTable::default();
        h.insert("x-status".into(), AMQPValue::LongString("101".into()));
        let bad = BasicProperties::default().with_headers(h);
        assert!(reply_response(&bad, b"", "x-status").is_none());
        assert_eq!(
            reply_response(&BasicProperties::default(), b"", "x-status")
                .unwrap()
                .status(),
            200
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
    }
}
