//! The `script` plugin: a Rhai script from `plugins/`, wrapped around a route's inner service
//! like every plugin. Its `on_request(req)` runs before the route's middleware and backend,
//! its `on_response(res)` on the answer. Compiled when the config loads (a syntax error is a
//! config error with the script's line and column), sandboxed (no files, network or
//! processes; bounded operations, call depth, sizes and time per call).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use rhai::{AST, Dynamic, Engine, EvalAltResult, Map};
use serde::Deserialize;

use crate::backends::BuildContext;
use crate::config::types::{Dur, Size};
use crate::error::Problem;
use crate::middleware::choose::Chosen;
use crate::middleware::context::RequestContext;
use crate::{BoxError, Request, RouteService, full_body};

pub struct ScriptPlugin;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    /// The script, relative to routes.yaml's directory.
    file: PathBuf,
    /// Settings the hooks read as `config`.
    #[serde(default)]
    config: serde_json::Value,
    /// `json`: the hooks read (and may replace) the JSON body as `req.body` / `res.body`.
    #[serde(default)]
    body: Option<BodyMode>,
    #[serde(default)]
    limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BodyMode {
    /// Parsed as JSON into maps and arrays.
    Json,
    /// As text (UTF-8), exactly as sent: for checking a signature over it.
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Limits {
    /// Operations one hook call may take.
    operations: u64,
    /// Time one hook call may take.
    time: Dur,
    /// Nested function calls.
    call_depth: usize,
    /// The longest string a script may make.
    string_size: Size,
    /// The most items of an array, or entries of a map.
    collection_size: usize,
    /// The largest body read with `body: json`.
    body_size: Size,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            operations: 100_000,
            time: Dur::millis(20),
            call_depth: 32,
            string_size: Size(1 << 20),
            collection_size: 10_000,
            body_size: Size(1 << 20),
        }
    }
}

/// A compiled script, shared by the route's requests.
pub struct Settings {
    /// As written in the config, for errors and logs.
    file: String,
    engine: Engine,
    ast: AST,
    config: Dynamic,
    body: Option<BodyMode>,
    body_size: usize,
    budget: Duration,
    on_request: bool,
    on_response: bool,
    on_message: bool,
    on_reply: bool,
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
    /// The route's `backend`, then its `alternatives`: what `req.backend` may be set to.
    backends: Arc<[Arc<str>]>,
}

thread_local! {
    /// When the hook running on this thread must stop (read by the engine's progress check).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn spec_of(config: &serde_json::Value) -> Result<Spec, String> {
    let spec: Spec = serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
    let f = spec.file.to_string_lossy();
    if f.is_empty()
        || spec.file.is_absolute()
        || spec
            .file
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "`file`: `{f}` is not a path under routes.yaml's directory (such as plugins/tenant.rhai)"
        ));
    }
    let l = &spec.limits;
    if l.operations == 0 || l.time.0.is_zero() || l.call_depth == 0 || l.collection_size == 0 {
        return Err("`limits`: every limit must be above zero".into());
    }
    Ok(spec)
}

/// The sandbox: Rhai's engine has no file, network or process access of its own; module
/// imports are compiled out (the `no_module` feature) and `eval` is disabled, so a script
/// runs only the code it holds, within its limits.
fn engine(limits: &Limits) -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(limits.operations)
        .set_max_call_levels(limits.call_depth)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(limits.string_size.0 as usize)
        .set_max_array_size(limits.collection_size)
        .set_max_map_size(limits.collection_size)
        .set_max_variables(1_000)
        .set_max_functions(1_000);
    e.disable_symbol("eval");
    e.on_progress(|ops| {
        // Checked every 256 operations: the clock is read often enough to stop a runaway
        // loop within its budget, and rarely enough to cost nothing.
        if ops % 256 == 0
            && DEADLINE
                .with(Cell::get)
                .is_some_and(|d| Instant::now() >= d)
        {
            Some("the script's time budget ran out".into())
        } else {
            None
        }
    });
    e.on_print(|s| tracing::info!(target: "switchyard::script", "{s}"));
    e.on_debug(|s, _, pos| tracing::debug!(target: "switchyard::script", line = pos.line(), "{s}"));
    register(&mut e);
    e
}

/// `file:line:column: message` of an error at `pos` in the script.
fn at(file: &str, pos: rhai::Position, what: impl std::fmt::Display) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}: {what}"),
        (Some(l), None) => format!("{file}:{l}: {what}"),
        _ => format!("{file}: {what}"),
    }
}

impl super::Plugin for ScriptPlugin {
    fn name(&self) -> &'static str {
        "script"
    }

    /// Pure: the settings are checked; the script is read and compiled when the route is built.
    fn validate(&self, config: &serde_json::Value) -> Result<(), String> {
        spec_of(config).map(|_| ())
    }

    fn wrap(
        &self,
        config: &serde_json::Value,
        inner: RouteService,
        route: &crate::config::RouteSpec,
        cx: &BuildContext<'_>,
    ) -> Result<RouteService, String> {
        let mut settings = build(config, cx)?;
        settings.backends = std::iter::once(&route.backend)
            .chain(&route.alternatives)
            .map(|b| Arc::from(b.as_str()))
            .collect();
        Ok(RouteService::new(Scripted {
            settings: Arc::new(settings),
            inner,
        }))
    }
}

/// Reads and compiles the script (recorded in `cx`, so that an edit reloads the config).
fn build(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Settings, String> {
    let spec = spec_of(config)?;
    let path = cx.base.join(&spec.file);
    cx.read_files().push(path.clone());
    let file = spec.file.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("`file`: cannot read {}: {e}", path.display()))?;
    let engine = engine(&spec.limits);
    let ast = engine.compile(&text).map_err(|e| at(&file, e.1, e.0))?;
    let has = |name: &str| {
        ast.iter_functions()
            .any(|f| f.name == name && f.params.len() == 1)
    };
    let (on_request, on_response, on_message, on_reply) = (
        has("on_request"),
        has("on_response"),
        has("on_message"),
        has("on_reply"),
    );
    if !on_request && !on_response && !on_message && !on_reply {
        return Err(format!(
            "{file}: defines none of `fn on_request(req)`, `fn on_response(res)`, `fn on_message(msg)` and `fn on_reply(msg)`"
        ));
    }
    Ok(Settings {
        // No `config` is an empty map (as documented), so that `config.name` reads `()`.
        config: match &spec.config {
            serde_json::Value::Null => Dynamic::from_map(Map::new()),
            c => rhai::serde::to_dynamic(c).map_err(|e| e.to_string())?,
        },
        file,
        engine,
        ast,
        body: spec.body,
        body_size: spec.limits.body_size.0 as usize,
        budget: spec.limits.time.0,
        on_request,
        on_response,
        on_message,
        on_reply,
        metrics: cx.metrics.clone(),
        backends: Arc::default(),
    })
}

/// The `on_message` and `on_reply` hooks of the script of a `script` plugin's `config` on
/// route `route`, when it defines one: for what the spool and jobs send later, below the
/// plugins ([`AttachHook`]).
pub fn message_hook(
    config: &serde_json::Value,
    route: &str,
    cx: &BuildContext<'_>,
) -> Result<Option<MessageHook>, String> {
    let settings = build(config, cx)?;
    Ok(
        (settings.on_message || settings.on_reply).then(|| MessageHook {
            settings: Arc::new(settings),
            route: route.to_string(),
        }),
    )
}

/// Gives the requests that pass it a route's message hook, unless its plugins gave one: the
/// requests the spool and jobs send later, rebuilt from what they kept, pass the script's
/// `on_message` and `on_reply` as the live ones do.
pub struct AttachHook {
    pub inner: RouteService,
    pub hook: MessageHook,
}

impl crate::DirectCall for AttachHook {
    fn call(&self, mut req: Request) -> crate::ResponseFuture {
        if req.extensions().get::<MessageHook>().is_none() {
            req.extensions_mut().insert(self.hook.clone());
        }
        self.inner.call_shared(req)
    }
}

/// The script around a route's inner service.
#[derive(Clone)]
struct Scripted {
    settings: Arc<Settings>,
    inner: RouteService,
}

crate::backends::route_service!(Scripted);

impl Scripted {
    async fn call_backend(self, req: Request) -> Result<crate::Response, BoxError> {
        run(&self.settings, self.inner, req).await
    }
}

/// What a hook sees and changes of a request or an answer (`req`, `res`): a handle, so that
/// what the script sets through it is what the gateway reads back.
#[derive(Clone, Default)]
pub struct Exchange(Arc<Mutex<Facts>>);

#[derive(Default)]
struct Facts {
    method: String,
    path: String,
    query: String,
    route: String,
    client: String,
    status: i64,
    params: Map,
    claims: Dynamic,
    cert: Dynamic,
    /// Header changes: `Some` sets, `None` removes.
    headers: Vec<(String, Option<String>)>,
    /// The headers as they came.
    seen: Vec<(String, String)>,
    body: Option<Dynamic>,
    body_changed: bool,
    path_changed: bool,
    ctx: BTreeMap<String, String>,
    /// A message's topic (MQTT) or routing key (AMQP), and its exchange (read only).
    destination: String,
    destination_changed: bool,
    exchange: String,
    /// A message's properties (text), and what they may be set to.
    properties: Vec<(&'static str, String)>,
    properties_changed: bool,
    protocol: Option<Protocol>,
    /// The backend the request goes to, among `backends` (the route's, then its alternatives).
    backend: String,
    backend_changed: bool,
    backends: Arc<[Arc<str>]>,
}

impl Exchange {
    fn with<T>(&self, f: impl FnOnce(&mut Facts) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn header(&self, name: &str) -> Dynamic {
        let name = name.to_ascii_lowercase();
        self.with(|f| {
            if let Some((_, v)) = f.headers.iter().rev().find(|(k, _)| *k == name) {
                return v.clone().map_or(Dynamic::UNIT, Dynamic::from);
            }
            f.seen
                .iter()
                .find(|(k, _)| *k == name)
                .map_or(Dynamic::UNIT, |(_, v)| Dynamic::from(v.clone()))
        })
    }
}

/// The values scripts set for templates (`{ctx.name}`), in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Values(pub Arc<BTreeMap<String, String>>);

type Fail = Box<EvalAltResult>;

fn register(e: &mut Engine) {
    e.register_type_with_name::<Exchange>("Exchange");
    let text = |f: fn(&Facts) -> String| move |x: &mut Exchange| x.with(|facts| f(facts));
    e.register_get("method", text(|f| f.method.clone()));
    e.register_get("path", text(|f| f.path.clone()));
    e.register_get("query", text(|f| f.query.clone()));
    e.register_get("route", text(|f| f.route.clone()));
    e.register_get("client", text(|f| f.client.clone()));
    e.register_get("status", |x: &mut Exchange| x.with(|f| f.status));
    e.register_get("params", |x: &mut Exchange| x.with(|f| f.params.clone()));
    e.register_get("claims", |x: &mut Exchange| x.with(|f| f.claims.clone()));
    e.register_get("cert", |x: &mut Exchange| x.with(|f| f.cert.clone()));
    e.register_get("headers", |x: &mut Exchange| {
        x.with(|f| {
            let mut m = Map::new();
            for (k, v) in &f.seen {
                m.insert(k.as_str().into(), v.clone().into());
            }
            for (k, v) in &f.headers {
                match v {
                    Some(v) => m.insert(k.as_str().into(), v.clone().into()),
                    None => m.remove(k.as_str()),
                };
            }
            m
        })
    });
    e.register_fn("header", |x: &mut Exchange, name: &str| x.header(name));
    e.register_fn(
        "set_header",
        |x: &mut Exchange, name: &str, value: &str| -> Result<(), Fail> {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a header name"))?;
            HeaderValue::from_str(value)
                .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
            x.with(|f| {
                f.headers
                    .push((n.as_str().to_string(), Some(value.to_string())))
            });
            Ok(())
        },
    );
    e.register_fn("remove_header", |x: &mut Exchange, name: &str| {
        x.with(|f| f.headers.push((name.to_ascii_lowercase(), None)));
    });
    e.register_set("path", |x: &mut Exchange, path: &str| -> Result<(), Fail> {
        // A path a script makes (often of request values) may not climb out of where it
        // points: no dot segments, encoded or not, and no encoded slashes.
        let lower = path.to_ascii_lowercase();
        if !path.starts_with('/')
            || path.contains(['?', '#', '\\'])
            || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
            || lower.contains("%2f")
            || lower.contains("%5c")
            || lower
                .replace("%2e", ".")
                .split('/')
                .any(|seg| seg == "." || seg == "..")
        {
            return Err(format!(
                "`{path}` is not a request path (no dot segments, no encoded slashes)"
            )
            .into());
        }
        x.with(|f| {
            f.path = path.to_string();
            f.path_changed = true;
        });
        Ok(())
    });
    e.register_set(
        "query",
        |x: &mut Exchange, query: &str| -> Result<(), Fail> {
            if query.contains('#') || query.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!("`{query}` is not a query string").into());
            }
            x.with(|f| {
                f.query = query.to_string();
                f.path_changed = true;
            });
            Ok(())
        },
    );
    e.register_set(
        "status",
        |x: &mut Exchange, status: i64| -> Result<(), Fail> {
            if !(200..=599).contains(&status) {
                return Err(format!("{status} is not a status from 200 to 599").into());
            }
            x.with(|f| f.status = status);
            Ok(())
        },
    );
    e.register_get("body", |x: &mut Exchange| {
        x.with(|f| f.body.clone().unwrap_or(Dynamic::UNIT))
    });
    e.register_set(
        "body",
        |x: &mut Exchange, body: Dynamic| -> Result<(), Fail> {
            x.with(|f| {
                if f.body.is_none() {
                    return Err("the body is read only with `body: json`".into());
                }
                f.body = Some(body);
                f.body_changed = true;
                Ok(())
            })
        },
    );
    e.register_get("backend", |x: &mut Exchange| x.with(|f| f.backend.clone()));
    e.register_set(
        "backend",
        |x: &mut Exchange, name: &str| -> Result<(), Fail> {
            x.with(|f| {
                if !f.backends.iter().any(|b| &**b == name) {
                    let known: Vec<&str> = f.backends.iter().map(|b| &**b).collect();
                    return Err(format!(
                        "`{name}` is not a backend of this route ({}); list it under the route's `alternatives`",
                        known.join(", ")
                    )
                    .into());
                }
                f.backend = name.to_string();
                f.backend_changed = true;
                Ok(())
            })
        },
    );
    e.register_fn("set_ctx", |x: &mut Exchange, name: &str, value: Dynamic| {
        x.with(|f| f.ctx.insert(name.to_string(), value.to_string()));
    });
    e.register_get("topic", |x: &mut Exchange| {
        x.with(|f| f.destination.clone())
    });
    e.register_get("routing_key", |x: &mut Exchange| {
        x.with(|f| f.destination.clone())
    });
    e.register_get("exchange", |x: &mut Exchange| {
        x.with(|f| f.exchange.clone())
    });
    let destination = |x: &mut Exchange, v: &str| -> Result<(), Fail> {
        // What the broker takes on a shared connection: no wildcards in a topic, no control
        // characters, within the protocols' lengths.
        if v.is_empty()
            || v.len() > 255
            || v.chars().any(|c| c.is_control() || c == '+' || c == '#')
        {
            return Err(format!("`{v}` cannot be a topic or routing key (empty, over 255 bytes, a wildcard or a control character)").into());
        }
        x.with(|f| {
            f.destination = v.to_string();
            f.destination_changed = true;
        });
        Ok(())
    };
    e.register_set("topic", destination);
    e.register_set("routing_key", destination);
    e.register_get("properties", |x: &mut Exchange| {
        x.with(|f| {
            f.properties
                .iter()
                .map(|(k, v)| ((*k).into(), Dynamic::from(v.clone())))
                .collect::<Map>()
        })
    });
    e.register_fn(
        "set_property",
        |x: &mut Exchange, name: &str, value: Dynamic| -> Result<(), Fail> {
            x.with(|f| {
                let protocol = f
                    .protocol
                    .ok_or("only a message (`on_message`) has properties to set")?;
                let (name, value) = protocol.property(name, &value)?;
                f.properties.retain(|(k, _)| *k != name);
                f.properties.push((name, value));
                f.properties_changed = true;
                Ok(())
            })
        },
    );
    // Signatures: HMAC-SHA256 in hex, and a comparison that takes the same time whatever
    // the strings hold.
    e.register_fn("hmac_sha256", |key: &str, data: &str| -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes())
            .expect("HMAC takes any key");
        mac.update(data.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    // A stable share of users: the same text always falls in the same bucket, 0 to 99
    // (the first bytes of its SHA-256), for canaries that keep a user on one version.
    e.register_fn("bucket", |text: &str| -> i64 {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(text.as_bytes());
        let head = u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"));
        (head % 100) as i64
    });
    e.register_fn("same", |a: &str, b: &str| -> bool {
        use subtle::ConstantTimeEq;
        a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
    });
    // `return respond(403, "why")` ends the request with that status and a problem+json body.
    e.register_fn("respond", |status: i64, detail: &str| -> Map {
        let mut m = Map::new();
        m.insert("status".into(), status.into());
        m.insert("detail".into(), detail.into());
        m
    });
}

/// What ending a hook means for the request.
enum Verdict {
    Continue,
    Respond(StatusCode, String),
}

/// Calls `hook` with `x`, within the time budget.
fn call_hook(s: &Settings, hook: &str, x: &Exchange) -> Result<Verdict, String> {
    let mut scope = rhai::Scope::new();
    scope.push_constant("config", s.config.clone());
    DEADLINE.with(|d| d.set(Some(Instant::now() + s.budget)));
    // Only the hook runs: a script's top-level statements are not evaluated per call.
    let options = rhai::CallFnOptions::new()
        .eval_ast(false)
        .rewind_scope(false);
    let out =
        s.engine
            .call_fn_with_options::<Dynamic>(options, &mut scope, &s.ast, hook, (x.clone(),));
    DEADLINE.with(|d| d.set(None));
    let out = out.map_err(|e| {
        let pos = e.position();
        at(&s.file, pos, describe(&e))
    })?;
    let Some(map) = out.try_cast::<Map>() else {
        return Ok(Verdict::Continue);
    };
    let status = map
        .get("status")
        .and_then(|v| v.as_int().ok())
        .and_then(|n| u16::try_from(n).ok())
        .and_then(|n| StatusCode::from_u16(n).ok())
        .filter(|s| s.is_client_error() || s.is_server_error() || s.is_success())
        .ok_or_else(|| {
            format!(
                "{}: `{hook}` returned a map without a `status` from 200 to 599",
                s.file
            )
        })?;
    let detail = map
        .get("detail")
        .map(ToString::to_string)
        .unwrap_or_default();
    Ok(Verdict::Respond(status, detail))
}

/// Rhai's error without its position (given apart): the limits by name.
fn describe(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorTooManyOperations(_) => {
            "too many operations (limits.operations)".into()
        }
        EvalAltResult::ErrorStackOverflow(_) => "calls nested too deep (limits.call_depth)".into(),
        EvalAltResult::ErrorDataTooLarge(what, _) => format!("{what} too large (limits)"),
        EvalAltResult::ErrorTerminated(v, _) => v.to_string(),
        other => {
            let s = other.to_string();
            s.split(" (line ").next().unwrap_or(&s).to_string()
        }
    }
}

/// A script that failed: 500 naming the route and the script, never its internals.
fn failed(s: &Settings, route: &str, hook: &str, why: &str) -> BoxError {
    tracing::warn!(route, script = %s.file, hook, error = %why, "A script failed; the request is answered 500.");
    if let Some(m) = &s.metrics {
        m.script_failure(route, &s.file);
    }
    let mut p = Problem::new(
        crate::error::Kind::INTERNAL,
        StatusCode::INTERNAL_SERVER_ERROR,
        crate::error::Fault::Gateway,
        format!(
            "The script {} of route `{route}` failed in `{hook}`.",
            s.file
        ),
    );
    p.logged = true;
    p.into()
}

async fn run(
    s: &Arc<Settings>,
    inner: RouteService,
    req: Request,
) -> Result<crate::Response, BoxError> {
    let (mut parts, body) = req.into_parts();
    let ctx = parts.extensions.get::<RequestContext>().cloned();
    let route = ctx
        .as_ref()
        .map_or_else(String::new, |c| c.route_id.to_string());
    let mut body = body;
    if s.on_request {
        let mut json = None;
        if let Some(mode) = s.body {
            let bytes = http_body_util::Limited::new(body, s.body_size)
                .collect()
                .await
                .map_err(|_| Problem::payload_too_large(s.body_size as u64))?
                .to_bytes();
            json = Some(if mode == BodyMode::Text {
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| {
                        Problem::bad_request("The body is not UTF-8 text.").with_field("body")
                    })?
                    .into()
            } else if bytes.is_empty() {
                Dynamic::UNIT
            } else {
                let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    Problem::bad_request(format!("The body is not JSON: {e}.")).with_field("body")
                })?;
                rhai::serde::to_dynamic(&v)
                    .map_err(|_| Problem::internal("reading the body for the script"))?
            });
            body = full_body(bytes);
        }
        let x = Exchange::default();
        x.with(|f| {
            f.method = parts.method.to_string();
            f.path = parts.uri.path().to_string();
            f.query = parts.uri.query().unwrap_or("").to_string();
            f.route = route.clone();
            if let Some(c) = &ctx {
                f.client = c.client_addr.ip().to_string();
                f.params = c
                    .params
                    .iter()
                    .map(|(k, v)| (k.as_ref().into(), v.clone().into()))
                    .collect();
                if let Some(cert) = &c.client_cert {
                    let mut m = Map::new();
                    m.insert("subject".into(), cert.subject.clone().into());
                    m.insert("hash".into(), cert.hash.clone().into());
                    if let Some(cn) = cert.cn() {
                        m.insert("cn".into(), cn.to_string().into());
                    }
                    f.cert = m.into();
                }
            }
            if let Some(c) = parts.extensions.get::<crate::plugins::jwt::Claims>() {
                f.claims = rhai::serde::to_dynamic(&*c.0).unwrap_or(Dynamic::UNIT);
            }
            f.seen = text_headers(&parts.headers);
            f.body = json;
            f.backends = s.backends.clone();
            f.backend = parts
                .extensions
                .get::<Chosen>()
                .map(|c| &c.0)
                .or(s.backends.first())
                .map_or_else(String::new, |b| b.to_string());
        });
        match call_hook(s, "on_request", &x) {
            Err(why) => return Err(failed(s, &route, "on_request", &why)),
            Ok(Verdict::Respond(status, detail)) => return Err(refused(status, detail)),
            Ok(Verdict::Continue) => {}
        }
        let facts = std::mem::take(&mut *x.0.lock().unwrap_or_else(|e| e.into_inner()));
        apply_headers(&mut parts.headers, &facts.headers);
        if facts.path_changed {
            let target = if facts.query.is_empty() {
                facts.path.clone()
            } else {
                format!("{}?{}", facts.path, facts.query)
            };
            parts.uri = target.parse().map_err(|_| {
                failed(
                    s,
                    &route,
                    "on_request",
                    "the path it set is not a valid URI",
                )
            })?;
        }
        if facts.body_changed
            && let Some(b) = facts.body
        {
            let bytes = match b.clone().into_string() {
                Ok(text) if s.body == Some(BodyMode::Text) => Bytes::from(text),
                _ => json_bytes(s, &route, "on_request", &b)?,
            };
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            body = full_body(bytes);
        }
        if !facts.ctx.is_empty() {
            parts.extensions.insert(Values(Arc::new(facts.ctx)));
        }
        if facts.backend_changed
            && let Some(b) = s.backends.iter().find(|b| ***b == *facts.backend)
        {
            parts.extensions.insert(Chosen(b.clone()));
        }
    }
    if s.on_message || s.on_reply {
        parts.extensions.insert(MessageHook {
            settings: s.clone(),
            route: route.clone(),
        });
    }
    let resp = inner.call_shared(Request::from_parts(parts, body)).await?;
    if !s.on_response {
        return Ok(resp);
    }
    let (mut rparts, rbody) = resp.into_parts();
    let mut rbody = rbody;
    let x = Exchange::default();
    let mut json = None;
    let is_json = rparts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if s.body == Some(BodyMode::Json) && is_json {
        let bytes = http_body_util::Limited::new(rbody, s.body_size)
            .collect()
            .await
            .map_err(|_| {
                failed(
                    s,
                    &route,
                    "on_response",
                    "the answer's body is over limits.body_size",
                )
            })?
            .to_bytes();
        json = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| rhai::serde::to_dynamic(&v).ok());
        rbody = full_body(bytes);
    }
    x.with(|f| {
        f.route = route.clone();
        f.status = i64::from(rparts.status.as_u16());
        f.seen = text_headers(&rparts.headers);
        f.body = json;
    });
    match call_hook(s, "on_response", &x) {
        Err(why) => return Err(failed(s, &route, "on_response", &why)),
        Ok(Verdict::Respond(status, detail)) => return Err(refused(status, detail)),
        Ok(Verdict::Continue) => {}
    }
    let facts = std::mem::take(&mut *x.0.lock().unwrap_or_else(|e| e.into_inner()));
    apply_headers(&mut rparts.headers, &facts.headers);
    if let Ok(status) = StatusCode::from_u16(facts.status as u16) {
        rparts.status = status;
    }
    if facts.body_changed
        && let Some(b) = facts.body
    {
        let bytes = json_bytes(s, &route, "on_response", &b)?;
        rparts.headers.remove(http::header::CONTENT_LENGTH);
        rbody = full_body(bytes);
    }
    Ok(http::Response::from_parts(rparts, rbody))
}

/// A script's `on_message(msg)`, put in the request's extensions for the bridge that makes
/// the message (AMQP, MQTT): it runs on the message as made, before it is published.
#[derive(Clone)]
pub struct MessageHook {
    settings: Arc<Settings>,
    route: String,
}

/// A message as `on_message` sees it and leaves it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The MQTT topic, or the AMQP routing key.
    pub destination: String,
    /// The AMQP exchange (read only; empty for MQTT).
    pub exchange: String,
    /// AMQP headers, or MQTT 5 user properties (text values).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The protocol's own properties that are set (`content_type`, `priority`, …), as text;
    /// those of [`Protocol::settable`] may be changed.
    pub properties: Vec<(&'static str, String)>,
    pub protocol: Protocol,
}

/// The broker protocol of a message, which says what properties a script may set on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Amqp,
    Mqtt,
}

impl Protocol {
    /// The properties a script may set. The others (the message and correlation ids, the
    /// app id, the delivery mode, an MQTT response topic) are the gateway's: read only.
    pub fn settable(self) -> &'static [&'static str] {
        match self {
            Protocol::Amqp => &[
                "content_type",
                "content_encoding",
                "type",
                "priority",
                "expiration",
            ],
            Protocol::Mqtt => &["content_type", "message_expiry_interval"],
        }
    }

    /// `value` as property `name` takes it on the wire, or why it cannot be: nothing a
    /// script sets may make the broker refuse the message or close the shared channel
    /// (RabbitMQ closes a channel over an `expiration` that is not a number of milliseconds).
    fn property(self, name: &str, value: &Dynamic) -> Result<(&'static str, String), String> {
        let Some(&known) = self.settable().iter().find(|k| **k == name) else {
            return Err(format!(
                "the property `{name}` cannot be set; these can: {}",
                self.settable().join(", ")
            ));
        };
        let text = value
            .as_int()
            .map(|n| n.to_string())
            .or_else(|_| value.clone().into_string())
            .map_err(|_| format!("`{name}` takes a string or an integer"))?;
        let number = |max: u64| {
            text.parse::<u64>()
                .ok()
                .filter(|n| *n <= max && !text.starts_with('+'))
                .map(|n| n.to_string())
                .ok_or_else(|| format!("`{name}` takes a whole number from 0 to {max}"))
        };
        let value = match known {
            "priority" => number(255)?,
            "expiration" => number(u64::from(u32::MAX))?,
            "message_expiry_interval" => number(u64::from(u32::MAX))?,
            _ => {
                let max = if self == Protocol::Amqp { 255 } else { 65535 };
                if text.len() > max || text.chars().any(char::is_control) {
                    return Err(format!(
                        "`{name}` takes text of {max} bytes at most, without control characters"
                    ));
                }
                text
            }
        };
        Ok((known, value))
    }
}

impl MessageHook {
    /// Runs `on_message` (when the script defines it): the message as the script left it, or
    /// the end of the request (a `respond(…)`, or the script's failure).
    pub fn run(&self, m: Message) -> Result<Message, BoxError> {
        if !self.settings.on_message {
            return Ok(m);
        }
        self.hook("on_message", m)
    }

    /// Runs `on_reply` (when the script defines it) on a reply (AMQP) or response (MQTT 5)
    /// before it becomes the answer; `destination` is where it came in.
    pub fn reply(&self, m: Message) -> Result<Message, BoxError> {
        if !self.settings.on_reply {
            return Ok(m);
        }
        self.hook("on_reply", m)
    }

    fn hook(&self, hook: &'static str, m: Message) -> Result<Message, BoxError> {
        let s = &self.settings;
        let x = Exchange::default();
        let body = if s.body == Some(BodyMode::Json) {
            serde_json::from_slice::<serde_json::Value>(&m.body)
                .ok()
                .and_then(|v| rhai::serde::to_dynamic(&v).ok())
        } else {
            None
        };
        let body = body.unwrap_or_else(|| String::from_utf8_lossy(&m.body).into_owned().into());
        x.with(|f| {
            f.route = self.route.clone();
            f.destination = m.destination.clone();
            f.exchange = m.exchange.clone();
            f.seen = m.headers.clone();
            f.body = Some(body);
            f.properties = m.properties.clone();
            f.protocol = (hook == "on_message").then_some(m.protocol);
        });
        match call_hook(s, hook, &x) {
            Err(why) => return Err(failed(s, &self.route, hook, &why)),
            Ok(Verdict::Respond(status, detail)) => return Err(refused(status, detail)),
            Ok(Verdict::Continue) => {}
        }
        let facts = std::mem::take(&mut *x.0.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = m;
        if facts.destination_changed {
            out.destination = facts.destination;
        }
        if facts.properties_changed {
            out.properties = facts.properties;
        }
        for (name, value) in facts.headers {
            out.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
            if let Some(v) = value {
                out.headers.push((name, v));
            }
        }
        if facts.body_changed
            && let Some(b) = facts.body
        {
            out.body = match b.clone().into_string() {
                Ok(text) => Bytes::from(text),
                Err(_) => json_bytes(s, &self.route, hook, &b)?,
            };
        }
        Ok(out)
    }
}

/// The headers a hook sees: those with a text value.
fn text_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// A request or an answer a hook ended with `respond(status, detail)`: problem+json with the
/// script's detail.
fn refused(status: StatusCode, detail: String) -> BoxError {
    let kind = match status.as_u16() {
        401 => crate::error::Kind::UNAUTHORIZED,
        403 => crate::error::Kind::FORBIDDEN,
        s if s >= 500 => crate::error::Kind::INTERNAL,
        _ => crate::error::Kind::BAD_REQUEST,
    };
    let mut p = Problem::new(kind, status, crate::error::Fault::Client, detail);
    p.logged = true;
    p.into()
}

/// A body a hook set, as JSON bytes.
fn json_bytes(s: &Settings, route: &str, hook: &str, body: &Dynamic) -> Result<Bytes, BoxError> {
    let v: serde_json::Value =
        rhai::serde::from_dynamic(body).map_err(|e| failed(s, route, hook, &e.to_string()))?;
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| failed(s, route, hook, &e.to_string()))
}

fn apply_headers(headers: &mut http::HeaderMap, changes: &[(String, Option<String>)]) {
    for (name, value) in changes {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        match value.as_deref().map(HeaderValue::from_str) {
            Some(Ok(v)) => {
                headers.insert(name, v);
            }
            Some(Err(_)) => {}
            None => {
                headers.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_property_is_set_only_as_the_broker_takes_it() {
        let amqp = |name: &str, v: Dynamic| Protocol::Amqp.property(name, &v);
        let mqtt = |name: &str, v: Dynamic| Protocol::Mqtt.property(name, &v);
        assert_eq!(amqp("priority", 9.into()), Ok(("priority", "9".into())));
        assert_eq!(
            amqp("priority", "255".into()),
            Ok(("priority", "255".into()))
        );
        assert_eq!(amqp("expiration", 0.into()), Ok(("expiration", "0".into())));
        assert_eq!(
            amqp("content_type", "text/plain".into()),
            Ok(("content_type", "text/plain".into()))
        );
        for (name, v) in [
            ("priority", Dynamic::from(256_i64)),
            ("priority", Dynamic::from(-1_i64)),
            ("expiration", Dynamic::from("+5")),
            ("expiration", Dynamic::from("5s")),
            ("expiration", Dynamic::from(4_294_967_296_i64)),
            ("type", Dynamic::from("a\nb")),
            ("content_type", Dynamic::from("x".repeat(256))),
            ("content_type", Dynamic::from(true)),
            ("message_id", Dynamic::from("mine")),
            ("user_id", Dynamic::from("admin")),
            ("message_expiry_interval", Dynamic::from(5_i64)),
        ] {
            assert!(amqp(name, v.clone()).is_err(), "AMQP {name} = {v}");
        }
        assert_eq!(
            mqtt("message_expiry_interval", 60.into()),
            Ok(("message_expiry_interval", "60".into()))
        );
        assert!(mqtt("content_type", "x".repeat(300).into()).is_ok());
        assert!(mqtt("content_type", "\u{7f}".into()).is_err());
        assert!(mqtt("response_topic", "a/b".into()).is_err());
        assert!(mqtt("priority", 1.into()).is_err());
    }
}
