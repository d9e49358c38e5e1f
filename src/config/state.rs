//! The serde model of routes.yaml's `state:` section and of the per-route asynchronous
//! settings (`idempotency`, `spool`, `mode`): where the gateway keeps what must outlive a
//! request.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::model::BackoffSpec;
use super::types::{Dur, Size};

/// Where idempotency records, jobs and dead letters live, and the local spool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// `embedded` (a file on local disk; one gateway) or `redis` (shared by replicas).
    #[serde(default)]
    pub store: StoreKind,
    /// The local database file: the embedded store's records and, whatever `store` says, the
    /// spool. Relative to routes.yaml's directory. One gateway process per file.
    #[serde(default = "default_state_path")]
    pub path: PathBuf,
    /// The Redis server, when `store: redis`.
    #[serde(default)]
    pub redis: RedisStoreSpec,
    /// Limits and pacing of the spool (routes with `spool: true`).
    #[serde(default)]
    pub spool: SpoolSpec,
    /// The job endpoint of `mode: async` routes.
    #[serde(default)]
    pub jobs: JobsSpec,
    /// How long dead letters are kept.
    #[serde(default = "default_dead_letter_ttl")]
    pub dead_letter_ttl: Dur,
}

impl Default for StateSpec {
    fn default() -> Self {
        StateSpec {
            store: StoreKind::default(),
            path: default_state_path(),
            redis: RedisStoreSpec::default(),
            spool: SpoolSpec::default(),
            jobs: JobsSpec::default(),
            dead_letter_ttl: default_dead_letter_ttl(),
        }
    }
}

fn default_state_path() -> PathBuf {
    PathBuf::from("switchyard-data/state.redb")
}
fn default_dead_letter_ttl() -> Dur {
    Dur::secs(7 * 24 * 3600)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisStoreSpec {
    /// `redis://[user:password@]host:port[/db]`; `${VAR}` interpolation keeps secrets out.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key the gateway writes.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// Bound on each store operation, connecting included; past it the request gets 503.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// A Redis Cluster instead of one server: some of its nodes (`redis://host:port`), from
    /// which the client learns the rest. `url` is not used then.
    #[serde(default)]
    pub cluster: Vec<String>,
    /// A server found through Redis Sentinel instead of `url`: the sentinels, and the name
    /// they monitor the master under. After a failover the gateway reconnects to the new
    /// master.
    #[serde(default)]
    pub sentinel: Option<SentinelSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SentinelSpec {
    /// The sentinels (`redis://host:26379`).
    pub urls: Vec<String>,
    /// The master's name in the sentinels' configuration.
    pub master: String,
}

impl Default for RedisStoreSpec {
    fn default() -> Self {
        RedisStoreSpec {
            url: default_redis_url(),
            prefix: default_redis_prefix(),
            timeout: default_redis_timeout(),
            cluster: Vec::new(),
            sentinel: None,
        }
    }
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_redis_prefix() -> String {
    "switchyard:".into()
}
fn default_redis_timeout() -> Dur {
    Dur::secs(1)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpoolSpec {
    /// Most bytes (bodies and headers) held in the spool; beyond it, 503.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: Size,
    /// Most messages held in the spool; beyond it, 503.
    #[serde(default = "default_spool_messages")]
    pub max_messages: u64,
    /// Wait between forwarding attempts while the backend is still down (doubling from
    /// `min` to `max`; a new message or a reload wakes the forwarder at once).
    #[serde(default = "default_spool_retry")]
    pub retry: BackoffSpec,
    /// A spooled message the backend refuses this many times (not counting refusals because
    /// it is down) goes to the dead letters.
    #[serde(default = "default_spool_attempts")]
    pub max_attempts: u32,
}

impl Default for SpoolSpec {
    fn default() -> Self {
        SpoolSpec {
            max_bytes: default_spool_bytes(),
            max_messages: default_spool_messages(),
            retry: default_spool_retry(),
            max_attempts: default_spool_attempts(),
        }
    }
}

fn default_spool_bytes() -> Size {
    Size(256 * 1024 * 1024)
}
fn default_spool_messages() -> u64 {
    100_000
}
fn default_spool_retry() -> BackoffSpec {
    BackoffSpec {
        min: Dur(std::time::Duration::from_millis(200)),
        max: Dur::secs(5),
    }
}
fn default_spool_attempts() -> u32 {
    5
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobsSpec {
    /// Path prefix of the job endpoint: `GET {path}/{id}`.
    #[serde(default = "default_jobs_path")]
    pub path: String,
    /// How long a job and its result are kept after it was accepted.
    #[serde(default = "default_jobs_ttl")]
    pub ttl: Dur,
    /// `Retry-After` sent while a job is pending.
    #[serde(default = "default_jobs_retry_after")]
    pub retry_after: Dur,
}

impl Default for JobsSpec {
    fn default() -> Self {
        JobsSpec {
            path: default_jobs_path(),
            ttl: default_jobs_ttl(),
            retry_after: default_jobs_retry_after(),
        }
    }
}

fn default_jobs_path() -> String {
    "/jobs".into()
}
fn default_jobs_ttl() -> Dur {
    Dur::secs(24 * 3600)
}
fn default_jobs_retry_after() -> Dur {
    Dur::secs(1)
}

/// `Idempotency-Key` handling on a route (IETF httpapi draft): a repeat of a finished request
/// gets the stored answer, a repeat of a running one 409, a reuse with another body 422.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySpec {
    /// How long a finished request's answer is kept for replay.
    #[serde(default = "default_idem_ttl")]
    pub ttl: Dur,
    /// Refuse requests without a key (400).
    #[serde(default)]
    pub required: bool,
    /// Longest key accepted (at most 255).
    #[serde(default = "default_idem_key_len")]
    pub max_key_length: usize,
    /// Largest answer body stored for replay; a larger answer is passed on and its key
    /// released, so a repeat runs again.
    #[serde(default = "default_idem_response")]
    pub max_response_size: Size,
}

impl Default for IdempotencySpec {
    fn default() -> Self {
        IdempotencySpec {
            ttl: default_idem_ttl(),
            required: false,
            max_key_length: default_idem_key_len(),
            max_response_size: default_idem_response(),
        }
    }
}

fn default_idem_ttl() -> Dur {
    Dur::secs(24 * 3600)
}
fn default_idem_key_len() -> usize {
    255
}
fn default_idem_response() -> Size {
    Size(1024 * 1024)
}

/// How a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    /// The backend's answer is the client's answer.
    #[default]
    Sync,
    /// 202 with a job location once the request is durably stored; the call runs in the
    /// background and its result is read from the job endpoint.
    Async,
}

/// What a sync route does when its `timeout` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// 504.
    #[default]
    Fail,
    /// 202 with a job location; the call goes on in the background and its late answer is
    /// kept in the job.
    Accept,
}

/// Settings of the background call of `mode: async` and `on_timeout: accept` routes.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AsyncSpec {
    /// Deadline of the background call: for `mode: async` the route's `timeout` when absent;
    /// for `on_timeout: accept`, 5 minutes.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// POST the job's result to a callback URL when it finishes.
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
}

/// A signed callback with a job's result.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The callback URL, for every job of the route.
    #[serde(default)]
    pub url: Option<String>,
    /// Take the callback URL from this request header instead, when the client sends one.
    #[serde(default)]
    pub from_header: Option<String>,
    /// URL prefixes a URL from `from_header` must start with (`https://hooks.example.com/`);
    /// any other is refused with 400.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The HMAC-SHA256 key the `Switchyard-Signature` header is made with (`${VAR}` keeps it
    /// out of the file).
    pub secret: String,
    /// Deliveries tried in all before the result is dead-lettered.
    #[serde(default = "default_webhook_attempts")]
    pub attempts: u32,
    /// Wait between deliveries, doubling.
    #[serde(default = "default_webhook_backoff")]
    pub backoff: BackoffSpec,
    /// Bound on each delivery.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Dur,
}

fn default_webhook_attempts() -> u32 {
    6
}
fn default_webhook_backoff() -> BackoffSpec {
    BackoffSpec {
        min: Dur(std::time::Duration::from_millis(500)),
        max: Dur::secs(60),
    }
}
fn default_webhook_timeout() -> Dur {
    Dur::secs(5)
}
