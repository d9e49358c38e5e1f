//! Tower middleware shared by every route, and [`stack`], THE function that orders a route's
//! layers. It runs once per route when config loads; the request path calls the result through
//! shared references (`RouteService::direct`): a layer clones only what its future keeps.

pub mod breaker;
pub mod choose;
pub mod context;
pub mod correlation;

pub mod limit;
pub mod retry;
pub mod timeout;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use crate::RouteService;
use crate::backends::BuiltBackend;
use crate::config::{DefaultsSpec, FieldError, OnTimeout, RouteMode, RouteSpec};
use crate::plugins;
use crate::store::State;
use crate::telemetry::metrics::Metrics;

/// Builds one route's service around its backend. Outermost first, the order is:
///
/// 1. **Correlation ID, trace context and the error edge** — applied by the front end
///    (`server::dispatch`) around the router itself, not here, because 400/404/405 answers made
///    before any route is chosen must carry the correlation ID too.
/// 2. **Plugins**, in the order the route lists them: they see the request first and the
///    response last, and a plugin's rejection (auth, for instance) must not count as a backend
///    failure, use a rate-limit token or take time from the backend's deadline.
/// 3. **Rate limit**: cheapest refusal first; a request over the rate never holds a
///    concurrency slot.
/// 4. **Route concurrency limit** (load shedding): fails fast with 503 instead of queueing.
/// 5. **Idempotency key**: a repeat is answered from the store before it can reach anything
///    below, and the answer stored is the one the client saw (a spooled 202 included).
/// 6. **Job** (`mode: async`, `on_timeout: accept`): below the key, so that a repeat gets the
///    same job; above the spool and the timeout, so that the background call gets the whole
///    stack below, with its own deadline (`async.timeout`).
/// 7. **Spool**: above the timeout, retry and breaker, so that it sees the final verdict of
///    all tries (backend unreachable, breaker open) and the forwarder's replays go through
///    the same tries and breaker as a direct request. Below it (and the job), the route's
///    script's `on_message` and `on_reply` are attached to what is sent later, which does not
///    pass the plugins again.
/// 8. **Overall timeout**: one deadline for everything below it, retries and backoff included;
///    it sets the `Deadline` extension so backends can pass the remaining time on.
/// 9. **Backend choice** (`alternatives` only): the backend a script chose; each backend has
///    its own layers 10 to 14 below, so a canary's failures open its own breaker and spend its
///    own retry budget, while the route's rate, limits and deadline above stay one.
/// 10. **Retry** (with the backend's budget): outside the breaker so that every try is judged by
///     it, and a breaker that opens mid-way stops further tries at once.
/// 11. **Circuit breaker** (per backend, shared by its routes): sees each try's outcome.
/// 12. **Backend concurrency limit**: each try holds a slot on the backend.
/// 13. **Per-try timeout**: bounds one try, so a hung try can be retried within the deadline.
/// 14. **Backend**: the protocol bridge itself.
///
/// A WebSocket route gets the same layers, but they see only its handshake: the answer (101)
/// ends the request, so the timeout bounds the handshake and the breaker and limits judge
/// whether the bridge could be set up; the session that follows runs under the app's drain.
pub fn stack(
    route: &RouteSpec,
    defaults: &DefaultsSpec,
    backend: &BuiltBackend,
    alternatives: &[Arc<BuiltBackend>],
    metrics: &Arc<Metrics>,
    state: Option<&Arc<State>>,
    cx: &crate::backends::BuildContext<'_>,
) -> Result<RouteStack, FieldError> {
    let needs_state = || FieldError::from("the route needs the state store, which is not open");
    let id: Arc<str> = route.id.as_str().into();
    let mut svc = tries(route, defaults, backend, metrics)?;
    if !alternatives.is_empty() {
        let mut others = Vec::with_capacity(alternatives.len());
        for (j, alt) in alternatives.iter().enumerate() {
            let below = tries(route, defaults, alt, metrics).map_err(|e| {
                let on = e.field.map(|f| format!(" (`{f}`)")).unwrap_or_default();
                FieldError::at(
                    format!("alternatives[{j}]"),
                    format!("backend `{}`{on}: {}", alt.name, e.message),
                )
            })?;
            others.push((Arc::from(alt.name.as_str()), below));
        }
        svc = RouteService::direct(choose::Choose::new(svc, others));
    }
    let timeout = route.timeout.unwrap_or(defaults.timeout).0;
    let background = route
        .background
        .as_ref()
        .and_then(|b| b.timeout)
        .map(|d| d.0);
    let jobbed = route.mode == RouteMode::Async || route.on_timeout == OnTimeout::Accept;
    // The timeout layer bounds the call the job layer makes in the background, if there is one.
    let deadline = match (route.mode, route.on_timeout) {
        (RouteMode::Async, _) => background.unwrap_or(timeout),
        (_, OnTimeout::Accept) => background.unwrap_or(Duration::from_secs(300)),
        _ => timeout,
    };
    svc = RouteService::direct(timeout::TimeoutLayer::new(deadline).layer(svc));
    if route.spool || jobbed {
        svc = with_message_hook(route, svc, cx)?;
    }
    let mut spool_inner = None;
    if route.spool {
        let state = state.ok_or_else(needs_state)?;
        spool_inner = Some(crate::durable::spool::Forwarding {
            service: svc.clone(),
            ordered: backend.ordered_sender(route),
        });
        svc = RouteService::new(crate::durable::spool::SpoolService::new(
            svc,
            state.spool.clone(),
            id.clone(),
            backend.name.clone(),
        ));
    }
    let mut job = None;
    if jobbed {
        let state = state.ok_or_else(needs_state)?;
        let j = crate::durable::jobs::JobService::new(
            svc,
            state.jobs.clone(),
            id.clone(),
            (route.on_timeout == OnTimeout::Accept && route.mode == RouteMode::Sync)
                .then_some(timeout),
            route
                .background
                .as_ref()
                .and_then(|b| b.webhook.clone())
                .map(Arc::new),
            deadline,
        );
        svc = RouteService::new(j.clone());
        job = Some(j);
    }
    if let Some(spec) = &route.idempotency {
        let state = state.ok_or_else(needs_state)?;
        svc = RouteService::new(crate::durable::idempotency::IdempotencyService::new(
            svc,
            state.store.clone(),
            spec,
            id.clone(),
            timeout,
        ));
    }
    if let Some(n) = route.concurrency_limit {
        let scope: Arc<str> = format!("route {}", route.id).into();
        svc = RouteService::direct(limit::ConcurrencyLimitService::new(
            svc,
            limit::Slots::new(n),
            scope,
            metrics.clone(),
        ));
    }
    if let Some(rl) = &route.rate_limit {
        let store = match rl.scope {
            crate::config::RateScope::Cluster => Some(state.ok_or_else(needs_state)?.store.clone()),
            crate::config::RateScope::Local => None,
        };
        let rl = Arc::new(limit::RateLimit::new(
            rl,
            id.clone(),
            metrics.clone(),
            store,
        ));
        svc = RouteService::direct(limit::RateLimitService::new(svc, rl));
    }
    svc = with_plugins(route, svc, cx)?;
    // Reading a job of the route passes the same plugins (its authentication, for one).
    let job_reader = match &job {
        Some(_) => Some(with_plugins(
            route,
            RouteService::new(crate::durable::jobs::ReadJob),
            cx,
        )?),
        None => None,
    };
    Ok(RouteStack {
        service: svc,
        spool_inner,
        job,
        job_reader,
    })
}

/// Layers 10 to 14 of [`stack`] around one backend: what each try of a request passes.
fn tries(
    route: &RouteSpec,
    defaults: &DefaultsSpec,
    backend: &BuiltBackend,
    metrics: &Arc<Metrics>,
) -> Result<RouteService, FieldError> {
    let mut svc = backend.route_service(route, metrics)?;
    if let Some(t) = route.per_try_timeout.or(defaults.per_try_timeout) {
        svc = RouteService::direct(timeout::TimeoutLayer::per_try(t.0).layer(svc));
    }
    if let Some(slots) = &backend.policy.concurrency {
        let scope: Arc<str> = format!("backend {}", backend.name).into();
        svc = RouteService::direct(limit::ConcurrencyLimitService::new(
            svc,
            slots.clone(),
            scope,
            metrics.clone(),
        ));
    }
    if let Some(b) = &backend.policy.breaker {
        svc = RouteService::direct(breaker::BreakerService::new(svc, b.clone()));
    }
    if let Some(r) = route.retry.as_ref().or(defaults.retry.as_ref())
        && r.attempts > 1
    {
        let policy = Arc::new(retry::RetryPolicy::new(r, route.idempotent));
        svc = RouteService::direct(retry::RetryService::new(
            svc,
            policy,
            backend.policy.budget.clone(),
            route.id.as_str().into(),
            backend.name.as_str().into(),
            metrics.clone(),
        ));
    }
    Ok(svc)
}

/// `svc` with the route's script's `on_message` and `on_reply` (the innermost script that has
/// them, as on the live path), for the requests the spool and jobs rebuild and send later.
fn with_message_hook(
    route: &RouteSpec,
    svc: RouteService,
    cx: &crate::backends::BuildContext<'_>,
) -> Result<RouteService, FieldError> {
    for (j, p) in route.plugins.iter().enumerate().rev() {
        if p.name != "script" {
            continue;
        }
        let hook = plugins::script::message_hook(&p.config, &route.id, cx).map_err(|e| {
            FieldError::at(format!("plugins[{j}]"), format!("plugin `script`: {e}"))
        })?;
        if let Some(hook) = hook {
            return Ok(RouteService::direct(plugins::script::AttachHook {
                inner: svc,
                hook,
            }));
        }
    }
    Ok(svc)
}

/// `svc` inside the route's plugins, the first listed outermost; except `cors`, which is
/// always outermost, so that a preflight (which carries no credentials) is answered before any
/// authentication plugin would refuse it.
fn with_plugins(
    route: &RouteSpec,
    mut svc: RouteService,
    cx: &crate::backends::BuildContext<'_>,
) -> Result<RouteService, FieldError> {
    let mut order: Vec<(usize, &crate::config::PluginSpec)> =
        route.plugins.iter().enumerate().collect();
    order.sort_by_key(|(_, p)| p.name != "cors");
    for (j, p) in order.into_iter().rev() {
        let refused = |message: String| {
            FieldError::at(
                format!("plugins[{j}]"),
                format!("plugin `{}`: {message}", p.name),
            )
        };
        let plugin = plugins::find(&p.name).ok_or_else(|| refused("unknown plugin".into()))?;
        svc = plugin.wrap(&p.config, svc, route, cx).map_err(refused)?;
    }
    Ok(svc)
}

/// A route's stack, and the part below its spool layer that the spool's forwarder replays
/// messages through.
pub struct RouteStack {
    pub service: RouteService,
    pub spool_inner: Option<crate::durable::spool::Forwarding>,
    /// The job layer, whose routes' jobs are run (and recovered) once the table serves.
    pub job: Option<crate::durable::jobs::JobService>,
    /// What `GET {jobs.path}/{id}` passes for a job of this route: its plugins.
    pub job_reader: Option<RouteService>,
}

impl RouteStack {
    /// A stack that is only `service`, for routes the gateway generates with no layers of
    /// their own (the job endpoint, whose answers pass through the plugins of the job's route).
    pub fn bare(service: RouteService) -> Self {
        RouteStack {
            service,
            spool_inner: None,
            job: None,
            job_reader: None,
        }
    }
}
