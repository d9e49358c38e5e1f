//! Pure validation of a parsed [`ConfigSpec`]: every problem is collected, each pointing at the
//! line and column it was written on. No I/O: files named by the config are checked at build.

use std::collections::{BTreeSet, HashMap};

use http::{HeaderName, HeaderValue, Method, Uri};

use super::ConfigError;
use super::model::*;
use super::source::Locator;
use super::template::{PathTemplate, ValueTemplate};

pub struct Checks<'a> {
    file: &'a str,
    loc: &'a Locator,
    errors: Vec<ConfigError>,
    /// A template of the route being checked reads `{claims.…}`.
    claims_used: bool,
    /// A template of the route being checked reads `{ctx.…}`.
    ctx_used: bool,
}

impl Checks<'_> {
    /// Notes that `t`, a template of the route being checked, reads `{claims.…}`, which only
    /// a `jwt` plugin on the route provides.
    pub(crate) fn template(&mut self, t: &ValueTemplate) {
        self.claims_used |= t.uses_claims();
        self.ctx_used |= t.uses_ctx();
    }

    pub(crate) fn err(&mut self, path: &str, route: Option<&str>, message: impl Into<String>) {
        let pos = self.loc.at(path);
        self.errors.push(ConfigError {
            route: route.map(str::to_string),
            ..ConfigError::at(self.file, pos.line, pos.column, message)
        });
    }
    pub(crate) fn err_key_route(
        &mut self,
        path: &str,
        route: Option<&str>,
        message: impl Into<String>,
    ) {
        let pos = self.loc.key(path);
        self.errors.push(ConfigError {
            route: route.map(str::to_string),
            ..ConfigError::at(self.file, pos.line, pos.column, message)
        });
    }
    pub(crate) fn err_key(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.loc.key(path);
        self.errors
            .push(ConfigError::at(self.file, pos.line, pos.column, message));
    }
}

/// Parsed methods of a route: `None` means every method.
pub fn route_methods(m: &MatchSpec) -> Result<Option<BTreeSet<Method>>, String> {
    let Some(list) = &m.method else {
        return Ok(None);
    };
    if list.0.is_empty() {
        return Err("`method` is an empty list; leave it out to match every method".into());
    }
    let mut out = BTreeSet::new();
    for name in &list.0 {
        let upper = name.to_ascii_uppercase();
        if upper != *name {
            return Err(format!(
                "method `{name}` must be written in capitals: `{upper}`"
            ));
        }
        let m = Method::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid HTTP method"))?;
        out.insert(m);
    }
    Ok(Some(out))
}

pub fn validate(file: &str, spec: &ConfigSpec, loc: &Locator) -> Vec<ConfigError> {
    let mut cx = Checks {
        file,
        loc,
        errors: Vec::new(),
        claims_used: false,
        ctx_used: false,
    };
    validate_server(&mut cx, &spec.server);
    if let Some(r) = &spec.defaults.retry {
        validate_retry(&mut cx, "defaults.retry", None, r);
    }
    if let Some(t) = spec.defaults.per_try_timeout
        && t.0 > spec.defaults.timeout.0
    {
        cx.err(
            "defaults.per_try_timeout",
            None,
            "the per-try timeout is longer than the overall `timeout`; make it shorter",
        );
    }
    for (name, backend) in &spec.backends {
        validate_backend(&mut cx, name, backend);
    }
    validate_state(&mut cx, &spec.state);
    crate::telemetry::otel::spec::validate(&mut cx, &spec.telemetry);
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut shapes: HashMap<(Option<String>, String), Vec<usize>> = HashMap::new();
    let mut catch_all_keys = std::collections::HashSet::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let base = format!("routes[{i}]");
        let id = route.id.as_str();
        if id.trim().is_empty() {
            cx.err(&format!("{base}.id"), None, "a route `id` may not be empty");
        } else if let Some(first) = ids.get(id) {
            let first_line = loc.at(&format!("routes[{first}].id")).line;
            cx.err(
                &format!("{base}.id"),
                Some(id),
                format!("duplicate route id; the first route with this id is on line {first_line}; give each route a unique id"),
            );
        } else {
            ids.insert(id, i);
        }
        let template = validate_route(&mut cx, spec, i, route);
        validate_state_use(&mut cx, spec, i, route);
        if let Some(t) = template {
            let host = route.matcher.host.clone();
            if t.ends_with_catch_all() {
                catch_all_keys.insert(t.router_key());
            }
            shapes.entry((host, t.router_key())).or_default().push(i);
        }
    }
    // Two routes with the same host and path shape can only be told apart by methods or headers.
    for group in shapes.values() {
        for (a_pos, &a) in group.iter().enumerate() {
            for &b in &group[a_pos + 1..] {
                let (ra, rb) = (&spec.routes[a], &spec.routes[b]);
                if indistinguishable(ra, rb) {
                    let line = loc.at(&format!("routes[{a}]")).line;
                    cx.err(
                        &format!("routes[{b}].match.path"),
                        Some(&rb.id),
                        format!(
                            "this route can never be told apart from route `{}` (line {line}): same host, path shape and methods; change the path, the methods or add a header condition",
                            ra.id
                        ),
                    );
                }
            }
        }
    }
    // The router itself must accept every shape (it rejects some overlaps of variables).
    let mut routers: HashMap<(Option<String>, bool), matchit::Router<()>> = HashMap::new();
    let mut keys: Vec<_> = shapes.iter().collect();
    keys.sort_by_key(|(_, idx)| idx[0]);
    for ((host, key), idx) in keys {
        let router = routers
            .entry((host.clone(), catch_all_keys.contains(key)))
            .or_default();
        if let Err(e) = router.insert(key.as_str(), ()) {
            let i = idx[0];
            cx.err(
                &format!("routes[{i}].match.path"),
                Some(&spec.routes[i].id),
                format!("this path overlaps another route's path in a way the router cannot resolve ({e}); make the static parts differ"),
            );
        }
    }
    cx.errors.sort_by_key(|e| (e.line, e.column));
    cx.errors
}

fn validate_state(cx: &mut Checks, st: &crate::config::StateSpec) {
    if st.path.as_os_str().is_empty() {
        cx.err("state.path", None, "name the local database file");
    }
    if st.store == crate::config::StoreKind::Redis {
        let redis_url = |url: &str| {
            (url.starts_with("redis://") || url.starts_with("rediss://"))
                && url.split("://").nth(1).is_some_and(|r| !r.is_empty())
        };
        let url = &st.redis.url;
        if !redis_url(url) {
            cx.err(
                "state.redis.url",
                None,
                format!("`{url}` is not a Redis URL; write redis://host:port[/db]"),
            );
        }
        for (i, node) in st.redis.cluster.iter().enumerate() {
            if !redis_url(node) {
                cx.err(
                    &format!("state.redis.cluster[{i}]"),
                    None,
                    format!("`{node}` is not a Redis URL; write redis://host:port"),
                );
            }
        }
        if let Some(s) = &st.redis.sentinel {
            if !st.redis.cluster.is_empty() {
                cx.err_key_route(
                    "state.redis.sentinel",
                    None,
                    "a Redis Cluster is not found through Sentinel: set `cluster` or `sentinel`, not both",
                );
            }
            if s.urls.is_empty() {
                cx.err(
                    "state.redis.sentinel.urls",
                    None,
                    "list at least one sentinel",
                );
            }
            for (i, u) in s.urls.iter().enumerate() {
                if !redis_url(u) {
                    cx.err(
                        &format!("state.redis.sentinel.urls[{i}]"),
                        None,
                        format!("`{u}` is not a Redis URL; write redis://host:26379"),
                    );
                }
            }
            if s.master.is_empty() {
                cx.err(
                    "state.redis.sentinel.master",
                    None,
                    "name the monitored master",
                );
            }
        }
        if st.redis.timeout.0.is_zero() {
            cx.err("state.redis.timeout", None, "must be above zero");
        }
    }
    if st.spool.max_messages == 0 {
        cx.err("state.spool.max_messages", None, "must be above zero");
    }
    if st.spool.max_bytes.0 == 0 {
        cx.err("state.spool.max_bytes", None, "must be above zero");
    }
    if st.spool.max_attempts == 0 {
        cx.err("state.spool.max_attempts", None, "must be at least 1");
    }
    if st.spool.retry.min.0.is_zero() || st.spool.retry.min.0 > st.spool.retry.max.0 {
        cx.err(
            "state.spool.retry",
            None,
            "`min` must be above zero and at most `max`",
        );
    }
    let p = &st.jobs.path;
    if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains(['{', '}', '?', '#']) {
        cx.err(
            "state.jobs.path",
            None,
            format!("`{p}` is not a path prefix; write one such as /jobs (a leading slash, no trailing slash, no variables)"),
        );
    }
    for (key, d) in [
        ("state.jobs.ttl", st.jobs.ttl),
        ("state.dead_letter_ttl", st.dead_letter_ttl),
    ] {
        if d.0.is_zero() {
            cx.err(key, None, "must be above zero");
        }
    }
}

/// The route settings that use the state store: `idempotency`, `spool` and `mode`.
fn validate_state_use(cx: &mut Checks, spec: &ConfigSpec, i: usize, route: &RouteSpec) {
    let base = format!("routes[{i}]");
    let id = Some(route.id.as_str());
    let ws = route.websocket.is_some();
    if let Some(idem) = &route.idempotency {
        if ws {
            cx.err_key_route(
                &format!("{base}.idempotency"),
                id,
                "a WebSocket route has no single answer to replay; remove `idempotency`",
            );
        }
        if idem.max_key_length == 0 || idem.max_key_length > 255 {
            cx.err(
                &format!("{base}.idempotency.max_key_length"),
                id,
                "must be between 1 and 255",
            );
        }
        if idem.ttl.0.is_zero() {
            cx.err(&format!("{base}.idempotency.ttl"), id, "must be above zero");
        }
    }
    if route.spool {
        let backend = spec.backends.get(&route.backend);
        let broker = matches!(backend, Some(BackendSpec::Amqp(_) | BackendSpec::Mqtt(_)));
        let waits = route.amqp.as_ref().is_some_and(|a| a.reply.is_some())
            || route.mqtt.as_ref().is_some_and(|m| m.response.is_some());
        let why = if ws {
            Some("a WebSocket route cannot be spooled")
        } else if backend.is_some() && !broker {
            Some("only routes to an amqp or mqtt backend publish messages that can be spooled")
        } else if waits {
            Some(
                "this route waits for a reply, which a spooled message cannot give; remove `spool` or the reply",
            )
        } else {
            None
        };
        if let Some(why) = why {
            cx.err(&format!("{base}.spool"), id, why);
        }
    }
    let is_async = route.mode == crate::config::RouteMode::Async;
    let accept = route.on_timeout == crate::config::OnTimeout::Accept;
    if is_async && ws {
        cx.err(
            &format!("{base}.mode"),
            id,
            "a WebSocket route cannot run as a job",
        );
    }
    if accept && (ws || is_async) {
        cx.err(
            &format!("{base}.on_timeout"),
            id,
            if ws {
                "a WebSocket route has no timeout to accept on"
            } else {
                "`on_timeout` is for sync routes; an async route always answers 202 with a job"
            },
        );
    }
    if (is_async || accept)
        && let Some(p) = spec.routes.iter().position(|r| {
            let jobs = &spec.state.jobs.path;
            r.matcher.path == *jobs
                || r.matcher
                    .path
                    .strip_prefix(jobs.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    {
        cx.err(
            &format!("routes[{p}].match.path"),
            Some(&spec.routes[p].id),
            format!(
                "this path is under the job endpoint `{}` (state.jobs.path); move the route or set another state.jobs.path",
                spec.state.jobs.path
            ),
        );
    }
    if accept && !is_async && !ws {
        let wait = route.timeout.unwrap_or(spec.defaults.timeout).0;
        let background = route
            .background
            .as_ref()
            .and_then(|b| b.timeout)
            .map_or(std::time::Duration::from_secs(300), |d| d.0);
        if background <= wait {
            let at = if route
                .background
                .as_ref()
                .is_some_and(|b| b.timeout.is_some())
            {
                format!("{base}.async.timeout")
            } else {
                format!("{base}.on_timeout")
            };
            cx.err(
                &at,
                id,
                format!(
                    "the background call's deadline ({}) must be longer than the route's `timeout` ({}), which is when the job is accepted",
                    humantime::format_duration(background),
                    humantime::format_duration(wait)
                ),
            );
        }
    }
    let Some(bg) = &route.background else {
        return;
    };
    let ab = format!("{base}.async");
    if !(is_async || accept) {
        cx.err_key_route(
            &ab,
            id,
            "`async` settings apply only to `mode: async` or `on_timeout: accept` routes",
        );
    }
    if bg.timeout.is_some_and(|t| t.0.is_zero()) {
        cx.err(&format!("{ab}.timeout"), id, "must be above zero");
    }
    let Some(w) = &bg.webhook else { return };
    let wb = format!("{ab}.webhook");
    if w.url.is_none() && w.from_header.is_none() {
        cx.err_key_route(
            &wb,
            id,
            "give the callback `url`, or `from_header` to take it from the request",
        );
    }
    if let Some(u) = &w.url
        && !crate::durable::jobs::webhook::valid_url(u)
    {
        cx.err(
            &format!("{wb}.url"),
            id,
            format!("`{u}` is not an absolute http or https URL without user info"),
        );
    }
    if let Some(h) = &w.from_header {
        if HeaderName::from_bytes(h.as_bytes()).is_err() {
            cx.err(
                &format!("{wb}.from_header"),
                id,
                format!("`{h}` is not a valid header name"),
            );
        }
        if w.allow.is_empty() {
            cx.err(
                &format!("{wb}.from_header"),
                id,
                "a callback URL from the request must match an `allow` entry; list the URL prefixes allowed",
            );
        }
    }
    for (j, a) in w.allow.iter().enumerate() {
        if !crate::durable::jobs::webhook::valid_url(a) {
            cx.err(
                &format!("{wb}.allow[{j}]"),
                id,
                format!("`{a}` is not an absolute http or https URL prefix"),
            );
        }
    }
    if w.secret.len() < 16 {
        cx.err(
            &format!("{wb}.secret"),
            id,
            "the signing secret must be at least 16 characters; use `${VAR}` to keep it out of the file",
        );
    }
    if w.attempts == 0 {
        cx.err(&format!("{wb}.attempts"), id, "must be at least 1");
    }
    if w.backoff.min.0.is_zero() || w.backoff.min.0 > w.backoff.max.0 {
        cx.err(
            &format!("{wb}.backoff"),
            id,
            "`min` must be above zero and at most `max`",
        );
    }
    if w.timeout.0.is_zero() {
        cx.err(&format!("{wb}.timeout"), id, "must be above zero");
    }
}

/// Whether two routes of the same host and path shape accept the same requests: their methods
/// overlap, and neither a header condition nor a custom verb tells them apart.
pub fn indistinguishable(a: &RouteSpec, b: &RouteSpec) -> bool {
    let (Ok(ma), Ok(mb)) = (route_methods(&a.matcher), route_methods(&b.matcher)) else {
        return false;
    };
    let overlap = match (&ma, &mb) {
        (Some(x), Some(y)) => x.intersection(y).next().is_some(),
        _ => true,
    };
    let shape = |r: &RouteSpec| r.matcher.rule.as_ref().map(|t| t.shape());
    overlap && a.matcher.headers == b.matcher.headers && shape(a) == shape(b)
}

/// Whether a URL carries user info (`user:pass@`).
pub(crate) fn has_userinfo(u: &Uri) -> bool {
    u.authority().is_some_and(|a| a.as_str().contains('@'))
}

/// Why user info is refused in an HTTP or gRPC endpoint.
pub(crate) const USERINFO_HTTP: &str = "an endpoint holds no user info (`user:pass@`): it would not be sent as credentials but could end up in the Host header; set `Authorization` with the `headers` plugin";

fn validate_server(cx: &mut Checks, s: &ServerSpec) {
    if let Some(t) = &s.admin_token
        && t.len() < 16
    {
        cx.err(
            "server.admin_token",
            None,
            "shorter than 16 characters; use a long random token from the environment (`${ADMIN_TOKEN}`)",
        );
    }
    if HeaderName::from_bytes(s.correlation_header.as_bytes()).is_err() {
        cx.err(
            "server.correlation_header",
            None,
            "not a valid HTTP header name",
        );
    }
    if s.limits.max_connections == 0 {
        cx.err("server.limits.max_connections", None, "must be at least 1");
    }
    if s.limits.max_header_size.0 < 8192 {
        cx.err(
            "server.limits.max_header_size",
            None,
            "must be at least 8KiB (the HTTP/1 parser's smallest buffer)",
        );
    }
    for (what, d) in [
        ("header_read_timeout", s.limits.header_read_timeout),
        ("idle_timeout", s.limits.idle_timeout),
    ] {
        if d.0.is_zero() {
            cx.err(&format!("server.limits.{what}"), None, "must be above zero");
        }
    }
    match (s.workers, s.runtime) {
        (Some(0), _) => cx.err("server.workers", None, "`workers` must be at least 1"),
        (Some(n), _) if n > 1024 => {
            cx.err("server.workers", None, "`workers` must be at most 1024")
        }
        (Some(_), crate::config::RuntimeMode::Shared) => cx.err(
            "server.workers",
            None,
            "`workers` applies to `runtime: per_core`; set `runtime: per_core`, or remove `workers` (the shared runtime uses every core)",
        ),
        _ => {}
    }
    if s.listen == s.admin && s.listen.port() != 0 {
        cx.err(
            "server.admin",
            None,
            "the admin listener needs an address of its own, not the public `listen` address",
        );
    }
}

fn validate_backend(cx: &mut Checks, name: &str, b: &BackendSpec) {
    let base = format!("backends.{name}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        cx.err_key(
            &base,
            format!("backend name `{name}`: use letters, digits, `-`, `_` and `.`"),
        );
    }
    b.validate(cx, &base);
    validate_policy(cx, &base, &b.policy());
}

fn validate_route(
    cx: &mut Checks,
    spec: &ConfigSpec,
    i: usize,
    route: &RouteSpec,
) -> Option<PathTemplate> {
    let base = format!("routes[{i}]");
    let id = Some(route.id.as_str());
    let template = match PathTemplate::parse(&route.matcher.path) {
        Ok(t) => Some(t),
        Err(e) => {
            cx.err(&format!("{base}.match.path"), id, e);
            None
        }
    };
    if let Err(e) = route_methods(&route.matcher) {
        cx.err(&format!("{base}.match.method"), id, e);
    }
    if let Some(host) = &route.matcher.host
        && (host.is_empty() || host.contains([':', '/', ' ']) || host.to_ascii_lowercase() != *host)
    {
        cx.err(
            &format!("{base}.match.host"),
            id,
            format!("host `{host}`: write a lower-case host name without port or scheme"),
        );
    }
    for (name, value) in &route.matcher.headers {
        let path = format!("{base}.match.headers.{name}");
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            cx.err(&path, id, format!("`{name}` is not a valid header name"));
        }
        if HeaderValue::from_str(value).is_err() {
            cx.err(
                &path,
                id,
                "header value holds characters not allowed in HTTP headers",
            );
        }
    }
    if let Some(t) = route.timeout
        && t.0.is_zero()
    {
        cx.err(&format!("{base}.timeout"), id, "must be above zero");
    }
    let overall = route.timeout.unwrap_or(spec.defaults.timeout).0;
    if let Some(t) = route.per_try_timeout {
        if t.0.is_zero() {
            cx.err(&format!("{base}.per_try_timeout"), id, "must be above zero");
        } else if t.0 > overall {
            cx.err(
                &format!("{base}.per_try_timeout"),
                id,
                format!(
                    "the per-try timeout ({}) is longer than the route's overall timeout ({}); make it shorter",
                    humantime::format_duration(t.0),
                    humantime::format_duration(overall)
                ),
            );
        }
    }
    if let Some(r) = &route.retry {
        validate_retry(cx, &format!("{base}.retry"), id, r);
    }
    if route.concurrency_limit == Some(0) {
        cx.err(
            &format!("{base}.concurrency_limit"),
            id,
            "must be at least 1",
        );
    }
    if let Some(rl) = &route.rate_limit {
        let p = format!("{base}.rate_limit");
        if rl.requests == 0 {
            cx.err(&format!("{p}.requests"), id, "must be at least 1");
        }
        if rl.per.0.is_zero() {
            cx.err(&format!("{p}.per"), id, "must be above zero");
        }
        if rl.burst == Some(0) {
            cx.err(&format!("{p}.burst"), id, "must be at least 1");
        }
        let cluster = rl.scope == crate::config::RateScope::Cluster;
        if cluster && spec.state.store != crate::config::StoreKind::Redis {
            cx.err(
                &format!("{p}.scope"),
                id,
                "`scope: cluster` keeps the count in the shared state store; set `state.store: redis`",
            );
        }
        if !cluster && rl.fallback != crate::config::RateFallback::Local {
            cx.err_key_route(
                &format!("{p}.fallback"),
                id,
                "`fallback` says what a cluster-wide limit does while Redis is away; it needs `scope: cluster`",
            );
        }
        if cluster && rl.store_timeout.0.is_zero() {
            cx.err(&format!("{p}.store_timeout"), id, "must be above zero");
        }
        if let RateLimitKey::Header(h) = &rl.key
            && HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            cx.err(
                &format!("{p}.key"),
                id,
                format!("`{h}` is not a valid header name"),
            );
        }
    }
    match spec.backends.get(&route.backend) {
        None => {
            let known: Vec<&str> = spec.backends.keys().map(String::as_str).collect();
            let hint = if known.is_empty() {
                "define it under `backends:`".to_string()
            } else {
                format!(
                    "define it under `backends:` or use one of: {}",
                    known.join(", ")
                )
            };
            cx.err(
                &format!("{base}.backend"),
                id,
                format!("backend `{}` is not defined; {hint}", route.backend),
            );
        }
        Some(backend) => {
            let kind = backend.kind();
            for (key, present) in [
                ("http", route.http.is_some()),
                ("grpc", route.grpc.is_some()),
                ("amqp", route.amqp.is_some()),
                ("mqtt", route.mqtt.is_some()),
            ] {
                if present && key != kind {
                    cx.err_key_route(
                        &format!("{base}.{key}"),
                        id,
                        format!(
                            "`{key}:` settings need a {key} backend, and `{}` is a {kind} backend",
                            route.backend
                        ),
                    );
                }
            }
        }
    }
    validate_alternatives(cx, spec, &base, id, route);
    let bridge = match (&route.websocket, spec.backends.get(&route.backend)) {
        (Some(ws), Some(backend)) => {
            validate_websocket_route(cx, &base, id, route, ws, backend, template.as_ref());
            None
        }
        (_, b) => b,
    };
    if let Some(b) = bridge {
        b.validate_route(cx, &base, route, template.as_ref());
    }
    if std::mem::take(&mut cx.claims_used) && !route.plugins.iter().any(|p| p.name == "jwt") {
        cx.err(
            &base,
            id,
            "a template reads `{claims.…}`, which only a `jwt` plugin on the route provides; add one, or use `{header.…}`",
        );
    }
    if std::mem::take(&mut cx.ctx_used) && !route.plugins.iter().any(|p| p.name == "script") {
        cx.err(
            &base,
            id,
            "a template reads `{ctx.…}`, which only a `script` plugin on the route sets; add one",
        );
    }
    for (j, p) in route.plugins.iter().enumerate() {
        let path = format!("{base}.plugins[{j}]");
        match crate::plugins::find(&p.name) {
            None => cx.err_key_route(
                &format!("{path}.{}", p.name),
                id,
                format!(
                    "unknown plugin `{}`; known plugins: {}",
                    p.name,
                    crate::plugins::names().join(", ")
                ),
            ),
            Some(plugin) => {
                if let Err(e) = plugin.validate(&p.config) {
                    cx.err(
                        &format!("{path}.{}", p.name),
                        id,
                        format!("plugin `{}`: {e}", p.name),
                    );
                }
            }
        }
    }
    template
}

/// A route's `alternatives`: declared backends of `backend`'s type, each once, chosen by a
/// script, on a route whose requests are not kept for later (what the spool or a job sends
/// later does not pass the script again, so it could not keep the choice).
fn validate_alternatives(
    cx: &mut Checks,
    spec: &ConfigSpec,
    base: &str,
    id: Option<&str>,
    route: &RouteSpec,
) {
    if route.alternatives.is_empty() {
        return;
    }
    let kind = spec.backends.get(&route.backend).map(BackendSpec::kind);
    for (j, name) in route.alternatives.iter().enumerate() {
        let path = format!("{base}.alternatives[{j}]");
        let why = match spec.backends.get(name) {
            None => Some(format!("backend `{name}` is not defined")),
            Some(_) if *name == route.backend => Some(format!(
                "`{name}` is the route's `backend`; list only the others"
            )),
            Some(_) if route.alternatives[..j].contains(name) => {
                Some(format!("`{name}` is listed twice"))
            }
            Some(b) if kind.is_some_and(|k| k != b.kind()) => Some(format!(
                "`{name}` is a {} backend and `{}` a {}; alternatives share the route's settings, so they are of one type",
                b.kind(),
                route.backend,
                kind.unwrap_or_default()
            )),
            Some(_) => None,
        };
        if let Some(why) = why {
            cx.err(&path, id, why);
        }
    }
    let kept = if route.spool {
        Some("`spool: true`")
    } else if route.mode == crate::config::RouteMode::Async {
        Some("`mode: async`")
    } else if route.on_timeout == crate::config::OnTimeout::Accept {
        Some("`on_timeout: accept`")
    } else {
        None
    };
    if let Some(kept) = kept {
        cx.err_key_route(
            &format!("{base}.alternatives"),
            id,
            format!(
                "a route with {kept} sends requests later, past its script, which could not choose among `alternatives` then; remove one of the two"
            ),
        );
    }
    if !route.plugins.iter().any(|p| p.name == "script") {
        cx.err_key_route(
            &format!("{base}.alternatives"),
            id,
            "only a `script` plugin on the route chooses among `alternatives` (`req.backend = \"name\"`); add one",
        );
    }
}

/// A WebSocket route: the handshake policy, connection care, and the bridge's settings, which
/// replace the HTTP bridge's (`mqtt:`, `amqp:`, `grpc:`) on such a route.
fn validate_websocket_route(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    route: &RouteSpec,
    ws: &WebSocketSpec,
    backend: &BackendSpec,
    template: Option<&PathTemplate>,
) {
    let wb = format!("{base}.websocket");
    if let Ok(Some(methods)) = route_methods(&route.matcher)
        && !methods.contains(&Method::GET)
    {
        cx.err(
            &format!("{base}.match.method"),
            id,
            "a WebSocket handshake is a GET (HTTP/2 clients' CONNECT is matched as GET); include GET",
        );
    }
    for (key, present) in [
        ("amqp", route.amqp.is_some()),
        ("mqtt", route.mqtt.is_some()),
        ("grpc", route.grpc.is_some()),
    ] {
        if present {
            cx.err_key_route(
                &format!("{base}.{key}"),
                id,
                format!("a WebSocket route takes its bridge settings under `websocket.{key}:`, not `{key}:`"),
            );
        }
    }
    if let Err((i, e)) = crate::plugins::cors::Origins::parse(&ws.origins) {
        cx.err(&format!("{wb}.origins[{i}]"), id, e);
    }
    for (i, p) in ws.subprotocols.iter().enumerate() {
        let token = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            cx.err(
                &format!("{wb}.subprotocols[{i}]"),
                id,
                format!("`{p}` is not a subprotocol name (an HTTP token: no spaces, commas or separators)"),
            );
        }
    }
    if ws.ping_interval.0.is_zero() {
        cx.err(&format!("{wb}.ping_interval"), id, "must be above zero");
    } else if ws.idle_timeout.0 <= ws.ping_interval.0 {
        cx.err(
            &format!("{wb}.idle_timeout"),
            id,
            format!(
                "the idle timeout ({}) must be longer than the ping interval ({}), or live clients would be cut off between pings",
                humantime::format_duration(ws.idle_timeout.0),
                humantime::format_duration(ws.ping_interval.0)
            ),
        );
    }
    if ws.write_timeout.0.is_zero() {
        cx.err(&format!("{wb}.write_timeout"), id, "must be above zero");
    }
    const MAX_MESSAGE: u64 = 64 * 1024 * 1024;
    if !(16..=MAX_MESSAGE).contains(&ws.max_message_size.0) {
        cx.err(
            &format!("{wb}.max_message_size"),
            id,
            "from 16 bytes to 64MiB",
        );
    }
    if let Some(f) = ws.max_frame_size
        && (f.0 < 16 || f.0 > ws.max_message_size.0)
    {
        cx.err(
            &format!("{wb}.max_frame_size"),
            id,
            "from 16 bytes up to `max_message_size`",
        );
    }
    for (key, n) in [("buffer", ws.buffer), ("inflight", ws.inflight)] {
        if !(1..=65536).contains(&n) {
            cx.err(&format!("{wb}.{key}"), id, "from 1 to 65536");
        }
    }
    let kind = backend.kind();
    for (key, present) in [
        ("mqtt", ws.mqtt.is_some()),
        ("amqp", ws.amqp.is_some()),
        ("grpc", ws.grpc.is_some()),
    ] {
        if present && key != kind {
            cx.err_key_route(
                &format!("{wb}.{key}"),
                id,
                format!(
                    "`websocket.{key}:` needs a {key} backend, and `{}` is a {kind} backend",
                    route.backend
                ),
            );
        }
    }
    backend.validate_websocket(cx, base, route, ws, template);
}

/// Checks a template for a WebSocket handshake: no body values, path values captured.
pub(crate) fn check_handshake_template(
    cx: &mut Checks,
    path: &str,
    id: Option<&str>,
    text: &str,
    template: Option<&PathTemplate>,
) -> Option<ValueTemplate> {
    let captured: Vec<&str> = template.map(|t| t.captures()).unwrap_or_default();
    match ValueTemplate::parse(text) {
        Err(e) => {
            cx.err(path, id, e);
            None
        }
        Ok(t) => {
            cx.template(&t);
            if t.needs_body() {
                cx.err(
                    path,
                    id,
                    "a WebSocket handshake has no body to take `{body.…}` from",
                );
            }
            for p in t.params() {
                if template.is_some() && !captured.contains(&p) {
                    cx.err(
                        path,
                        id,
                        format!("`{{{p}}}` is not captured by the route's path; capture it or use `{{query.{p}}}` or `{{header.{p}}}`"),
                    );
                }
            }
            Some(t)
        }
    }
}

pub(crate) fn validate_retry(cx: &mut Checks, base: &str, id: Option<&str>, r: &RetrySpec) {
    if r.attempts == 0 {
        cx.err(
            &format!("{base}.attempts"),
            id,
            "`attempts` counts every try including the first; use 1 for no retries",
        );
    } else if r.attempts > 10 {
        cx.err(
            &format!("{base}.attempts"),
            id,
            "more than 10 tries only adds load; use at most 10",
        );
    }
    if r.backoff.0 > r.max_backoff.0 {
        cx.err(
            &format!("{base}.backoff"),
            id,
            "`backoff` is larger than `max_backoff`",
        );
    }
    for (i, on) in r.on.iter().enumerate() {
        if let RetryOn::Status(code) = on
            && !(500..=599).contains(code)
        {
            cx.err(
                &format!("{base}.on[{i}]"),
                id,
                format!("status {code} is not retryable; list statuses from 500 to 599"),
            );
        }
    }
}

fn validate_policy(cx: &mut Checks, base: &str, p: &BackendPolicy) {
    let b = &p.breaker;
    let bp = format!("{base}.breaker");
    if b.consecutive_failures == 0 {
        cx.err(
            &format!("{bp}.consecutive_failures"),
            None,
            "must be at least 1",
        );
    }
    if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
        cx.err(
            &format!("{bp}.failure_rate"),
            None,
            "a failure rate is above 0 and at most 1, like 0.5",
        );
    }
    if b.min_requests == 0 {
        cx.err(&format!("{bp}.min_requests"), None, "must be at least 1");
    }
    if b.half_open_probes == 0 {
        cx.err(
            &format!("{bp}.half_open_probes"),
            None,
            "must be at least 1",
        );
    }
    if b.open_for.0.is_zero() {
        cx.err(&format!("{bp}.open_for"), None, "must be above zero");
    }
    if b.window.0 < std::time::Duration::from_secs(1) {
        cx.err(&format!("{bp}.window"), None, "must be at least 1s");
    }
    let r = &p.retry_budget;
    let rp = format!("{base}.retry_budget");
    if !(0.0..=1.0).contains(&r.ratio) {
        cx.err(
            &format!("{rp}.ratio"),
            None,
            "the budget ratio is between 0 and 1, like 0.2 (20 % extra load)",
        );
    }
    if r.ttl.0 < std::time::Duration::from_secs(1) || r.ttl.0 > std::time::Duration::from_secs(60) {
        cx.err(&format!("{rp}.ttl"), None, "must be between 1s and 60s");
    }
    if r.min_per_second >= i32::MAX as u32 {
        cx.err(&format!("{rp}.min_per_second"), None, "is too large");
    }
    if p.concurrency_limit == Some(0) {
        cx.err(
            &format!("{base}.concurrency_limit"),
            None,
            "must be at least 1",
        );
    }
}
