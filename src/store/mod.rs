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
}

impl Ns {
    pub fn as_str(self) -> &'static str {
        match self {
            Ns::Idempotency => "idem",
            Ns::Jobs => "job",
            Ns::DeadLetters => "dead",
        }
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

    /// Removes the record under `key`; whether one was there.
    async fn delete(&self, ns: Ns, key: &str) -> Result<bool, StoreError>;

    /// Up to `limit` live records with keys greater than `after`, in key order.
    async fn list(
        &self,
        ns: Ns,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
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
    pub spool: Arc<crate::spool::Spool>,
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
        let reuse = previous.filter(|p| p.path == path);
        let (local, spool) = match reuse {
            Some(p) => {
                p.spool.set_spec(spec.spool.clone());
                (p.local.clone(), p.spool.clone())
            }
            None => {
                let local = if dry {
                    embedded::LocalDb::in_memory()?
                } else {
                    embedded::LocalDb::open(&path)?
                };
                let spool =
                    crate::spool::Spool::open(local.clone(), spec.spool.clone(), metrics.clone())?;
                (local, spool)
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
            (_, crate::config::StoreKind::Redis) => Arc::new(redis::RedisStore::new(
                &spec.redis.url,
                &spec.redis.prefix,
                spec.redis.timeout.0,
            )?),
        };
        spool.set_dead_letters(store.clone(), spec.dead_letter_ttl.0);
        Ok(Arc::new(State {
            spec: spec.clone(),
            path,
            store,
            local,
            spool,
        }))
    }
}
