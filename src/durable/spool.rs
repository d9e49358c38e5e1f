//! The spool (store-and-forward outbox) of routes with `spool: true`. Its layer sits in the
//! route's stack above the timeout, retry and breaker (see `middleware::stack`): when the
//! backend is unreachable or its breaker is open, the request is written to the local
//! database (fsynced, in group commits) and the client gets 202. One forwarder task per route
//! replays the spooled requests, oldest first, through the same inner stack once the backend
//! is back, so they get the same confirms and properties as a direct publish. Messages the
//! backend refuses for good go to the dead letters.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tower::ServiceExt;

use crate::config::SpoolSpec;
use crate::error::{Fault, Kind, Problem, classify};
use crate::middleware::context::{MessageId, RequestContext};
use crate::store::embedded::{LocalDb, unavailable};
use crate::store::{Ns, SharedStore, StoreError, now_ms};
use crate::telemetry::metrics::{Metrics, SpoolGauges};
use crate::telemetry::otel::{self, Attr, Trace, semconv};
use crate::{BoxError, Request, Response, RouteService, full_body};

/// Spooled requests: (route id, sequence) → encoded [`Spooled`] and body.
const SPOOL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("spool");

/// Most messages, and bytes, the forwarder reads and sends at once: a batch shares one read,
/// one ordered send (where the backend allows) and one delete (one fsync).
const BATCH: usize = 1024;
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Header on a 202 that says the request was spooled, not yet delivered.
pub const SPOOLED_HEADER: &str = "switchyard-spooled";

/// A spooled request: what is needed to replay it through the route's stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spooled {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub correlation_id: String,
    pub message_id: String,
    pub client: String,
    pub host: Option<String>,
    pub params: Vec<(String, String)>,
    /// When the client's request was accepted (ms since the epoch).
    pub accepted_ms: u64,
    /// What the request's plugins established, which its templates may read when it is sent
    /// later: the values a script set (`{ctx.…}`), the verified token's claims (`{claims.…}`)
    /// and the client certificate (`{cert.…}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ctx: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<crate::server::client_cert::ClientCert>,
}

impl Spooled {
    pub fn capture(parts: &http::request::Parts, message_id: &str) -> Spooled {
        let ctx = parts.extensions.get::<RequestContext>();
        Spooled {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            correlation_id: ctx
                .map(|c| c.correlation_id.to_string())
                .unwrap_or_default(),
            message_id: message_id.to_string(),
            client: ctx.map(|c| c.client_addr.to_string()).unwrap_or_default(),
            host: ctx.and_then(|c| c.host.clone()),
            params: ctx
                .map(|c| {
                    c.params
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            accepted_ms: now_ms(),
            ctx: parts
                .extensions
                .get::<crate::plugins::script::Values>()
                .map(|v| (*v.0).clone())
                .unwrap_or_default(),
            claims: parts
                .extensions
                .get::<crate::plugins::jwt::Claims>()
                .map(|c| (*c.0).clone()),
            cert: ctx.and_then(|c| c.client_cert.as_deref().cloned()),
        }
    }

    /// The stand-in request of a record that cannot be read (its raw bytes are the body).
    fn unreadable() -> Spooled {
        Spooled {
            method: String::new(),
            uri: String::new(),
            headers: Vec::new(),
            correlation_id: String::new(),
            message_id: String::new(),
            client: String::new(),
            host: None,
            params: Vec::new(),
            accepted_ms: now_ms(),
            ctx: BTreeMap::new(),
            claims: None,
            cert: None,
        }
    }

    /// The trace context of the captured request (its `traceparent`), when it had one.
    pub fn trace_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        let get = |name: &str| {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        crate::telemetry::otel::remote(get("traceparent")?, get("tracestate"))
    }

    /// [`Spooled::request`] sent later on the request's behalf, in `trace` (a span linked to
    /// the captured request): the backends see that span's context, not the request's.
    pub fn traced_request(
        &self,
        route: &Arc<str>,
        body: Bytes,
        trace: &Trace,
    ) -> Result<Request, String> {
        let mut req = self.request(route, body)?;
        trace.inject(req.headers_mut());
        req.extensions_mut().insert(trace.clone());
        Ok(req)
    }

    /// The request again, with its context, ready for the route's inner stack.
    pub fn request(&self, route: &Arc<str>, body: Bytes) -> Result<Request, String> {
        let mut req = http::Request::builder()
            .method(self.method.as_str())
            .uri(self.uri.as_str())
            .body(full_body(body))
            .map_err(|e| e.to_string())?;
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                req.headers_mut().append(n, v);
            }
        }
        let ext = req.extensions_mut();
        ext.insert(RequestContext {
            correlation_id: self.correlation_id.as_str().into(),
            client_addr: self
                .client
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            tls: false,
            host: self.host.clone(),
            route_id: route.clone(),
            client_cert: self.cert.clone().map(Arc::new),
            params: self
                .params
                .iter()
                .map(|(n, v)| (Arc::from(n.as_str()), v.clone()))
                .collect(),
        });
        ext.insert(MessageId(self.message_id.as_str().into()));
        if !self.ctx.is_empty() {
            ext.insert(crate::plugins::script::Values(Arc::new(self.ctx.clone())));
        }
        if let Some(c) = &self.claims {
            ext.insert(crate::plugins::jwt::Claims(Arc::new(c.clone())));
        }
        Ok(req)
    }

    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let head = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + head.len() + body.len());
        out.extend_from_slice(&(head.len() as u32).to_be_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(body);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<(Spooled, Bytes), StoreError> {
        let corrupt = || StoreError::Corrupt("spool record".into());
        let len = u32::from_be_bytes(
            raw.get(..4)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?,
        ) as usize;
        let head = raw.get(4..4 + len).ok_or_else(corrupt)?;
        let rec: Spooled = serde_json::from_slice(head).map_err(|_| corrupt())?;
        Ok((rec, Bytes::copy_from_slice(&raw[4 + len..])))
    }
}

/// A message that failed for good, as kept in the dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    /// `spool` or `webhook`.
    pub source: String,
    pub route: String,
    pub reason: String,
    pub attempts: u32,
    pub dead_ms: u64,
    pub request: Spooled,
    /// The body, base64.
    pub body: String,
}

/// What one route's spool holds, as the admin API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteSpoolStatus {
    pub messages: u64,
    pub bytes: u64,
    /// Seconds the oldest message has waited.
    pub oldest_age_seconds: f64,
    /// Whether a route with `spool: true` is loaded to forward them.
    pub forwarding: bool,
    /// Why the last forwarding attempt did not get through.
    pub last_error: Option<String>,
}

/// How a route's spooled requests are sent on: through the route's stack below the spool,
/// or, where the backend can keep order with several in flight, in ordered batches.
#[derive(Clone)]
pub struct Forwarding {
    pub service: RouteService,
    pub ordered: Option<Arc<dyn OrderedSend>>,
}

/// Sends requests in order with several in flight (AMQP: one channel, confirms awaited
/// together). One answer per request, in order.
#[async_trait::async_trait]
pub trait OrderedSend: Send + Sync {
    async fn send_ordered(&self, reqs: Vec<Request>) -> Vec<Result<(), BoxError>>;
}

#[derive(Default)]
struct Slot {
    service: Option<Forwarding>,
    notify: Arc<Notify>,
    messages: u64,
    bytes: u64,
    oldest_ms: Option<u64>,
    last_error: Option<String>,
    running: bool,
}

struct Append {
    route: Arc<str>,
    record: Vec<u8>,
    done: oneshot::Sender<Result<u64, StoreError>>,
}

/// Why a spool write was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool full")]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The spool of every route, in the local database.
pub struct Spool {
    local: LocalDb,
    spec: Mutex<SpoolSpec>,
    writer: mpsc::Sender<Append>,
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    totals: Mutex<(u64, u64)>,
    dead: Mutex<Option<(SharedStore, Duration)>>,
    metrics: Arc<Metrics>,
    /// The trace exporter of the serving table: each forward is a span linked to the request
    /// that was spooled.
    pub otel: crate::telemetry::otel::Current,
}

impl Spool {
    /// Opens the spool in `local`, counting what a previous run left in it. Forwarding starts
    /// when routes are installed.
    pub fn open(
        local: LocalDb,
        spec: SpoolSpec,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Spool>, StoreError> {
        let db = local.db.clone();
        let mut slots: HashMap<Arc<str>, Slot> = HashMap::new();
        let mut next = 0u64;
        {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(SPOOL).map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(SPOOL).map_err(unavailable)?;
            for entry in t.iter().map_err(unavailable)? {
                let (k, v) = entry.map_err(unavailable)?;
                let (route, seq) = k.value();
                next = next.max(seq + 1);
                let raw = v.value();
                let slot = slots.entry(route.into()).or_default();
                slot.messages += 1;
                slot.bytes += raw.len() as u64;
                if slot.oldest_ms.is_none() {
                    slot.oldest_ms = Spooled::decode(raw).ok().map(|(r, _)| r.accepted_ms);
                }
            }
        }
        let totals = slots
            .values()
            .fold((0, 0), |(m, b), s| (m + s.messages, b + s.bytes));
        if totals.0 > 0 {
            tracing::info!(
                messages = totals.0,
                bytes = totals.1,
                "The spool holds messages from an earlier run; they are forwarded once their routes load."
            );
        }
        let (tx, rx) = mpsc::channel(1024);
        let writer_db = db.clone();
        tokio::task::spawn_blocking(move || write_loop(writer_db, rx, next));
        Ok(Arc::new(Spool {
            local,
            spec: Mutex::new(spec),
            writer: tx,
            slots: Mutex::new(slots),
            totals: Mutex::new(totals),
            dead: Mutex::new(None),
            metrics,
            otel: Default::default(),
        }))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.local.path
    }

    pub fn set_spec(&self, spec: SpoolSpec) {
        if let Ok(mut s) = self.spec.lock() {
            *s = spec;
        }
    }

    fn spec(&self) -> SpoolSpec {
        self.spec.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Where dead letters go (the state store of the loaded config).
    pub fn set_dead_letters(&self, store: SharedStore, ttl: Duration) {
        if let Ok(mut d) = self.dead.lock() {
            *d = Some((store, ttl));
        }
    }

    /// Makes `service` (the route's stack below the spool layer, and maybe an ordered batch
    /// sender) the one that forwards the route's messages, and starts its forwarder. Called after a table is swapped in.
    pub fn install(self: &Arc<Self>, route: &Arc<str>, service: Forwarding) {
        let mut slots = self.slots.lock().expect("spool slots");
        let slot = slots.entry(route.clone()).or_default();
        slot.service = Some(service);
        slot.notify.notify_one();
        if !slot.running {
            slot.running = true;
            tokio::spawn(forward(
                Arc::downgrade(self),
                route.clone(),
                slot.notify.clone(),
            ));
        }
    }

    /// Forgets the services of routes not in `keep` (their messages wait for a route with
    /// their id to come back).
    pub fn retain_routes(&self, keep: &[Arc<str>]) {
        if let Ok(mut slots) = self.slots.lock() {
            for (id, slot) in slots.iter_mut() {
                if !keep.contains(id) {
                    slot.service = None;
                }
            }
        }
    }

    /// Whether the route has messages waiting (new ones queue behind them to keep order).
    pub fn holds(&self, route: &str) -> bool {
        self.slots
            .lock()
            .map(|s| s.get(route).is_some_and(|s| s.messages > 0))
            .unwrap_or(false)
    }

    /// Writes a request to the spool durably. Returns the route's depth after it. The write
    /// and its accounting run in a task of their own, so a client that goes away mid-write
    /// leaves the spool's counts right.
    pub async fn append(
        self: &Arc<Self>,
        route: &Arc<str>,
        rec: &Spooled,
        body: &[u8],
    ) -> Result<u64, SpoolError> {
        let record = rec.encode(body);
        let size = record.len() as u64;
        let spec = self.spec();
        {
            let mut t = self.totals.lock().expect("spool totals");
            if t.0 + 1 > spec.max_messages || t.1 + size > spec.max_bytes.0 {
                self.metrics.spool_event(route, "full");
                return Err(SpoolError::Full);
            }
            t.0 += 1;
            t.1 += size;
        }
        let (this, route, accepted) = (self.clone(), route.clone(), rec.accepted_ms);
        let task = tokio::spawn(async move {
            let (done, wait) = oneshot::channel();
            let append = Append {
                route: route.clone(),
                record,
                done,
            };
            let written = match this.writer.send(append).await {
                Ok(()) => wait.await.unwrap_or_else(|_| {
                    Err(StoreError::Unavailable("spool writer stopped".into()))
                }),
                Err(_) => Err(StoreError::Unavailable("spool writer stopped".into())),
            };
            if let Err(e) = written {
                let mut t = this.totals.lock().expect("spool totals");
                t.0 -= 1;
                t.1 -= size;
                return Err(SpoolError::Store(e));
            }
            this.metrics.spool_event(&route, "spooled");
            let mut slots = this.slots.lock().expect("spool slots");
            let slot = slots.entry(route.clone()).or_default();
            slot.messages += 1;
            slot.bytes += size;
            slot.oldest_ms.get_or_insert(accepted);
            slot.notify.notify_one();
            Ok(slot.messages)
        });
        task.await
            .unwrap_or_else(|e| Err(SpoolError::Store(StoreError::Unavailable(e.to_string()))))
    }

    /// The oldest messages of a route: at most `n`, and no more than `bytes` past the first.
    async fn peek(
        &self,
        route: &Arc<str>,
        n: usize,
        bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let route = route.clone();
        self.local
            .run(move |db: &Database| {
                let tx = db.begin_read().map_err(unavailable)?;
                let t = tx.open_table(SPOOL).map_err(unavailable)?;
                let (mut out, mut size) = (Vec::new(), 0usize);
                for entry in t
                    .range((route.as_ref(), 0u64)..=(route.as_ref(), u64::MAX))
                    .map_err(unavailable)?
                {
                    let (k, v) = entry.map_err(unavailable)?;
                    let v = v.value();
                    if !out.is_empty() && size + v.len() > bytes {
                        break;
                    }
                    size += v.len();
                    out.push((k.value().1, v.to_vec()));
                    if out.len() >= n {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }

    /// Deletes forwarded (or dead-lettered) messages, in one transaction. On failure, hands
    /// the list back.
    async fn remove(
        &self,
        route: &Arc<str>,
        done: Vec<(u64, u64)>,
    ) -> Result<(), (StoreError, Vec<(u64, u64)>)> {
        if done.is_empty() {
            return Ok(());
        }
        let r = route.clone();
        let seqs: Vec<u64> = done.iter().map(|(s, _)| *s).collect();
        // What was really there is what the counters lose.
        let removed = self
            .local
            .run(move |db: &Database| {
                let tx = db.begin_write().map_err(unavailable)?;
                let (mut n, mut bytes) = (0u64, 0u64);
                {
                    let mut t = tx.open_table(SPOOL).map_err(unavailable)?;
                    for s in seqs {
                        if let Some(v) = t.remove((r.as_ref(), s)).map_err(unavailable)? {
                            n += 1;
                            bytes += v.value().len() as u64;
                        }
                    }
                }
                tx.commit().map_err(unavailable)?;
                Ok((n, bytes))
            })
            .await;
        let (n, bytes) = match removed {
            Ok(x) => x,
            Err(e) => return Err((e, done)),
        };
        if let Ok(mut t) = self.totals.lock() {
            t.0 = t.0.saturating_sub(n);
            t.1 = t.1.saturating_sub(bytes);
        }
        if let Ok(mut slots) = self.slots.lock()
            && let Some(slot) = slots.get_mut(route)
        {
            slot.messages = slot.messages.saturating_sub(n);
            slot.bytes = slot.bytes.saturating_sub(bytes);
            if slot.messages == 0 {
                slot.oldest_ms = None;
            }
        }
        Ok(())
    }

    fn note(&self, route: &Arc<str>, f: impl FnOnce(&mut Slot)) {
        if let Ok(mut slots) = self.slots.lock()
            && let Some(slot) = slots.get_mut(route)
        {
            f(slot);
        }
    }

    /// Per route: what waits, for the admin API; also refreshes the exported gauges.
    pub fn status(&self) -> Vec<(Arc<str>, RouteSpoolStatus)> {
        let now = now_ms();
        let slots = self.slots.lock().expect("spool slots");
        let mut out: Vec<_> = slots
            .iter()
            .map(|(id, s)| {
                let age = s
                    .oldest_ms
                    .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1000.0);
                self.metrics.spool(
                    id,
                    SpoolGauges {
                        messages: s.messages,
                        bytes: s.bytes,
                        age,
                    },
                );
                (
                    id.clone(),
                    RouteSpoolStatus {
                        messages: s.messages,
                        bytes: s.bytes,
                        oldest_age_seconds: age,
                        forwarding: s.service.is_some(),
                        last_error: s.last_error.clone(),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn dead_letter(
        &self,
        route: &Arc<str>,
        rec: Spooled,
        body: &[u8],
        reason: String,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let Some((store, ttl)) = self.dead.lock().ok().and_then(|d| d.clone()) else {
            return Err(StoreError::Unavailable("no dead-letter store".into()));
        };
        let dl = DeadLetter {
            id: uuid::Uuid::now_v7().to_string(),
            source: "spool".into(),
            route: route.to_string(),
            reason,
            attempts,
            dead_ms: now_ms(),
            request: rec,
            body: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, body),
        };
        put_dead_letter(&store, ttl, &dl).await?;
        self.metrics.spool_event(route, "dead_lettered");
        tracing::warn!(route = %route, dead_letter = %dl.id, reason = %dl.reason, attempts, "A spooled message was moved to the dead letters.");
        Ok(())
    }
}

/// Writes a dead letter to the store.
pub async fn put_dead_letter(
    store: &SharedStore,
    ttl: Duration,
    dl: &DeadLetter,
) -> Result<(), StoreError> {
    let value = serde_json::to_vec(dl).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put(Ns::DeadLetters, &dl.id, &value, ttl).await
}

/// Appends in group commits: every append waiting when a transaction starts shares its fsync.
fn write_loop(db: Arc<Database>, mut rx: mpsc::Receiver<Append>, mut next: u64) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let start = next;
        let result = (|| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(SPOOL).map_err(unavailable)?;
                for (i, a) in batch.iter().enumerate() {
                    t.insert((a.route.as_ref(), start + i as u64), a.record.as_slice())
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })();
        if result.is_ok() {
            next += batch.len() as u64;
        }
        for (i, a) in batch.into_iter().enumerate() {
            let r = match &result {
                Ok(()) => Ok(start + i as u64),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            };
            let _ = a.done.send(r);
        }
    }
}

/// How a forwarding attempt ended.
enum Outcome {
    Delivered,
    /// The backend is (still) down: wait and try the same message again.
    Down(String),
    /// The backend refused this message; `permanent` ones are dead-lettered at once.
    Refused {
        reason: String,
        permanent: bool,
    },
}

fn judge(result: Result<Response, BoxError>) -> Outcome {
    match result {
        Ok(resp) if resp.status().is_success() => Outcome::Delivered,
        Ok(resp) => Outcome::Refused {
            reason: format!("the backend answered {}", resp.status()),
            permanent: resp.status().is_client_error(),
        },
        Err(e) => {
            let c = classify(e.as_ref());
            let reason = c
                .raised()
                .map(|p| p.detail.clone())
                .unwrap_or_else(|| crate::server::dispatch::error_chain(e.as_ref()));
            match c.kind {
                // The broker refused this message: counted, so that one it always refuses
                // ends in the dead letters instead of blocking the route.
                Kind::BACKEND_UNAVAILABLE if c.reason == Some(crate::error::REFUSED_BY_BROKER) => {
                    Outcome::Refused {
                        reason: crate::error::REFUSED_BY_BROKER.to_string(),
                        permanent: false,
                    }
                }
                Kind::BACKEND_UNAVAILABLE
                | Kind::CIRCUIT_OPEN
                | Kind::OVERLOADED
                | Kind::TIMEOUT
                | Kind::UNCONFIRMED => Outcome::Down(reason),
                _ if c.status == StatusCode::GATEWAY_TIMEOUT => Outcome::Down(reason),
                _ => Outcome::Refused {
                    reason,
                    permanent: c.fault == Fault::Client,
                },
            }
        }
    }
}

/// Clears a route's `running` mark when its forwarder ends, however it ends (a panic in the
/// backend's future included), so that the next install starts a new one.
struct Running {
    spool: Weak<Spool>,
    route: Arc<str>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(sp) = self.spool.upgrade() {
            sp.note(&self.route, |s| s.running = false);
        }
    }
}

/// One route's forwarder: replays its messages in order through the installed service.
async fn forward(spool: Weak<Spool>, route: Arc<str>, notify: Arc<Notify>) {
    let _running = Running {
        spool: spool.clone(),
        route: route.clone(),
    };
    // The wait before the next round, and the failed rounds in a row it counts.
    let mut backoff: Option<Duration> = None;
    let mut failed: u32 = 0;
    let mut refusals: (u64, u32) = (u64::MAX, 0);
    // After an ordered batch broke, its messages go one at a time, so that each failure is
    // blamed on the message that caused it.
    let mut careful_until: Option<u64> = None;
    // Delivered (or dead-lettered) but not yet deleted: never sent again while they wait.
    let mut done: Vec<(u64, u64)> = Vec::new();
    loop {
        if let Some(wait) = backoff {
            // New messages do not cut a backoff short: the backend is down for them too.
            tokio::time::sleep(wait).await;
        }
        let Some(sp) = spool.upgrade() else { return };
        let spec = sp.spec();
        let pace = crate::backoff::Backoff::new(spec.retry.min.0, spec.retry.max.0);
        let next_backoff = |failed: &mut u32| {
            *failed += 1;
            Some(pace.nth(*failed))
        };
        if !done.is_empty() {
            match sp.remove(&route, std::mem::take(&mut done)).await {
                Ok(()) => {}
                Err((e, left)) => {
                    tracing::error!(route = %route, error = %e, "Removing forwarded messages from the spool failed; they are kept from being sent again.");
                    done = left;
                    backoff = next_backoff(&mut failed);
                    continue;
                }
            }
        }
        let service = sp
            .slots
            .lock()
            .ok()
            .and_then(|s| s.get(&route).and_then(|s| s.service.clone()));
        // The database, not the counters, says what waits.
        let batch = match &service {
            Some(_) => sp.peek(&route, BATCH, BATCH_BYTES).await,
            None => Ok(Vec::new()),
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(route = %route, error = %e, "Reading the spool failed.");
                backoff = next_backoff(&mut failed);
                continue;
            }
        };
        let Some(service) = service.filter(|_| !batch.is_empty()) else {
            drop(sp);
            // Idle: wake on a new message or install, and now and then to notice a drop.
            let _ = tokio::time::timeout(Duration::from_secs(5), notify.notified()).await;
            (backoff, failed) = (None, 0);
            continue;
        };
        let mut stalled = None;
        // Decoded first: a batch that reads cleanly may go out in one ordered send.
        let mut records = Vec::with_capacity(batch.len());
        for (seq, raw) in batch {
            let size = raw.len() as u64;
            match Spooled::decode(&raw) {
                Ok((rec, body)) => records.push((seq, size, rec, body)),
                Err(e) => {
                    if !records.is_empty() {
                        break; // the readable ones first; this one heads the next batch
                    }
                    // Kept, not dropped: the raw record goes to the dead letters.
                    let reason = format!("the spool record cannot be read: {e}");
                    match sp
                        .dead_letter(&route, Spooled::unreadable(), &raw, reason, 0)
                        .await
                    {
                        Ok(()) => done.push((seq, size)),
                        Err(e) => {
                            stalled = Some(format!(
                                "an unreadable record could not be dead-lettered: {e}"
                            ));
                        }
                    }
                    break;
                }
            }
        }
        let careful = careful_until
            .zip(records.first())
            .is_some_and(|(c, (first, ..))| *first <= c);
        // The forward spans of a batch sent in order, ended with their outcomes below.
        let mut traces: Vec<Trace> = Vec::new();
        let outcomes: Vec<Outcome> = match &service.ordered {
            Some(ordered) if records.len() > 1 && !careful => {
                let mut reqs = Vec::with_capacity(records.len());
                let mut bad = None;
                for (i, (_, _, rec, body)) in records.iter().enumerate() {
                    let trace = forward_trace(&sp, &route, rec);
                    match rec.traced_request(&route, body.clone(), &trace) {
                        Ok(r) => {
                            reqs.push(r);
                            traces.push(trace);
                        }
                        Err(_) => {
                            bad = Some(i);
                            break;
                        }
                    }
                }
                // A request that cannot be rebuilt ends the batch before it.
                if let Some(i) = bad {
                    records.truncate(i.max(1));
                    reqs.truncate(records.len());
                }
                if reqs.len() == records.len() {
                    if let Some((_, _, rec, _)) = records.first() {
                        sp.note(&route, |s| s.oldest_ms = Some(rec.accepted_ms));
                    }
                    let (n, started) = (reqs.len(), std::time::Instant::now());
                    let answers = ordered.send_ordered(reqs).await;
                    tracing::debug!(route = %route, messages = n, took = ?started.elapsed(), "Spool batch sent.");
                    let outcomes: Vec<Outcome> = answers
                        .into_iter()
                        .map(|r| judge(r.map(|()| http::Response::new(crate::empty_body()))))
                        .collect();
                    if outcomes.iter().any(|o| matches!(o, Outcome::Down(_))) {
                        careful_until = records.last().map(|(seq, ..)| *seq);
                    }
                    outcomes
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        let mut outcomes = outcomes.into_iter().zip(traces);
        for (seq, size, rec, body) in records {
            sp.note(&route, |s| s.oldest_ms = Some(rec.accepted_ms));
            let (outcome, trace) = match outcomes.next() {
                Some(o) => o,
                None => {
                    let trace = forward_trace(&sp, &route, &rec);
                    let outcome = match rec.traced_request(&route, body.clone(), &trace) {
                        Ok(req) => judge(service.service.clone().oneshot(req).await),
                        Err(reason) => Outcome::Refused {
                            reason,
                            permanent: true,
                        },
                    };
                    (outcome, trace)
                }
            };
            match &outcome {
                Outcome::Delivered => {}
                Outcome::Down(reason) => trace.fail("backend-unavailable", reason.clone()),
                Outcome::Refused { reason, .. } => trace.fail("refused", reason.clone()),
            }
            trace.end();
            match outcome {
                Outcome::Delivered => {
                    sp.metrics.spool_event(&route, "forwarded");
                    done.push((seq, size));
                }
                Outcome::Down(reason) => {
                    stalled = Some(reason);
                    break;
                }
                Outcome::Refused { reason, permanent } => {
                    let attempts = if refusals.0 == seq { refusals.1 + 1 } else { 1 };
                    refusals = (seq, attempts);
                    if permanent || attempts >= spec.max_attempts {
                        match sp
                            .dead_letter(&route, rec, &body, reason.clone(), attempts)
                            .await
                        {
                            Ok(()) => done.push((seq, size)),
                            Err(e) => {
                                stalled = Some(format!(
                                    "{reason}; and the dead-letter store failed: {e}"
                                ));
                                break;
                            }
                        }
                    } else {
                        stalled = Some(reason);
                        break;
                    }
                }
            }
        }
        let progressed = !done.is_empty();
        let started = std::time::Instant::now();
        let removed = sp.remove(&route, std::mem::take(&mut done)).await;
        tracing::debug!(route = %route, took = ?started.elapsed(), "Spool batch removed.");
        if let Err((e, left)) = removed {
            tracing::error!(route = %route, error = %e, "Removing forwarded messages from the spool failed; they are kept from being sent again.");
            done = left;
            stalled.get_or_insert_with(|| e.to_string());
        }
        match stalled {
            Some(reason) => {
                tracing::debug!(route = %route, %reason, "Forwarding from the spool paused.");
                sp.note(&route, |s| s.last_error = Some(reason));
                // A round that got messages through starts the wait over.
                if progressed {
                    failed = 0;
                }
                backoff = next_backoff(&mut failed);
            }
            None => {
                sp.note(&route, |s| s.last_error = None);
                (backoff, failed) = (None, 0);
            }
        }
    }
}

/// The span of one forward of a spooled message: a new trace, linked to the request that was
/// spooled; the backend's span is its child.
fn forward_trace(sp: &Spool, route: &Arc<str>, rec: &Spooled) -> Trace {
    Trace::linked(
        sp.otel.get().as_ref(),
        format!("forward {route}"),
        otel::Kind::Consumer,
        rec.trace_context(),
        || {
            vec![
                Attr::new("switchyard.route", route.to_string()),
                Attr::new(semconv::MESSAGING_MESSAGE_ID, rec.message_id.clone()),
                Attr::new(semconv::MESSAGING_OPERATION_TYPE, "process"),
                Attr::new(semconv::MESSAGING_OPERATION_NAME, "forward"),
            ]
        },
    )
}

/// The spool layer of one route (see the module docs).
#[derive(Clone)]
pub struct SpoolService {
    inner: RouteService,
    spool: Arc<Spool>,
    route: Arc<str>,
    backend: Arc<str>,
}

impl SpoolService {
    pub fn new(inner: RouteService, spool: Arc<Spool>, route: Arc<str>, backend: String) -> Self {
        SpoolService {
            inner,
            spool,
            route,
            backend: backend.into(),
        }
    }
}

crate::backends::route_service!(SpoolService);

impl SpoolService {
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let this = self;
        let (mut parts, body) = req.into_parts();
        let body = crate::collect_body(body).await?;
        let message_id = match parts.extensions.get::<MessageId>() {
            Some(m) => m.0.clone(),
            None => {
                let id: Arc<str> = uuid::Uuid::now_v7().to_string().into();
                parts.extensions.insert(MessageId(id.clone()));
                id
            }
        };
        let record = Spooled::capture(&parts, &message_id);
        let trace = Trace::of(&parts.extensions).cloned();
        // Behind messages already waiting, a new one waits too: order is kept per route.
        if !this.spool.holds(&this.route) {
            let req = http::Request::from_parts(parts, full_body(body.clone()));
            let err = match this.inner.clone().oneshot(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let down = matches!(
                classify(err.as_ref()).kind,
                Kind::BACKEND_UNAVAILABLE | Kind::CIRCUIT_OPEN
            );
            if !down {
                return Err(err);
            }
        }
        let depth = match this.spool.append(&this.route, &record, &body).await {
            Ok(d) => d,
            Err(SpoolError::Full) => {
                return Err(Problem::spool_full(&this.route).into());
            }
            Err(SpoolError::Store(e)) => {
                tracing::warn!(route = %this.route, error = %e, "Writing to the spool failed.");
                return Err(Problem::store_unavailable(e).into());
            }
        };
        if let Some(t) = &trace {
            t.event("spooled", || {
                vec![
                    Attr::new(semconv::MESSAGING_MESSAGE_ID, message_id.to_string()),
                    Attr::new("switchyard.spool.depth", depth as i64),
                ]
            });
        }
        let body = serde_json::json!({
            "status": "spooled",
            "detail": format!("Backend '{}' is unavailable; the message is kept and will be delivered in order once it is back.", this.backend),
            "message_id": &*message_id,
            "queued": depth,
        });
        let mut resp = http::Response::new(full_body(body.to_string()));
        *resp.status_mut() = StatusCode::ACCEPTED;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(SPOOLED_HEADER, HeaderValue::from_static("true"));
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> crate::server::client_cert::ClientCert {
        crate::server::client_cert::ClientCert {
            subject: "CN=svc-a,O=Acme".into(),
            attributes: vec![("CN".into(), "svc-a".into())],
            dns: vec!["svc-a.internal".into()],
            uri: Vec::new(),
            email: Vec::new(),
            ip: Vec::new(),
            hash: "ab".repeat(32),
            xfcc: None,
        }
    }

    /// What the plugins established comes back with the request rebuilt from a record.
    #[test]
    fn a_record_keeps_the_script_values_the_claims_and_the_certificate() {
        let mut req = http::Request::builder()
            .method("POST")
            .uri("/orders/7")
            .header("x-tenant", "acme")
            .body(())
            .unwrap();
        let ctx = BTreeMap::from([("tenant".to_string(), "acme".to_string())]);
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"sub":"u1","org":{"id":7}}"#).unwrap();
        let ext = req.extensions_mut();
        ext.insert(crate::plugins::script::Values(Arc::new(ctx.clone())));
        ext.insert(crate::plugins::jwt::Claims(Arc::new(claims.clone())));
        ext.insert(RequestContext {
            correlation_id: "c1".into(),
            client_addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
            tls: true,
            host: None,
            route_id: "orders".into(),
            client_cert: Some(Arc::new(cert())),
            params: Vec::new(),
        });
        let (parts, ()) = req.into_parts();
        let raw = Spooled::capture(&parts, "m1").encode(b"{}");
        let (rec, body) = Spooled::decode(&raw).unwrap();
        assert_eq!(&body[..], b"{}");
        let back = rec.request(&Arc::from("orders"), body).unwrap();
        let ext = back.extensions();
        assert_eq!(*ext.get::<crate::plugins::script::Values>().unwrap().0, ctx);
        assert_eq!(*ext.get::<crate::plugins::jwt::Claims>().unwrap().0, claims);
        let c = ext
            .get::<RequestContext>()
            .unwrap()
            .client_cert
            .clone()
            .unwrap();
        assert_eq!(
            (c.cn(), c.hash.as_str()),
            (Some("svc-a"), cert().hash.as_str())
        );
    }

    /// Records written before these fields existed still read, with none of them.
    #[test]
    fn a_record_without_the_plugins_facts_still_reads() {
        let head = br#"{"method":"POST","uri":"/o","headers":[],"correlation_id":"c","message_id":"m","client":"127.0.0.1:1","host":null,"params":[],"accepted_ms":1}"#;
        let mut raw = (head.len() as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(head);
        raw.extend_from_slice(b"body");
        let (rec, body) = Spooled::decode(&raw).unwrap();
        assert_eq!(&body[..], b"body");
        assert!(rec.ctx.is_empty() && rec.claims.is_none() && rec.cert.is_none());
        let back = rec.request(&Arc::from("o"), body).unwrap();
        assert!(
            back.extensions()
                .get::<crate::plugins::script::Values>()
                .is_none()
        );
    }
}
