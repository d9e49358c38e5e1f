//! The gRPC backend: REST/JSON requests transcoded at run time into gRPC calls, from descriptors
//! compiled when the config loads (protox) — no code generation. Sits at the bottom of a
//! route's stack; the reply (or the gRPC status) comes back as JSON or problem+json.

pub mod annotations;
pub mod bridge;
pub mod codec;
mod embedded;
pub mod live;
mod ndjson;
pub mod passthrough;
pub mod reflection;
pub mod reply;
pub mod spec;
pub mod status;
mod stream;
pub mod transcode;
pub mod transport;
pub mod validate;
pub mod websocket;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor, ReflectMessage,
};
use tower::Service;

use crate::config::{FieldError, GrpcBackendSpec, GrpcRouteSpec, RouteSpec};
use crate::error::Problem;
use crate::middleware::context::{Deadline, RequestContext};
use crate::telemetry::otel::{self, Attr, Trace, semconv};
use crate::{BoxError, Request, Response, ResponseFuture, full_body};

use super::AbortOnDrop;
use super::bridge::{Generated, Unserved};

/// Loads the descriptor pool of a backend: `.proto` files compiled with protox, and/or a binary
/// `FileDescriptorSet`. Paths are relative to `base` (routes.yaml's directory).
pub fn load_descriptors(spec: &GrpcBackendSpec, base: &Path) -> Result<DescriptorPool, String> {
    load_descriptors_with(spec, base, &[], &mut Vec::new())
}

/// [`load_descriptors`], plus the serialized files the server gave through reflection. Every
/// file read from disk (the descriptor set, the protos and the imports found under the import
/// paths) is added to `read`, so that a change to any of them reloads the config.
pub fn load_descriptors_with(
    spec: &GrpcBackendSpec,
    base: &Path,
    reflected: &[Vec<u8>],
    read: &mut Vec<std::path::PathBuf>,
) -> Result<DescriptorPool, String> {
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut pool = DescriptorPool::new();
    if let Some(set) = &spec.descriptor_set {
        let path = resolve(set);
        read.push(path.clone());
        super::must_exist("descriptor_set", &path)?;
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("{}: cannot read the descriptor set: {e}", path.display()))?;
        pool.decode_file_descriptor_set(bytes.as_slice())
            .map_err(|e| format!("{}: not a valid FileDescriptorSet: {e}", path.display()))?;
    }
    let includes: Vec<_> = if spec.import_paths.is_empty() {
        vec![base.to_path_buf()]
    } else {
        spec.import_paths.iter().map(|p| resolve(p)).collect()
    };
    let mut resolver = protox::file::ChainFileResolver::new();
    for dir in &includes {
        resolver.add(protox::file::IncludeFileResolver::new(dir.clone()));
    }
    resolver.add(embedded::EmbeddedFiles);
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    for proto in &spec.protos {
        let path = resolve(proto);
        read.push(path.clone());
        if !path.is_file() {
            return Err(format!(
                "{}: not found; list `.proto` files that exist (a relative path starts at routes.yaml's directory)",
                path.display()
            ));
        }
        compiler
            .open_file(&path)
            .map_err(|e| match proto_position(&e) {
                Some((line, col)) => format!("{}:{line}:{col}: {e}", path.display()),
                None if !includes.iter().any(|dir| path.starts_with(dir)) => format!(
                    "{}: {e}; add its folder ({}), or the one its imports are written from, to `import_paths`",
                    path.display(),
                    path.parent().unwrap_or(base).display()
                ),
                None => format!("{}: {e}", path.display()),
            })?;
    }
    // What the reflected files import but the server did not send (the well-known types).
    for name in reflection::missing_imports(reflected) {
        if pool.get_file_by_name(&name).is_none() {
            compiler.open_file(&name).map_err(|e| {
                format!("`{name}`, imported by the server's files, is not available: {e}")
            })?;
        }
    }
    // The error model, so that status details decode to JSON.
    for name in [
        embedded::STATUS,
        embedded::ERROR_DETAILS,
        embedded::ANNOTATIONS,
    ] {
        if pool.get_file_by_name(name).is_none() {
            compiler
                .open_file(name)
                .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    // The imports found under the import paths were read from disk too.
    for file in &compiler.file_descriptor_set().file {
        if let Some(found) = includes
            .iter()
            .map(|dir| dir.join(file.name()))
            .find(|p| p.is_file())
            && !read.contains(&found)
        {
            read.push(found);
        }
    }
    // The encoded form keeps method options (google.api.http) that prost-types would drop.
    pool.decode_file_descriptor_set(compiler.encode_file_descriptor_set().as_slice())
        .map_err(|e| format!("the compiled protos do not fit together: {e}"))?;
    // The server's own files; a name the pool already holds (a built-in google/api file) is kept.
    let fresh: Vec<Vec<u8>> = reflected
        .iter()
        .filter(|b| {
            <prost_types::FileDescriptorProto as prost::Message>::decode(b.as_slice())
                .is_ok_and(|fd| pool.get_file_by_name(fd.name()).is_none())
        })
        .cloned()
        .collect();
    pool.decode_file_descriptor_set(reflection::encode_set(&fresh).as_slice())
        .map_err(|e| format!("the files from server reflection do not fit together: {e}"))?;
    Ok(pool)
}

/// Line and column (1-based) of a proto compile error, from its diagnostic label.
fn proto_position(e: &protox::Error) -> Option<(usize, usize)> {
    use miette::Diagnostic;
    let label = e.labels()?.next()?;
    let contents = e.source_code()?.read_span(label.inner(), 0, 0).ok()?;
    Some((contents.line() + 1, contents.column() + 1))
}

pub struct GrpcBackend {
    name: String,
    annotated_routes: bool,
    native_routes: bool,
    /// How its routes read and write JSON, unless a route says otherwise.
    pub transcoding: crate::config::TranscodingSpec,
    /// Reloaded on every config reload, so edited protos take effect while connections stay.
    pool: arc_swap::ArcSwap<DescriptorPool>,
    /// Transcoded and passed-through calls.
    transport: transport::Transport,
    reachable: Arc<AtomicBool>,
    /// The endpoints' addresses, which the readiness probe connects to.
    addrs: Vec<String>,
    connect_timeout: Duration,
    _probe: Option<AbortOnDrop>,
}

impl GrpcBackend {
    /// Loads descriptors (the only step that can fail) and prepares its connections; nothing here
    /// waits for the server.
    pub fn new(
        name: &str,
        spec: &GrpcBackendSpec,
        cx: &super::BuildContext<'_>,
    ) -> Result<Self, String> {
        let reflected = match cx.reflected.get(name) {
            Some(Ok(files)) => files.as_slice(),
            Some(Err(e)) => return Err(e.clone()),
            None => &[],
        };
        let pool = load_descriptors_with(spec, cx.base, reflected, &mut cx.read_files())?;
        let transport = transport::Transport::new(name, spec, cx.base)?;
        let reachable = Arc::new(AtomicBool::new(false));
        let addrs: Vec<String> = spec
            .endpoints
            .iter()
            .filter_map(|e| {
                e.parse::<http::Uri>()
                    .ok()?
                    .authority()
                    .map(|a| a.to_string())
            })
            .collect();
        let probe = super::spawn_probe(
            name,
            "grpc",
            addrs.clone(),
            reachable.clone(),
            Duration::from_secs(2),
            spec.connect_timeout.0,
            &cx.gate,
        );
        Ok(GrpcBackend {
            name: name.to_string(),
            annotated_routes: spec.annotated_routes,
            native_routes: spec.native_routes,
            transcoding: spec.transcoding,
            pool: arc_swap::ArcSwap::from_pointee(pool),
            transport,
            reachable,
            addrs,
            connect_timeout: spec.connect_timeout.0,
            _probe: probe,
        })
    }

    pub fn ready(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Whether an endpoint accepts a connection now: the probe's answer when it found one,
    /// else a connect tried here (the probe may not have run yet, or be out of date).
    pub async fn reachable_now(&self) -> bool {
        if self.ready() {
            return true;
        }
        for addr in &self.addrs {
            let connect = tokio::net::TcpStream::connect(addr.as_str());
            if matches!(
                tokio::time::timeout(self.connect_timeout, connect).await,
                Ok(Ok(_))
            ) {
                return true;
            }
        }
        false
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's connections, for WebSocket sessions (cheap to clone).
    pub fn transport(&self) -> transport::Transport {
        self.transport.clone()
    }

    /// Loads the descriptors again (a reload that kept this backend); the channel is kept.
    /// When reflection fails this time, the descriptors the server gave before stay in use.
    pub fn reload_descriptors(
        &self,
        spec: &GrpcBackendSpec,
        cx: &super::BuildContext<'_>,
    ) -> Result<(), String> {
        let reflected = match cx.reflected.get(&self.name) {
            Some(Ok(files)) => files.as_slice(),
            Some(Err(e)) => {
                tracing::warn!(backend = %self.name, error = %e, "Reflection failed; the descriptors it gave before stay in use.");
                return Ok(());
            }
            None => &[],
        };
        let pool = load_descriptors_with(spec, cx.base, reflected, &mut cx.read_files())?;
        self.pool.store(Arc::new(pool));
        Ok(())
    }

    /// The routes the backend makes itself: from `google.api.http` annotations and, for gRPC
    /// clients, one native route per method, each when enabled.
    pub fn generated_routes(&self) -> Generated {
        let mut out = self.annotated_routes();
        if self.native_routes {
            let pool = self.pool.load();
            for service in pool.services() {
                for method in service.methods() {
                    let full = format!("{}/{}", service.full_name(), method.name());
                    let id = format!("{}/{full}", self.name);
                    let mut route = match self.generated_route(&id, &format!("/{full}"), "POST") {
                        Ok(r) => r,
                        Err(reason) => {
                            out.unserved.push(self.unserved(
                                id,
                                format!("the native route of `{full}`"),
                                reason,
                            ));
                            continue;
                        }
                    };
                    route.grpc = Some(GrpcRouteSpec {
                        method: full,
                        body: Some("*".into()),
                        native: true,
                        ..GrpcRouteSpec::default()
                    });
                    out.routes.push(route);
                }
            }
        }
        out
    }

    /// A route of this backend that cannot be served, and why.
    fn unserved(&self, id: String, what: String, reason: String) -> Unserved {
        Unserved {
            backend: self.name.clone(),
            id,
            what,
            reason,
        }
    }

    /// A route of this backend with nothing but its id, path and method.
    fn generated_route(&self, id: &str, path: &str, method: &str) -> Result<RouteSpec, String> {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "match": { "path": path, "method": method },
            "backend": self.name,
        }))
        .map_err(|e| e.to_string())
    }

    /// Routes made from the `google.api.http` annotations of every method, when enabled. A
    /// binding that cannot be served is listed with its reason; the others serve.
    fn annotated_routes(&self) -> Generated {
        let mut out = Generated::default();
        if !self.annotated_routes {
            return out;
        }
        let pool = self.pool.load();
        for service in pool.services() {
            for method in service.methods() {
                let full = format!("{}/{}", service.full_name(), method.name());
                for (i, b) in annotations::bindings(&pool, &method)
                    .into_iter()
                    .enumerate()
                {
                    let id = if i == 0 {
                        format!("{}.{}", self.name, method.name())
                    } else {
                        format!("{}.{}#{i}", self.name, method.name())
                    };
                    let b = match b {
                        Ok(b) => b,
                        Err(reason) => {
                            out.unserved.push(self.unserved(
                                id,
                                format!("a binding of `{full}`"),
                                reason,
                            ));
                            continue;
                        }
                    };
                    let route = self.generated_route(&id, &b.rule.raw, &b.method);
                    let mut route = match route {
                        Ok(r) => r,
                        Err(reason) => {
                            out.unserved.push(self.unserved(
                                id,
                                format!("`{} {}` of `{full}`", b.method, b.rule.raw),
                                reason,
                            ));
                            continue;
                        }
                    };
                    route.matcher.rule = Some(Arc::new(b.rule));
                    route.grpc = Some(GrpcRouteSpec {
                        method: full.clone(),
                        body: Some(b.body),
                        response_body: (!b.response_body.is_empty()).then_some(b.response_body),
                        ..GrpcRouteSpec::default()
                    });
                    out.routes.push(route);
                }
            }
        }
        // Verb routes first: they are stricter than a plain variable of the same shape.
        out.routes
            .sort_by_key(|r| r.matcher.rule.as_ref().is_none_or(|t| t.verb.is_none()));
        out
    }

    /// The descriptor of `package.Service/Method`, or a message listing what is there.
    pub fn method(&self, full: &str) -> Result<MethodDescriptor, String> {
        let (svc, m) = full.split_once('/').unwrap_or((full, ""));
        let pool = self.pool.load();
        let service = pool.get_service_by_name(svc).ok_or_else(|| {
            let known: Vec<_> = pool.services().map(|s| s.full_name().to_string()).collect();
            format!(
                "service `{svc}` is not in the loaded descriptors; services: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?;
        service.methods().find(|x| x.name() == m).ok_or_else(|| {
            let known: Vec<_> = service.methods().map(|x| x.name().to_string()).collect();
            format!(
                "service `{svc}` has no method `{m}`; methods: {}",
                known.join(", ")
            )
        })
    }
}

#[derive(Clone)]
enum PathVars {
    Bound,
    Named { multi: Vec<String> },
}

#[derive(Clone)]
enum BodyRule {
    None,
    Whole,
    Field(FieldDescriptor),
}

/// One route's service on top of a shared [`GrpcBackend`].
#[derive(Clone)]
pub struct GrpcRouteService {
    backend: Arc<GrpcBackend>,
    method: MethodDescriptor,
    path: PathAndQuery,
    body: BodyRule,
    response_body: Option<FieldDescriptor>,
    /// How JSON is read and written.
    opts: transcode::Options,
    /// How path variables become fields: by their rule (annotated routes, whose variables
    /// the router binds to fields, decoded), or by name (a route's own `{id}` and
    /// `{*rest}`, the catch-alls listed here keeping `%2F`).
    path_vars: PathVars,
    /// Allow-listed request headers forwarded as metadata, lower-cased.
    /// The request headers forwarded as metadata (the trace context, the request id, and the
    /// route's `metadata_headers`), their metadata keys made once.
    metadata_headers: Arc<Vec<(http::HeaderName, tonic::metadata::AsciiMetadataKey)>>,
    server_streaming: bool,
    /// Client streaming: the body is NDJSON, one request message per line.
    client_streaming: bool,
    /// Bidirectional (native routes only): JSON clients are turned away.
    bidi: bool,
    /// gRPC and gRPC-Web requests to this route's method, forwarded untranscoded.
    passthrough: passthrough::Passthrough,
}

impl GrpcRouteService {
    pub fn new(
        backend: Arc<GrpcBackend>,
        route: &RouteSpec,
        spec: &GrpcRouteSpec,
    ) -> Result<Self, FieldError> {
        let method = backend
            .method(&spec.method)
            .map_err(|e| FieldError::at("grpc.method", e))?;
        let bidi = method.is_client_streaming() && method.is_server_streaming();
        if bidi && !spec.native {
            return Err(FieldError::at(
                "grpc.method",
                format!(
                    "`{}` is a bidirectional-streaming method; plain HTTP routes bridge unary, server-streaming and client-streaming methods",
                    spec.method
                ),
            ));
        }
        let input = method.input();
        let has_body = route.matcher.method.as_ref().is_some_and(|m| {
            m.0.iter()
                .any(|x| matches!(x.as_str(), "POST" | "PUT" | "PATCH"))
        });
        let body = match spec.body.as_deref() {
            Some("*") => BodyRule::Whole,
            Some("") => BodyRule::None,
            None if has_body => BodyRule::Whole,
            None => BodyRule::None,
            Some(name) => {
                let f = transcode::field_by_name(&input, name).ok_or_else(|| {
                    FieldError::at(
                        "grpc.body",
                        format!(
                            "`body: {name}`: {} has no field `{name}`",
                            input.full_name()
                        ),
                    )
                })?;
                BodyRule::Field(f)
            }
        };
        if method.is_client_streaming() && !bidi && matches!(body, BodyRule::None) {
            return Err(FieldError::at(
                "grpc.body",
                format!(
                    "`{}` is client-streaming: its messages come from the NDJSON request body, so the route needs `body: \"*\"` (or a field) and a method that takes a body",
                    spec.method
                ),
            ));
        }
        let response_body = match &spec.response_body {
            None => None,
            Some(name) => {
                let output = method.output();
                let f = transcode::field_by_name(&output, name).ok_or_else(|| {
                    FieldError::at(
                        "grpc.response_body",
                        format!(
                            "`response_body: {name}`: {} has no field `{name}`",
                            output.full_name()
                        ),
                    )
                })?;
                Some(f)
            }
        };
        let path: PathAndQuery =
            format!("/{}/{}", method.parent_service().full_name(), method.name())
                .parse()
                .map_err(|_| "the method's path is not a valid URI path".to_string())?;
        let path_vars = match &route.matcher.rule {
            Some(_) => PathVars::Bound,
            None => PathVars::Named {
                multi: crate::config::template::PathTemplate::parse(&route.matcher.path)
                    .map(|t| {
                        t.segments
                            .into_iter()
                            .filter_map(|s| match s {
                                crate::config::template::Segment::CatchAll(n) => Some(n),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        };
        let opts = transcode::Options::for_route(
            spec.emit_defaults,
            spec.proto_names,
            spec.transcoding,
            backend.transcoding,
        );
        Ok(GrpcRouteService {
            passthrough: passthrough::Passthrough::new(
                &backend.name,
                backend.transport.clone(),
                path.clone(),
            ),
            backend,
            server_streaming: method.is_server_streaming(),
            bidi,
            client_streaming: method.is_client_streaming(),
            method,
            path,
            body,
            response_body,
            opts,
            path_vars,
            metadata_headers: Arc::new(
                ["x-request-id", "traceparent", "tracestate"]
                    .into_iter()
                    .map(str::to_string)
                    .chain(spec.metadata_headers.iter().map(|h| h.to_ascii_lowercase()))
                    .filter_map(|h| {
                        Some((
                            http::HeaderName::from_bytes(h.as_bytes()).ok()?,
                            tonic::metadata::AsciiMetadataKey::from_bytes(h.as_bytes()).ok()?,
                        ))
                    })
                    .collect(),
            ),
        })
    }

    fn bad_field(e: transcode::FieldError) -> BoxError {
        let detail = if e.field.is_empty() {
            format!("The request body does not fit the message: {}.", e.message)
        } else {
            format!("Field `{}`: {}.", e.field, e.message)
        };
        Problem::bad_request(detail)
            .with_optional_field((!e.field.is_empty()).then_some(e.field))
            .into()
    }

    /// Builds the request message: body first, then query parameters, then path variables
    /// (which win, as in google.api.HttpRule).
    fn message(
        &self,
        req_parts: &http::request::Parts,
        body: &Bytes,
    ) -> Result<DynamicMessage, BoxError> {
        let content_type = req_parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut msg = self.body_message(body, Some(content_type))?;
        let (pairs, query) = self.param_pairs(req_parts)?;
        transcode::set_params(&mut msg, &pairs, query, &self.opts).map_err(Self::bad_field)?;
        Ok(msg)
    }

    /// The request message as the body alone makes it, following the route's body rule. A
    /// whole request body (`content_type` given) that fills a `google.api.HttpBody` is taken as
    /// it is; the lines of a client stream (no content type) are always proto3 JSON.
    fn body_message(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<DynamicMessage, BoxError> {
        let input = self.method.input();
        let parse = |desc, body| match content_type {
            Some(ct) => transcode::message_from_body(desc, body, ct, &self.opts),
            None => transcode::message_from_json(desc, body, &self.opts),
        };
        Ok(match &self.body {
            BodyRule::Whole => parse(input, body).map_err(Self::bad_field)?,
            BodyRule::None => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(Problem::bad_request("This route takes no request body.").into());
                }
                DynamicMessage::new(input)
            }
            BodyRule::Field(f) => {
                // A scalar, repeated or map field: the body is its JSON value.
                let (Kind::Message(m), false) = (f.kind(), f.is_list() || f.is_map()) else {
                    return transcode::field_from_json(input, f, body, &self.opts)
                        .map_err(Self::bad_field);
                };
                let inner = parse(m, body)
                    .map_err(|mut e| {
                        e.field = if e.field.is_empty() {
                            f.name().to_string()
                        } else {
                            format!("{}.{}", f.name(), e.field)
                        };
                        e
                    })
                    .map_err(Self::bad_field)?;
                let mut msg = DynamicMessage::new(input);
                msg.set_field(f, prost_reflect::Value::Message(inner));
                msg
            }
        })
    }

    /// Field paths and values from the query string (unless the body is the whole message)
    /// and then from path variables, in the order they are applied; and how many of them came
    /// from the query.
    fn param_pairs(
        &self,
        req_parts: &http::request::Parts,
    ) -> Result<(Vec<(String, String)>, usize), BoxError> {
        let mut out = Vec::new();
        if !matches!(self.body, BodyRule::Whole)
            && let Some(q) = req_parts.uri.query()
        {
            out.extend(transcode::query_pairs(q, self.opts.query_unescape_plus));
        }
        let query = out.len();
        if let Some(ctx) = req_parts.extensions.get::<RequestContext>() {
            for (name, value) in &ctx.params {
                let value = match &self.path_vars {
                    PathVars::Bound => value.clone(),
                    PathVars::Named { multi } if multi.iter().any(|m| **m == **name) => {
                        crate::config::template::decode_keeping_slashes(value)
                    }
                    PathVars::Named { .. } => percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .into_owned(),
                };
                out.push((name.to_string(), value));
            }
        }
        Ok((out, query))
    }

    /// A gRPC client on the backend's connections; a failed connect shows in the call's status.
    fn client(&self) -> tonic::client::Grpc<transport::Transport> {
        tonic::client::Grpc::new(self.backend.transport.clone())
    }

    /// Wraps the request message(s) with the remaining deadline as `grpc-timeout` and the
    /// forwarded metadata.
    fn outgoing<T>(&self, parts: &http::request::Parts, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(d) = parts.extensions.get::<Deadline>() {
            request.set_timeout(d.remaining());
        }
        // The try's span, for the transport to name the endpoint on.
        if let Some(t) = Trace::of(&parts.extensions) {
            request.extensions_mut().insert(t.clone());
        }
        for (name, key) in self.metadata_headers.iter() {
            for v in parts.headers.get_all(name) {
                if let Ok(v) = tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes()) {
                    request.metadata_mut().append(key.clone(), v);
                }
            }
        }
        request
    }

    /// One call, in a client span (RPC semantic conventions) whose context the server receives
    /// in its metadata.
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let (mut parts, body) = req.into_parts();
        let Some(span) = Trace::of(&parts.extensions).map(|t| {
            let method = self.path.as_str().trim_start_matches('/');
            t.child(method.to_owned(), otel::Kind::Client, || {
                vec![
                    Attr::new(semconv::RPC_SYSTEM_NAME, "grpc"),
                    Attr::new(semconv::RPC_METHOD, method.to_owned()),
                ]
            })
        }) else {
            return self.call(parts, body).await;
        };
        if span.recording() {
            span.inject(&mut parts.headers);
            parts.extensions.insert(span.clone());
        }
        let result = self.call(parts, body).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e
                .downcast_ref::<Problem>()
                .map_or(tonic::Code::Unknown, |p| p.grpc_code),
        };
        span.set(|| {
            vec![Attr::new(
                semconv::RPC_RESPONSE_STATUS_CODE,
                status::code_name(code),
            )]
        });
        if let Err(e) = &result {
            span.fail(
                status::code_name(code),
                crate::server::dispatch::error_chain(e.as_ref()),
            );
        }
        span.end();
        result
    }

    async fn call(
        self,
        parts: http::request::Parts,
        body: crate::Body,
    ) -> Result<Response, BoxError> {
        if self.bidi {
            return Err(Problem::bad_request(
                "This method streams both ways; call it with a gRPC or gRPC-Web client.",
            )
            .into());
        }
        if self.client_streaming {
            return self.call_client_streaming(parts, body).await;
        }
        let body = crate::collect_body(body).await?;
        let msg = self.message(&parts, &body)?;
        let mut grpc = self.client();
        let request = self.outgoing(&parts, msg);
        let codec = codec::DynamicCodec::new(self.method.output());
        if self.server_streaming {
            let format = stream::Format::from_accept(parts.headers.get(header::ACCEPT));
            return match grpc
                .server_streaming(request, self.path.clone(), codec)
                .await
            {
                Ok(resp) => {
                    let (metadata, mut messages, extensions) = resp.into_parts();
                    // The HTTP status goes with the first message: a status that comes before
                    // it is answered like a unary call's.
                    let first = match messages.message().await {
                        Ok(first) => first,
                        Err(status) => {
                            return Err(
                                self.status_error(status, parts.extensions.get::<Deadline>())
                            );
                        }
                    };
                    let mut r = stream::response(messages, first, format, self.opts);
                    metadata_to_headers(&metadata, r.headers_mut());
                    Ok(with_upstream(r, &extensions))
                }
                Err(status) => Err(self.status_error(status, parts.extensions.get::<Deadline>())),
            };
        }
        match grpc
            .unary(request, self.path.clone(), codec::ReplyCodec)
            .await
        {
            Ok(resp) => self.reply(resp),
            Err(status) => Err(self.status_error(status, parts.extensions.get::<Deadline>())),
        }
    }

    /// A client-streaming call fed from an NDJSON body, line by line as it arrives. Query and
    /// path fields are set on every message.
    async fn call_client_streaming(
        self,
        parts: http::request::Parts,
        body: crate::Body,
    ) -> Result<Response, BoxError> {
        let (params, query) = self.param_pairs(&parts)?;
        let this = self.clone();
        let parse: ndjson::LineParser = Box::new(move |line| {
            let mut msg = this.body_message(line, None)?;
            transcode::set_params(&mut msg, &params, query, &this.opts).map_err(Self::bad_field)?;
            Ok(msg)
        });
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let mut grpc = self.client();
        let request = self.outgoing(&parts, ndjson::messages(body, parse, failed_tx));
        let call = grpc.client_streaming(request, self.path.clone(), codec::ReplyCodec);
        tokio::select! {
            // A bad line or a failed body: dropping the call cancels the stream on the server.
            Ok(e) = failed_rx => Err(e),
            r = call => match r {
                Ok(resp) => self.reply(resp),
                Err(status) => Err(self.status_error(status, parts.extensions.get::<Deadline>())),
            },
        }
    }

    /// A unary reply as JSON (or its `response_body` field, or a passed-through HttpBody). A
    /// whole reply is written from its bytes when their encoding allows (`reply::write`);
    /// otherwise, and for the other two, it is decoded first.
    fn reply(&self, resp: tonic::Response<Bytes>) -> Result<Response, BoxError> {
        let (metadata, raw, extensions) = resp.into_parts();
        let output = self.method.output();
        if self.response_body.is_none() && output.full_name() != "google.api.HttpBody" {
            let mut json = Vec::with_capacity(64 + 2 * raw.len());
            if reply::write(&output, &raw, &self.opts, &mut json).is_ok() {
                return Ok(with_upstream(json_response(json, &metadata), &extensions));
            }
        }
        let reply = DynamicMessage::decode(output, raw).map_err(|e| {
            self.status_error(
                tonic::Status::internal(format!("decoding the message failed: {e}")),
                None,
            )
        })?;
        self.reply_json(metadata, reply)
            .map(|r| with_upstream(r, &extensions))
    }

    fn reply_json(
        &self,
        metadata: tonic::metadata::MetadataMap,
        reply: DynamicMessage,
    ) -> Result<Response, BoxError> {
        let out = match &self.response_body {
            Some(f) => match (f.kind(), f.is_list() || f.is_map()) {
                (Kind::Message(m), false) => match reply.get_field(f).as_message() {
                    Some(inner) => inner.clone(),
                    None => DynamicMessage::new(m),
                },
                // A scalar, repeated or map field: the answer is its JSON value.
                _ => {
                    let json = transcode::field_to_json(&reply, f, &self.opts)
                        .map_err(|_| Problem::internal("the reply could not be written as JSON"))?;
                    return Ok(json_response(json, &metadata));
                }
            },
            None => reply,
        };
        if out.descriptor().full_name() == "google.api.HttpBody" {
            return Ok(http_body_response(&out, &metadata));
        }
        let json = transcode::message_to_json(&out, &self.opts)
            .map_err(|_| Problem::internal("the reply could not be written as JSON"))?;
        Ok(json_response(json, &metadata))
    }
}

/// A JSON answer with the reply's metadata as headers.
fn json_response(json: Vec<u8>, metadata: &tonic::metadata::MetadataMap) -> Response {
    let mut r = http::Response::new(full_body(json));
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    metadata_to_headers(metadata, headers);
    r
}

/// A `google.api.HttpBody` reply is passed through: `data` as the body, `content_type` as its
/// Content-Type.
fn http_body_response(msg: &DynamicMessage, metadata: &tonic::metadata::MetadataMap) -> Response {
    let data = msg
        .get_field_by_name("data")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let content_type = msg
        .get_field_by_name("content_type")
        .and_then(|v| v.as_str().and_then(|s| HeaderValue::from_str(s).ok()))
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let mut r = http::Response::new(full_body(data));
    r.headers_mut().insert(header::CONTENT_TYPE, content_type);
    metadata_to_headers(metadata, r.headers_mut());
    r
}

/// Response metadata (headers and trailers) becomes `grpc-metadata-<key>` response headers;
/// binary (`-bin`) entries and the protocol's own (`grpc-*`, `content-type`, …) are left out.
fn metadata_to_headers(metadata: &tonic::metadata::MetadataMap, headers: &mut http::HeaderMap) {
    for kv in metadata.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
            let key = k.as_str();
            if key.starts_with("grpc-") || matches!(key, "content-type" | "te" | "date" | "trailer")
            {
                continue;
            }
            // `grpc-metadata-` and the key, on the stack unless the key is long.
            const PREFIX: &[u8] = b"grpc-metadata-";
            let (mut buf, long);
            let full = PREFIX.len() + key.len();
            let joined: &[u8] = if full <= 128 {
                buf = [0u8; 128];
                buf[..PREFIX.len()].copy_from_slice(PREFIX);
                buf[PREFIX.len()..full].copy_from_slice(key.as_bytes());
                &buf[..full]
            } else {
                long = [PREFIX, key.as_bytes()].concat();
                &long
            };
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(joined),
                HeaderValue::from_bytes(v.as_encoded_bytes()),
            ) {
                headers.append(name, value);
            }
        }
    }
}

impl GrpcRouteService {
    /// The error for a non-OK status: a transport failure is a backend that cannot be reached,
    /// and tonic's own `CANCELLED: Timeout expired` once the route's deadline passed is a
    /// gateway timeout.
    fn status_error(&self, status: tonic::Status, deadline: Option<&Deadline>) -> BoxError {
        if let Some(d) = deadline
            && matches!(
                status.code(),
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            )
            && d.remaining().is_zero()
        {
            return Problem::timeout(d.total).into();
        }
        let backend = &self.backend;
        // A status with a cause was made on this side, not sent by the server: the call failed
        // in transport. A failed connect means the backend never saw the call; any other
        // failure (a reset, a dead connection) may come after it acted, so it is a 502,
        // retried only when safe.
        if std::error::Error::source(&status).is_some() {
            if let Some(reason) = crate::backends::tls::failure(&status) {
                return Problem::upstream_tls(&backend.name, &reason)
                    .with_source(status)
                    .into();
            }
            if transport::is_connect_failure(&status) {
                return Problem::backend_unavailable(
                    &backend.name,
                    "cannot connect to the backend",
                )
                .with_source(status)
                .into();
            }
            return Problem::bad_gateway(&backend.name, "the connection to the backend failed")
                .with_source(status)
                .into();
        }
        status::problem(
            &backend.name,
            status.code(),
            status.message(),
            self.details(&status),
        )
        .into()
    }

    /// The `google.rpc.Status` details of an error status, as proto3 JSON (`Any` values of the
    /// types the backend's descriptors know are expanded; others keep only their `@type`).
    fn details(&self, status: &tonic::Status) -> Option<serde_json::Value> {
        if status.details().is_empty() {
            return None;
        }
        let desc = self
            .backend
            .pool
            .load()
            .get_message_by_name("google.rpc.Status")?;
        let st = DynamicMessage::decode(desc, status.details()).ok()?;
        let list = st.get_field_by_name("details")?;
        let items = list.as_list()?;
        let out: Vec<serde_json::Value> = items
            .iter()
            .filter_map(|v| v.as_message())
            .map(|any| {
                let mut ser = serde_json::Serializer::new(Vec::new());
                let json = any
                    .serialize_with_options(&mut ser, &prost_reflect::SerializeOptions::new())
                    .ok()
                    .and_then(|_| serde_json::from_slice(&ser.into_inner()).ok());
                json.unwrap_or_else(|| {
                    let url = any
                        .get_field_by_name("type_url")
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    serde_json::json!({ "@type": url })
                })
            })
            .collect();
        Some(serde_json::Value::Array(out))
    }
}

impl Service<Request> for GrpcRouteService {
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        if let Some(wire) = passthrough::Wire::of(req.headers()) {
            return self.passthrough.serve(wire, req);
        }
        let this = self.clone();
        Box::pin(this.call_backend(req))
    }
}

/// The answer, with the upstream facts the transport put on the call's answer (for the access
/// log).
fn with_upstream(mut r: Response, extensions: &tonic::Extensions) -> Response {
    if let Some(u) = extensions.get::<crate::telemetry::access::Upstream>() {
        r.extensions_mut().insert(u.clone());
    }
    r
}
