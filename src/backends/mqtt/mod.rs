//! The MQTT backend (MQTT 5 or 3.1.1, rumqttc): an HTTP request becomes a publish, answered only after
//! the broker's PUBACK (QoS 1) or PUBCOMP (QoS 2), or once written to the socket (QoS 0). Sits
//! at the bottom of a route's stack. One client per backend with a persistent session; its
//! event loop is polled in its own task, which ties each acknowledgement to its request.
//!
//! rumqttc's `publish` only enqueues and reports no acknowledgement, so the gateway keeps its
//! own book: publishes enter rumqttc's request channel in the order they enter the book's
//! queue, rumqttc reports `Outgoing::Publish(pkid)` in that order, so the head of the queue gets
//! that packet id, and `PubAck`/`PubComp` with the id settles it. When the connection drops,
//! rumqttc moves unacknowledged publishes (and requests still in its channel) to its `pending`
//! list and resends them if the broker kept the session; if the broker comes back without the
//! session, rumqttc drops them, and the book publishes them again. A publish rumqttc numbered
//! just before the failure reports its `Outgoing::Publish` only after the reconnect (a stale
//! event); the book counts it as sent, not as one of the unnumbered ones in `pending`.
//! SUBSCRIBEs are tracked the same way until their SUBACK (`asks`), so a client hears whether
//! the broker granted or refused its filter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http_body_util::BodyExt;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Packet, PubAckReason, PubCompReason, PubRecReason, Publish, PublishProperties,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request as MqttRequest};
use tokio::sync::{broadcast, oneshot, watch};

mod asks;
mod book;
pub mod bridge;
pub mod live;
pub mod spec;
pub mod validate;
pub mod websocket;
use asks::{Ask, Asks, Grant};
use book::{Book, Entry, Failure, MAX_STRIKES, Outcome};

use super::AbortOnDrop;
use super::values::{RequestValues, Target};
use crate::config::template::ValueTemplate;
use crate::config::{MqttBackendSpec, MqttProtocol, MqttRouteSpec, RouteSpec};
use crate::error::Problem;
use crate::middleware::context::{Deadline, RequestContext};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otel::{Attr, Trace, semconv};
use crate::{BodyError, BoxError, Request, Response, full_body};

/// How long a new subscription waits for room in the client's queue, then for its SUBACK.
const SUBACK_WAIT: Duration = Duration::from_secs(5);

/// A last-value read waiting for a topic's retained message: its id and its sender.
type Reader = (u64, oneshot::Sender<Publish>);

/// Live subscriptions by topic filter. Filters without wildcards are found by a hash lookup,
/// so a message costs the same with ten thousand one-topic subscribers as with one; only
/// wildcard filters are matched one by one.
#[derive(Default)]
struct SubTable {
    by_filter: HashMap<String, broadcast::Sender<Arc<Publish>>>,
    wild: Vec<String>,
}

impl SubTable {
    fn get(&self, filter: &str) -> Option<&broadcast::Sender<Arc<Publish>>> {
        self.by_filter.get(filter)
    }
    fn contains_key(&self, filter: &str) -> bool {
        self.by_filter.contains_key(filter)
    }
    fn insert(&mut self, filter: String, tx: broadcast::Sender<Arc<Publish>>) {
        if filter.contains(['+', '#']) {
            self.wild.push(filter.clone());
        }
        self.by_filter.insert(filter, tx);
    }
    fn remove(&mut self, filter: &str) {
        if self.by_filter.remove(filter).is_some() && filter.contains(['+', '#']) {
            self.wild.retain(|f| f != filter);
        }
    }
    fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_filter.keys()
    }
    fn clear(&mut self) {
        self.by_filter.clear();
        self.wild.clear();
    }
    /// The channels of every filter `topic` matches.
    fn matching<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = &'a broadcast::Sender<Arc<Publish>>> + 'a {
        self.by_filter.get(topic).into_iter().chain(
            self.wild
                .iter()
                .filter(move |f| filter_matches(f, topic))
                .filter_map(|f| self.by_filter.get(f)),
        )
    }
}

/// The client of either protocol version. The backend keeps MQTT 5 types throughout; a 3.1.1
/// client sends them without their properties.
enum Client {
    V5(AsyncClient),
    V311(rumqttc::AsyncClient),
}

fn qos311(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: rumqttc::QoS) -> QoS {
    match q {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl Client {
    async fn unsubscribe(&self, filter: String) {
        let _ = match self {
            Client::V5(c) => c.unsubscribe(filter).await.map_err(|_| ()),
            Client::V311(c) => c.unsubscribe(filter).await.map_err(|_| ()),
        };
    }

    fn try_unsubscribe(&self, filter: String) -> Result<(), ()> {
        match self {
            Client::V5(c) => c.try_unsubscribe(filter).map_err(|_| ()),
            Client::V311(c) => c.try_unsubscribe(filter).map_err(|_| ()),
        }
    }

    fn try_subscribe(&self, filter: String) -> Result<(), ()> {
        match self {
            Client::V5(c) => c.try_subscribe(filter, QoS::AtLeastOnce).map_err(|_| ()),
            Client::V311(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|_| ()),
        }
    }

    /// Enqueues a publish (MQTT 3.1.1: without its properties).
    fn try_publish(&self, p: &Publish) -> Result<(), ()> {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        match self {
            Client::V5(c) => c
                .try_publish_with_properties(
                    topic,
                    p.qos,
                    p.retain,
                    p.payload.clone(),
                    p.properties.clone().unwrap_or_default(),
                )
                .map_err(|_| ()),
            Client::V311(c) => c
                .try_publish(topic, qos311(p.qos), p.retain, p.payload.clone())
                .map_err(|_| ()),
        }
    }
}

struct Shared {
    name: String,
    /// The broker as the access log names it (no credentials).
    addr: Arc<str>,
    /// How the connection's availability is logged.
    health: super::health::Health,
    metrics: Arc<Metrics>,
    client: Client,
    connected: AtomicBool,
    problem: std::sync::Mutex<Option<String>>,
    book: std::sync::Mutex<Book>,
    seq: AtomicU64,
    /// The largest packet the client sends; a bigger publish would break the connection.
    max_packet: usize,
    /// The largest packet the broker accepts (from its CONNACK).
    broker_max: std::sync::atomic::AtomicUsize,
    /// Last-value reads waiting for the retained message of a topic.
    readers: std::sync::Mutex<HashMap<String, Vec<Reader>>>,
    /// Where responders send responses (MQTT 5 response topic), subscribed on every connect.
    response_topic: String,
    /// Requests waiting for their response, by correlation data.
    responses: std::sync::Mutex<HashMap<Bytes, oneshot::Sender<Publish>>>,
    /// SUBSCRIBEs waiting for their SUBACK.
    asks: std::sync::Mutex<Asks>,
    /// Whether the broker granted the response topic subscription.
    responses_ok: AtomicBool,
    /// Live subscriptions by topic filter; one broker subscription feeds every client.
    subs: std::sync::Mutex<SubTable>,
    /// Cancelled when the backend is dropped (a reload removed or changed it).
    gone: tokio_util::sync::CancellationToken,
}

pub struct MqttBackend {
    shared: Arc<Shared>,
    _task: Option<AbortOnDrop>,
}

impl MqttBackend {
    /// Prepares the client and starts polling its event loop; nothing here waits for the broker.
    pub fn new(
        name: &str,
        spec: &MqttBackendSpec,
        metrics: &Arc<Metrics>,
        base: &std::path::Path,
        gate: &super::StartGate,
    ) -> Result<Self, String> {
        let client_id = client_id(name, spec);
        let response_topic = response_topic(&client_id);
        let brokers = Brokers {
            at: std::iter::once(&spec.url)
                .chain(&spec.failover)
                .map(|url| broker_at(url, spec, base))
                .collect::<Result<_, _>>()?,
            spec: spec.clone(),
            client_id,
            current: 0,
            connected: false,
        };
        let (client, eventloop) = match spec.protocol {
            MqttProtocol::V5 => {
                let (client, eventloop) = AsyncClient::new(brokers.v5(0), spec.inflight as usize);
                (Client::V5(client), Loop::V5(Box::new(eventloop)))
            }
            MqttProtocol::V311 => {
                let (client, mut eventloop) =
                    rumqttc::AsyncClient::new(brokers.v311(0), spec.inflight as usize);
                eventloop
                    .network_options
                    .set_connection_timeout(spec.connect_timeout.0.as_secs().max(1));
                (Client::V311(client), Loop::V311(Box::new(eventloop)))
            }
        };
        let shared = Arc::new(Shared {
            name: name.to_string(),
            addr: super::broker_address(&spec.url),
            health: super::health::Health::new(name, "mqtt"),
            metrics: metrics.clone(),
            client,
            connected: AtomicBool::new(false),
            problem: std::sync::Mutex::new(Some("connecting".into())),
            book: std::sync::Mutex::new(Book::default()),
            seq: AtomicU64::new(0),
            max_packet: spec.max_packet_size.0 as usize,
            broker_max: std::sync::atomic::AtomicUsize::new(usize::MAX),
            readers: std::sync::Mutex::new(HashMap::new()),
            response_topic,
            responses: std::sync::Mutex::new(HashMap::new()),
            asks: std::sync::Mutex::new(Asks::default()),
            responses_ok: AtomicBool::new(false),
            subs: std::sync::Mutex::new(SubTable::default()),
            gone: tokio_util::sync::CancellationToken::new(),
        });
        let (min, max, inflight) = (spec.reconnect.min.0, spec.reconnect.max.0, spec.inflight);
        let task = gate.spawn(run(
            Arc::downgrade(&shared),
            eventloop,
            brokers,
            min,
            max,
            inflight,
        ));
        Ok(MqttBackend {
            shared,
            _task: task,
        })
    }

    pub fn ready(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    pub fn problem(&self) -> Option<String> {
        self.shared.problem.lock().ok().and_then(|p| p.clone())
    }

    /// The shared client, for bridges that publish and subscribe on their own terms (the
    /// WebSocket bridge).
    pub fn handle(&self) -> MqttHandle {
        MqttHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for MqttBackend {
    /// A reload removed or changed the backend: its event loop stops, so live subscribers are
    /// told the backend is gone (their channels close) instead of waiting forever.
    fn drop(&mut self) {
        self.shared.gone.cancel();
        self.shared.connected.store(false, Ordering::SeqCst);
        if let Ok(mut subs) = self.shared.subs.lock() {
            subs.clear();
        }
        // Clients waiting on a SUBACK or a retained message hear at once.
        *asks(&self.shared) = Asks::default();
        if let Ok(mut r) = self.shared.readers.lock() {
            r.clear();
        }
    }
}

/// The broker's host and port, and the TLS transport for `mqtts://`.
pub(crate) fn broker(
    spec: &MqttBackendSpec,
    base: &std::path::Path,
) -> Result<(String, u16, Option<rumqttc::Transport>), String> {
    broker_at(&spec.url, spec, base)
}

/// [`broker`] for `url`, one of the backend's brokers.
fn broker_at(
    url: &str,
    spec: &MqttBackendSpec,
    base: &std::path::Path,
) -> Result<(String, u16, Option<rumqttc::Transport>), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("url: {e}"))?;
    let host = uri.host().ok_or("url: no host")?.to_string();
    let tls = uri.scheme_str() == Some("mqtts");
    let port = uri.port_u16().unwrap_or(if tls { 8883 } else { 1883 });
    let transport = if tls {
        Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(super::tls::rustls_client(
                spec.tls.as_ref(),
                base,
            )?)),
        ))
    } else {
        None
    };
    Ok((host, port, transport))
}

/// The backend's brokers (`url`, then `failover`), and which one the event loop uses.
struct Brokers {
    at: Vec<(String, u16, Option<rumqttc::Transport>)>,
    spec: MqttBackendSpec,
    client_id: String,
    current: usize,
    /// Whether the current broker accepted the connection since the loop moved to it.
    connected: bool,
}

impl Brokers {
    /// The MQTT 5 options for broker `i`.
    fn v5(&self, i: usize) -> MqttOptions {
        let spec = &self.spec;
        let (host, port, transport) = &self.at[i];
        let mut opts = MqttOptions::new(self.client_id.clone(), host.clone(), *port);
        opts.set_keep_alive(spec.keep_alive.0)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(spec.session_expiry.0.as_secs() as u32))
            .set_max_packet_size(Some(spec.max_packet_size.0 as u32))
            .set_outgoing_inflight_upper_limit(spec.inflight)
            .set_request_channel_capacity(spec.inflight as usize)
            .set_connection_timeout(spec.connect_timeout.0.as_secs().max(1));
        if let Some(t) = transport {
            opts.set_transport(t.clone());
        }
        if let Some(user) = &spec.username {
            opts.set_credentials(user.clone(), spec.password.clone().unwrap_or_default());
        }
        opts
    }

    /// The MQTT 3.1.1 options for broker `i`.
    fn v311(&self, i: usize) -> rumqttc::MqttOptions {
        let spec = &self.spec;
        let (host, port, transport) = &self.at[i];
        let mut opts = rumqttc::MqttOptions::new(self.client_id.clone(), host.clone(), *port);
        // 3.1.1 cannot tell the broker our limit, and rumqttc drops the connection on a bigger
        // incoming packet (which a kept session or a retained message would then bring back
        // on every reconnect): incoming packets get the protocol's limit; outgoing ones the
        // configured one.
        let max = spec.max_packet_size.0 as usize;
        opts.set_keep_alive(spec.keep_alive.0)
            .set_clean_session(false)
            .set_max_packet_size(268_435_455, max)
            .set_inflight(spec.inflight)
            .set_request_channel_capacity(spec.inflight as usize);
        if let Some(t) = transport {
            opts.set_transport(t.clone());
        }
        if let Some(user) = &spec.username {
            opts.set_credentials(user.clone(), spec.password.clone().unwrap_or_default());
        }
        opts
    }

    /// After a failure: the broker to try next, when it is another one. One that never
    /// accepted the connection gives way to the next; a connection that was up and is lost
    /// starts again from the first.
    fn after_failure(&mut self, name: &str) -> Option<usize> {
        if self.at.len() < 2 {
            return None;
        }
        let next = if self.connected {
            0
        } else {
            (self.current + 1) % self.at.len()
        };
        self.connected = false;
        if next == self.current {
            return None;
        }
        self.current = next;
        let (host, port, _) = &self.at[next];
        tracing::warn!(backend = name, broker = %format!("{host}:{port}"), "Trying the next MQTT broker.");
        Some(next)
    }
}

/// The backend's client id: `client_id`, or `switchyard-<backend>`.
pub(crate) fn client_id(name: &str, spec: &MqttBackendSpec) -> String {
    spec.client_id
        .clone()
        .unwrap_or_else(|| format!("switchyard-{name}"))
}

/// The topic MQTT 5 responses come back on, for a client id.
pub(crate) fn response_topic(client_id: &str) -> String {
    format!("switchyard/responses/{client_id}")
}

/// A clonable view of a backend's client: confirmed publishes and shared subscriptions.
#[derive(Clone)]
pub struct MqttHandle {
    shared: Arc<Shared>,
}

/// One client's share of a broker subscription. The receiver drops before the guard, so the
/// guard sees the true count of remaining clients.
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Publish>>,
    _guard: SubGuard,
}

impl MqttHandle {
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Resolves when the backend is dropped by a reload; its client no longer runs.
    pub async fn gone(&self) {
        self.shared.gone.cancelled().await
    }

    pub fn unavailable(&self, reason: &'static str) -> Problem {
        Problem::backend_unavailable(&self.shared.name, reason)
    }

    /// The largest payload the client and the broker both accept, less the fixed header.
    pub fn payload_limit(&self) -> usize {
        self.shared
            .max_packet
            .min(self.shared.broker_max.load(Ordering::SeqCst))
            .saturating_sub(5)
    }

    /// Joins the live subscription on `filter`, subscribing at the broker for the first
    /// client, and answers once the broker granted it (its SUBACK), or with the broker's
    /// refusal. Clients on one filter share one broker subscription; a client `buffer`
    /// messages behind sees `Lagged`, and the channel closes when the backend goes away. A
    /// burst of new filters waits for room in the client's request queue (at most five
    /// seconds) rather than failing.
    pub async fn subscribe(&self, filter: String, buffer: usize) -> Result<Subscription, Problem> {
        if !self.connected() {
            return Err(self.unavailable("not connected to the broker"));
        }
        self.fits(&filter)?;
        let mut mine = None;
        let (rx, grant) = {
            let mut subs = self
                .shared
                .subs
                .lock()
                .map_err(|_| Problem::internal("the subscription table is poisoned"))?;
            match subs.get(&filter) {
                Some(tx) => (tx.subscribe(), asks(&self.shared).pending(&filter)),
                None => {
                    let (tx, rx) = broadcast::channel(buffer.max(1));
                    mine = Some(tx.clone());
                    subs.insert(filter.clone(), tx);
                    // Created with the entry, so that a client joining before the SUBSCRIBE
                    // is even asked waits for its SUBACK too.
                    (rx, Some(asks(&self.shared).grant(&filter)))
                }
            }
        };
        self.shared.metrics.stream(&self.shared.name, 1);
        let sub = Subscription {
            rx,
            _guard: SubGuard {
                shared: self.shared.clone(),
                filter: filter.clone(),
            },
        };
        if let Some(mine) = mine {
            // Asked from a task of its own, so that a caller who stops waiting (a handshake
            // that timed out) cannot leave the filter in the table with no broker request
            // behind it; on failure the entry goes and clients that joined meanwhile hear so.
            let (shared, f) = (self.shared.clone(), filter.clone());
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + SUBACK_WAIT;
                loop {
                    {
                        // Asked only while this filter's entry still has clients, and under
                        // the table's lock, so that an UNSUBSCRIBE of a client that left
                        // cannot come before this SUBSCRIBE.
                        let mut subs = shared
                            .subs
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let live = subs
                            .get(&f)
                            .is_some_and(|tx| tx.same_channel(&mine) && tx.receiver_count() > 0);
                        if live && shared.ask(&f).is_some() {
                            return;
                        }
                        if !live || tokio::time::Instant::now() >= deadline {
                            if subs.get(&f).is_some_and(|tx| tx.same_channel(&mine)) {
                                subs.remove(&f);
                            }
                            drop(subs);
                            asks(&shared).settle(&f, Grant::NotAsked);
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        // A filter already granted has no grant under way.
        let Some(mut grant) = grant else {
            return Ok(sub);
        };
        let answer = tokio::time::timeout(SUBACK_WAIT, async {
            grant
                .wait_for(|g| *g != Grant::Pending)
                .await
                .map(|g| g.clone())
        })
        .await;
        match answer {
            Ok(Ok(Grant::Granted)) => Ok(sub),
            Ok(Ok(Grant::Refused(reason))) => Err(self.shared.refused(&filter, &reason)),
            Ok(Ok(_)) => Err(self.unavailable("too many requests in flight")),
            Ok(Err(_)) => Err(self.unavailable("the backend was removed")),
            Err(_) => Err(self.unavailable("the broker did not answer the subscription in time")),
        }
    }

    /// A SUBSCRIBE for `filter` is one the broker takes (see [`unfit_topic`]) and fits the
    /// packet limit (one too big could never be sent, and would break the connection on every
    /// attempt).
    fn fits(&self, filter: &str) -> Result<(), Problem> {
        if let Some(why) = unfit_topic(filter, true) {
            return Err(
                Problem::bad_request(format!("The topic filter cannot be used: {why}."))
                    .with_field("topic"),
            );
        }
        // The filter, its length, the packet id, its options and MQTT 5's property length.
        let limit = self.payload_limit();
        if filter.len() + 6 > limit {
            return Err(Problem::bad_request(format!(
                "The topic filter is {} bytes, too long for the {}-byte packet limit.",
                filter.len(),
                limit + 5
            ))
            .with_field("topic"));
        }
        Ok(())
    }

    /// Publishes and waits up to `wait` for the broker's acknowledgement (QoS 1, 2) or for
    /// the write (QoS 0). Errors say whether the message may have arrived (`Unconfirmed`).
    pub async fn publish(&self, publish: Publish, wait: Duration) -> Result<(), Problem> {
        let mut publish = publish;
        if matches!(self.shared.client, Client::V311(_)) {
            // 3.1.1 sends no properties: they count for nothing against the packet limit.
            publish.properties = None;
        }
        if let Some(why) = std::str::from_utf8(&publish.topic)
            .map_or(Some("it is not valid UTF-8"), |t| unfit_topic(t, false))
        {
            return Err(
                Problem::bad_request(format!("The topic cannot be used: {why}."))
                    .with_field("topic"),
            );
        }
        let limit = self.payload_limit();
        if publish.payload.len() > limit {
            return Err(Problem::payload_too_large(limit as u64));
        }
        if publish.size() > limit {
            return Err(Problem::bad_request(format!(
                    "The message with its topic and properties would be {} bytes, over the {}-byte packet limit.",
                    publish.size() + 5,
                    limit + 5
                )).with_field("topic"));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut book = self
                .shared
                .book
                .lock()
                .map_err(|_| Problem::internal("the publish book is poisoned"))?;
            if !self.connected() {
                return Err(self.unavailable("not connected to the broker"));
            }
            // Enqueued under the lock, so the book's order is rumqttc's order.
            self.shared
                .client
                .try_publish(&publish)
                .map_err(|_| self.unavailable("too many publishes in flight"))?;
            book.push(Entry::new(
                self.shared.seq.fetch_add(1, Ordering::Relaxed),
                publish,
                tx,
            ));
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(Failure::Lost))) => Err(Problem::unconfirmed(
                &self.shared.name,
                "the broker lost the session before it acknowledged the message",
            )),
            Ok(Ok(Err(Failure::Refused(reason)))) => {
                self.shared
                    .metrics
                    .broker_event(&self.shared.name, "refused");
                Err(Problem::bad_request(format!(
                    "The broker refused the message: {reason}."
                )))
            }
            Ok(Err(_)) | Err(_) => Err(Problem::unconfirmed(
                &self.shared.name,
                "the broker did not acknowledge the message in time",
            )),
        }
    }
}

/// A publish's properties that are set, as text, as a script sees them (`qos` and `retain`
/// among them, read only).
fn property_texts(
    props: &PublishProperties,
    qos: QoS,
    retain: bool,
) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("qos", (qos as u8).to_string()),
        ("retain", retain.to_string()),
    ];
    if let Some(c) = &props.content_type {
        out.push(("content_type", c.clone()));
    }
    if let Some(e) = props.message_expiry_interval {
        out.push(("message_expiry_interval", e.to_string()));
    }
    if let Some(f) = props.payload_format_indicator {
        out.push(("payload_format_indicator", f.to_string()));
    }
    if let Some(t) = &props.response_topic {
        out.push(("response_topic", t.clone()));
    }
    out
}

/// A publish after a script's `on_message`, which sees the topic, the user properties and the
/// payload as made and may change them; its topic, which must still be one the broker takes
/// on a shared connection, and its payload, within `limit`.
pub(crate) fn scripted(
    hook: &crate::plugins::script::MessageHook,
    topic: String,
    publish: &mut Publish,
    limit: usize,
) -> Result<String, BoxError> {
    let props = publish.properties.get_or_insert_with(Default::default);
    let properties = property_texts(props, publish.qos, publish.retain);
    let m = hook.run(crate::plugins::script::Message {
        destination: topic,
        exchange: String::new(),
        headers: std::mem::take(&mut props.user_properties),
        body: publish.payload.clone(),
        properties: properties.clone(),
        protocol: crate::plugins::script::Protocol::Mqtt,
    })?;
    props.user_properties = m.headers;
    // What the script set: the values were checked when it set them.
    for (name, value) in m.properties.iter().filter(|p| !properties.contains(p)) {
        match *name {
            "content_type" => props.content_type = Some(value.clone()),
            "message_expiry_interval" => props.message_expiry_interval = value.parse().ok(),
            _ => {}
        }
    }
    if let Some(why) = unfit_topic(&m.destination, false) {
        return Err(Problem::bad_request(format!(
            "The topic the route's script made cannot be published to: {why}."
        ))
        .with_field("topic")
        .into());
    }
    if m.body.len() > limit {
        return Err(Problem::payload_too_large(limit as u64).into());
    }
    publish.topic = Bytes::from(m.destination.clone());
    publish.payload = m.body;
    Ok(m.destination)
}

/// Why a broker would close the connection over this topic name (`filter == false`, a
/// publish) or topic filter (a subscription), if it would. Checked by [`MqttHandle`] before
/// anything reaches the shared connection, so that no request can break it for the others:
/// an empty name, a control character (U+0000–U+001F, U+007F–U+009F; Mosquitto drops the
/// connection over them), wildcards in a name, a malformed filter, over 65535 bytes.
pub fn unfit_topic(topic: &str, filter: bool) -> Option<&'static str> {
    if topic.is_empty() {
        Some("it is empty")
    } else if topic.len() > 65535 {
        Some("it is longer than MQTT allows (65535 bytes)")
    } else if topic.chars().any(char::is_control) {
        Some("it holds a control character (U+0000–U+001F or U+007F–U+009F)")
    } else if !filter && topic.contains(['+', '#']) {
        Some("a topic name holds no `+` or `#` wildcards")
    } else if filter && !validate::valid_filter(topic) {
        Some("`+` stands for one whole level, and `#` only for the last")
    } else {
        None
    }
}

/// The book, even after a panic elsewhere poisoned its lock: its data stays consistent because
/// every change is a single push, pop or insert.
fn book(shared: &Shared) -> std::sync::MutexGuard<'_, Book> {
    shared
        .book
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The SUBSCRIBEs under way (kept consistent like the book: every change is one step).
fn asks(shared: &Shared) -> std::sync::MutexGuard<'_, Asks> {
    shared
        .asks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Hands rumqttc a SUBSCRIBE for `filter` without waiting for room in its request queue;
    /// returns what will tell the broker's answer.
    fn ask(&self, filter: &str) -> Option<watch::Receiver<Grant>> {
        let mut asks = asks(self);
        // Under the lock, so that the order of `asks` is rumqttc's order.
        self.client.try_subscribe(filter.to_string()).ok()?;
        Some(asks.asked(filter))
    }

    fn refused(&self, filter: &str, reason: &str) -> Problem {
        Problem::subscription_refused(&self.name, filter, reason)
    }
}

/// A SUBACK (its first reason code): the waiting clients are told. A refused filter leaves
/// the live subscriptions, so that the next client asks again (and hears the answer).
fn on_suback(shared: &Shared, pkid: u16, outcome: Result<(), String>) -> Option<Ask> {
    // `subs` first (the order `subscribe` takes): a client joining the filter between the
    // grant and the removal would take the refused filter for a granted one.
    let mut subs = shared
        .subs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ask = asks(shared).answered(pkid, outcome.clone());
    match (&ask, &outcome) {
        (Some(Ask::Filter(filter)), Err(reason)) => {
            tracing::warn!(backend = %shared.name, %filter, %reason, "The MQTT broker refused a subscription; allow the gateway's client to read this filter.");
            subs.remove(filter);
        }
        (None, _) => {
            tracing::warn!(backend = %shared.name, pkid, "A SUBACK matched no SUBSCRIBE the gateway tracks.");
        }
        _ => {}
    }
    ask
}

fn set_problem(shared: &Shared, p: Option<String>) {
    let p = p.map(|p| crate::telemetry::redact::secrets(&p).into_owned());
    if let Ok(mut cur) = shared.problem.lock() {
        *cur = p;
    }
}

/// The event loop of either protocol version.
enum Loop {
    V5(Box<EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// What the book does on a CONNACK (see [`Book::on_connack`]).
fn on_connack(
    shared: &Shared,
    session_present: bool,
    window: usize,
    first_resend: Option<u16>,
) -> Vec<Publish> {
    book(shared).on_connack(session_present, window, first_resend)
}

/// rumqttc wrote a publish (see [`Book::on_outgoing_publish`]).
fn on_outgoing_publish(shared: &Shared, pkid: u16) {
    book(shared).on_outgoing_publish(pkid);
}

/// A message from the broker for live subscriptions and last-value reads.
fn deliver(shared: &Shared, p: Publish) {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    if let Ok(subs) = shared.subs.lock() {
        let shared_p = Arc::new(p.clone());
        for tx in subs.matching(&topic) {
            let _ = tx.send(shared_p.clone());
        }
    }
    let waiting = shared
        .readers
        .lock()
        .ok()
        .and_then(|mut r| r.remove(&topic))
        .unwrap_or_default();
    for (_, tx) in waiting {
        let _ = tx.send(p.clone());
    }
}

/// PUBACK (QoS 1) or PUBCOMP (QoS 2): the publish is settled (outside the book's lock).
fn on_ack(shared: &Shared, pkid: u16, qos2: bool, outcome: Outcome) {
    let e = book(shared).take_acked(pkid, qos2);
    if let Some(e) = e {
        e.settle(outcome);
    }
}

/// PUBREC: the QoS 2 publish waits for its PUBCOMP, unless the broker refused it.
fn on_pubrec(shared: &Shared, pkid: u16, outcome: Outcome) {
    book(shared).on_pubrec(pkid, outcome);
}

/// A request in rumqttc's pending list, as the book and the asks see it.
enum Held {
    /// A publish and its packet id (0: never sent).
    Publish(u16),
    Subscribe,
    Other,
}

fn held_v5(r: &MqttRequest) -> Held {
    match r {
        MqttRequest::Publish(p) => Held::Publish(p.pkid),
        MqttRequest::Subscribe(_) => Held::Subscribe,
        _ => Held::Other,
    }
}

fn held_v311(r: &rumqttc::Request) -> Held {
    match r {
        rumqttc::Request::Publish(p) => Held::Publish(p.pkid),
        rumqttc::Request::Subscribe(_) => Held::Subscribe,
        _ => Held::Other,
    }
}

/// The packet id of the first publish rumqttc will resend from its pending list.
fn first_resend<R>(pending: &VecDeque<R>, held: impl Fn(&R) -> Held) -> Option<u16> {
    pending.iter().find_map(|r| match held(r) {
        Held::Publish(id) if id != 0 => Some(id),
        _ => None,
    })
}

/// The connection failed: the publishes rumqttc holds in `pending` unnumbered (taken from its
/// channel, never sent) are the head of the book's queue, and its SUBSCRIBEs the head of the
/// asks'.
/// A publish resent first on `MAX_STRIKES` connections that all closed before its
/// acknowledgement is taken out of `pending` and answered as refused.
fn on_failure<R>(
    shared: &Shared,
    pending: &mut VecDeque<R>,
    err: &dyn std::fmt::Display,
    held: impl Fn(&R) -> Held,
) {
    let (mut limbo, mut sub_limbo) = (0, 0);
    for r in pending.iter() {
        match held(r) {
            Held::Publish(0) => limbo += 1,
            Held::Subscribe => sub_limbo += 1,
            _ => {}
        }
    }
    let was = shared.connected.swap(false, Ordering::SeqCst);
    let refused = book(shared).on_failure(limbo);
    if let Some((id, e)) = refused {
        pending.retain(|r| !matches!(held(r), Held::Publish(p) if p == id));
        let topic = String::from_utf8_lossy(&e.publish.topic).into_owned();
        tracing::warn!(backend = %shared.name, %topic, bytes = e.publish.payload.len(), "The MQTT broker closed the connection each time this message was sent; it is refused and sent no more.");
        e.settle(Err(Failure::Refused(format!(
            "it closed the connection each of the {MAX_STRIKES} times the message was sent (a broker refuses an MQTT 3.1.1 message it will not take this way, most often one over its maximum packet size)"
        ))));
    }
    {
        // The table is locked before the refusals are settled: a client woken by its refusal
        // (on another thread) must find its filter gone, or its guard would UNSUBSCRIBE it,
        // and that packet would close the next connection too.
        let mut subs = shared
            .subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Not asked again: its live subscribers' streams end, and they were told why.
        for filter in asks(shared).failed(sub_limbo, MAX_STRIKES) {
            subs.remove(&filter);
            tracing::warn!(backend = %shared.name, %filter, "The MQTT broker closed the connection each time this filter was subscribed; it is refused and asked no more.");
        }
    }
    if was {
        shared.metrics.broker_event(&shared.name, "disconnected");
        shared.metrics.backend_ready(&shared.name, false);
        shared
            .health
            .down(&format!("the MQTT connection was lost: {err}"));
    } else {
        shared
            .health
            .down(&format!("cannot connect to the MQTT broker: {err}"));
    }
    set_problem(shared, Some(format!("not connected: {err}")));
}

/// Connected and ready.
fn on_ready(shared: &Shared) {
    shared.connected.store(true, Ordering::SeqCst);
    shared.metrics.broker_event(&shared.name, "connected");
    shared.metrics.backend_ready(&shared.name, true);
}

/// The filters of the live subscriptions, placed again on every connect. Without a session
/// the broker forgot them; with one, a SUBSCRIBE sent just before the failure may never have
/// reached it (rumqttc does not resend those). Subscribing again is harmless.
fn live_filters(shared: &Shared) -> Vec<String> {
    shared
        .subs
        .lock()
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

/// The filters a live subscription or a last-value read still holds.
fn held_filters(shared: &Shared) -> std::collections::HashSet<String> {
    let mut held: std::collections::HashSet<String> = live_filters(shared).into_iter().collect();
    if let Ok(r) = shared.readers.lock() {
        held.extend(r.keys().cloned());
    }
    held
}

/// Polls the event loop for as long as the backend exists, settling publishes as the broker
/// acknowledges them and reconnecting with backoff when the connection fails.
async fn run(
    weak: std::sync::Weak<Shared>,
    eventloop: Loop,
    brokers: Brokers,
    min: Duration,
    max: Duration,
    inflight_limit: u16,
) {
    match eventloop {
        Loop::V5(l) => run_v5(weak, *l, brokers, min, max, inflight_limit).await,
        Loop::V311(l) => run_v311(weak, *l, brokers, min, max, inflight_limit).await,
    }
}

async fn run_v5(
    weak: std::sync::Weak<Shared>,
    mut eventloop: EventLoop,
    mut brokers: Brokers,
    min: Duration,
    max: Duration,
    inflight_limit: u16,
) {
    let mut backoff = crate::backoff::Backoff::new(min, max);
    loop {
        let event = eventloop.poll().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                brokers.connected = true;
                let broker_max = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .map_or(usize::MAX, |m| m as usize);
                shared.broker_max.store(broker_max, Ordering::SeqCst);
                let window = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.receive_max)
                    .unwrap_or(u16::MAX)
                    .min(inflight_limit) as usize;
                let first = first_resend(&eventloop.pending, held_v5);
                let again = on_connack(&shared, ack.session_present, window, first);
                let republished = again.len();
                for p in again.into_iter().rev() {
                    eventloop.pending.push_front(MqttRequest::Publish(p));
                }
                // Ready once the response topic is subscribed. Its SUBSCRIBE goes first of all
                // (ahead of resends and of subscribes left from before).
                eventloop.pending.push_front(MqttRequest::Subscribe(
                    rumqttc::v5::mqttbytes::v5::Subscribe::new(
                        rumqttc::v5::mqttbytes::v5::Filter::new(
                            shared.response_topic.clone(),
                            QoS::AtLeastOnce,
                        ),
                        None,
                    ),
                ));
                // Retained messages are only sent for a subscription that is new to the broker.
                // The filters are read before the asks are locked (subscribe locks `subs`, then
                // `asks`).
                let (live, wanted) = (live_filters(&shared), held_filters(&shared));
                let again = asks(&shared)
                    .reconnected(ack.session_present, true, live, |f| wanted.contains(f));
                for f in again {
                    let mut filter = rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce);
                    filter.retain_forward_rule =
                        rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe;
                    eventloop.pending.push_back(MqttRequest::Subscribe(
                        rumqttc::v5::mqttbytes::v5::Subscribe::new(filter, None),
                    ));
                }
                backoff.reset();
                tracing::debug!(backend = %shared.name, session_present = ack.session_present, republished, "MQTT connection established.");
                shared.health.up();
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => asks(&shared).written(pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let outcome = match ack.return_codes.first() {
                    Some(rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) => Ok(()),
                    other => Err(other.map_or("no reason code".into(), |c| format!("{c:?}"))),
                };
                let ok = outcome.is_ok();
                if on_suback(&shared, ack.pkid, outcome) != Some(Ask::ResponseTopic) {
                    continue;
                }
                shared.responses_ok.store(ok, Ordering::SeqCst);
                if ok {
                    set_problem(&shared, None);
                } else {
                    let why = format!(
                        "the broker refused the response topic `{}` ({:?}); request/response routes answer 503",
                        shared.response_topic,
                        ack.return_codes.first()
                    );
                    tracing::error!(backend = %shared.name, reason = %why, "MQTT response topic refused; allow the gateway to subscribe to it.");
                    set_problem(&shared, Some(why));
                }
                on_ready(&shared);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => on_outgoing_publish(&shared, pkid),
            Ok(Event::Incoming(Packet::Publish(p)))
                if p.topic.as_ref() == shared.response_topic.as_bytes() =>
            {
                let waiter = p
                    .properties
                    .as_ref()
                    .and_then(|pr| pr.correlation_data.clone())
                    .and_then(|c| shared.responses.lock().ok()?.remove(&c));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(p);
                    }
                    None => shared.metrics.broker_event(&shared.name, "reply_unmatched"),
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => deliver(&shared, p),
            Ok(Event::Incoming(Packet::PubAck(ack))) => on_ack(
                &shared,
                ack.pkid,
                false,
                match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    other => Err(Failure::Refused(format!("{other:?}"))),
                },
            ),
            Ok(Event::Incoming(Packet::PubRec(rec))) => on_pubrec(
                &shared,
                rec.pkid,
                match rec.reason {
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Ok(()),
                    other => Err(Failure::Refused(format!("{other:?}"))),
                },
            ),
            Ok(Event::Incoming(Packet::PubComp(comp))) => on_ack(
                &shared,
                comp.pkid,
                true,
                match comp.reason {
                    PubCompReason::Success => Ok(()),
                    other => Err(Failure::Refused(format!("{other:?}"))),
                },
            ),
            Ok(_) => {}
            Err(err) => {
                on_failure(&shared, &mut eventloop.pending, &err, held_v5);
                if let Some(next) = brokers.after_failure(&shared.name) {
                    eventloop.options = brokers.v5(next);
                }
                drop(shared);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// One 3.1.1 event other than a CONNACK.
fn on_event_311(shared: &Shared, ev: rumqttc::Event) {
    use rumqttc::{Event as E, Packet as P};
    match ev {
        E::Outgoing(Outgoing::Publish(pkid)) => on_outgoing_publish(shared, pkid),
        E::Incoming(P::Publish(p)) => deliver(shared, from311(p)),
        E::Incoming(P::PubAck(ack)) => on_ack(shared, ack.pkid, false, Ok(())),
        E::Incoming(P::PubRec(rec)) => on_pubrec(shared, rec.pkid, Ok(())),
        E::Incoming(P::PubComp(comp)) => on_ack(shared, comp.pkid, true, Ok(())),
        E::Outgoing(Outgoing::Subscribe(pkid)) => asks(shared).written(pkid),
        E::Incoming(P::SubAck(ack)) => {
            let outcome = match ack.return_codes.first() {
                Some(rumqttc::SubscribeReasonCode::Success(_)) => Ok(()),
                Some(rumqttc::SubscribeReasonCode::Failure) => Err("Failure (0x80)".into()),
                None => Err("no reason code".into()),
            };
            on_suback(shared, ack.pkid, outcome);
        }
        _ => {}
    }
}

/// A 3.1.1 publish as the MQTT 5 type the backend keeps (no properties).
fn from311(p: rumqttc::Publish) -> Publish {
    let mut out = Publish::new(p.topic, qos5(p.qos), p.payload, None);
    out.retain = p.retain;
    out.pkid = p.pkid;
    out.dup = p.dup;
    out
}

/// A publish the book keeps, for a 3.1.1 client (its properties stay behind).
fn to311(p: Publish) -> rumqttc::Publish {
    let mut out = rumqttc::Publish::new(
        String::from_utf8_lossy(&p.topic).into_owned(),
        qos311(p.qos),
        p.payload.to_vec(),
    );
    out.retain = p.retain;
    out
}

/// The MQTT 3.1.1 event loop: the same book, no properties, no response topic (3.1.1 has no
/// request/response), subscriptions placed again only when the broker lost the session.
async fn run_v311(
    weak: std::sync::Weak<Shared>,
    mut eventloop: rumqttc::EventLoop,
    mut brokers: Brokers,
    min: Duration,
    max: Duration,
    inflight_limit: u16,
) {
    use rumqttc::{Event as E, Packet as P, Request as R};
    let mut backoff = crate::backoff::Backoff::new(min, max);
    loop {
        let event = eventloop.poll().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        match event {
            Ok(E::Incoming(P::ConnAck(ack))) => {
                brokers.connected = true;
                // rumqttc 3.1.1 reports the CONNACK ahead of events it queued before the failure
                // (a stale `Outgoing::Publish` of a publish numbered just before it); the book
                // must see those first, as the MQTT 5 loop does.
                let stale: Vec<E> = eventloop.state.events.drain(..).collect();
                for ev in stale {
                    on_event_311(&shared, ev);
                }
                let first = first_resend(&eventloop.pending, held_v311);
                let again =
                    on_connack(&shared, ack.session_present, inflight_limit as usize, first);
                let republished = again.len();
                for p in again.into_iter().rev() {
                    eventloop.pending.push_front(R::Publish(to311(p)));
                }
                // Only a broker that forgot the session needs the subscriptions again: 3.1.1
                // cannot ask for retained messages only on new subscriptions, and placing them
                // again would resend every retained message to live clients. SUBSCRIBEs lost
                // with the connection go again either way.
                let live = if ack.session_present {
                    Vec::new()
                } else {
                    live_filters(&shared)
                };
                let wanted = held_filters(&shared);
                let again = asks(&shared)
                    .reconnected(ack.session_present, false, live, |f| wanted.contains(f));
                for f in again {
                    eventloop
                        .pending
                        .push_back(R::Subscribe(rumqttc::Subscribe::new(
                            f,
                            rumqttc::QoS::AtLeastOnce,
                        )));
                }
                set_problem(&shared, None);
                on_ready(&shared);
                backoff.reset();
                tracing::debug!(backend = %shared.name, session_present = ack.session_present, republished, protocol = "3.1.1", "MQTT connection established.");
                shared.health.up();
            }
            Ok(ev) => on_event_311(&shared, ev),
            Err(err) => {
                on_failure(&shared, &mut eventloop.pending, &err, held_v311);
                if let Some(next) = brokers.after_failure(&shared.name) {
                    eventloop.mqtt_options = brokers.v311(next);
                }
                drop(shared);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// A copy of a publish for resending (rumqttc assigns a fresh packet id to `pkid == 0`).
/// One route's service on top of a shared [`MqttBackend`].
#[derive(Clone)]
pub struct MqttRouteService {
    shared: Arc<Shared>,
    handle: MqttHandle,
    topic: Arc<ValueTemplate>,
    route: Arc<MqttRouteSpec>,
    headers: Arc<Vec<http::HeaderName>>,
    status: http::StatusCode,
    qos: QoS,
}

impl MqttRouteService {
    pub fn new(
        backend: &MqttBackend,
        _route: &RouteSpec,
        spec: &MqttRouteSpec,
    ) -> Result<Self, String> {
        Ok(MqttRouteService {
            shared: backend.shared.clone(),
            handle: backend.handle(),
            topic: Arc::new(ValueTemplate::parse(&spec.topic)?),
            headers: Arc::new(
                spec.headers
                    .iter()
                    .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
            ),
            status: http::StatusCode::from_u16(spec.status).map_err(|e| e.to_string())?,
            qos: match spec.qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            route: Arc::new(spec.clone()),
        })
    }

    /// The topic of a publish, or (`filter`) the filter of a subscription: request values
    /// follow the MQTT rules of [`Target`], `/` only where the route's `multi_level` says so.
    fn topic(&self, values: &RequestValues<'_>, filter: bool) -> Result<String, Problem> {
        let spans = &self.route.multi_level;
        let target = if filter {
            Target::MqttFilter { spans }
        } else {
            Target::MqttTopic { spans }
        };
        values.render(&self.topic, target)
    }

    fn publish(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<(String, Publish), Problem> {
        let values = RequestValues::new(parts, &body);
        let topic = self.topic(&values, false)?;
        let ctx = parts.extensions.get::<RequestContext>();
        let mut user = Vec::new();
        let message_id = parts
            .extensions
            .get::<crate::middleware::context::MessageId>()
            .map(|m| m.0.clone());
        if let Some(id) = &message_id {
            user.push(("message-id".to_string(), id.to_string()));
        }
        // The trace context (the publish span's, put in the request's headers by the caller).
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
                user.push((name.to_string(), v.to_string()));
            }
        }
        for name in self.headers.iter() {
            for v in parts.headers.get_all(name) {
                let v = v.to_str().map_err(|_| {
                    Problem::bad_request(format!(
                        "Header `{name}` must be visible ASCII to travel as a user property."
                    ))
                    .with_field(format!("header.{name}"))
                })?;
                user.push((name.as_str().to_string(), v.to_string()));
            }
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let textual = content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/") || c.contains("json") || c.contains("xml"))
            && std::str::from_utf8(&body).is_ok();
        let expiry = match self.route.message_expiry {
            Some(d) => Some(d.0.as_secs().clamp(1, u32::MAX as u64) as u32),
            None => parts
                .extensions
                .get::<Deadline>()
                .map(|d| d.remaining().as_secs().clamp(1, u32::MAX as u64) as u32),
        };
        let props = PublishProperties {
            payload_format_indicator: textual.then_some(1),
            message_expiry_interval: expiry,
            correlation_data: match &self.route.response {
                // Responses are matched on fresh data: two requests may share an X-Request-Id.
                Some(_) => Some(Bytes::copy_from_slice(uuid::Uuid::now_v7().as_bytes())),
                // An idempotency key (or a spooled message's id) lets subscribers spot repeats.
                None => match &message_id {
                    Some(id) => Some(Bytes::copy_from_slice(id.as_bytes())),
                    None => ctx.map(|c| Bytes::copy_from_slice(c.correlation_id.as_bytes())),
                },
            },
            response_topic: self
                .route
                .response
                .as_ref()
                .map(|_| self.shared.response_topic.clone()),
            user_properties: user,
            content_type,
            ..Default::default()
        };
        let mut publish = Publish::new(topic.clone(), self.qos, body, Some(props));
        publish.retain = self.route.retain;
        Ok((topic, publish))
    }

    /// A last-value read: subscribe to the topic, answer with the retained message the broker
    /// sends at once, unsubscribe. 404 when none comes within `wait`.
    async fn read_last_value(&self, parts: &http::request::Parts) -> Result<Response, BoxError> {
        let empty = Bytes::new();
        let topic = self.topic(&RequestValues::new(parts, &empty), true)?;
        self.handle.fits(&topic)?;
        if !self.shared.connected.load(Ordering::SeqCst) {
            return Err(self
                .handle
                .unavailable("not connected to the broker")
                .into());
        }
        let id = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .readers
            .lock()
            .map_err(|_| Problem::internal("the reader table is poisoned"))?
            .entry(topic.clone())
            .or_default()
            .push((id, tx));
        let leave = |shared: &Shared| {
            let last = shared.readers.lock().is_ok_and(|mut r| {
                if let Some(v) = r.get_mut(&topic) {
                    v.retain(|(i, _)| *i != id);
                    if v.is_empty() {
                        r.remove(&topic);
                    }
                }
                !r.contains_key(&topic)
            });
            // A live subscription on the same filter shares the broker's subscription.
            let streamed = shared.subs.lock().is_ok_and(|s| s.contains_key(&topic));
            if last && !streamed {
                let _ = shared.client.try_unsubscribe(topic.clone());
            }
        };
        let Some(mut grant) = self.shared.ask(&topic) else {
            leave(&self.shared);
            return Err(self
                .handle
                .unavailable("too many requests in flight")
                .into());
        };
        // The retained message, or the broker's refusal of the subscription.
        let refused = async {
            let seen = grant
                .wait_for(|g| matches!(g, Grant::Refused(_)))
                .await
                .map(|g| g.clone());
            match seen {
                Ok(g) => g,
                // Granted (or the backend went away): the message decides.
                Err(_) => std::future::pending().await,
            }
        };
        let got = tokio::time::timeout(self.route.wait.0, async {
            tokio::select! {
                p = rx => p.map_err(|_| Grant::Pending),
                g = refused => Err(g),
            }
        })
        .await;
        leave(&self.shared);
        let p = match got {
            Ok(Ok(p)) => p,
            Ok(Err(Grant::Refused(reason))) => {
                return Err(self.shared.refused(&topic, &reason).into());
            }
            _ => return Err(Problem::no_value(&topic).into()),
        };
        let ct = p
            .properties
            .as_ref()
            .and_then(|pr| pr.content_type.as_deref())
            .and_then(|c| HeaderValue::from_str(c).ok())
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        let mut r = http::Response::new(full_body(p.payload));
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
        if let Ok(v) = HeaderValue::from_str(&topic) {
            r.headers_mut().insert("mqtt-topic", v);
        }
        Ok(r)
    }

    /// A live subscription: the messages on the topic filter as Server-Sent Events until the
    /// client leaves. Clients on one filter share one broker subscription; a client that falls
    /// `buffer` messages behind gets a final `error` event and is disconnected, and the others
    /// never wait for it.
    async fn stream(&self, parts: &http::request::Parts) -> Result<Response, BoxError> {
        let empty = Bytes::new();
        let filter = self.topic(&RequestValues::new(parts, &empty), true)?;
        let sub = self.handle.subscribe(filter, self.route.buffer).await?;
        let state = SseState {
            sub,
            seq: 0,
            done: false,
            tick: tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(15),
                Duration::from_secs(15),
            ),
        };
        let events = futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let chunk = tokio::select! {
                r = st.sub.rx.recv() => match r {
                    Ok(p) => {
                        st.seq += 1;
                        sse_message(st.seq, &p)
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        st.done = true;
                        let data = serde_json::json!({ "error": "slow-consumer", "missed": missed,
                            "detail": "This client fell too far behind and was disconnected; reconnect to continue." });
                        sse_error(&data)
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        st.done = true;
                        sse_error(&serde_json::json!({ "error": "backend-gone" }))
                    }
                },
                _ = st.tick.tick() => Bytes::from_static(crate::server::sse::KEEP_ALIVE),
            };
            Some((Ok::<_, BodyError>(http_body::Frame::data(chunk)), st))
        });
        let mut r = http::Response::new(http_body_util::StreamBody::new(events).boxed_unsync());
        crate::server::sse::set_headers(r.headers_mut());
        Ok(r)
    }

    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        if self.route.subscribe {
            let (parts, _) = req.into_parts();
            return self.stream(&parts).await;
        }
        if self.route.last_value {
            let (parts, _) = req.into_parts();
            return self.read_last_value(&parts).await;
        }
        let (mut parts, body) = req.into_parts();
        let Some(span) = Trace::of(&parts.extensions).map(|t| t.publish("mqtt")) else {
            return self.publish_and_answer(parts, body, None).await;
        };
        span.inject_if_recorded(&mut parts.headers);
        let result = self.publish_and_answer(parts, body, Some(&span)).await;
        span.end_with(&result);
        result
    }

    /// One publish (and its response), in the producer span `span` whose context the message
    /// carries in its user properties.
    async fn publish_and_answer(
        self,
        parts: http::request::Parts,
        body: crate::Body,
        span: Option<&Trace>,
    ) -> Result<Response, BoxError> {
        let body = crate::collect_body(body).await?;
        // A packet over either side's limit would break the connection: refused before
        // anything else is done.
        let limit = self.handle.payload_limit();
        if body.len() > limit {
            return Err(Problem::payload_too_large(limit as u64).into());
        }
        let (mut topic, mut publish) = self.publish(&parts, body)?;
        // A script's `on_message` sees the message as made, and may change it.
        if let Some(hook) = parts
            .extensions
            .get::<crate::plugins::script::MessageHook>()
        {
            topic = scripted(hook, topic, &mut publish, limit)?;
        }
        let sent = crate::telemetry::access::enabled().then(std::time::Instant::now);
        if let Some(span) = span {
            span.published(&topic, || {
                let mut attrs = message_attributes(&publish);
                attrs.push(Attr::new("messaging.mqtt.qos", publish.qos as i64));
                attrs.push(Attr::new("messaging.mqtt.retain", publish.retain));
                attrs
            });
        }
        // A response waiter exists before the request can be answered.
        let response = match &self.route.response {
            Some(_) if !self.shared.responses_ok.load(Ordering::SeqCst) => {
                return Err(self
                    .handle
                    .unavailable("the broker refused the gateway's response topic")
                    .into());
            }
            Some(_) => {
                let cid = publish
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_data.clone())
                    .unwrap_or_default();
                let (tx, rx) = oneshot::channel();
                self.shared
                    .responses
                    .lock()
                    .map_err(|_| Problem::internal("the response table is poisoned"))?
                    .insert(cid.clone(), tx);
                Some((
                    rx,
                    Forget {
                        shared: &self.shared,
                        cid,
                    },
                ))
            }
            None => None,
        };
        let deadline = parts.extensions.get::<Deadline>().copied();
        let wait = deadline.map_or(Duration::from_secs(30), |d| d.remaining());
        self.handle.publish(publish, wait).await?;
        if let (Some((rx, _forget)), Some(spec)) = (response, &self.route.response) {
            // The publish span covers the publish; the wait for the response is the request's.
            if let Some(span) = span {
                span.end();
            }
            let wait = deadline.map_or(Duration::from_secs(30), |d| d.remaining());
            let p = match tokio::time::timeout(wait, rx).await {
                Ok(Ok(p)) => p,
                _ => {
                    return Err(Problem::timeout(deadline.map_or(wait, |d| d.total)).into());
                }
            };
            let mut p = p;
            // A script's `on_reply` sees the response before it becomes the answer.
            if let Some(hook) = parts
                .extensions
                .get::<crate::plugins::script::MessageHook>()
            {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let props = p.properties.get_or_insert_with(Default::default);
                let properties = property_texts(props, p.qos, p.retain);
                let m = hook.reply(crate::plugins::script::Message {
                    destination: topic,
                    exchange: String::new(),
                    headers: std::mem::take(&mut props.user_properties),
                    body: p.payload.clone(),
                    properties,
                    protocol: crate::plugins::script::Protocol::Mqtt,
                })?;
                props.user_properties = m.headers;
                p.payload = m.body;
            }
            if let Some(request) = Trace::of(&parts.extensions) {
                let sender = p.properties.as_ref().and_then(|props| {
                    let user = |name: &str| {
                        props
                            .user_properties
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.as_str())
                    };
                    crate::telemetry::otel::remote(user("traceparent")?, user("tracestate"))
                });
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                request.reply_received("mqtt", &topic, sender, || message_attributes(&p));
            }
            let mut r = response_answer(&self.shared.name, p, &spec.status_property)?;
            crate::telemetry::access::mark_upstream(&mut r, &self.shared.addr, sent);
            return Ok(r);
        }
        let json = serde_json::json!({
            "topic": topic,
            "qos": self.route.qos,
            "correlation_id": parts.extensions.get::<RequestContext>().map(|c| c.correlation_id.to_string()),
        });
        let mut r = http::Response::new(full_body(json.to_string()));
        *r.status_mut() = self.status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        crate::telemetry::access::mark_upstream(&mut r, &self.shared.addr, sent);
        Ok(r)
    }
}

/// One SSE client's state.
struct SseState {
    sub: Subscription,
    seq: u64,
    done: bool,
    tick: tokio::time::Interval,
}

/// Ends the broker subscription when its last client leaves.
struct SubGuard {
    shared: Arc<Shared>,
    filter: String,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        self.shared.metrics.stream(&self.shared.name, -1);
        let Ok(mut subs) = self.shared.subs.lock() else {
            return;
        };
        if subs
            .get(&self.filter)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            subs.remove(&self.filter);
            // A last-value read on the same filter shares the broker's subscription.
            let reading = self
                .shared
                .readers
                .lock()
                .is_ok_and(|r| r.contains_key(&self.filter));
            if !reading
                && self
                    .shared
                    .client
                    .try_unsubscribe(self.filter.clone())
                    .is_err()
            {
                // The request queue is full (a burst of clients leaving): unsubscribe once
                // there is room, unless a client subscribed to the filter again meanwhile.
                let (shared, filter) = (self.shared.clone(), self.filter.clone());
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let again = shared.subs.lock().is_ok_and(|s| s.contains_key(&filter));
                        if !again {
                            shared.client.unsubscribe(filter).await;
                        }
                    });
                }
            }
        }
    }
}

/// One message as an SSE event: its topic, and its payload as JSON when it is JSON, else text,
/// else base64.
fn sse_message(seq: u64, p: &Publish) -> Bytes {
    let data = message_json(p).to_string();
    crate::server::sse::Event {
        id: Some(seq),
        name: Some("message"),
        data: data.as_bytes(),
        retry_ms: None,
    }
    .to_bytes()
}

/// An `error` event that ends a subscription stream.
fn sse_error(data: &serde_json::Value) -> Bytes {
    let data = data.to_string();
    crate::server::sse::Event {
        name: Some("error"),
        data: data.as_bytes(),
        ..Default::default()
    }
    .to_bytes()
}

/// A message as JSON for clients: its topic, its payload as JSON when it is JSON, else text,
/// else base64, and which of these it is.
pub fn message_json(p: &Publish) -> serde_json::Value {
    let topic = String::from_utf8_lossy(&p.topic);
    let (payload, encoding) = match serde_json::from_slice::<serde_json::Value>(&p.payload) {
        Ok(v) => (v, "json"),
        Err(_) => match std::str::from_utf8(&p.payload) {
            Ok(t) => (serde_json::Value::String(t.to_string()), "text"),
            Err(_) => {
                use base64::Engine;
                (
                    base64::engine::general_purpose::STANDARD
                        .encode(&p.payload)
                        .into(),
                    "base64",
                )
            }
        },
    };
    serde_json::json!({
        "topic": topic,
        "payload": payload,
        "encoding": encoding,
        "retain": p.retain,
    })
}

/// Whether an MQTT topic filter (`+` one level, `#` the rest) matches a topic.
/// Whether `topic` matches the topic `filter`. Wildcards in the first level never match
/// topics that start with `$` (MQTT 4.7.2).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `filter` matches is also matched by `allowed` (both well-formed).
pub fn filter_covers(allowed: &str, filter: &str) -> bool {
    if filter.starts_with('$') && allowed.starts_with(['+', '#']) {
        return false;
    }
    let mut a = allowed.split('/');
    let mut f = filter.split('/');
    loop {
        match (a.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" && x != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Removes a response waiter when the request ends, answered or not.
struct Forget<'a> {
    shared: &'a Shared,
    cid: Bytes,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.shared.responses.lock() {
            r.remove(&self.cid);
        }
    }
}

/// The HTTP answer made of a response message: payload, content type, and the status in its
/// `status_property` user property (200 when absent; 502 when it is not a status 200–599).
/// The messaging attributes of an MQTT 5 message: its size, and its ids when it has them
/// (a `message-id` user property, correlation data as the conversation).
fn message_attributes(p: &Publish) -> Vec<Attr> {
    let mut attrs = vec![Attr::new(
        semconv::MESSAGING_MESSAGE_BODY_SIZE,
        p.payload.len() as i64,
    )];
    let Some(props) = &p.properties else {
        return attrs;
    };
    if let Some((_, id)) = props
        .user_properties
        .iter()
        .find(|(k, _)| k == "message-id")
    {
        attrs.push(Attr::new(semconv::MESSAGING_MESSAGE_ID, id.clone()));
    }
    if let Some(c) = &props.correlation_data {
        let c = match uuid::Uuid::from_slice(c) {
            Ok(u) => u.to_string(),
            Err(_) => String::from_utf8_lossy(c).into_owned(),
        };
        attrs.push(Attr::new(semconv::MESSAGING_MESSAGE_CONVERSATION_ID, c));
    }
    attrs
}

fn response_answer(backend: &str, p: Publish, status_property: &str) -> Result<Response, BoxError> {
    let props = p.properties.unwrap_or_default();
    let status = match props
        .user_properties
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(status_property))
    {
        None => http::StatusCode::OK,
        Some((_, v)) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (200..600).contains(n))
            .and_then(|n| http::StatusCode::from_u16(n).ok())
            .ok_or_else(|| {
                Problem::bad_gateway(
                    backend,
                    "the response's status property does not hold an HTTP status (200-599)",
                )
            })?,
    };
    let ct = props
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let mut r = http::Response::new(full_body(p.payload));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, ct);
    Ok(r)
}

super::route_service!(MqttRouteService);

#[cfg(test)]
mod filter_tests {
    use super::{filter_covers, filter_matches};

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("#", "x/y"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(filter_matches("a/b", "a/b"));
        assert!(!filter_matches("+/x", "$SYS/x"));
    }

    #[test]
    fn covering_filters() {
        assert!(filter_covers("a/#", "a/b/+"));
        assert!(filter_covers("a/#", "a/#"));
        assert!(filter_covers("a/+/c", "a/b/c"));
        assert!(filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/b/c", "a/+/c"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/+", "a/b/c"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(filter_covers("$SYS/#", "$SYS/broker"));
        assert!(!filter_covers("a/b", "a"));
    }
}
