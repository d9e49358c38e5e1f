//! Jobs (request-acknowledge-confirm): the layer of `mode: async` and `on_timeout: accept`
//! routes, placed below the idempotency key and above the spool and the timeout (see
//! `middleware::stack`), and the job endpoint the front end serves at `GET {jobs.path}/{id}`.
//!
//! A job is written to the state store (with the request, so that it can run again) before the
//! 202 that names it. It runs in the background through the route's inner stack; its result
//! (the backend's answer, or a problem) is stored under the job and, when the route has a
//! webhook, POSTed to the callback URL. A job whose gateway died is run again by another (or
//! the restarted) gateway once its lease expires: at least once, with the same message id.

pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::config::{JobsSpec, WebhookSpec};
use crate::durable::spool::{DeadLetter, Spooled};
use crate::error::Problem;
use crate::middleware::context::{MessageId, RequestContext};
use crate::store::{Ns, SharedStore, StoreError, StoredResponse, now_ms, read_limited};
use crate::telemetry::otel::{self, Attr, Trace};
use crate::{BoxError, Request, Response, RouteService, full_body};

/// Carries a job's state on every answer about it.
pub const STATUS_HEADER: &str = "switchyard-job-status";
/// The largest backend answer kept as a job's result.
const MAX_RESULT: usize = 8 * 1024 * 1024;
/// Runs a job gets (its gateways dying mid-run) before it is failed instead.
const MAX_RUNS: u32 = 5;
/// How long a webhook replay waits for a job another task still holds (the run that has just
/// dead-lettered it, which releases it at once) before answering that the job is busy.
const REPLAY_WAITS_FOR_BUSY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }
}

/// Where a job's webhook stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delivery {
    pub delivered: bool,
    pub attempts: u32,
    pub dead_lettered: bool,
    pub last_error: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub route: String,
    pub status: JobStatus,
    pub accepted_ms: u64,
    pub finished_ms: Option<u64>,
    /// Runs started (more than one after a gateway died mid-run).
    pub runs: u32,
    pub request: Spooled,
    /// The request body, base64.
    pub body: String,
    pub response: Option<StoredResponse>,
    pub problem: Option<Value>,
    pub callback: Option<String>,
    pub webhook: Option<Delivery>,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Job {
    /// The JSON that describes the job (the job endpoint's body, and a webhook's).
    pub fn view(&self, jobs_path: &str) -> Value {
        let mut v = json!({
            "id": self.id,
            "status": self.status.as_str(),
            "route": self.route,
            "href": format!("{jobs_path}/{}", self.id),
            "accepted_at": rfc3339(self.accepted_ms),
        });
        if let Some(f) = self.finished_ms {
            v["finished_at"] = rfc3339(f).into();
        }
        if let Some(r) = &self.response {
            v["response"] = response_view(r);
        }
        if let Some(p) = &self.problem {
            v["problem"] = p.clone();
        }
        if let Some(w) = &self.webhook {
            v["webhook"] = json!({
                "delivered": w.delivered,
                "attempts": w.attempts,
                "dead_lettered": w.dead_lettered,
                "last_error": w.last_error,
            });
        }
        v
    }
}

/// A stored answer as JSON: a JSON body inline, other text as a string, bytes as base64.
fn response_view(r: &StoredResponse) -> Value {
    let body = r.body().unwrap_or_default();
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned().into()))
        .collect();
    let mut v = json!({ "status": r.status, "headers": headers });
    let json_type = r
        .headers
        .iter()
        .any(|(n, v)| n == "content-type" && String::from_utf8_lossy(v).contains("json"));
    match (
        json_type,
        serde_json::from_slice::<Value>(&body),
        std::str::from_utf8(&body),
    ) {
        (true, Ok(parsed), _) => v["body"] = parsed,
        (_, _, Ok(text)) => v["body"] = text.into(),
        _ => {
            v["body_base64"] =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body).into()
        }
    }
    v
}

/// What a route installed for its jobs.
#[derive(Clone)]
struct Installed {
    service: RouteService,
    webhook: Option<Arc<WebhookSpec>>,
    lease: Duration,
}

/// The jobs of every route: the store they live in, the routes that run them, and recovery.
pub struct Jobs {
    store: Mutex<(SharedStore, Duration)>,
    spec: Mutex<JobsSpec>,
    routes: Mutex<HashMap<Arc<str>, Installed>>,
    sender: webhook::Sender,
    /// This process, as a lease holder.
    instance: String,
    recovering: AtomicBool,
    /// The trace exporter of the serving table: a job's run and its webhook are spans linked
    /// to the request that made the job.
    pub otel: crate::telemetry::otel::Current,
}

impl Jobs {
    pub fn new(store: SharedStore, spec: JobsSpec, dead_letter_ttl: Duration) -> Arc<Jobs> {
        Arc::new(Jobs {
            store: Mutex::new((store, dead_letter_ttl)),
            spec: Mutex::new(spec),
            routes: Mutex::new(HashMap::new()),
            sender: webhook::Sender::new(),
            instance: uuid::Uuid::now_v7().to_string(),
            recovering: AtomicBool::new(false),
            otel: Default::default(),
        })
    }

    /// Takes the store and settings of a reloaded config.
    pub fn configure(&self, store: SharedStore, spec: JobsSpec, dead_letter_ttl: Duration) {
        if let Ok(mut s) = self.store.lock() {
            *s = (store, dead_letter_ttl);
        }
        if let Ok(mut s) = self.spec.lock() {
            *s = spec;
        }
    }

    fn store(&self) -> SharedStore {
        self.store.lock().expect("jobs store").0.clone()
    }

    pub fn spec(&self) -> JobsSpec {
        self.spec.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Makes `service` (the route's stack below the job layer) the one its jobs run through,
    /// and starts recovery. Called after a table is swapped in.
    pub fn install(
        self: &Arc<Self>,
        route: &Arc<str>,
        service: RouteService,
        webhook: Option<Arc<WebhookSpec>>,
        lease: Duration,
    ) {
        if let Ok(mut r) = self.routes.lock() {
            r.insert(
                route.clone(),
                Installed {
                    service,
                    webhook,
                    lease,
                },
            );
        }
        if !self.recovering.swap(true, Ordering::SeqCst) {
            tokio::spawn(recover(Arc::downgrade(self)));
        }
    }

    /// Forgets routes not in `keep`.
    pub fn retain_routes(&self, keep: &[Arc<str>]) {
        if let Ok(mut r) = self.routes.lock() {
            r.retain(|id, _| keep.contains(id));
        }
    }

    fn installed(&self, route: &str) -> Option<Installed> {
        self.routes.lock().ok()?.get(route).cloned()
    }

    fn ttl_left(&self, job: &Job) -> Duration {
        let ttl = self.spec().ttl.0.as_millis() as u64;
        let end = job.accepted_ms + ttl;
        // A result that comes in at the end of the job's life is still kept for a while: a
        // minute, or the whole TTL when that is shorter.
        Duration::from_millis(end.saturating_sub(now_ms()).max(ttl.min(60_000)).max(1))
    }

    /// Takes the lease on job `id` for `ttl`, unless someone holds it: the token that proves
    /// it is ours.
    async fn claim(&self, id: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let token = format!("{}:{}", self.instance, uuid::Uuid::now_v7()).into_bytes();
        let taken = self.store().insert(Ns::Leases, id, &token, ttl).await?;
        Ok(taken.is_none().then(|| Lease {
            id: id.to_string(),
            token,
            ttl,
        }))
    }

    /// Whether the lease is still ours, extending it when it is.
    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        lease.renew(&self.store()).await
    }

    /// The job is done with: its pending mark goes, then the lease (in that order, so that
    /// nobody can claim it in between and find the mark).
    async fn release(&self, lease: &Lease) {
        let store = self.store();
        if !matches!(self.renew(lease).await, Ok(true)) {
            return;
        }
        if let Err(e) = store.delete(Ns::PendingJobs, &lease.id).await {
            tracing::warn!(job = %lease.id, error = %e, "Clearing a finished job's pending mark failed; recovery will look at it again.");
        }
        let _ = store
            .swap(Ns::Leases, &lease.id, &lease.token, None, lease.ttl)
            .await;
    }

    /// Gives the lease up without touching the pending mark (the job is not done with).
    async fn release_lease_only(&self, lease: &Lease) {
        let _ = self
            .store()
            .swap(Ns::Leases, &lease.id, &lease.token, None, lease.ttl)
            .await;
    }

    /// Records a new job durably: its lease first (so that recovery leaves it alone while it
    /// is written), then the pending mark recovery looks for, then the job. On failure, what
    /// was written is taken back, so that a 503 means nothing will run.
    async fn create(&self, job: &Job, lease_ttl: Duration) -> Result<Lease, StoreError> {
        let store = self.store();
        let ttl = self.spec().ttl.0;
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let lease = self
            .claim(&job.id, lease_ttl)
            .await?
            .ok_or_else(|| StoreError::Corrupt("job id already taken".into()))?;
        let written = async {
            store
                .put(Ns::PendingJobs, &job.id, job.route.as_bytes(), ttl)
                .await?;
            match store.insert(Ns::Jobs, &job.id, &value, ttl).await? {
                None => Ok(()),
                Some(_) => Err(StoreError::Corrupt("job id already taken".into())),
            }
        }
        .await;
        if let Err(e) = written {
            let _ = store.swap(Ns::Jobs, &job.id, &value, None, ttl).await;
            let _ = store.delete(Ns::PendingJobs, &job.id).await;
            self.release_lease_only(&lease).await;
            return Err(e);
        }
        Ok(lease)
    }

    /// Reads a job.
    pub async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.store().get(Ns::Jobs, id).await? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("job record".into())),
            None => Ok(None),
        }
    }

    /// Writes a job while its lease is ours, trying a few times while the store is down: the
    /// result of a call that ran must not be dropped lightly.
    async fn save(&self, job: &Job, lease: &Lease) -> Result<(), StoreError> {
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut wait = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            let attempt = async {
                if !self.renew(lease).await? {
                    return Err(StoreError::Unavailable(
                        "the job's lease passed to another gateway".into(),
                    ));
                }
                self.store()
                    .put(Ns::Jobs, &job.id, &value, self.ttl_left(job))
                    .await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if tries >= 3 => return Err(e),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }

    /// Keeps `lease` alive until the returned guard is dropped.
    fn hold(&self, lease: &Lease) -> tokio::task::JoinHandle<()> {
        let (store, lease) = (self.store(), lease.clone());
        tokio::spawn(async move {
            let every = lease.ttl / 3;
            loop {
                tokio::time::sleep(every).await;
                if matches!(lease.renew(&store).await, Ok(false)) {
                    tracing::warn!(job = %lease.id, "A job's lease passed to another gateway while this one ran it.");
                    return;
                }
            }
        })
    }

    /// Runs a job whose lease this gateway holds, then finishes it.
    async fn run(self: Arc<Self>, mut job: Job, installed: Installed, lease: Lease) {
        let holding = self.hold(&lease);
        if job.runs >= MAX_RUNS {
            let problem = json!({
                "type": "urn:switchyard:problem:job-abandoned",
                "title": "Internal Server Error",
                "status": 500,
                "detail": format!("The job was started {} times and never finished (its gateways stopped mid-run); it is not started again.", job.runs),
                "correlation_id": job.request.correlation_id,
            });
            let result = Outcome::failed(problem);
            self.finish(job, result, installed.webhook, lease).await;
            holding.abort();
            return;
        }
        job.runs += 1;
        if self.save(&job, &lease).await.is_err() {
            holding.abort();
            return;
        }
        let route: Arc<str> = job.route.as_str().into();
        let body = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &job.body)
            .unwrap_or_default();
        // The run is a new trace, linked to the request that made the job.
        let trace = Trace::linked(
            self.otel.get().as_ref(),
            format!("job {route}"),
            otel::Kind::Consumer,
            job.request.trace_context(),
            || {
                vec![
                    Attr::new("switchyard.route", job.route.clone()),
                    Attr::new("switchyard.job.id", job.id.clone()),
                    Attr::new("switchyard.job.run", i64::from(job.runs)),
                ]
            },
        );
        let result = match job
            .request
            .traced_request(&route, Bytes::from(body), &trace)
        {
            Ok(req) => installed.service.clone().oneshot(req).await,
            Err(reason) => Err(Problem::bad_request(format!(
                "The stored request cannot be rebuilt: {reason}."
            ))
            .into()),
        };
        let result = outcome(result, &job.request.correlation_id, installed.lease).await;
        trace.set(|| vec![Attr::new("switchyard.job.status", result.status.as_str())]);
        if result.status == JobStatus::Failed {
            trace.fail("job-failed", "");
        }
        trace.end();
        self.finish(job, result, installed.webhook, lease).await;
        holding.abort();
    }

    /// Stores a finished call's result in the job, then delivers its webhook.
    async fn finish(
        self: &Arc<Self>,
        mut job: Job,
        result: Outcome,
        webhook: Option<Arc<WebhookSpec>>,
        lease: Lease,
    ) {
        job.status = result.status;
        job.response = result.response;
        job.problem = result.problem;
        job.finished_ms = Some(now_ms());
        if let Err(e) = self.save(&job, &lease).await {
            // The lease runs out and another run makes the call again.
            tracing::error!(job = %job.id, route = %job.route, error = %e, "Storing a job's result failed; the job will run again.");
            return;
        }
        tracing::debug!(job = %job.id, route = %job.route, status = job.status.as_str(), "Job finished.");
        self.notify(job, webhook, lease).await;
    }

    /// Delivers the webhook (if any and not done yet), then releases the job.
    async fn notify(
        self: &Arc<Self>,
        mut job: Job,
        webhook: Option<Arc<WebhookSpec>>,
        lease: Lease,
    ) {
        let pending = job
            .webhook
            .as_ref()
            .is_some_and(|d| !d.delivered && !d.dead_lettered);
        if let (Some(url), Some(spec), true) = (job.callback.clone(), webhook, pending) {
            let holding = self.hold(&lease);
            let delivered = self.deliver(&mut job, &url, &spec).await;
            let saved = self.save(&job, &lease).await;
            holding.abort();
            if !delivered || saved.is_err() {
                // Keep the pending mark: recovery tries again later.
                if let Err(e) = saved {
                    tracing::warn!(job = %job.id, error = %e, "Recording a webhook's delivery failed.");
                }
                return;
            }
        }
        self.release(&lease).await;
    }

    /// Tries the webhook until it is taken or its attempts are spent, then dead-letters it.
    /// Whether the job is done with (delivered, or dead-lettered).
    async fn deliver(&self, job: &mut Job, url: &str, spec: &WebhookSpec) -> bool {
        let mut delivery = job.webhook.clone().unwrap_or_default();
        let jobs_path = self.spec().path;
        let body = Bytes::from(job.view(&jobs_path).to_string());
        let event = format!("job.{}", job.status.as_str());
        let mut backoff = crate::backoff::Backoff::new(spec.backoff.min.0, spec.backoff.max.0);
        // The delivery is a new trace, linked to the request that made the job; each attempt
        // is an HTTP client span in it.
        let trace = Trace::linked(
            self.otel.get().as_ref(),
            format!("webhook {event}"),
            otel::Kind::Producer,
            job.request.trace_context(),
            || {
                vec![
                    Attr::new("switchyard.route", job.route.clone()),
                    Attr::new("switchyard.job.id", job.id.clone()),
                ]
            },
        );
        while !delivery.delivered && delivery.attempts < spec.attempts {
            delivery.attempts += 1;
            match self
                .sender
                .send(url, spec, &job.id, &event, body.clone(), &trace)
                .await
            {
                Ok(()) => {
                    delivery.delivered = true;
                    delivery.last_error = None;
                }
                Err(e) => {
                    tracing::debug!(job = %job.id, attempt = delivery.attempts, error = %e, "Webhook delivery failed.");
                    delivery.last_error = Some(e);
                    if delivery.attempts < spec.attempts {
                        tokio::time::sleep(backoff.next_wait()).await;
                    }
                }
            }
        }
        if !delivery.delivered {
            trace.fail(
                "undelivered",
                delivery.last_error.clone().unwrap_or_default(),
            );
        }
        trace.end();
        if !delivery.delivered {
            let dl = DeadLetter {
                id: uuid::Uuid::now_v7().to_string(),
                source: "webhook".into(),
                route: job.route.clone(),
                reason: format!(
                    "webhook to {url} failed {} times: {}",
                    delivery.attempts,
                    delivery.last_error.clone().unwrap_or_default()
                ),
                attempts: delivery.attempts,
                dead_ms: now_ms(),
                request: Spooled {
                    method: "POST".into(),
                    uri: url.to_string(),
                    headers: vec![(JOB_ID.into(), job.id.as_bytes().to_vec())],
                    ..job.request.clone()
                },
                body: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body),
            };
            let (store, ttl) = self.store.lock().expect("jobs store").clone();
            match crate::durable::spool::put_dead_letter(&store, ttl, &dl).await {
                Ok(()) => {
                    tracing::warn!(job = %job.id, route = %job.route, dead_letter = %dl.id, "A webhook was moved to the dead letters.");
                    delivery.dead_lettered = true;
                }
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "Dead-lettering a webhook failed.");
                    job.webhook = Some(delivery);
                    return false;
                }
            }
        }
        job.webhook = Some(delivery);
        true
    }

    /// Replays a dead-lettered webhook: one more series of deliveries.
    pub async fn redeliver(self: &Arc<Self>, dl: &DeadLetter) -> Result<(), String> {
        let job_id = dl
            .request
            .headers
            .iter()
            .find(|(n, _)| n == JOB_ID)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .ok_or("the dead letter names no job")?;
        let installed = self
            .installed(&dl.route)
            .filter(|i| i.webhook.is_some())
            .ok_or_else(|| format!("route `{}` is not loaded with a webhook", dl.route))?;
        // The run that dead-lettered the webhook releases the job just after the dead letter is
        // written: a replay asked for at once waits for it, briefly.
        let busy_until = tokio::time::Instant::now() + REPLAY_WAITS_FOR_BUSY;
        let lease = loop {
            match self
                .claim(&job_id, installed.lease)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(lease) => break lease,
                None if tokio::time::Instant::now() < busy_until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => return Err(format!("job `{job_id}` is busy; try again shortly")),
            }
        };
        let prepared = async {
            let mut job = self
                .get(&job_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("job `{job_id}` no longer exists"))?;
            job.webhook = Some(Delivery::default());
            job.callback = Some(dl.request.uri.clone());
            self.save(&job, &lease).await.map_err(|e| e.to_string())?;
            self.store()
                .put(
                    Ns::PendingJobs,
                    &job.id,
                    job.route.as_bytes(),
                    self.ttl_left(&job),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(job)
        }
        .await;
        match prepared {
            Ok(job) => {
                let this = self.clone();
                tokio::spawn(async move { this.notify(job, installed.webhook, lease).await });
                Ok(())
            }
            Err(e) => {
                self.release_lease_only(&lease).await;
                Err(e)
            }
        }
    }
}

/// Proof that this gateway holds a job.
#[derive(Clone)]
struct Lease {
    id: String,
    token: Vec<u8>,
    ttl: Duration,
}

impl Lease {
    /// Extends the lease if it is still ours; whether it was.
    async fn renew(&self, store: &SharedStore) -> Result<bool, StoreError> {
        store
            .swap(
                Ns::Leases,
                &self.id,
                &self.token,
                Some(&self.token),
                self.ttl,
            )
            .await
    }
}

/// The header naming the job, on webhooks and on their dead letters.
const JOB_ID: &str = "switchyard-job-id";

/// A call's result, as a job keeps it.
struct Outcome {
    status: JobStatus,
    response: Option<StoredResponse>,
    problem: Option<Value>,
}

impl Outcome {
    fn failed(problem: Value) -> Outcome {
        Outcome {
            status: JobStatus::Failed,
            response: None,
            problem: Some(problem),
        }
    }
}

/// A call's result as a job's status, stored answer and problem. Reading the answer's body is
/// bounded by `within`, like the call.
async fn outcome(
    result: Result<Response, BoxError>,
    correlation_id: &str,
    within: Duration,
) -> Outcome {
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => return problem_of(e, correlation_id).await,
    };
    let (head, body) = resp.into_parts();
    let read = match tokio::time::timeout(within, read_limited(body, MAX_RESULT)).await {
        Ok(r) => r,
        Err(_) => {
            return Outcome::failed(json!({
                "type": "urn:switchyard:problem:timeout",
                "title": "Gateway Timeout",
                "status": 504,
                "detail": "The backend's answer did not arrive in full in time.",
                "correlation_id": correlation_id,
            }));
        }
    };
    match read {
        Ok(Ok(bytes)) => {
            let stored = StoredResponse::new(&head, &bytes);
            if head.status.is_server_error() {
                let problem = json!({
                    "type": "urn:switchyard:problem:backend-error",
                    "title": head.status.canonical_reason().unwrap_or("Error"),
                    "status": head.status.as_u16(),
                    "detail": format!("The backend answered {}.", head.status),
                    "correlation_id": correlation_id,
                });
                Outcome {
                    status: JobStatus::Failed,
                    response: Some(stored),
                    problem: Some(problem),
                }
            } else {
                Outcome {
                    status: JobStatus::Succeeded,
                    response: Some(stored),
                    problem: None,
                }
            }
        }
        Ok(Err(_)) => Outcome::failed(json!({
            "type": "urn:switchyard:problem:result-not-kept",
            "title": "Bad Gateway",
            "status": 502,
            "detail": format!("The backend's answer is larger than the {MAX_RESULT} bytes a job keeps, or carries trailers, which a job cannot keep."),
            "correlation_id": correlation_id,
        })),
        Err(e) => problem_of(e, correlation_id).await,
    }
}

/// The problem+json the error edge would have answered, as the job's problem.
async fn problem_of(e: BoxError, correlation_id: &str) -> Outcome {
    let resp = crate::error::rescue(e.as_ref(), correlation_id, None);
    let body = crate::collect_body(resp.into_body())
        .await
        .unwrap_or_default();
    Outcome::failed(serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "status": 500 })))
}

/// Every two seconds: runs jobs whose gateway died (their lease expired), delivers the
/// webhooks it left undelivered, and fails the jobs of routes that no longer run jobs. The
/// first look waits one period, so that a starting gateway has installed all its routes.
async fn recover(jobs: Weak<Jobs>) {
    let period = Duration::from_secs(2);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(j) = jobs.upgrade() else { return };
        if let Err(e) = recover_once(&j).await {
            tracing::warn!(error = %e, "Looking for abandoned jobs failed.");
        }
    }
}

/// Jobs one sweep takes over at most: after an outage, abandoned jobs come back a batch
/// every sweep instead of all at once onto the backends.
const RECOVER_PER_SWEEP: usize = 32;

async fn recover_once(jobs: &Arc<Jobs>) -> Result<(), StoreError> {
    let store = jobs.store();
    let mut after: Option<String> = None;
    let mut taken = 0;
    loop {
        let page = store.list(Ns::PendingJobs, after.as_deref(), 100).await?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (id, route) in &page {
            if taken >= RECOVER_PER_SWEEP {
                return Ok(());
            }
            let route = String::from_utf8_lossy(route);
            let installed = jobs.installed(&route);
            let ttl = installed
                .as_ref()
                .map_or(Duration::from_secs(30), |i| i.lease);
            let Some(lease) = jobs.claim(id, ttl).await? else {
                continue; // someone runs it
            };
            taken += 1;
            let job = match jobs.get(id).await {
                Ok(Some(job)) => job,
                Ok(None) => {
                    // Never fully written (its gateway died before the 202), or expired.
                    jobs.release(&lease).await;
                    continue;
                }
                Err(e) => {
                    jobs.release_lease_only(&lease).await;
                    return Err(e);
                }
            };
            let Some(installed) = installed else {
                if job.status == JobStatus::Pending {
                    tracing::warn!(job = %id, route = %route, "A pending job's route no longer runs jobs; the job is marked failed.");
                    let problem = json!({
                        "type": "urn:switchyard:problem:job-abandoned",
                        "title": "Internal Server Error",
                        "status": 500,
                        "detail": format!("Route '{route}' no longer runs jobs (it was removed or changed by a reload), so this job will not run."),
                        "correlation_id": job.request.correlation_id,
                    });
                    let this = jobs.clone();
                    tokio::spawn(async move {
                        this.finish(job, Outcome::failed(problem), None, lease)
                            .await;
                    });
                } else {
                    jobs.release(&lease).await;
                }
                continue;
            };
            if job.status == JobStatus::Pending {
                tracing::info!(job = %id, route = %route, "Running a job again: the gateway that ran it stopped.");
                tokio::spawn(jobs.clone().run(job, installed, lease));
            } else {
                let this = jobs.clone();
                tokio::spawn(async move { this.notify(job, installed.webhook, lease).await });
            }
        }
        if page.len() < 100 {
            return Ok(());
        }
    }
}

/// The job layer of one route (see the module docs).
#[derive(Clone)]
pub struct JobService {
    inner: RouteService,
    jobs: Arc<Jobs>,
    route: Arc<str>,
    /// `on_timeout: accept`: how long the client waits before it gets a job instead.
    accept_after: Option<Duration>,
    webhook: Option<Arc<WebhookSpec>>,
    lease: Duration,
}

impl JobService {
    pub fn new(
        inner: RouteService,
        jobs: Arc<Jobs>,
        route: Arc<str>,
        accept_after: Option<Duration>,
        webhook: Option<Arc<WebhookSpec>>,
        background: Duration,
    ) -> Self {
        JobService {
            inner,
            jobs,
            route,
            accept_after,
            webhook,
            lease: background + Duration::from_secs(5),
        }
    }

    /// The job's callback URL: from the header the route names (checked against its
    /// allow-list), else the route's own.
    fn callback(&self, parts: &http::request::Parts) -> Result<Option<String>, Problem> {
        let Some(spec) = &self.webhook else {
            return Ok(None);
        };
        if let Some(h) = &spec.from_header
            && let Some(v) = parts.headers.get(h.as_str())
        {
            let field = Some(format!("header.{}", h.to_ascii_lowercase()));
            let url = v.to_str().map_err(|_| {
                Problem::bad_request("The callback URL must be visible ASCII.")
                    .with_optional_field(field.clone())
            })?;
            if !webhook::valid_url(url) {
                return Err(Problem::bad_request(
                    "The callback URL must be an absolute http or https URL.",
                )
                .with_optional_field(field));
            }
            if let Err(why) = webhook::allowed(url, &spec.allow) {
                return Err(Problem::bad_request(format!(
                    "The callback URL cannot be used: {why}."
                ))
                .with_optional_field(field));
            }
            return Ok(Some(url.to_string()));
        }
        Ok(spec.url.clone())
    }

    fn installed(&self) -> Installed {
        Installed {
            service: self.inner.clone(),
            webhook: self.webhook.clone(),
            lease: self.lease,
        }
    }

    /// What `activate` installs for this route.
    pub fn install(&self) {
        self.jobs.install(
            &self.route,
            self.inner.clone(),
            self.webhook.clone(),
            self.lease,
        );
    }
}

crate::backends::route_service!(JobService);

impl JobService {
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let (mut parts, body) = req.into_parts();
        let body = crate::collect_body(body).await?;
        let callback = self.callback(&parts)?;
        let id = uuid::Uuid::now_v7().to_string();
        let message_id = match parts.extensions.get::<MessageId>() {
            Some(m) => m.0.to_string(),
            None => {
                parts.extensions.insert(MessageId(id.as_str().into()));
                id.clone()
            }
        };
        let job = Job {
            id: id.clone(),
            route: self.route.to_string(),
            status: JobStatus::Pending,
            accepted_ms: now_ms(),
            finished_ms: None,
            runs: 0,
            request: Spooled::capture(&parts, &message_id),
            body: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body),
            response: None,
            problem: None,
            webhook: callback.as_ref().map(|_| Delivery::default()),
            callback,
        };
        let jobs_path = self.jobs.spec().path;
        let retry_after = self.jobs.spec().retry_after.0;
        let answer = accepted(&job, &jobs_path, retry_after);
        let Some(wait) = self.accept_after else {
            // Recorded and started in a task of its own: a client that goes away mid-write
            // leaves either no job or one that runs.
            let (jobs, installed) = (self.jobs.clone(), self.installed());
            let created = tokio::spawn(async move {
                let lease = jobs.create(&job, installed.lease).await?;
                tokio::spawn(jobs.run(job, installed, lease));
                Ok::<_, StoreError>(())
            });
            created
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
                .and_then(|r| r)
                .map_err(Problem::store_unavailable)?;
            return Ok(answer);
        };
        // on_timeout: accept — the call runs on its own so that it outlives the wait.
        let req = http::Request::from_parts(parts, full_body(body));
        let (tx, mut rx) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _ = tx.send(inner.oneshot(req).await);
        });
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(result)) => return result,
            Ok(Err(_)) => {
                return Err(Problem::internal("the call ended without an answer").into());
            }
            Err(_) => {}
        }
        // The wait is over: record the job, then follow the call to its end, in a task of its
        // own so that the late answer is kept even if this client goes away.
        let (jobs, installed, route) = (self.jobs.clone(), self.installed(), self.route.clone());
        let (created_tx, created_rx) = oneshot::channel();
        tokio::spawn(async move {
            let lease = match jobs.create(&job, installed.lease).await {
                Ok(lease) => {
                    let _ = created_tx.send(true);
                    lease
                }
                Err(e) => {
                    tracing::warn!(route = %route, error = %e, "The call outlived its timeout but no job could be recorded for it.");
                    let _ = created_tx.send(false);
                    return;
                }
            };
            let holding = jobs.hold(&lease);
            let result = rx.await.unwrap_or_else(|_| {
                Err(Problem::internal("the call ended without an answer").into())
            });
            let result = outcome(result, &job.request.correlation_id, installed.lease).await;
            jobs.finish(job, result, installed.webhook, lease).await;
            holding.abort();
        });
        if created_rx.await != Ok(true) {
            return Err(Problem::timeout(wait).into());
        }
        Ok(answer)
    }
}

/// The 202 that names a job.
fn accepted(job: &Job, jobs_path: &str, retry_after: Duration) -> Response {
    let href = format!("{jobs_path}/{}", job.id);
    let body = json!({
        "id": job.id,
        "status": "pending",
        "href": href,
        "message_id": job.request.message_id,
    });
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = StatusCode::ACCEPTED;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&href) {
        h.insert(header::LOCATION, v);
    }
    h.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    h.insert(STATUS_HEADER, HeaderValue::from_static("pending"));
    resp
}

/// The id the job endpoint's route carries: its answers are counted and logged under it.
pub const JOBS_ROUTE: &str = "switchyard.jobs";

/// The route the table generates for `GET {jobs.path}/{id}` when a route runs jobs, answered
/// by [`JobEndpoint`].
pub fn endpoint_route(spec: &JobsSpec) -> crate::config::RouteSpec {
    let path = format!("{}/{{id}}", spec.path.trim_end_matches('/'));
    serde_json::from_value(serde_json::json!({
        "id": JOBS_ROUTE,
        // Every method: the path is the job endpoint's alone (a catch-all route never takes
        // it), and the endpoint answers 405 itself for what is not GET or HEAD.
        "match": { "path": path },
        "backend": "",
    }))
    .expect("the job endpoint's route is a valid route")
}

/// The bottom of the job endpoint's route: the job, passed through the plugins of the route
/// that made it (authentication, headers), or as it is when that route is gone or no longer
/// runs jobs.
#[derive(Clone)]
pub struct JobEndpoint {
    jobs: Arc<Jobs>,
    /// Per route id, the stack of its plugins around a prepared answer.
    readers: Arc<HashMap<String, crate::RouteService>>,
}

impl JobEndpoint {
    pub fn new(jobs: Arc<Jobs>, readers: HashMap<String, crate::RouteService>) -> Self {
        JobEndpoint {
            jobs,
            readers: Arc::new(readers),
        }
    }

    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let id = req
            .extensions()
            .get::<RequestContext>()
            .and_then(|c| c.param("id"))
            .unwrap_or_default()
            .to_string();
        let spec = self.jobs.spec();
        let (resp, job_route) = serve(&self.jobs, &spec, req.method(), &id).await?;
        let Some(reader) = self.readers.get(&job_route).cloned() else {
            return Ok(resp);
        };
        let (mut parts, _) = req.into_parts();
        parts
            .extensions
            .insert(Prepared(Arc::new(std::sync::Mutex::new(Some(resp)))));
        if let Some(cx) = parts.extensions.get_mut::<RequestContext>() {
            cx.route_id = Arc::from(job_route.as_str());
            cx.params = Vec::new();
        }
        reader
            .oneshot(http::Request::from_parts(parts, crate::empty_body()))
            .await
    }
}

crate::backends::route_service!(JobEndpoint);

/// A job's answer, prepared by the front end, handed through the plugins of its route.
#[derive(Clone)]
pub struct Prepared(pub Arc<std::sync::Mutex<Option<Response>>>);

/// The bottom of a route's job-reading stack: the answer the front end prepared.
#[derive(Clone)]
pub struct ReadJob;

crate::backends::route_service!(ReadJob);

impl ReadJob {
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        req.extensions()
            .get::<Prepared>()
            .and_then(|p| p.0.lock().ok()?.take())
            .ok_or_else(|| Problem::internal("no job answer was prepared").into())
    }
}

async fn serve(
    jobs: &Arc<Jobs>,
    spec: &JobsSpec,
    method: &Method,
    id: &str,
) -> Result<(Response, String), BoxError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Problem::method_not_allowed(&[Method::GET, Method::HEAD]).into());
    }
    let not_found = || Problem::job_not_found(id);
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(not_found().into());
    }
    let job = jobs
        .get(id)
        .await
        .map_err(Problem::store_unavailable)?
        .ok_or_else(not_found)?;
    // Pending: 202 and the job; succeeded: 200 and the job with the backend's answer; failed:
    // the problem the route would have answered, with its status, naming the job.
    let (status, content_type, body) = match job.status {
        JobStatus::Pending => (
            StatusCode::ACCEPTED,
            "application/json",
            job.view(&spec.path),
        ),
        JobStatus::Succeeded => (StatusCode::OK, "application/json", job.view(&spec.path)),
        JobStatus::Failed => {
            let mut p = match job.problem.clone() {
                Some(Value::Object(p)) => p,
                _ => serde_json::Map::new(),
            };
            p.entry("status").or_insert(json!(500));
            p.insert("job_id".into(), job.id.clone().into());
            p.insert("job_status".into(), "failed".into());
            p.insert("href".into(), format!("{}/{}", spec.path, job.id).into());
            if let Some(f) = job.finished_ms {
                p.insert("finished_at".into(), rfc3339(f).into());
            }
            if let Some(r) = &job.response {
                p.insert("response".into(), response_view(r));
            }
            let status = p["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, "application/problem+json", Value::Object(p))
        }
    };
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(STATUS_HEADER, HeaderValue::from_static(job.status.as_str()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if job.status == JobStatus::Pending {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(spec.retry_after.0.as_secs().max(1)),
        );
    }
    Ok((resp, job.route))
}
