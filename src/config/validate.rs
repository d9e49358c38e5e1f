//! Pure validation of a parsed [`ConfigSpec`]: every problem is collected, each pointing at the
//! line and column it was written on. No I/O: files named by the config are checked at build.

use std::collections::{BTreeSet, HashMap};

use http::{HeaderName, HeaderValue, Method, Uri};

use super::ConfigError;
use super::model::*;
use super::source::Locator;
use super::template::{PathTemplate, Template, ValueTemplate};

struct Ctx<'a> {
    file: &'a str,
    loc: &'a Locator,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn err(&mut self, path: &str, route: Option<&str>, message: impl Into<String>) {
        let pos = self.loc.at(path);
        self.errors.push(ConfigError {
            route: route.map(str::to_string),
            ..ConfigError::at(self.file, pos.line, pos.column, message)
        });
    }
    fn err_key_route(&mut self, path: &str, route: Option<&str>, message: impl Into<String>) {
        let pos = self.loc.key(path);
        self.errors.push(ConfigError {
            route: route.map(str::to_string),
            ..ConfigError::at(self.file, pos.line, pos.column, message)
        });
    }
    fn err_key(&mut self, path: &str, message: impl Into<String>) {
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
    let mut cx = Ctx {
        file,
        loc,
        errors: Vec::new(),
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

fn validate_state(cx: &mut Ctx, st: &crate::config::StateSpec) {
    if st.path.as_os_str().is_empty() {
        cx.err("state.path", None, "name the local database file");
    }
    if st.store == crate::config::StoreKind::Redis {
        let url = &st.redis.url;
        if !(url.starts_with("redis://") || url.starts_with("rediss://"))
            || url.split("://").nth(1).is_none_or(str::is_empty)
        {
            cx.err(
                "state.redis.url",
                None,
                format!("`{url}` is not a Redis URL; write redis://host:port[/db]"),
            );
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
fn validate_state_use(cx: &mut Ctx, spec: &ConfigSpec, i: usize, route: &RouteSpec) {
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
    overlap && a.matcher.headers == b.matcher.headers && a.matcher.verb == b.matcher.verb
}

/// Request headers that never travel as AMQP message headers: RabbitMQ routes again on `CC`
/// and `BCC`, and the rest are about the HTTP hop itself.
const AMQP_FORBIDDEN_HEADERS: [&str; 8] = [
    "cc",
    "bcc",
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
];

fn validate_amqp_route(
    cx: &mut Ctx,
    base: &str,
    id: Option<&str>,
    a: &AmqpRouteSpec,
    template: Option<&PathTemplate>,
) {
    let captured: Vec<&str> = template.map(|t| t.captures()).unwrap_or_default();
    for (key, raw) in [("exchange", &a.exchange), ("routing_key", &a.routing_key)] {
        match ValueTemplate::parse(raw) {
            Err(e) => cx.err(&format!("{base}.amqp.{key}"), id, e),
            Ok(t) => {
                for p in t.params() {
                    if template.is_some() && !captured.contains(&p) {
                        cx.err(
                            &format!("{base}.amqp.{key}"),
                            id,
                            format!("`{{{p}}}` is not captured by the route's path; capture it or use `{{query.{p}}}`, `{{header.{p}}}` or `{{body.{p}}}`"),
                        );
                    }
                }
            }
        }
    }
    if a.exchange.len() > 255 || a.routing_key.len() > 255 {
        cx.err(
            &format!("{base}.amqp"),
            id,
            "exchange names and routing keys are at most 255 bytes",
        );
    }
    if !matches!(a.unroutable_status, 404 | 502) {
        cx.err(
            &format!("{base}.amqp.unroutable_status"),
            id,
            "an unroutable message answers 404 or 502",
        );
    }
    if !(200..300).contains(&a.status) {
        cx.err(
            &format!("{base}.amqp.status"),
            id,
            "the answer after the broker's confirm is a 2xx status",
        );
    }
    if a.expiration.is_some_and(|d| d.0.as_millis() == 0) {
        cx.err(
            &format!("{base}.amqp.expiration"),
            id,
            "at least 1ms (the property counts milliseconds)",
        );
    }
    for (key, v) in [
        ("app_id", Some(&a.app_id)),
        ("type", a.message_type.as_ref()),
        ("reply.queue", a.reply.as_ref().map(|r| &r.queue)),
    ] {
        if v.is_some_and(|v| v.len() > 255) {
            cx.err(&format!("{base}.amqp.{key}"), id, "at most 255 bytes");
        }
    }
    for (i, h) in a.headers.iter().enumerate() {
        let lower = h.to_ascii_lowercase();
        if HeaderName::from_bytes(h.as_bytes()).is_err()
            || h.len() > 255
            || AMQP_FORBIDDEN_HEADERS.contains(&lower.as_str())
        {
            cx.err(
                &format!("{base}.amqp.headers[{i}]"),
                id,
                format!("`{h}` cannot be copied into a message's headers; name an application header (never CC or BCC, which RabbitMQ routes on)"),
            );
        }
    }
    if let Some(r) = &a.reply {
        if r.queue.is_empty() {
            cx.err(
                &format!("{base}.amqp.reply.queue"),
                id,
                "name the reply queue, or leave it out for direct reply-to",
            );
        }
        if HeaderName::from_bytes(r.status_header.as_bytes()).is_err() {
            cx.err(
                &format!("{base}.amqp.reply.status_header"),
                id,
                "not a valid header name",
            );
        }
    }
}

fn validate_mqtt_route(
    cx: &mut Ctx,
    base: &str,
    id: Option<&str>,
    m: &MqttRouteSpec,
    template: Option<&PathTemplate>,
) {
    let captured: Vec<&str> = template.map(|t| t.captures()).unwrap_or_default();
    match ValueTemplate::parse(&m.topic) {
        Err(e) => cx.err(&format!("{base}.mqtt.topic"), id, e),
        Ok(t) => {
            for p in t.params() {
                if template.is_some() && !captured.contains(&p) {
                    cx.err(
                        &format!("{base}.mqtt.topic"),
                        id,
                        format!("`{{{p}}}` is not captured by the route's path; capture it or use `{{query.{p}}}`, `{{header.{p}}}` or `{{body.{p}}}`"),
                    );
                }
            }
            let literal: String = t
                .parts
                .iter()
                .filter_map(|p| match p {
                    crate::config::template::ValuePart::Lit(l) => Some(l.as_str()),
                    _ => None,
                })
                .collect();
            if m.subscribe {
                if !valid_filter(&m.topic) || literal.contains('\0') {
                    cx.err(
                        &format!("{base}.mqtt.topic"),
                        id,
                        "a topic filter: `+` stands for one whole level, `#` only for the last",
                    );
                }
            } else if m.topic.is_empty() || literal.contains(['+', '#', '\0']) {
                cx.err(
                    &format!("{base}.mqtt.topic"),
                    id,
                    "a publish topic is not empty and has no `+` or `#` wildcards",
                );
            }
            if m.subscribe && (m.last_value || m.response.is_some()) {
                cx.err(
                    &format!("{base}.mqtt.subscribe"),
                    id,
                    "a route either subscribes, reads the last value or waits for a response",
                );
            }
            if m.subscribe && t.needs_body() {
                cx.err(
                    &format!("{base}.mqtt.topic"),
                    id,
                    "a subscription has no request body to take `{body.…}` from",
                );
            }
            if !(1..=65536).contains(&m.buffer) {
                cx.err(
                    &format!("{base}.mqtt.buffer"),
                    id,
                    "from 1 to 65536 messages",
                );
            }
        }
    }
    if m.qos > 2 {
        cx.err(&format!("{base}.mqtt.qos"), id, "0, 1 or 2");
    }
    if !(200..300).contains(&m.status) {
        cx.err(
            &format!("{base}.mqtt.status"),
            id,
            "the answer after the broker's acknowledgement is a 2xx status",
        );
    }
    if m.message_expiry.is_some_and(|d| d.0.as_secs() == 0) {
        cx.err(
            &format!("{base}.mqtt.message_expiry"),
            id,
            "at least 1s (MQTT counts seconds)",
        );
    }
    for (i, h) in m.headers.iter().enumerate() {
        if HeaderName::from_bytes(h.as_bytes()).is_err() {
            cx.err(
                &format!("{base}.mqtt.headers[{i}]"),
                id,
                format!("`{h}` is not a header name"),
            );
        }
    }
}

/// Whether a URL carries user info (`user:pass@`).
fn has_userinfo(u: &Uri) -> bool {
    u.authority().is_some_and(|a| a.as_str().contains('@'))
}

/// Why user info is refused in an HTTP or gRPC endpoint.
const USERINFO_HTTP: &str = "an endpoint holds no user info (`user:pass@`): it would not be sent as credentials but could end up in the Host header; set `Authorization` with the `headers` plugin";

fn validate_mqtt_backend(cx: &mut Ctx, base: &str, m: &MqttBackendSpec) {
    match m.url.parse::<Uri>() {
        Ok(u) if has_userinfo(&u) => cx.err(
            &format!("{base}.url"),
            None,
            "an MQTT url holds no user info (`user:pass@`); use `username` and `password` (from `${VAR}`)",
        ),
        Ok(u) if u.scheme_str() == Some("mqtt") && u.host().is_some() => {
            if u.path() != "/" && !u.path().is_empty() {
                cx.err(
                    &format!("{base}.url"),
                    None,
                    "an MQTT url has no path: `mqtt://host:1883`",
                );
            }
        }
        Ok(u) if u.scheme_str() == Some("mqtts") && u.host().is_some() => {}
        _ => cx.err(
            &format!("{base}.url"),
            None,
            format!("`{}` is not a URL like `mqtt://127.0.0.1:1883`", m.url),
        ),
    }
    if m.client_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > 65535)
    {
        cx.err(&format!("{base}.client_id"), None, "1 to 65535 bytes");
    }
    if m.password.is_some() && m.username.is_none() {
        cx.err(
            &format!("{base}.password"),
            None,
            "a password needs a `username`",
        );
    }
    if m.keep_alive.0.as_secs() < 5 || m.keep_alive.0.as_secs() > 65535 {
        cx.err(&format!("{base}.keep_alive"), None, "from 5s to 65535s");
    }
    if m.max_packet_size.0 < 1024 || m.max_packet_size.0 > 268_435_455 {
        cx.err(
            &format!("{base}.max_packet_size"),
            None,
            "from 1KiB to 256MiB (the protocol's limit)",
        );
    }
    if m.session_expiry.0.as_secs() == 0 || m.session_expiry.0.as_secs() > u32::MAX as u64 {
        cx.err(
            &format!("{base}.session_expiry"),
            None,
            "above zero: a persistent session is how unacknowledged publishes survive a reconnect",
        );
    }
    if m.inflight == 0 {
        cx.err(&format!("{base}.inflight"), None, "at least 1");
    }
    if m.connect_timeout.0.as_secs() == 0 {
        cx.err(&format!("{base}.connect_timeout"), None, "at least 1s");
    }
}

fn validate_amqp_backend(cx: &mut Ctx, base: &str, a: &AmqpBackendSpec) {
    match a.url.parse::<lapin::uri::AMQPUri>() {
        Err(e) => cx.err(
            &format!("{base}.url"),
            None,
            format!("not an AMQP URL like `amqp://user:pass@127.0.0.1:5672/%2f`: {e}"),
        ),
        Ok(u) => {
            let tls = u.scheme == lapin::uri::AMQPScheme::AMQPS;
            if a.tls.is_some() && !tls {
                cx.err(
                    &format!("{base}.tls"),
                    None,
                    "`tls` applies to an `amqps://` url",
                );
            }
        }
    }
    if let Some(tls) = &a.tls {
        if tls
            .server_name
            .as_deref()
            .is_some_and(|n| rustls_pki_types::ServerName::try_from(n).is_err())
        {
            cx.err(
                &format!("{base}.tls.server_name"),
                None,
                "not a DNS name or an IP address",
            );
        }
        if tls.cert.is_some() != tls.key.is_some() {
            cx.err(
                &format!("{base}.tls"),
                None,
                "a client certificate needs both `cert` and `key`",
            );
        }
    }
    if !(1..=64).contains(&a.channels) {
        cx.err(&format!("{base}.channels"), None, "between 1 and 64");
    }
    for (key, d) in [
        ("heartbeat", a.heartbeat),
        ("connect_timeout", a.connect_timeout),
        ("confirm_timeout", a.confirm_timeout),
        ("reconnect.min", a.reconnect.min),
    ] {
        if d.0.is_zero() {
            cx.err(&format!("{base}.{key}"), None, "must be above zero");
        }
    }
    if a.reconnect.max.0 < a.reconnect.min.0 {
        cx.err(
            &format!("{base}.reconnect.max"),
            None,
            "must be at least `reconnect.min`",
        );
    }
    let t = &a.topology;
    let mut names: Vec<(String, &String)> = Vec::new();
    for (i, e) in t.exchanges.iter().enumerate() {
        names.push((format!("{base}.topology.exchanges[{i}].name"), &e.name));
    }
    for (i, q) in t.queues.iter().enumerate() {
        names.push((format!("{base}.topology.queues[{i}].name"), &q.name));
        if let Some(d) = &q.dead_letter_exchange {
            names.push((
                format!("{base}.topology.queues[{i}].dead_letter_exchange"),
                d,
            ));
        }
        if let Some(k) = &q.dead_letter_routing_key {
            names.push((
                format!("{base}.topology.queues[{i}].dead_letter_routing_key"),
                k,
            ));
        }
    }
    for (i, b) in t.bindings.iter().enumerate() {
        for (key, v) in [
            ("queue", &b.queue),
            ("exchange", &b.exchange),
            ("routing_key", &b.routing_key),
        ] {
            names.push((format!("{base}.topology.bindings[{i}].{key}"), v));
        }
    }
    for (path, v) in names {
        if v.len() > 255 {
            cx.err(&path, None, "at most 255 bytes");
        }
    }
    for (i, e) in t.exchanges.iter().enumerate() {
        if e.name.is_empty() || e.name.starts_with("amq.") {
            cx.err(
                &format!("{base}.topology.exchanges[{i}].name"),
                None,
                "name the exchange (names starting with `amq.` belong to the broker)",
            );
        }
    }
    for (i, q) in t.queues.iter().enumerate() {
        if q.name.is_empty() || q.name.starts_with("amq.") {
            cx.err(
                &format!("{base}.topology.queues[{i}].name"),
                None,
                "name the queue (names starting with `amq.` belong to the broker)",
            );
        }
        if q.kind == QueueKindSpec::Quorum && !q.durable {
            cx.err(
                &format!("{base}.topology.queues[{i}].durable"),
                None,
                "quorum queues are always durable",
            );
        }
        if q.message_ttl
            .is_some_and(|d| d.0.as_millis() > u32::MAX as u128)
        {
            cx.err(
                &format!("{base}.topology.queues[{i}].message_ttl"),
                None,
                "at most about 49 days",
            );
        }
    }
    for (i, b) in t.bindings.iter().enumerate() {
        if b.queue.is_empty() || b.exchange.is_empty() {
            cx.err(
                &format!("{base}.topology.bindings[{i}]"),
                None,
                "a binding names its `queue` and its `exchange`",
            );
        }
    }
}

fn validate_server(cx: &mut Ctx, s: &ServerSpec) {
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
    if s.listen == s.admin && s.listen.port() != 0 {
        cx.err(
            "server.admin",
            None,
            "the admin listener needs an address of its own, not the public `listen` address",
        );
    }
}

fn validate_backend(cx: &mut Ctx, name: &str, b: &BackendSpec) {
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
    match b {
        BackendSpec::Grpc(g) => {
            if g.endpoints.is_empty() {
                cx.err(
                    &base,
                    None,
                    "a grpc backend needs at least one entry in `endpoints`",
                );
            }
            let mut https = 0;
            for (i, ep) in g.endpoints.iter().enumerate() {
                match ep.parse::<Uri>() {
                    Ok(u) if has_userinfo(&u) => cx.err(
                        &format!("{base}.endpoints[{i}]"),
                        None,
                        USERINFO_HTTP,
                    ),
                    Ok(u)
                        if matches!(u.scheme_str(), Some("http" | "https"))
                            && u.authority().is_some() =>
                    {
                        https += usize::from(u.scheme_str() == Some("https"));
                    }
                    _ => cx.err(
                        &format!("{base}.endpoints[{i}]"),
                        None,
                        format!("endpoint `{ep}` is not a URL like `http://127.0.0.1:50051` (or `https://` for TLS)"),
                    ),
                }
            }
            if https > 0 && https < g.endpoints.len() {
                cx.err(
                    &format!("{base}.endpoints"),
                    None,
                    "mix of `http://` and `https://` endpoints: one backend speaks either TLS or cleartext",
                );
            }
            if let Some(tls) = &g.tls {
                if https == 0 {
                    cx.err(
                        &format!("{base}.tls"),
                        None,
                        "`tls` applies to `https://` endpoints, and this backend has none",
                    );
                }
                if tls.cert.is_some() != tls.key.is_some() {
                    cx.err(
                        &format!("{base}.tls"),
                        None,
                        "a client certificate needs both `cert` and `key`",
                    );
                }
            }
            if g.protos.is_empty() && g.descriptor_set.is_none() && !g.reflection {
                cx.err(
                    &base,
                    None,
                    "a grpc backend needs its descriptors: list `.proto` files under `protos`, give a `descriptor_set`, or set `reflection: true`",
                );
            }
        }
        BackendSpec::Amqp(a) => validate_amqp_backend(cx, &base, a),
        BackendSpec::Mqtt(m) => validate_mqtt_backend(cx, &base, m),
        BackendSpec::Http(h) => {
            if h.endpoints.is_empty() {
                cx.err(
                    &base,
                    None,
                    "an http backend needs at least one entry in `endpoints`",
                );
            }
            for (i, ep) in h.endpoints.iter().enumerate() {
                let path = format!("{base}.endpoints[{i}]");
                match ep.parse::<Uri>() {
                    Ok(u) if has_userinfo(&u) => cx.err(&path, None, USERINFO_HTTP),
                    Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {
                        if u.query().is_some() {
                            cx.err(&path, None, format!("endpoint `{ep}`: an endpoint has no query string"));
                        }
                    }
                    Ok(u) if u.scheme_str() == Some("https") => cx.err(
                        &path,
                        None,
                        format!("endpoint `{ep}`: TLS to upstreams is not supported yet; use an `http://` endpoint"),
                    ),
                    _ => cx.err(
                        &path,
                        None,
                        format!("endpoint `{ep}` is not a URL like `http://127.0.0.1:9000`"),
                    ),
                }
            }
            if h.connect_timeout.0.is_zero() {
                cx.err(
                    &format!("{base}.connect_timeout"),
                    None,
                    "must be above zero",
                );
            }
            if h.probe_interval.0.is_zero() {
                cx.err(
                    &format!("{base}.probe_interval"),
                    None,
                    "must be above zero",
                );
            }
        }
    }
    validate_policy(cx, &base, &b.policy());
}

fn validate_route(
    cx: &mut Ctx,
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
    let bridge = match (&route.websocket, spec.backends.get(&route.backend)) {
        (Some(ws), Some(backend)) => {
            validate_websocket_route(cx, &base, id, route, ws, backend, template.as_ref());
            None
        }
        (_, b) => b,
    };
    match bridge {
        None => {}
        Some(BackendSpec::Http(_)) => {
            if let Some(h) = &route.http {
                validate_http_route(cx, &base, id, h, template.as_ref());
            }
        }
        Some(BackendSpec::Mqtt(b)) => match &route.mqtt {
            None => cx.err(
                &base,
                id,
                "a route to an mqtt backend needs `mqtt: { topic: … }`",
            ),
            Some(m) => {
                validate_mqtt_route(cx, &base, id, m, template.as_ref());
                if b.protocol == crate::config::MqttProtocol::V311 && m.response.is_some() {
                    cx.err_key_route(
                        &format!("{base}.mqtt.response"),
                        id,
                        format!(
                            "request/response needs MQTT 5 (response topic and correlation data); backend `{}` speaks 3.1.1",
                            route.backend
                        ),
                    );
                }
            }
        },
        Some(BackendSpec::Amqp(_)) => match &route.amqp {
            None => cx.err(
                &base,
                id,
                "a route to an amqp backend needs `amqp: { exchange: …, routing_key: … }`",
            ),
            Some(a) => validate_amqp_route(cx, &base, id, a, template.as_ref()),
        },
        Some(BackendSpec::Grpc(_)) => match &route.grpc {
            None => cx.err(
                &base,
                id,
                "a route to a grpc backend needs `grpc: { method: package.Service/Method }`",
            ),
            Some(g) => {
                if !valid_grpc_method(&g.method) {
                    cx.err(
                        &format!("{base}.grpc.method"),
                        id,
                        format!(
                            "`{}` is not a method name like `package.Service/Method`",
                            g.method
                        ),
                    );
                }
                for (i, h) in g.metadata_headers.iter().enumerate() {
                    let lower = h.to_ascii_lowercase();
                    if HeaderName::from_bytes(h.as_bytes()).is_err()
                        || lower.starts_with("grpc-")
                        || matches!(
                            lower.as_str(),
                            "te" | "content-type" | "host" | "connection"
                        )
                    {
                        cx.err(
                                &format!("{base}.grpc.metadata_headers[{i}]"),
                                id,
                                format!("`{h}` cannot be forwarded as gRPC metadata; name an application header"),
                            );
                    }
                }
                if let Some(b) = &g.body
                    && b != "*"
                    && !b.is_empty()
                    && !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    cx.err(
                        &format!("{base}.grpc.body"),
                        id,
                        "`body` is `\"*\"`, a top-level field name, or `\"\"` for none",
                    );
                }
            }
        },
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

/// A WebSocket route: the handshake policy, connection care, and the bridge's settings, which
/// replace the HTTP bridge's (`mqtt:`, `amqp:`, `grpc:`) on such a route.
fn validate_websocket_route(
    cx: &mut Ctx,
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
    for (i, o) in ws.origins.iter().enumerate() {
        let ok = o == "null"
            || o.parse::<Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some()
                    && u.path_and_query().is_none_or(|p| p.as_str() == "/")
                    && !o.ends_with('/')
            });
        if !ok {
            cx.err(
                &format!("{wb}.origins[{i}]"),
                id,
                format!("`{o}` is not an origin: write `https://host` or `https://host:port`, without a path"),
            );
        }
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
    match backend {
        BackendSpec::Mqtt(_) => match &ws.mqtt {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to an mqtt backend needs `mqtt: { allow: [...] }` (JSON operations) or `mqtt: { subscribe: [...], publish: ... }` (fixed topics)",
            ),
            Some(m) => validate_ws_mqtt(cx, &format!("{wb}.mqtt"), id, m, template),
        },
        BackendSpec::Http(_) => {
            if let Some(h) = &route.http {
                validate_http_route(cx, base, id, h, template);
            }
        }
        BackendSpec::Amqp(_) => match &ws.amqp {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to an amqp backend needs `amqp: { exchange: …, routing_key: … }` (publish frames) and/or `amqp: { consume: … }` (push messages)",
            ),
            Some(a) => validate_ws_amqp(cx, &format!("{wb}.amqp"), id, a, template),
        },
        BackendSpec::Grpc(_) => match &ws.grpc {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to a grpc backend needs `grpc: { method: package.Service/Method }`",
            ),
            Some(g) if !valid_grpc_method(&g.method) => cx.err(
                &format!("{wb}.grpc.method"),
                id,
                format!(
                    "`{}` is not a method name like `package.Service/Method`",
                    g.method
                ),
            ),
            Some(_) => {}
        },
    }
}

/// Whether `method` reads `package.Service/Method`.
fn valid_grpc_method(method: &str) -> bool {
    method.split_once('/').is_some_and(|(svc, m)| {
        svc.contains('.')
            && !m.is_empty()
            && !m.contains(['/', '.'])
            && svc.split('.').all(|p| !p.is_empty())
    })
}

/// Whether `filter` is a well-formed MQTT topic filter: `+` a whole level, `#` only the last.
pub fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && !filter.contains('\0')
        && !levels.iter().enumerate().any(|(i, l)| {
            (l.contains('+') && *l != "+")
                || (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
        })
}

/// Checks a template for a WebSocket handshake: no body values, path values captured.
fn check_handshake_template(
    cx: &mut Ctx,
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

fn validate_ws_amqp(
    cx: &mut Ctx,
    base: &str,
    id: Option<&str>,
    a: &WsAmqpSpec,
    template: Option<&PathTemplate>,
) {
    if a.exchange.is_none() && a.consume.is_none() {
        cx.err(
            base,
            id,
            "give `exchange` (publish client frames), `consume` (push messages), or both",
        );
    }
    if let Some(e) = &a.exchange {
        check_handshake_template(cx, &format!("{base}.exchange"), id, e, template);
        check_handshake_template(
            cx,
            &format!("{base}.routing_key"),
            id,
            &a.routing_key,
            template,
        );
    } else if a.acks {
        cx.err(
            &format!("{base}.acks"),
            id,
            "`acks` answers publishes; give `exchange`",
        );
    }
    if let Some(c) = &a.consume {
        let cb = format!("{base}.consume");
        match (&c.queue, c.bind.is_empty()) {
            (Some(q), true) => {
                if q.is_empty() {
                    cx.err(&format!("{cb}.queue"), id, "name a queue");
                }
                check_handshake_template(cx, &format!("{cb}.queue"), id, q, template);
            }
            (None, false) => {
                for (i, b) in c.bind.iter().enumerate() {
                    check_handshake_template(cx, &format!("{cb}.bind[{i}].exchange"), id, &b.exchange, template);
                    check_handshake_template(cx, &format!("{cb}.bind[{i}].routing_key"), id, &b.routing_key, template);
                    if b.exchange.is_empty() {
                        cx.err(
                            &format!("{cb}.bind[{i}].exchange"),
                            id,
                            "the default exchange cannot be bound; name an exchange",
                        );
                    }
                }
            }
            _ => cx.err(
                &cb,
                id,
                "give either `queue` (consume a named queue) or `bind` (a queue of the connection's own, bound as listed)",
            ),
        }
        if c.prefetch == 0 {
            cx.err(&format!("{cb}.prefetch"), id, "at least 1");
        }
    }
}

fn validate_ws_mqtt(
    cx: &mut Ctx,
    base: &str,
    id: Option<&str>,
    m: &WsMqttSpec,
    template: Option<&PathTemplate>,
) {
    let ops = !m.allow.is_empty();
    let fixed = !m.subscribe.is_empty() || m.publish.is_some();
    if ops == fixed {
        cx.err(
            base,
            id,
            "give either `allow` (clients send JSON operations within these filters) or `subscribe`/`publish` (fixed topics, frames are payloads)",
        );
    }
    if ops && m.acks {
        cx.err(
            &format!("{base}.acks"),
            id,
            "operations mode always acknowledges publishes; `acks` is for fixed topics",
        );
    }
    let check = |cx: &mut Ctx, path: String, text: &str, filter: bool| {
        let Some(t) = check_handshake_template(cx, &path, id, text, template) else {
            return;
        };
        let literal: String = t
            .parts
            .iter()
            .map(|p| match p {
                crate::config::template::ValuePart::Lit(l) => l.as_str(),
                _ => "x",
            })
            .collect();
        if filter && !valid_filter(&literal) {
            cx.err(
                &path,
                id,
                "a topic filter: `+` stands for one whole level, `#` only for the last",
            );
        } else if !filter && (literal.is_empty() || literal.contains(['+', '#', '\0'])) {
            cx.err(
                &path,
                id,
                "a publish topic is not empty and has no `+` or `#` wildcards",
            );
        }
    };
    for (i, f) in m.allow.iter().enumerate() {
        check(cx, format!("{base}.allow[{i}]"), f, true);
    }
    for (i, f) in m.subscribe.iter().enumerate() {
        check(cx, format!("{base}.subscribe[{i}]"), f, true);
    }
    if let Some(p) = &m.publish {
        check(cx, format!("{base}.publish"), p, false);
    }
    if m.qos > 2 {
        cx.err(&format!("{base}.qos"), id, "0, 1 or 2");
    }
}

fn validate_http_route(
    cx: &mut Ctx,
    base: &str,
    id: Option<&str>,
    h: &HttpRouteSpec,
    template: Option<&PathTemplate>,
) {
    if h.strip_prefix.is_some() && h.rewrite.is_some() {
        cx.err(
            &format!("{base}.http.rewrite"),
            id,
            "use either `strip_prefix` or `rewrite`, not both",
        );
    }
    if let Some(p) = &h.strip_prefix
        && !p.starts_with('/')
    {
        cx.err(
            &format!("{base}.http.strip_prefix"),
            id,
            "a prefix starts with `/`",
        );
    }
    if let Some(rw) = &h.rewrite {
        let path = format!("{base}.http.rewrite");
        match Template::parse(rw) {
            Err(e) => cx.err(&path, id, e),
            Ok(t) => {
                if !rw.starts_with('/') {
                    cx.err(&path, id, "a rewrite template starts with `/`");
                }
                let captured = template.map(|t| t.captures()).unwrap_or_default();
                for v in t.vars() {
                    if template.is_some() && !captured.contains(&v) {
                        cx.err(
                            &path,
                            id,
                            format!(
                                "`{{{v}}}` is not captured by the path `{}`; captured: {}",
                                template.map(|t| t.raw.as_str()).unwrap_or(""),
                                if captured.is_empty() {
                                    "none".to_string()
                                } else {
                                    captured.join(", ")
                                }
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn validate_retry(cx: &mut Ctx, base: &str, id: Option<&str>, r: &RetrySpec) {
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

fn validate_policy(cx: &mut Ctx, base: &str, p: &BackendPolicy) {
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
