//! Backends: the closed set of protocol bridges at the bottom of every route's stack. A backend
//! is built (connections, pools, probes) when config loads and kept across reloads that leave
//! its spec unchanged; each route then gets its own service on top of the shared backend.

pub mod amqp;
pub mod balance;
pub mod bridge;
pub mod grpc;
pub mod health;
pub mod http;
pub mod live;
pub mod mqtt;
pub mod tls;
pub mod values;
pub mod websocket;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::middleware::window::RetryBudget;

use crate::RouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{BackendPolicy, BackendSpec, RouteSpec};
use crate::middleware::breaker::Breaker;
use crate::telemetry::metrics::Metrics;
use bridge::{Bridge, BridgeSpec};

/// A built backend: its shared connection state, its protection state (breaker, retry
/// budget, concurrency slots) and a readiness view. All of it survives reloads that leave the
/// backend's spec unchanged.
pub struct BuiltBackend {
    pub name: String,
    pub spec: BackendSpec,
    pub policy: PolicyState,
    /// The protocol's own backend, behind the one trait every bridge implements.
    bridge: Arc<dyn Bridge>,
    /// The content of the TLS files it was built with: a reload rebuilds the backend (new
    /// connections) when they changed, though its spec did not.
    tls_stamp: u64,
}

/// The TLS files a backend reads (CA bundle, client certificate and key), resolved against
/// routes.yaml's directory.
fn tls_files(spec: &BackendSpec, base: &std::path::Path) -> Vec<std::path::PathBuf> {
    let tls = match spec {
        BackendSpec::Http(h) => h.tls.as_ref(),
        BackendSpec::Grpc(g) => g.tls.as_ref(),
        BackendSpec::Amqp(a) => a.tls.as_ref(),
        BackendSpec::Mqtt(m) => m.tls.as_ref(),
    };
    tls.into_iter()
        .flat_map(|t| [&t.ca, &t.cert, &t.key])
        .flatten()
        .map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        })
        .collect()
}

/// A hash of the content of `files` (a missing file counts as such).
fn stamp(files: &[std::path::PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

pub struct PolicyState {
    pub breaker: Option<Arc<Breaker>>,
    pub budget: Arc<RetryBudget>,
    pub concurrency: Option<Arc<crate::middleware::limit::Slots>>,
}

impl PolicyState {
    fn new(name: &str, policy: &BackendPolicy, metrics: &Arc<Metrics>) -> Self {
        let b = &policy.retry_budget;
        PolicyState {
            breaker: policy
                .breaker
                .enabled
                .then(|| Breaker::new(name, policy.breaker.clone(), metrics.clone())),
            // Validation keeps ttl within 1–60 s and the ratio within 0–1, as the budget expects.
            budget: Arc::new(RetryBudget::new(
                b.ttl
                    .0
                    .clamp(Duration::from_secs(1), Duration::from_secs(60)),
                b.min_per_second.min(i32::MAX as u32 - 1),
                b.ratio.clamp(0.0, 1.0) as f32,
            )),
            concurrency: policy
                .concurrency_limit
                .map(crate::middleware::limit::Slots::new),
        }
    }
}

/// What building backends reads besides their specs: routes.yaml's directory (relative paths),
/// and what the servers of `reflection: true` backends said, asked just before the build.
pub struct BuildContext<'a> {
    pub base: &'a std::path::Path,
    /// Per backend name: the serialized files from reflection, or why they could not be had.
    pub reflected: HashMap<String, Result<Vec<Vec<u8>>, String>>,
    /// The state of the table being replaced, reused where the new config matches it.
    pub previous_state: Option<Arc<crate::store::State>>,
    /// A check build (`switchyard validate`): state opens in memory, never on disk.
    pub dry: bool,
    /// Every file the build read besides routes.yaml (protos, descriptor sets), so that the
    /// watcher reloads when one of them changes.
    pub read: std::sync::Mutex<Vec<std::path::PathBuf>>,
    /// What the backends this build makes wait on before they connect.
    pub gate: StartGate,
    /// The gateway's metrics, for plugins that count (none in a check build).
    pub metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
}

impl<'a> BuildContext<'a> {
    /// A context with no reflection answers.
    pub fn new(base: &'a std::path::Path) -> Self {
        BuildContext {
            base,
            reflected: HashMap::new(),
            previous_state: None,
            dry: false,
            read: Default::default(),
            gate: StartGate::default(),
            metrics: None,
        }
    }

    /// The list of files read so far, to add to.
    pub fn read_files(&self) -> std::sync::MutexGuard<'_, Vec<std::path::PathBuf>> {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks every `reflection: true` backend for its descriptors, all at once, each within its
    /// connect timeout plus five seconds. The only I/O before a build.
    pub async fn prepare(
        backends: &std::collections::BTreeMap<String, BackendSpec>,
        base: &'a std::path::Path,
    ) -> Self {
        let asks = backends.iter().filter_map(|(name, spec)| match spec {
            BackendSpec::Grpc(g) if g.reflection => Some(async move {
                let files = match grpc::transport::Transport::new(name, g, base) {
                    Ok(ch) => {
                        grpc::reflection::fetch(ch, g.connect_timeout.0 + Duration::from_secs(5))
                            .await
                    }
                    Err(e) => Err(e),
                };
                (name.clone(), files)
            }),
            _ => None,
        });
        BuildContext {
            base,
            reflected: futures_util::future::join_all(asks)
                .await
                .into_iter()
                .collect(),
            previous_state: None,
            dry: false,
            read: Default::default(),
            gate: StartGate::default(),
            metrics: None,
        }
    }
}

/// The closed set of backend kinds forwards to each bridge's [`BridgeSpec`].
impl BackendSpec {
    /// Builds the backend named `name` (inert until its build's gate opens).
    pub fn build(
        &self,
        name: &str,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<Arc<dyn Bridge>, String> {
        let built: Arc<dyn Bridge> = match self {
            BackendSpec::Http(s) => Arc::new(s.build(name, metrics, cx)?),
            BackendSpec::Grpc(s) => Arc::new(s.build(name, metrics, cx)?),
            BackendSpec::Amqp(s) => Arc::new(s.build(name, metrics, cx)?),
            BackendSpec::Mqtt(s) => Arc::new(s.build(name, metrics, cx)?),
        };
        Ok(built)
    }

    /// The pure checks of the backend's section.
    pub fn validate(&self, cx: &mut Checks, base: &str) {
        match self {
            BackendSpec::Http(s) => s.validate(cx, base),
            BackendSpec::Grpc(s) => s.validate(cx, base),
            BackendSpec::Amqp(s) => s.validate(cx, base),
            BackendSpec::Mqtt(s) => s.validate(cx, base),
        }
    }

    /// The pure checks of a route to this backend.
    pub fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        template: Option<&PathTemplate>,
    ) {
        match self {
            BackendSpec::Http(s) => s.validate_route(cx, base, route, template),
            BackendSpec::Grpc(s) => s.validate_route(cx, base, route, template),
            BackendSpec::Amqp(s) => s.validate_route(cx, base, route, template),
            BackendSpec::Mqtt(s) => s.validate_route(cx, base, route, template),
        }
    }

    /// The pure checks of a WebSocket route's bridge settings.
    pub fn validate_websocket(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        ws: &crate::config::WebSocketSpec,
        template: Option<&PathTemplate>,
    ) {
        match self {
            BackendSpec::Http(s) => s.validate_websocket(cx, base, route, ws, template),
            BackendSpec::Grpc(s) => s.validate_websocket(cx, base, route, ws, template),
            BackendSpec::Amqp(s) => s.validate_websocket(cx, base, route, ws, template),
            BackendSpec::Mqtt(s) => s.validate_websocket(cx, base, route, ws, template),
        }
    }

    /// `validate --live` of the backend and its routes.
    pub async fn live(
        &self,
        name: &str,
        routes: &[&RouteSpec],
        base: &std::path::Path,
    ) -> live::Findings {
        match self {
            BackendSpec::Http(s) => s.live(name, routes, base).await,
            BackendSpec::Grpc(s) => s.live(name, routes, base).await,
            BackendSpec::Amqp(s) => s.live(name, routes, base).await,
            BackendSpec::Mqtt(s) => s.live(name, routes, base).await,
        }
    }
}

/// The `tower::Service` of a route service that is cheap to clone and answers through its
/// `async fn call_backend(self, Request) -> Result<Response, BoxError>`.
macro_rules! route_service {
    ($t:ty) => {
        impl tower::Service<$crate::Request> for $t {
            type Response = $crate::Response;
            type Error = $crate::BoxError;
            type Future = $crate::ResponseFuture;

            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), $crate::BoxError>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: $crate::Request) -> $crate::ResponseFuture {
                Box::pin(self.clone().call_backend(req))
            }
        }
    };
}
pub(crate) use route_service;

/// Aborts a background task (a readiness probe) when its backend is dropped after a reload
/// replaced it.
pub struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Holds the background tasks of the backends a build made (connection loops, probes) until
/// their table serves: building makes inert values, so a rejected reload or a `validate`
/// never opens a connection. One gate per build; the table opens it when it is activated.
#[derive(Clone, Default, Debug)]
pub struct StartGate(tokio_util::sync::CancellationToken);

impl StartGate {
    /// Lets the tasks waiting on this gate run (idempotent).
    pub fn open(&self) {
        self.0.cancel();
    }

    /// Resolves once the gate is open.
    pub async fn opened(&self) {
        self.0.cancelled().await
    }

    /// Spawns `task` to run once the gate opens, aborted when the handle is dropped (with
    /// its backend). `None` outside a runtime (benchmarks build tables without one).
    pub fn spawn<F>(&self, task: F) -> Option<AbortOnDrop>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let gate = self.clone();
        let handle = rt.spawn(async move {
            gate.opened().await;
            task.await
        });
        Some(AbortOnDrop(handle.abort_handle()))
    }
}

/// Probes `addrs` with TCP connects every `interval` and sets `reachable` when any answers,
/// from the moment `gate` opens. Returns `None` outside a runtime (benchmarks build tables
/// without one).
pub fn spawn_probe(
    name: &str,
    kind: &'static str,
    addrs: Vec<String>,
    reachable: Arc<std::sync::atomic::AtomicBool>,
    interval: Duration,
    timeout: Duration,
    gate: &StartGate,
) -> Option<AbortOnDrop> {
    use std::sync::atomic::Ordering;
    let health = health::Health::new(name, kind);
    gate.spawn(async move {
        loop {
            let mut last_error = None;
            let mut any = false;
            for addr in &addrs {
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => any = true,
                    Ok(Err(e)) => last_error = Some(format!("{addr}: {e}")),
                    Err(_) => {
                        last_error = Some(format!(
                            "{addr}: no TCP connection within {}",
                            humantime::format_duration(timeout)
                        ))
                    }
                }
            }
            reachable.store(any, Ordering::Relaxed);
            if any {
                health.up();
            } else {
                health.down(&format!(
                    "no endpoint accepts a TCP connection ({})",
                    last_error.unwrap_or_default()
                ));
            }
            tokio::time::sleep(interval).await;
        }
    })
}

impl BuiltBackend {
    /// Builds the backend. Never fails because a backend is unreachable: connections are made
    /// lazily or in the background, and readiness reports the state.
    /// Fails only on a broken definition (descriptors that do not load), never because the
    /// backend is unreachable. `base` is routes.yaml's directory.
    pub fn build(
        name: &str,
        spec: &BackendSpec,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<Self, String> {
        let bridge = spec.build(name, metrics, cx)?;
        let tls = tls_files(spec, cx.base);
        let tls_stamp = stamp(&tls);
        cx.read_files().extend(tls);
        Ok(BuiltBackend {
            name: name.to_string(),
            spec: spec.clone(),
            policy: PolicyState::new(name, &spec.policy(), metrics),
            bridge,
            tls_stamp,
        })
    }

    /// Whether the backend can take requests now.
    pub fn ready(&self) -> bool {
        self.bridge.ready()
    }

    /// Why the backend is not ready, when the backend can say.
    pub fn problem(&self) -> Option<String> {
        self.bridge.problem()
    }

    pub fn kind(&self) -> &'static str {
        self.spec.kind()
    }

    /// Reloads what a kept backend reads from files (gRPC descriptors), keeping connections.
    pub fn refresh(&self, cx: &BuildContext<'_>) -> Result<(), String> {
        self.bridge.refresh(&self.spec, cx)
    }

    /// Routes the backend defines itself (gRPC methods with `google.api.http` annotations, and
    /// native gRPC routes).
    pub fn generated_routes(&self) -> bridge::Generated {
        self.bridge.generated_routes()
    }

    /// An ordered batch sender for the spool's forwarder, where the backend can keep a
    /// route's order with several messages in flight.
    pub fn ordered_sender(
        &self,
        route: &RouteSpec,
    ) -> Option<Arc<dyn crate::durable::spool::OrderedSend>> {
        self.bridge.clone().ordered_sender(route)
    }

    /// The service at the bottom of `route`'s stack.
    pub fn route_service(
        &self,
        route: &RouteSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, crate::config::FieldError> {
        match &route.websocket {
            Some(ws) => Ok(self.bridge.clone().websocket(route, ws, metrics)?),
            None => self.bridge.clone().route_service(route),
        }
    }
}

/// Backends by name, reused across reloads when their spec is unchanged.
#[derive(Default, Clone)]
pub struct BackendSet {
    pub by_name: HashMap<String, Arc<BuiltBackend>>,
}

impl BackendSet {
    /// What the serving routes need of their backends, applied once their table serves: the
    /// named AMQP reply queues each AMQP backend consumes, and whether its channels consume
    /// direct reply-to.
    pub fn activate(&self, routes: &[RouteSpec]) {
        for (name, b) in &self.by_name {
            b.bridge.activate(name, routes);
        }
    }

    /// The backends for a new config: unchanged specs keep their connections. Every backend
    /// is built, so that all broken definitions are reported at once: the set of those that
    /// built, and the name and reason of each that did not.
    pub fn rebuild(
        &self,
        specs: &std::collections::BTreeMap<String, BackendSpec>,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> (BackendSet, Vec<(String, String)>) {
        let mut by_name = HashMap::new();
        let mut failed = Vec::new();
        for (name, spec) in specs {
            let built = match self.by_name.get(name) {
                Some(old)
                    if old.spec == *spec && old.tls_stamp == stamp(&tls_files(spec, cx.base)) =>
                {
                    cx.read_files().extend(tls_files(spec, cx.base));
                    old.refresh(cx).map(|()| old.clone())
                }
                _ => BuiltBackend::build(name, spec, metrics, cx).map(Arc::new),
            };
            match built {
                Ok(b) => {
                    by_name.insert(name.clone(), b);
                }
                Err(e) => failed.push((name.clone(), e)),
            }
        }
        (BackendSet { by_name }, failed)
    }
}

/// Refuses a file the config names that does not exist, saying so and what `key` it came from,
/// before a reader's own error (which names neither) would.
/// A broker's address as the access log names it: `scheme://host:port` of its URL, without
/// credentials or path (`amqp://127.0.0.1:5672`).
pub(crate) fn broker_address(url: &str) -> Arc<str> {
    let Ok(u) = url.parse::<::http::Uri>() else {
        return Arc::from("-");
    };
    let scheme = u.scheme_str().unwrap_or("");
    let port = u.port_u16().unwrap_or(match scheme {
        "amqps" => 5671,
        "mqtt" | "tcp" => 1883,
        "mqtts" | "ssl" => 8883,
        "ws" => 80,
        "wss" => 443,
        _ => 5672,
    });
    match u.host() {
        Some(host) => Arc::from(format!("{scheme}://{host}:{port}")),
        None => Arc::from("-"),
    }
}

pub(crate) fn must_exist(key: &str, path: &std::path::Path) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!(
            "`{key}` {}: not found (a relative path starts at routes.yaml's directory)",
            path.display()
        ))
    }
}
