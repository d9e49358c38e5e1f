//! The state store behind the asynchronous patterns (idempotency records, jobs, dead letters):
//! one trait, [`Store`], with an embedded implementation on local disk ([`embedded`], the
//! default) and a Redis one ([`redis`]) for replicas that share state. Layers on the request
//! path call it before they answer; nothing here sits on a route without `idempotency`,
//! `mode: async` or `spool`.
//!
//! The trait is a small keyed record store with expiry, split into namespaces. Every write
//! has reached durable storage (fsync for the embedded store; the Redis server's reply for
//! Redis) when its future resolves, so a 2xx given after it is honest.

pub mod embedded;
pub mod redis;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A namespace of records. Keys are unique within one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ns {
    /// Idempotency records, keyed by route and key.
    Idempotency,
    /// Jobs of `mode: async` routes, keyed by job id.
    Jobs,
    /// Dead letters, keyed by a time-ordered id.
    DeadLetters,
    /// Jobs with work outstanding (a run or a webhook), keyed by job id; listed by recovery.
    PendingJobs,
    /// Who holds a piece of work now (a job's run, a dead letter's replay), keyed by what is
    /// held; expires if that gateway dies.
    Leases,
    /// Cluster-wide rate limits (`rate_limit.scope: cluster`): each bucket's theoretical
    /// arrival time, keyed by route and bucket.
    Rates,
}

impl Ns {
    pub fn as_str(self) -> &'static str {
        match self {
            Ns::Idempotency => "idem",
            Ns::Jobs => "job",
            Ns::DeadLetters => "dead",
            Ns::PendingJobs => "pending",
            Ns::Leases => "lease",
            Ns::Rates => "rate",
        }
    }

    /// Whether [`Store::list`] works on the namespace (Redis keeps an index only for these).
    pub fn listed(self) -> bool {
        matches!(self, Ns::DeadLetters | Ns::PendingJobs)
    }
}

/// The store could not do what was asked: the caller must not acknowledge the work.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the write (Redis down, disk full).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A record could not be read back (written by an incompatible version).
    #[error("state store record is corrupt: {0}")]
    Corrupt(String),
}

/// A keyed record store with expiry. Values are opaque bytes (the callers write JSON).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `embedded` or `redis`, for the admin API and logs.
    fn kind(&self) -> &'static str;

    /// Writes `value` under `key` unless a live record is there. Returns `None` when written,
    /// or the record that was there (which is left as it is). Two racing callers never both
    /// get `None`.
    async fn insert(
        &self,
        ns: Ns,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `value` under `key`, replacing any record, live for `ttl`.
    async fn put(&self, ns: Ns, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError>;

    /// The live record under `key`.
    async fn get(&self, ns: Ns, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Replaces the live record under `key` with `new` (or deletes it, when `new` is `None`)
    /// only if it still holds exactly `expected`; whether it did. Lets a claim's owner finish
    /// or release it without touching a claim someone else took after it expired.
    async fn swap(
        &self,
        ns: Ns,
        key: &str,
        expected: &[u8],
        new: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Removes the record under `key`; whether one was there.
    async fn delete(&self, ns: Ns, key: &str) -> Result<bool, StoreError>;

    /// Up to `limit` live records with keys greater than `after`, in key order. Only for
    /// namespaces that are [`Ns::listed`].
    async fn list(
        &self,
        ns: Ns,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Takes one request from the shared bucket `key` (GCRA: one request per `emission`, up
    /// to `burst` at once), by the store's one clock, so that every replica counts in the same
    /// bucket. Only a shared store keeps such buckets.
    async fn take_rate(
        &self,
        key: &str,
        emission: Duration,
        burst: u32,
    ) -> Result<RateTaken, StoreError> {
        let _ = (key, emission, burst);
        Err(StoreError::Unavailable(format!(
            "the {} store keeps no shared rate limits",
            self.kind()
        )))
    }
}

/// What a shared bucket said: a request let through (with what is left of the burst), or
/// refused (with how long until one would be let through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateTaken {
    Allowed { remaining: u32 },
    Refused { wait: Duration },
}

pub type SharedStore = Arc<dyn Store>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The embedded store keeps an absolute expiry; a zero TTL would mean "already gone", so the
/// shortest TTL is one millisecond.
pub(crate) fn expiry(ttl: Duration) -> u64 {
    now_ms().saturating_add((ttl.as_millis() as u64).max(1))
}

/// The state of a loaded config: the store, the local database and the spool. Kept across
/// reloads: the database file stays open while its path is unchanged, and the store while its
/// settings are.
pub struct State {
    pub spec: crate::config::StateSpec,
    /// The resolved path of the local database.
    pub path: std::path::PathBuf,
    pub store: SharedStore,
    pub local: embedded::LocalDb,
    pub spool: Arc<crate::durable::spool::Spool>,
    pub jobs: Arc<crate::durable::jobs::Jobs>,
}

impl State {
    /// Opens what `spec` names, reusing `previous` where it matches. `base` resolves a
    /// relative path. `dry` (for `switchyard validate`) opens an in-memory database instead,
    /// so that checking a config never touches a running gateway's files.
    pub fn build(
        spec: &crate::config::StateSpec,
        base: &std::path::Path,
        previous: Option<&Arc<State>>,
        metrics: &Arc<crate::telemetry::metrics::Metrics>,
        dry: bool,
    ) -> Result<Arc<State>, StoreError> {
        let path = if spec.path.is_absolute() {
            spec.path.clone()
        } else {
            base.join(&spec.path)
        };
        // Compared as the file it names, so `./x` and `x`, or a symlink, are one file (redb
        // refuses to open a file twice).
        let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
        let reuse = previous.filter(|p| p.path == canonical(&path));
        let (local, spool, jobs) = match reuse {
            Some(p) => (p.local.clone(), p.spool.clone(), Some(p.jobs.clone())),
            None => {
                let local = if dry {
                    embedded::LocalDb::in_memory()?
                } else {
                    embedded::LocalDb::open(&path)?
                };
                let spool = crate::durable::spool::Spool::open(
                    local.clone(),
                    spec.spool.clone(),
                    metrics.clone(),
                )?;
                (local, spool, None)
            }
        };
        let store: SharedStore = match (reuse, spec.store) {
            (Some(p), crate::config::StoreKind::Embedded)
                if p.spec.store == crate::config::StoreKind::Embedded =>
            {
                p.store.clone()
            }
            (Some(p), crate::config::StoreKind::Redis)
                if p.spec.store == crate::config::StoreKind::Redis
                    && p.spec.redis == spec.redis =>
            {
                p.store.clone()
            }
            (_, crate::config::StoreKind::Embedded) => Arc::new(embedded::EmbeddedStore::new(
                local.clone(),
                Duration::from_secs(60),
            )),
            (_, crate::config::StoreKind::Redis) => Arc::new(redis::RedisStore::new(&spec.redis)?),
        };
        let jobs = match jobs {
            Some(j) => j,
            None => crate::durable::jobs::Jobs::new(
                store.clone(),
                spec.jobs.clone(),
                spec.dead_letter_ttl.0,
            ),
        };
        Ok(Arc::new(State {
            spec: spec.clone(),
            path: canonical(&path),
            store,
            local,
            spool,
            jobs,
        }))
    }
}

impl State {
    /// Points the shared spool and jobs at this config's store and settings. Called when the
    /// table that holds this state starts serving, never for a reload that is rejected.
    pub fn apply(&self) {
        self.spool.set_spec(self.spec.spool.clone());
        self.spool
            .set_dead_letters(self.store.clone(), self.spec.dead_letter_ttl.0);
        self.jobs.configure(
            self.store.clone(),
            self.spec.jobs.clone(),
            self.spec.dead_letter_ttl.0,
        );
    }
}

/// An answer kept for later (an idempotent replay, a job's result): status, headers (without
/// the per-connection ones) and body.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Base64.
    pub body: String,
}

/// Headers never stored: per-connection ones, and those recomputed on the way out.
fn kept(name: &http::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
            | "content-length"
            | "date"
    )
}

impl StoredResponse {
    pub fn new(head: &http::response::Parts, body: &[u8]) -> StoredResponse {
        StoredResponse {
            status: head.status.as_u16(),
            headers: head
                .headers
                .iter()
                .filter(|(n, _)| kept(n))
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, body),
        }
    }

    pub fn body(&self) -> Result<Vec<u8>, StoreError> {
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &self.body)
            .map_err(|_| StoreError::Corrupt("stored body".into()))
    }

    /// The answer again.
    pub fn response(&self) -> Result<crate::Response, StoreError> {
        let mut resp = http::Response::new(crate::full_body(self.body()?));
        *resp.status_mut() = http::StatusCode::from_u16(self.status)
            .map_err(|_| StoreError::Corrupt("stored status".into()))?;
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_bytes(v),
            ) {
                resp.headers_mut().append(n, v);
            }
        }
        Ok(resp)
    }
}

/// Reads a whole answer body up to `limit` bytes. Past the limit, or at a trailers frame
/// (which a stored answer cannot carry), the body is handed back whole (what was read, then
/// the rest as it streams) for the caller to pass on unstored.
pub async fn read_limited(
    body: crate::Body,
    limit: usize,
) -> Result<Result<bytes::Bytes, crate::Body>, crate::BoxError> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| -> crate::BoxError { Box::new(e) })?;
        let stop = match frame.into_data() {
            Ok(data) => {
                buf.extend_from_slice(&data);
                (buf.len() > limit).then_some(None)
            }
            Err(other) => Some(Some(other)),
        };
        if let Some(extra) = stop {
            let mut head = vec![Ok::<_, crate::BodyError>(http_body::Frame::data(
                buf.freeze(),
            ))];
            head.extend(extra.map(Ok));
            let rest = http_body_util::BodyStream::new(body);
            return Ok(Err(http_body_util::StreamBody::new(
                futures_util::stream::iter(head).chain(rest),
            )
            .boxed_unsync()));
        }
    }
    Ok(Ok(buf.freeze()))
}
