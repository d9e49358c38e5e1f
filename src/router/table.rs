//! The compiled, immutable route table the front end matches every request against. Built off
//! to the side on each reload and swapped in whole; lookup cost grows with the path's length,
//! not the number of routes (a radix tree per host).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::RouteService;
use crate::backends::{BackendSet, BuiltBackend};
use crate::config::template::PathTemplate;
use crate::config::{ConfigSpec, FieldError, RouteSpec, validate::route_methods};
use crate::durable::jobs;
use crate::middleware;
use crate::router::build_error::{BuildError, BuildErrors};
use crate::store::State;
use crate::telemetry::metrics::Metrics;

/// One route, ready to serve.
pub struct CompiledRoute {
    pub id: Arc<str>,
    /// The path template as written (`/v1/orders/{id}`), for the access log.
    pub template: Arc<str>,
    /// The route's request counters and latency histogram, looked up once.
    pub counters: crate::telemetry::metrics::RouteMetrics,
    pub spec: RouteSpec,
    /// How the path is matched and its variables read.
    pub pattern: Pattern,
    pub methods: Option<BTreeSet<Method>>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub max_body_size: u64,
    /// `None` for the job endpoint's generated route.
    pub backend: Option<Arc<BuiltBackend>>,
    pub service: RouteService,
    /// The stack below the spool layer, for `spool: true` routes.
    pub spool_inner: Option<crate::durable::spool::Forwarding>,
    /// The job layer of `mode: async` and `on_timeout: accept` routes.
    pub job: Option<crate::durable::jobs::JobService>,
    /// The route's plugins around the job endpoint's answer for its jobs.
    pub job_reader: Option<RouteService>,
}

/// How a route's path is matched.
pub enum Pattern {
    /// A route's own template (`/v1/orders/{id}`, `/files/{*rest}`): the router's match is
    /// final, and each variable is named as written.
    Path { names: Vec<Arc<str>> },
    /// A `google.api.http` template (annotated gRPC routes): the router only finds candidates;
    /// the rule decides, and binds each variable to its field.
    Rule(Arc<crate::config::template::RuleTemplate>),
}

impl Pattern {
    /// The router keys of a path, each with whether it goes to the catch-all router.
    fn compile(r: &RouteSpec) -> Result<(Pattern, Vec<(String, bool)>), FieldError> {
        if let Some(rule) = &r.matcher.rule {
            return Ok((Pattern::Rule(rule.clone()), rule.router_keys()));
        }
        let template =
            PathTemplate::parse(&r.matcher.path).map_err(|e| FieldError::at("match.path", e))?;
        let names = template.captures().into_iter().map(Arc::from).collect();
        let key = (template.router_key(), template.ends_with_catch_all());
        Ok((Pattern::Path { names }, vec![key]))
    }
}

impl CompiledRoute {
    fn accepts(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
    fn headers_match(&self, headers: &HeaderMap) -> bool {
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
    }
}

/// The routes of one host. Templates ending in a catch-all live in a router of their own,
/// tried after the first: the radix tree ranks static segments above parameters but refuses a
/// parameter and a catch-all at the same position, and parameters must beat catch-alls.
#[derive(Default)]
struct PathIndex {
    exact: matchit::Router<usize>,
    catch_all: matchit::Router<usize>,
    /// Route indices per path shape, in config order.
    groups: Vec<Vec<usize>>,
}

/// The route that a router insert clashed with, for the message: "route `x` (`/a/{id}`)",
/// or "another path" when the router does not say which.
fn clashing_route(
    e: &matchit::InsertError,
    keys: &HashMap<(Option<String>, String), usize>,
    host: &Option<String>,
    index: &PathIndex,
    all: &[RouteSpec],
) -> String {
    let matchit::InsertError::Conflict { with } = e else {
        return "another path".into();
    };
    keys.get(&(host.clone(), with.clone()))
        .and_then(|&g| index.groups.get(g)?.first())
        .map(|&j| format!("route `{}` (`{}`)", all[j].id, all[j].matcher.path))
        .unwrap_or_else(|| "another path".into())
}

/// What the router found for a request.
pub enum Lookup<'a> {
    Found {
        route: &'a Arc<CompiledRoute>,
        params: Vec<(Arc<str>, String)>,
    },
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

pub struct RouteTable {
    pub version: u64,
    pub spec: Arc<ConfigSpec>,
    pub routes: Vec<Arc<CompiledRoute>>,
    pub backends: BackendSet,
    /// The state store and spool, open when a route needs them.
    pub state: Option<Arc<State>>,
    pub correlation_header: HeaderName,
    /// The files the build read besides routes.yaml (protos, descriptor sets): the watcher
    /// reloads when one of them changes.
    pub files: Vec<std::path::PathBuf>,
    /// Opened by [`activate`](Self::activate): the backends this build made start then.
    gate: crate::backends::StartGate,
    by_host: HashMap<String, PathIndex>,
    any_host: PathIndex,
    /// The custom verbs of the rule routes: a request path ending in `:<verb>` is that verb.
    verbs: std::collections::HashSet<String>,
    /// The routes matched by a rule template, in table order.
    rule_routes: Vec<usize>,
    /// Routes the backends would make but cannot serve, and why.
    pub unserved: Vec<crate::backends::bridge::Unserved>,
    /// The trace exporter of `telemetry.otlp` (set by the reloader, which keeps it across
    /// reloads that do not change it).
    pub otel: Option<Arc<crate::telemetry::otel::Otel>>,
}

/// Whether a route uses the state store or the spool.
pub fn needs_state(r: &RouteSpec) -> bool {
    r.spool
        || r.idempotency.is_some()
        || r.rate_limit
            .as_ref()
            .is_some_and(|l| l.scope == crate::config::RateScope::Cluster)
        || r.mode == crate::config::RouteMode::Async
        || r.on_timeout == crate::config::OnTimeout::Accept
}

impl RouteTable {
    /// Builds a table from validated config, reusing the previous backends where unchanged.
    pub fn build(
        spec: ConfigSpec,
        version: u64,
        previous: &BackendSet,
        metrics: &Arc<Metrics>,
        cx: &crate::backends::BuildContext<'_>,
    ) -> Result<RouteTable, BuildErrors> {
        // Every problem is collected, so that one build reports them all; a route whose
        // backend (or state store) failed is left out rather than reported again.
        let mut errors = Vec::new();
        // The state store (and its lock) before any backend connects: a store another
        // process holds fails the build before this one touches a broker.
        let mut state_failed = false;
        let state = if spec.routes.iter().any(needs_state) {
            State::build(
                &spec.state,
                cx.base,
                cx.previous_state.as_ref(),
                metrics,
                cx.dry,
            )
            .map_err(|e| {
                state_failed = true;
                errors.push(BuildError::state(e.to_string()));
            })
            .ok()
        } else {
            None
        };
        let (backends, failed) = previous.rebuild(&spec.backends, metrics, cx);
        for (name, e) in failed {
            errors.push(BuildError::backend(&name, e));
        }
        let mut routes = Vec::with_capacity(spec.routes.len());
        let mut by_host: HashMap<String, PathIndex> = HashMap::new();
        let mut any_host = PathIndex::default();
        let mut keys: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut all = spec.routes.clone();
        let mut names: Vec<&String> = backends.by_name.keys().collect();
        names.sort();
        let mut unserved = Vec::new();
        for name in names {
            let generated = backends.by_name[name].generated_routes();
            unserved.extend(generated.unserved);
            for g in generated.routes {
                if all.iter().any(|r| r.id == g.id) {
                    errors.push(BuildError::backend(
                        name,
                        format!(
                            "the route it generates (annotated or native) for `{}` has the id `{}` of another route; rename that route",
                            g.matcher.path, g.id
                        ),
                    ));
                    continue;
                }
                all.push(g);
            }
        }
        // A route that runs jobs makes the table serve `GET {jobs.path}/{id}`: one more
        // generated route, the last, whose stack is the job endpoint.
        let jobs = state.as_ref().filter(|_| {
            all.iter().any(|r| {
                r.mode == crate::config::RouteMode::Async
                    || r.on_timeout == crate::config::OnTimeout::Accept
            })
        });
        if jobs.is_some() {
            all.push(jobs::endpoint_route(&spec.state.jobs));
        }
        for (i, r) in all.iter().enumerate() {
            let generated = i >= spec.routes.len();
            // A problem of a generated route leaves that route out, said, and the others
            // serve; one of a route in the file is an error there.
            let mut refused = |e: FieldError| match generated {
                false => errors.push(BuildError::route(&r.id, e)),
                true => unserved.push(crate::backends::bridge::Unserved {
                    backend: r.backend.clone(),
                    id: r.id.clone(),
                    what: format!(
                        "`{} {}`{}",
                        r.matcher
                            .method
                            .as_ref()
                            .map(|m| m.0.join(","))
                            .unwrap_or_default(),
                        r.matcher.path,
                        r.grpc
                            .as_ref()
                            .map(|g| format!(" of `{}`", g.method))
                            .unwrap_or_default()
                    ),
                    reason: e.message,
                }),
            };
            let unbuilt =
                |b: &String| !backends.by_name.contains_key(b) && spec.backends.contains_key(b);
            if unbuilt(&r.backend)
                || r.alternatives.iter().any(unbuilt)
                || state_failed && needs_state(r)
            {
                continue;
            }
            // The route's problem, recorded; the next route is built.
            macro_rules! refuse {
                ($e:expr) => {{
                    refused(FieldError::from($e));
                    continue;
                }};
            }
            let (pattern, route_keys) = match Pattern::compile(r) {
                Ok(p) => p,
                Err(e) => refuse!(e),
            };
            let methods = match route_methods(&r.matcher) {
                Ok(m) => m,
                Err(e) => refuse!(FieldError::at("match.method", e)),
            };
            let endpoint = jobs.filter(|_| i + 1 == all.len() && generated);
            let mut headers = Vec::with_capacity(r.matcher.headers.len());
            for (n, v) in &r.matcher.headers {
                let field = format!("match.headers.{n}");
                let Ok(name) = HeaderName::from_bytes(n.as_bytes()) else {
                    refuse!(FieldError::at(field, format!("bad header name `{n}`")))
                };
                let Ok(value) = HeaderValue::from_str(v) else {
                    refuse!(FieldError::at(field, format!("bad header value for `{n}`")))
                };
                headers.push((name, value));
            }
            let (backend, built) = match endpoint {
                Some(state) => {
                    let readers = routes
                        .iter()
                        .filter_map(|c: &Arc<CompiledRoute>| {
                            Some((c.id.to_string(), c.job_reader.clone()?))
                        })
                        .collect();
                    let service = jobs::JobEndpoint::new(state.jobs.clone(), readers);
                    (
                        None,
                        middleware::RouteStack::bare(RouteService::new(service)),
                    )
                }
                None => {
                    let Some(backend) = backends.by_name.get(&r.backend).cloned() else {
                        refuse!(FieldError::at(
                            "backend",
                            format!("backend `{}` is not defined", r.backend)
                        ))
                    };
                    let mut alternatives = Vec::with_capacity(r.alternatives.len());
                    for (j, name) in r.alternatives.iter().enumerate() {
                        match backends.by_name.get(name) {
                            Some(b) => alternatives.push(b.clone()),
                            None => refuse!(FieldError::at(
                                format!("alternatives[{j}]"),
                                format!("backend `{name}` is not defined")
                            )),
                        }
                    }
                    match middleware::stack(
                        r,
                        &spec.defaults,
                        &backend,
                        &alternatives,
                        metrics,
                        state.as_ref(),
                        cx,
                    ) {
                        Ok(built) => (Some(backend), built),
                        Err(e) => refuse!(e),
                    }
                }
            };
            let host = r.matcher.host.clone();
            let index = match &host {
                Some(h) => by_host.entry(h.clone()).or_default(),
                None => &mut any_host,
            };
            let mut groups = Vec::with_capacity(route_keys.len());
            for (key, catch_all) in route_keys {
                let group = match keys.get(&(host.clone(), key.clone())) {
                    Some(&g) => g,
                    None => {
                        let g = index.groups.len();
                        let router = if catch_all {
                            &mut index.catch_all
                        } else {
                            &mut index.exact
                        };
                        if let Err(e) = router.insert(key.clone(), g) {
                            let clash = clashing_route(&e, &keys, &host, index, &all);
                            refuse!(FieldError::at(
                                "match.path",
                                format!(
                                    "the path `{}` clashes with {clash} in the router ({e}); make the two paths differ in a literal segment, or give them one host each",
                                    r.matcher.path
                                )
                            ))
                        }
                        index.groups.push(Vec::new());
                        keys.insert((host.clone(), key), g);
                        g
                    }
                };
                // Explicit routes were checked by validation; a generated one is checked here.
                if generated
                    && let Some(&j) = index.groups[group]
                        .iter()
                        .find(|&&j| crate::config::validate::indistinguishable(&all[j], r))
                {
                    refuse!(format!(
                        "it can never be told apart from route `{}`: same host, path shape and methods",
                        all[j].id
                    ))
                }
                groups.push(group);
            }
            for g in groups {
                index.groups[g].push(i);
            }
            let id: Arc<str> = r.id.as_str().into();
            routes.push(Arc::new(CompiledRoute {
                counters: metrics.route(&id),
                template: r.matcher.path.as_str().into(),
                id,
                pattern,
                spec: r.clone(),
                methods,
                headers,
                max_body_size: r.max_body_size.unwrap_or(spec.defaults.max_body_size).0,
                backend,
                service: built.service,
                spool_inner: built.spool_inner,
                job: built.job,
                job_reader: built.job_reader,
            }));
        }
        // The job endpoint serves every host: it is placed in each host's index too, where
        // it comes before the host's own catch-alls, as in the index of any host.
        if jobs.is_some()
            && let Some(last) = routes.last()
        {
            let i = routes.len() - 1;
            let key = PathTemplate::parse(&last.spec.matcher.path)
                .map(|t| t.router_key())
                .unwrap_or_default();
            for index in by_host.values_mut() {
                let g = index.groups.len();
                match index.exact.insert(key.clone(), g) {
                    Ok(()) => index.groups.push(vec![i]),
                    Err(e) => errors.push(BuildError::state(format!(
                        "the job endpoint's path `{}` clashes with a route in the router ({e}); change `state.jobs.path`",
                        last.spec.matcher.path
                    ))),
                }
            }
        }
        if !errors.is_empty() {
            return Err(BuildErrors(errors));
        }
        for u in &unserved {
            tracing::warn!(backend = %u.backend, route = %u.id, reason = %u.reason, "{u}");
        }
        let rule_routes = (0..routes.len())
            .filter(|&i| matches!(routes[i].pattern, Pattern::Rule(_)))
            .collect();
        let verbs = routes
            .iter()
            .filter_map(|r| match &r.pattern {
                Pattern::Rule(t) => t.verb.clone(),
                Pattern::Path { .. } => None,
            })
            .collect();
        let correlation_header = HeaderName::from_bytes(spec.server.correlation_header.as_bytes())
            .unwrap_or(HeaderName::from_static("x-request-id"));
        Ok(RouteTable {
            version,
            spec: Arc::new(spec),
            routes,
            backends,
            state,
            correlation_header,
            files: {
                let mut files = cx.read_files().clone();
                files.sort();
                files.dedup();
                files
            },
            gate: cx.gate.clone(),
            by_host,
            any_host,
            verbs,
            rule_routes,
            unserved,
            otel: None,
        })
    }

    /// Called once the table serves: tells backends what the routes need of them (AMQP reply
    /// queues to consume) and hands the spool and the jobs the services they replay through
    /// (a table that is built but rejected never gets here).
    pub fn activate(&self) {
        // The backends this build made connect now, and not before: a table that is built
        // but never served (a rejected reload, `validate`) has touched no broker.
        self.gate.open();
        self.backends.activate(&self.spec.routes);
        let Some(state) = &self.state else { return };
        state.apply();
        // Background work traces with the exporter of the table that serves.
        state.spool.otel.set(self.otel.clone());
        state.jobs.otel.set(self.otel.clone());
        let mut keep = Vec::new();
        for r in &self.routes {
            if let Some(inner) = &r.spool_inner {
                state.spool.install(&r.id, inner.clone());
                keep.push(r.id.clone());
            }
        }
        state.spool.retain_routes(&keep);
        let mut keep = Vec::new();
        for r in &self.routes {
            if let Some(j) = &r.job {
                j.install();
                keep.push(r.id.clone());
            }
        }
        state.jobs.retain_routes(&keep);
    }

    /// Route `i`, when it takes the request; the methods it would take otherwise are added to
    /// `allow`. `params` are the router's, for a route's own template.
    fn candidate(
        &self,
        i: usize,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        params: Option<&matchit::Params<'_, '_>>,
        allow: &mut Vec<Method>,
    ) -> Option<Lookup<'_>> {
        let route = &self.routes[i];
        if !route.headers_match(headers) {
            return None;
        }
        let params = match &route.pattern {
            Pattern::Path { names } => names
                .iter()
                .cloned()
                .zip(params?.iter().map(|(_, v)| v.to_string()))
                .collect(),
            Pattern::Rule(rule) => rule.bind(path, &self.verbs)?,
        };
        if route.accepts(method) {
            return Some(Lookup::Found { route, params });
        }
        if let Some(ms) = &route.methods {
            allow.extend(ms.iter().cloned());
        }
        None
    }

    /// Finds the route for a request. Host-specific routes are tried before host-less ones;
    /// within a path shape, routes are tried in config order.
    pub fn lookup(
        &self,
        host: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Lookup<'_> {
        let mut allow: Vec<Method> = Vec::new();
        let indices = host
            .and_then(|h| self.by_host.get(h))
            .into_iter()
            .chain(std::iter::once(&self.any_host))
            .flat_map(|i| [(&i.exact, i), (&i.catch_all, i)]);
        for (router, index) in indices {
            let Ok(m) = router.at(path) else {
                continue;
            };
            for &i in &index.groups[*m.value] {
                if let Some(found) =
                    self.candidate(i, method, path, headers, Some(&m.params), &mut allow)
                {
                    return found;
                }
            }
        }
        // The router gives one candidate group per router, the most specific: a rule template
        // that a more specific one shadowed (`/**` behind `/a/**/b` for `/a/x/c`) is found
        // here, trying the rule routes of this host in order. Only a path no route took pays.
        for &i in &self.rule_routes {
            let h = self.routes[i].spec.matcher.host.as_deref();
            if (h.is_none() || h == host)
                && let Some(found) = self.candidate(i, method, path, headers, None, &mut allow)
            {
                return found;
            }
        }
        if allow.is_empty() {
            Lookup::NotFound
        } else {
            if allow.contains(&Method::GET) {
                allow.push(Method::HEAD);
            }
            allow.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allow.dedup();
            Lookup::MethodNotAllowed(allow)
        }
    }
}
