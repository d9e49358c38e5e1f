//! The Redis state store, for several gateway replicas sharing jobs, idempotency records and
//! dead letters. Keys are `{prefix}{namespace}:{key}` with Redis expiry; dead letters are also
//! indexed in a sorted set so they can be listed in order. A write counts once Redis answered
//! it (the server's own persistence settings decide what survives a Redis restart).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use super::{Ns, Store, StoreError};

/// Replaces (ARGV[2] = 1) or deletes the value when it is still ARGV[1]; answers 1 if it did.
const SWAP: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[1])
  if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[5]) end
end
return 1";

/// Inserts unless a live key is there; answers 1 when written, else the existing value.
const INSERT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if KEYS[2] then redis.call('ZADD', KEYS[2], 0, ARGV[3]) end
  return 1
end
return redis.call('GET', KEYS[1])";

/// GCRA on one key, by Redis's clock (every replica reads the same one): KEYS[1] holds the
/// bucket's theoretical arrival time in microseconds; ARGV[1] is the emission interval and
/// ARGV[2] the burst, both in microseconds (burst × interval). Answers `{1, remaining}` when
/// the request is let through and `{0, wait_us}` when not.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + emission
local over = new_tat - now - window
if over > 0 then
  return {0, over}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((window - (new_tat - now)) / emission)}";

/// Where the store's server is: one server, a Redis Cluster, or a master found through
/// Sentinel.
enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    Sentinel(Mutex<redis::sentinel::SentinelClient>),
}

/// A connection of one of the [`Target`]s; commands and scripts run on it alike.
#[derive(Clone)]
enum Conn {
    /// Reconnects by itself.
    Single(ConnectionManager),
    /// Follows the cluster's slots and reconnects by itself.
    Cluster(redis::cluster_async::ClusterConnection),
    /// To the master Sentinel named; dropped on a failure, so that the next operation asks
    /// the sentinels again (after a failover, for the new master).
    Sentinel(redis::aio::MultiplexedConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    target: Target,
    prefix: String,
    timeout: Duration,
    /// Connected on first use, so a gateway starts (and serves routes that need no store)
    /// while Redis is down.
    conn: Mutex<Option<Conn>>,
    insert: redis::Script,
    swap: redis::Script,
    gcra: redis::Script,
    /// When connecting last failed: for a moment after, requests fail at once instead of each
    /// waiting for a connect of its own.
    failed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// Parses the URLs (`state.redis`); connects later. `timeout` bounds each operation,
    /// connecting included.
    pub fn new(spec: &crate::config::RedisStoreSpec) -> Result<RedisStore, StoreError> {
        let target = if !spec.cluster.is_empty() {
            Target::Cluster(
                redis::cluster::ClusterClientBuilder::new(spec.cluster.clone())
                    .connection_timeout(spec.timeout.0)
                    .response_timeout(spec.timeout.0)
                    .build()
                    .map_err(unavailable)?,
            )
        } else if let Some(s) = &spec.sentinel {
            Target::Sentinel(Mutex::new(
                redis::sentinel::SentinelClient::build(
                    s.urls.clone(),
                    s.master.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(unavailable)?,
            ))
        } else {
            Target::Single(redis::Client::open(spec.url.as_str()).map_err(unavailable)?)
        };
        Ok(RedisStore {
            target,
            prefix: spec.prefix.clone(),
            timeout: spec.timeout.0,
            conn: Mutex::new(None),
            insert: redis::Script::new(INSERT),
            swap: redis::Script::new(SWAP),
            gcra: redis::Script::new(GCRA),
            failed_at: std::sync::Mutex::new(None),
        })
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        if self
            .failed_at
            .lock()
            .ok()
            .and_then(|f| *f)
            .is_some_and(|at| at.elapsed() < self.timeout)
        {
            return Err(unavailable(
                "not connected (the last attempt failed just now)",
            ));
        }
        let mut guard = tokio::time::timeout(self.timeout, self.conn.lock())
            .await
            .map_err(|_| unavailable("connecting timed out"))?;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let connecting = async {
            match &self.target {
                Target::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .map(Conn::Single)
                }
                Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
                Target::Sentinel(client) => client
                    .lock()
                    .await
                    .get_async_connection()
                    .await
                    .map(Conn::Sentinel),
            }
        };
        let c = tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| unavailable("connecting timed out"))
            .and_then(|c| c.map_err(unavailable));
        if let Ok(mut f) = self.failed_at.lock() {
            *f = c.is_err().then(tokio::time::Instant::now);
        }
        let c = c?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets a Sentinel connection that failed: the next operation asks the sentinels for
    /// the master again. The other connections reconnect by themselves.
    async fn failed(&self) {
        if matches!(self.target, Target::Sentinel(_)) {
            *self.conn.lock().await = None;
        }
    }

    /// In a Redis Cluster a namespace's keys and its index carry one hash tag (`{ns}`), so
    /// that the scripts and transactions that touch both stay in one slot; rate buckets, one
    /// key each, are spread over the slots.
    fn key(&self, ns: Ns, key: &str) -> String {
        match (&self.target, ns) {
            (Target::Cluster(_), ns) if ns != Ns::Rates => {
                format!("{}{{{}}}:{key}", self.prefix, ns.as_str())
            }
            _ => format!("{}{}:{key}", self.prefix, ns.as_str()),
        }
    }

    /// The sorted set that lists a namespace's keys, for namespaces that are listed.
    fn index(&self, ns: Ns) -> Option<String> {
        ns.listed().then(|| match self.target {
            Target::Cluster(_) => format!("{}{{{}}}:index", self.prefix, ns.as_str()),
            _ => format!("{}{}:index", self.prefix, ns.as_str()),
        })
    }

    async fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn().await?;
        let out = match tokio::time::timeout(self.timeout, f(&mut c)).await {
            Err(_) => Err(unavailable("no answer in time")),
            Ok(r) => r.map_err(unavailable),
        };
        // A master that became a replica answers READONLY, one that is gone an I/O error:
        // after any failure Sentinel is asked again.
        if out.is_err() {
            self.failed().await;
        }
        out
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn insert(
        &self,
        ns: Ns,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.key(ns, key);
        let index = self.index(ns);
        let ms = ttl.as_millis().max(1) as u64;
        let answer: redis::Value = self
            .run(async |c| {
                let mut inv = self.insert.key(&k);
                if let Some(i) = &index {
                    inv.key(i);
                }
                inv.arg(value).arg(ms).arg(key).invoke_async(c).await
            })
            .await?;
        match answer {
            redis::Value::Int(1) => Ok(None),
            redis::Value::BulkString(v) => Ok(Some(v)),
            other => Err(StoreError::Corrupt(format!(
                "unexpected answer to insert: {other:?}"
            ))),
        }
    }

    async fn put(&self, ns: Ns, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let k = self.key(ns, key);
        let index = self.index(ns);
        let ms = ttl.as_millis().max(1) as u64;
        self.run(async |c| {
            let mut p = redis::pipe();
            p.atomic().cmd("SET").arg(&k).arg(value).arg("PX").arg(ms);
            if let Some(i) = &index {
                p.cmd("ZADD").arg(i).arg(0).arg(key);
            }
            p.query_async::<()>(c).await
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
        let k = self.key(ns, key);
        let index = self.index(ns);
        let ms = ttl.as_millis().max(1) as u64;
        let done: i64 = self
            .run(async |c| {
                let mut inv = self.swap.key(&k);
                if let Some(i) = &index {
                    inv.key(i);
                }
                inv.arg(expected)
                    .arg(if new.is_some() { "1" } else { "0" })
                    .arg(new.unwrap_or_default())
                    .arg(ms)
                    .arg(key)
                    .invoke_async(c)
                    .await
            })
            .await?;
        Ok(done == 1)
    }

    async fn get(&self, ns: Ns, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.key(ns, key);
        self.run(async |c| redis::cmd("GET").arg(&k).query_async(c).await)
            .await
    }

    async fn delete(&self, ns: Ns, key: &str) -> Result<bool, StoreError> {
        let k = self.key(ns, key);
        let index = self.index(ns);
        let (n, _): (u64, Option<u64>) = self
            .run(async |c| {
                let mut p = redis::pipe();
                p.atomic().cmd("DEL").arg(&k);
                match &index {
                    Some(i) => p.cmd("ZREM").arg(i).arg(key),
                    None => p.cmd("ECHO").arg(0),
                };
                p.query_async(c).await
            })
            .await?;
        Ok(n > 0)
    }

    async fn take_rate(
        &self,
        key: &str,
        emission: Duration,
        burst: u32,
    ) -> Result<super::RateTaken, StoreError> {
        let k = self.key(Ns::Rates, key);
        let emission_us = (emission.as_micros() as u64).max(1);
        let window_us = emission_us.saturating_mul(u64::from(burst.max(1)));
        let (allowed, n): (i64, i64) = self
            .run(async |c| {
                self.gcra
                    .key(&k)
                    .arg(emission_us)
                    .arg(window_us)
                    .invoke_async(c)
                    .await
            })
            .await?;
        Ok(if allowed == 1 {
            super::RateTaken::Allowed {
                remaining: u32::try_from(n.max(0)).unwrap_or(u32::MAX),
            }
        } else {
            super::RateTaken::Refused {
                wait: Duration::from_micros(n.max(1) as u64),
            }
        })
    }

    async fn list(
        &self,
        ns: Ns,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let Some(index) = self.index(ns) else {
            return Err(StoreError::Unavailable(format!(
                "namespace {} is not listed in redis",
                ns.as_str()
            )));
        };
        let mut out = Vec::new();
        let mut from = after.map_or("-".to_string(), |a| format!("({a}"));
        // Index entries whose record expired are dropped as they are met.
        while out.len() < limit {
            let want = limit - out.len();
            let keys: Vec<String> = self
                .run(async |c| {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&from)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(want)
                        .query_async(c)
                        .await
                })
                .await?;
            if keys.is_empty() {
                break;
            }
            let full: Vec<String> = keys.iter().map(|k| self.key(ns, k)).collect();
            let values: Vec<Option<Vec<u8>>> = self
                .run(async |c| redis::cmd("MGET").arg(&full).query_async(c).await)
                .await?;
            let mut gone = Vec::new();
            for (k, v) in keys.iter().zip(values) {
                match v {
                    Some(v) => out.push((k.clone(), v)),
                    None => gone.push(k.clone()),
                }
            }
            if !gone.is_empty() {
                self.run(async |c| {
                    redis::cmd("ZREM")
                        .arg(&index)
                        .arg(&gone)
                        .query_async::<()>(c)
                        .await
                })
                .await?;
            }
            from = format!("({}", keys[keys.len() - 1]);
            if keys.len() < want {
                break;
            }
        }
        Ok(out)
    }
}
