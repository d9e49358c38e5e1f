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
use crate::error::GatewayError;
use crate::middleware::context::MessageId;
use crate::spool::{DeadLetter, Spooled};
use crate::store::{Ns, SharedStore, StoreError, StoredResponse, now_ms, read_limited};
use crate::{BoxError, Request, Response, RouteService, full_body};

/// Carries a job's state on every answer about it.
pub const STATUS_HEADER: &str = "switchyard-job-status";
/// The largest backend answer kept as a job's result.
const MAX_RESULT: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Succeeded,
    Failed,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
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
        let end = job.accepted_ms + self.spec().ttl.0.as_millis() as u64;
        Duration::from_millis(end.saturating_sub(now_ms()).max(1000))
    }

    /// Records a new job durably, with this gateway's lease on it: the pending mark first,
    /// so that a job is never stored without the mark recovery looks for.
    async fn create(&self, job: &Job, lease: Duration) -> Result<(), StoreError> {
        let store = self.store();
        let ttl = self.spec().ttl.0;
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        store
            .put(Ns::PendingJobs, &job.id, job.route.as_bytes(), ttl)
            .await?;
        store
            .insert(Ns::Leases, &job.id, self.instance.as_bytes(), lease)
            .await?;
        if store
            .insert(Ns::Jobs, &job.id, &value, ttl)
            .await?
            .is_some()
        {
            return Err(StoreError::Corrupt("job id already taken".into()));
        }
        Ok(())
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

    /// Writes a job, trying a few times while the store is down: the result of a call that
    /// ran must not be dropped lightly.
    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut wait = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            match self
                .store()
                .put(Ns::Jobs, &job.id, &value, self.ttl_left(job))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if tries >= 5 => return Err(e),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }

    /// Runs a job whose lease this gateway holds, then finishes it.
    async fn run(self: Arc<Self>, mut job: Job, installed: Installed) {
        job.runs += 1;
        let route: Arc<str> = job.route.as_str().into();
        let body = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &job.body)
            .unwrap_or_default();
        let result = match job.request.request(&route, Bytes::from(body)) {
            Ok(req) => installed.service.clone().oneshot(req).await,
            Err(reason) => Err(GatewayError::BadRequest {
                detail: format!("The stored request cannot be rebuilt: {reason}."),
                field: None,
            }
            .into()),
        };
        self.finish(job, result, installed.webhook).await;
    }

    /// Stores a finished call's result in the job, then delivers its webhook.
    async fn finish(
        self: Arc<Self>,
        mut job: Job,
        result: Result<Response, BoxError>,
        webhook: Option<Arc<WebhookSpec>>,
    ) {
        let (status, response, problem) = outcome(result, &job.request.correlation_id).await;
        job.status = status;
        job.response = response;
        job.problem = problem;
        job.finished_ms = Some(now_ms());
        if let Err(e) = self.save(&job).await {
            // The lease runs out and another run makes the call again.
            tracing::error!(job = %job.id, route = %job.route, error = %e, "Storing a job's result failed; the job will run again.");
            return;
        }
        tracing::debug!(job = %job.id, route = %job.route, status = status.as_str(), "Job finished.");
        self.notify(job, webhook).await;
    }

    /// Delivers the webhook (if any), then clears the job's pending mark and lease.
    async fn notify(self: Arc<Self>, mut job: Job, webhook: Option<Arc<WebhookSpec>>) {
        let store = self.store();
        if let (Some(url), Some(spec)) = (job.callback.clone(), webhook) {
            let mut delivery = job.webhook.clone().unwrap_or_default();
            let jobs_path = self.spec().path;
            let body = Bytes::from(job.view(&jobs_path).to_string());
            let event = format!("job.{}", job.status.as_str());
            let mut wait = spec.backoff.min.0;
            while !delivery.delivered && delivery.attempts < spec.attempts {
                // Hold the job for the length of one attempt and its wait.
                let hold = spec.timeout.0 + spec.backoff.max.0 + Duration::from_secs(10);
                let _ = store
                    .put(Ns::Leases, &job.id, self.instance.as_bytes(), hold)
                    .await;
                delivery.attempts += 1;
                match self
                    .sender
                    .send(&url, &spec, &job.id, &event, body.clone())
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
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(spec.backoff.max.0);
                        }
                    }
                }
            }
            if !delivery.delivered {
                let reason = format!(
                    "webhook to {url} failed {} times: {}",
                    delivery.attempts,
                    delivery.last_error.clone().unwrap_or_default()
                );
                let dl = DeadLetter {
                    id: uuid::Uuid::now_v7().to_string(),
                    source: "webhook".into(),
                    route: job.route.clone(),
                    reason,
                    attempts: delivery.attempts,
                    dead_ms: now_ms(),
                    request: Spooled {
                        method: "POST".into(),
                        uri: url.clone(),
                        headers: vec![("switchyard-job-id".into(), job.id.as_bytes().to_vec())],
                        ..job.request.clone()
                    },
                    body: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body),
                };
                let ttl = self.store.lock().expect("jobs store").1;
                match crate::spool::put_dead_letter(&store, ttl, &dl).await {
                    Ok(()) => {
                        tracing::warn!(job = %job.id, route = %job.route, dead_letter = %dl.id, "A webhook was moved to the dead letters.");
                        delivery.dead_lettered = true;
                    }
                    Err(e) => {
                        // Keep the pending mark: recovery tries the delivery again later.
                        tracing::error!(job = %job.id, error = %e, "Dead-lettering a webhook failed.");
                        job.webhook = Some(delivery);
                        let _ = self.save(&job).await;
                        return;
                    }
                }
            }
            job.webhook = Some(delivery);
            if let Err(e) = self.save(&job).await {
                tracing::warn!(job = %job.id, error = %e, "Recording a webhook's delivery failed.");
            }
        }
        let _ = store.delete(Ns::PendingJobs, &job.id).await;
        let _ = store.delete(Ns::Leases, &job.id).await;
    }

    /// Replays a dead-lettered webhook: one more series of deliveries.
    pub async fn redeliver(self: &Arc<Self>, dl: &DeadLetter) -> Result<(), String> {
        let job_id = dl
            .request
            .headers
            .iter()
            .find(|(n, _)| n == "switchyard-job-id")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .ok_or("the dead letter names no job")?;
        let job = self
            .get(&job_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("job `{job_id}` no longer exists"))?;
        let installed = self
            .installed(&job.route)
            .filter(|i| i.webhook.is_some())
            .ok_or_else(|| format!("route `{}` is not loaded with a webhook", job.route))?;
        let mut job = job;
        job.webhook = Some(Delivery::default());
        job.callback = Some(dl.request.uri.clone());
        let store = self.store();
        store
            .put(
                Ns::PendingJobs,
                &job.id,
                job.route.as_bytes(),
                self.ttl_left(&job),
            )
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(self.clone().notify(job, installed.webhook));
        Ok(())
    }
}

/// A call's result as a job's status, stored answer and problem.
async fn outcome(
    result: Result<Response, BoxError>,
    correlation_id: &str,
) -> (JobStatus, Option<StoredResponse>, Option<Value>) {
    match result {
        Ok(resp) => {
            let (head, body) = resp.into_parts();
            match read_limited(body, MAX_RESULT).await {
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
                        (JobStatus::Failed, Some(stored), Some(problem))
                    } else {
                        (JobStatus::Succeeded, Some(stored), None)
                    }
                }
                Ok(Err(_)) => (
                    JobStatus::Failed,
                    None,
                    Some(json!({
                        "type": "urn:switchyard:problem:result-too-large",
                        "title": "Bad Gateway",
                        "status": 502,
                        "detail": format!("The backend's answer is larger than the {MAX_RESULT} bytes a job keeps."),
                        "correlation_id": correlation_id,
                    })),
                ),
                Err(e) => problem_of(e, correlation_id).await,
            }
        }
        Err(e) => problem_of(e, correlation_id).await,
    }
}

/// The problem+json the error edge would have answered, as the job's problem.
async fn problem_of(
    e: BoxError,
    correlation_id: &str,
) -> (JobStatus, Option<StoredResponse>, Option<Value>) {
    let resp = crate::error::rescue(e.as_ref(), correlation_id, None);
    let body = crate::collect_body(resp.into_body())
        .await
        .unwrap_or_default();
    let problem = serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "status": 500 }));
    (JobStatus::Failed, None, Some(problem))
}

/// Every two seconds: runs jobs whose gateway died (their lease expired) and delivers the
/// webhooks it left undelivered.
async fn recover(jobs: Weak<Jobs>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(j) = jobs.upgrade() else { return };
        if let Err(e) = recover_once(&j).await {
            tracing::warn!(error = %e, "Looking for abandoned jobs failed.");
        }
    }
}

async fn recover_once(jobs: &Arc<Jobs>) -> Result<(), StoreError> {
    let store = jobs.store();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(Ns::PendingJobs, after.as_deref(), 100).await?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (id, route) in &page {
            let route = String::from_utf8_lossy(route);
            let Some(installed) = jobs.installed(&route) else {
                continue;
            };
            if store
                .insert(Ns::Leases, id, jobs.instance.as_bytes(), installed.lease)
                .await?
                .is_some()
            {
                continue; // someone runs it
            }
            match jobs.get(id).await? {
                None => {
                    store.delete(Ns::PendingJobs, id).await?;
                    store.delete(Ns::Leases, id).await?;
                }
                Some(job) if job.status == JobStatus::Pending => {
                    tracing::info!(job = %id, route = %route, "Running a job again: the gateway that ran it stopped.");
                    tokio::spawn(jobs.clone().run(job, installed));
                }
                Some(job) => {
                    tokio::spawn(jobs.clone().notify(job, installed.webhook));
                }
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
    fn callback(&self, parts: &http::request::Parts) -> Result<Option<String>, GatewayError> {
        let Some(spec) = &self.webhook else {
            return Ok(None);
        };
        if let Some(h) = &spec.from_header
            && let Some(v) = parts.headers.get(h.as_str())
        {
            let field = Some(format!("header.{}", h.to_ascii_lowercase()));
            let url = v.to_str().map_err(|_| GatewayError::BadRequest {
                detail: "The callback URL must be visible ASCII.".into(),
                field: field.clone(),
            })?;
            if !webhook::valid_url(url) {
                return Err(GatewayError::BadRequest {
                    detail: "The callback URL must be an absolute http or https URL.".into(),
                    field,
                });
            }
            if !webhook::allowed(url, &spec.allow) {
                return Err(GatewayError::BadRequest {
                    detail: "The callback URL is not one this route may call back.".into(),
                    field,
                });
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
        let Some(wait) = self.accept_after else {
            self.jobs
                .create(&job, self.lease)
                .await
                .map_err(|source| GatewayError::StoreUnavailable { source })?;
            tokio::spawn(self.jobs.clone().run(job.clone(), self.installed()));
            return Ok(accepted(&job, &jobs_path, self.jobs.spec().retry_after.0));
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
                return Err(GatewayError::Internal("the call ended without an answer").into());
            }
            Err(_) => {}
        }
        if let Err(e) = self.jobs.create(&job, self.lease).await {
            tracing::warn!(route = %self.route, error = %e, "The call outlived its timeout but no job could be recorded for it.");
            return Err(GatewayError::Timeout { after: wait }.into());
        }
        let jobs = self.jobs.clone();
        let webhook = self.webhook.clone();
        let (follow, answer) = (
            job.clone(),
            accepted(&job, &jobs_path, jobs.spec().retry_after.0),
        );
        tokio::spawn(async move {
            let result = rx.await.unwrap_or_else(|_| {
                Err(GatewayError::Internal("the call ended without an answer").into())
            });
            jobs.finish(follow, result, webhook).await;
        });
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

/// `GET {jobs.path}/{id}` when `path` is under the job endpoint of a table with jobs; `None`
/// for any other path.
pub async fn endpoint(
    jobs: &Arc<Jobs>,
    method: &Method,
    path: &str,
) -> Option<Result<Response, BoxError>> {
    let spec = jobs.spec();
    let id = path.strip_prefix(spec.path.as_str())?.strip_prefix('/')?;
    Some(serve(jobs, &spec, method, id).await)
}

async fn serve(
    jobs: &Arc<Jobs>,
    spec: &JobsSpec,
    method: &Method,
    id: &str,
) -> Result<Response, BoxError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(GatewayError::MethodNotAllowed {
            allow: vec![Method::GET, Method::HEAD],
        }
        .into());
    }
    let not_found = || GatewayError::JobNotFound { id: id.to_string() };
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(not_found().into());
    }
    let job = jobs
        .get(id)
        .await
        .map_err(|source| GatewayError::StoreUnavailable { source })?
        .ok_or_else(not_found)?;
    let view = job.view(&spec.path);
    let (status, content_type, body) = match job.status {
        JobStatus::Pending => (StatusCode::ACCEPTED, "application/json", view),
        JobStatus::Succeeded => (StatusCode::OK, "application/json", view),
        JobStatus::Failed => {
            let mut p = job
                .problem
                .clone()
                .unwrap_or_else(|| json!({ "status": 500 }));
            p["job_id"] = job.id.clone().into();
            p["job_status"] = "failed".into();
            if let Some(r) = &job.response {
                p["response"] = response_view(r);
            }
            let status = p["status"]
                .as_u64()
                .and_then(|s| StatusCode::from_u16(s as u16).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, "application/problem+json", p)
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
    Ok(resp)
}
