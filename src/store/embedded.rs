//! The embedded state store: one redb file on local disk, for a single gateway or a sidecar.
//! Every write transaction commits with redb's default `Durability::Immediate` (fsync before
//! the commit returns). The same file holds the spool ([`crate::durable::spool`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Ns, Store, StoreError, expiry, now_ms};

/// Records: (namespace, key) → (expiry in ms since the epoch, value).
const RECORDS: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("records");

/// The local database file, opened once and shared by the embedded store and the spool.
#[derive(Clone)]
pub struct LocalDb {
    pub(crate) db: Arc<Database>,
    pub path: PathBuf,
}

impl std::fmt::Debug for LocalDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDb").field("path", &self.path).finish()
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl LocalDb {
    /// Opens (or creates) the file, creating its directory. Fails when another process holds it.
    pub fn open(path: &Path) -> Result<LocalDb, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let local = LocalDb {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        // Create the table up front so that readers never meet a missing one.
        let tx = local.db.begin_write().map_err(unavailable)?;
        tx.open_table(RECORDS).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(local)
    }

    /// A database in memory, for checking a config without touching files.
    pub fn in_memory() -> Result<LocalDb, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(unavailable)?;
        Ok(LocalDb {
            db: Arc::new(db),
            path: PathBuf::from(":memory:"),
        })
    }

    /// Runs blocking database work off the async threads.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

/// The embedded [`Store`].
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    local: LocalDb,
    /// The sweeper runs while this lives.
    _alive: Arc<()>,
}

impl EmbeddedStore {
    /// Wraps the database and starts the sweeper that deletes expired records every `sweep`
    /// (they are invisible from the moment they expire; the sweep only frees the space). The
    /// sweeper stops when the last clone of the store is dropped.
    pub fn new(local: LocalDb, sweep: Duration) -> EmbeddedStore {
        let alive = Arc::new(());
        let (weak, held) = (Arc::downgrade(&local.db), Arc::downgrade(&alive));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep);
            tick.tick().await;
            loop {
                tick.tick().await;
                if held.strong_count() == 0 {
                    break;
                }
                let Some(db) = weak.upgrade() else { break };
                let swept = tokio::task::spawn_blocking(move || sweep_expired(&db)).await;
                if let Ok(Err(e)) = swept {
                    tracing::warn!(error = %e, "Sweeping expired store records failed.");
                }
            }
        });
        EmbeddedStore {
            local,
            _alive: alive,
        }
    }
}

fn sweep_expired(db: &Database) -> Result<(), StoreError> {
    let now = now_ms();
    let tx = db.begin_write().map_err(unavailable)?;
    {
        let mut t = tx.open_table(RECORDS).map_err(unavailable)?;
        t.retain(|_, (exp, _)| exp > now).map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn insert(
        &self,
        ns: Ns,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.local
            .run(move |db| {
                let now = now_ms();
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut t = tx.open_table(RECORDS).map_err(unavailable)?;
                    if let Some(found) = t.get((ns.as_str(), key.as_str())).map_err(unavailable)? {
                        let (exp, v) = found.value();
                        if exp > now {
                            return Ok(Some(v.to_vec()));
                        }
                    }
                    t.insert((ns.as_str(), key.as_str()), (expiry(ttl), value.as_slice()))
                        .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)?;
                Ok(None)
            })
            .await
    }

    async fn put(&self, ns: Ns, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.local
            .run(move |db| {
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut t = tx.open_table(RECORDS).map_err(unavailable)?;
                    t.insert((ns.as_str(), key.as_str()), (expiry(ttl), value.as_slice()))
                        .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)
            })
            .await
    }

    async fn swap(
        &self,
        ns: Ns,
        key: &str,
        expected: &[u8],
        new: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (key, expected, new) = (key.to_string(), expected.to_vec(), new.map(<[u8]>::to_vec));
        self.local
            .run(move |db| {
                let now = now_ms();
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut t = tx.open_table(RECORDS).map_err(unavailable)?;
                    let current = t
                        .get((ns.as_str(), key.as_str()))
                        .map_err(unavailable)?
                        .map(|g| {
                            let (exp, v) = g.value();
                            exp > now && v == expected.as_slice()
                        });
                    if current != Some(true) {
                        return Ok(false);
                    }
                    match &new {
                        Some(v) => {
                            t.insert((ns.as_str(), key.as_str()), (expiry(ttl), v.as_slice()))
                                .map_err(unavailable)?;
                        }
                        None => {
                            t.remove((ns.as_str(), key.as_str())).map_err(unavailable)?;
                        }
                    }
                }
                tx.commit().map_err(unavailable)?;
                Ok(true)
            })
            .await
    }

    async fn get(&self, ns: Ns, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.local
            .run(move |db| {
                let tx = db.begin_read().map_err(unavailable)?;
                let t = tx.open_table(RECORDS).map_err(unavailable)?;
                Ok(t.get((ns.as_str(), key.as_str()))
                    .map_err(unavailable)?
                    .and_then(|g| {
                        let (exp, v) = g.value();
                        (exp > now_ms()).then(|| v.to_vec())
                    }))
            })
            .await
    }

    async fn delete(&self, ns: Ns, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.local
            .run(move |db| {
                let now = now_ms();
                let tx = db.begin_write().map_err(unavailable)?;
                let live = {
                    let mut t = tx.open_table(RECORDS).map_err(unavailable)?;
                    t.remove((ns.as_str(), key.as_str()))
                        .map_err(unavailable)?
                        .is_some_and(|g| g.value().0 > now)
                };
                tx.commit().map_err(unavailable)?;
                Ok(live)
            })
            .await
    }

    async fn list(
        &self,
        ns: Ns,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let after = after.map(str::to_string);
        self.local
            .run(move |db| {
                let now = now_ms();
                let tx = db.begin_read().map_err(unavailable)?;
                let t = tx.open_table(RECORDS).map_err(unavailable)?;
                let start = after.as_deref().unwrap_or("");
                let mut out = Vec::new();
                for entry in t.range((ns.as_str(), start)..).map_err(unavailable)? {
                    let (k, v) = entry.map_err(unavailable)?;
                    let (kns, key) = k.value();
                    if kns != ns.as_str() || out.len() >= limit {
                        break;
                    }
                    if after.as_deref() == Some(key) {
                        continue;
                    }
                    let (exp, value) = v.value();
                    if exp > now {
                        out.push((key.to_string(), value.to_vec()));
                    }
                }
                Ok(out)
            })
            .await
    }
}
