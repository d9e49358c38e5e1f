//! The error edge: every failure on the request path ends here, in [`rescue`], which turns an
//! error's cause chain into one RFC 9457 `application/problem+json` response (or a trailers-only
//! gRPC answer for gRPC clients).
//!
//! Errors are data. Every failure the gateway names is one [`Problem`]: its status, problem
//! type, detail, the field at fault, who is at fault ([`Fault`]), how it may be retried
//! ([`RetryClass`]), its gRPC code and the headers its answer carries. Modules build it with
//! the constructors below, which are the one place each kind's facts are written; the edge, the
//! retry policy, the breaker and the spool read its fields and never match on kinds of error.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use tonic::Code;

use crate::{BoxError, Response, full_body};

/// The `reason` of a `backend-unavailable` problem whose broker refused the message itself
/// (an AMQP nack): the spool counts it against the message rather than waiting for the broker.
pub const REFUSED_BY_BROKER: &str = "the broker refused the message (nack)";

/// Who caused a failure. Client faults never count against a backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Gateway,
}

/// How a failure may be retried, read by the retry policy against the route's `retry.on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Never retried by the gateway.
    Never,
    /// The backend could not be reached: it certainly did not act, so a retry is safe whatever
    /// the method (`connect-failure`).
    ConnectFailure,
    /// The exchange broke after the request left (`reset`).
    Reset,
    /// The backend did not answer in time (`timeout`).
    Timeout,
    /// The backend said it is unavailable (gRPC `UNAVAILABLE`, `unavailable`); also retried
    /// as its HTTP status.
    Unavailable,
    /// The backend answered with an error status: retried when the route lists that status.
    Answered,
}

impl RetryClass {
    /// Whether the backend may have acted on the request.
    pub fn may_have_acted(self) -> bool {
        self != RetryClass::ConnectFailure
    }
}

/// The problem type: its short name in `urn:switchyard:problem:<slug>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind(&'static str);

impl Kind {
    pub const ROUTE_NOT_FOUND: Kind = Kind("route-not-found");
    pub const METHOD_NOT_ALLOWED: Kind = Kind("method-not-allowed");
    pub const BAD_REQUEST: Kind = Kind("bad-request");
    pub const BAD_REQUEST_BODY: Kind = Kind("bad-request-body");
    pub const REQUEST_TIMEOUT: Kind = Kind("request-timeout");
    pub const PAYLOAD_TOO_LARGE: Kind = Kind("payload-too-large");
    pub const TIMEOUT: Kind = Kind("timeout");
    pub const BACKEND_UNAVAILABLE: Kind = Kind("backend-unavailable");
    pub const BAD_GATEWAY: Kind = Kind("bad-gateway");
    pub const CIRCUIT_OPEN: Kind = Kind("circuit-open");
    pub const OVERLOADED: Kind = Kind("overloaded");
    pub const RATE_LIMITED: Kind = Kind("rate-limited");
    pub const GRPC_STATUS: Kind = Kind("grpc-status");
    pub const UNROUTABLE: Kind = Kind("unroutable");
    pub const UNCONFIRMED: Kind = Kind("unconfirmed");
    pub const NO_VALUE: Kind = Kind("no-value");
    pub const SUBSCRIPTION_REFUSED: Kind = Kind("subscription-refused");
    pub const UPGRADE_REQUIRED: Kind = Kind("upgrade-required");
    pub const UNAUTHORIZED: Kind = Kind("unauthorized");
    pub const FORBIDDEN: Kind = Kind("forbidden");
    pub const STORE_UNAVAILABLE: Kind = Kind("store-unavailable");
    pub const SPOOL_FULL: Kind = Kind("spool-full");
    pub const KEY_IN_USE: Kind = Kind("idempotency-key-in-use");
    pub const KEY_REUSED: Kind = Kind("idempotency-key-reused");
    pub const JOB_NOT_FOUND: Kind = Kind("job-not-found");
    pub const NOT_IMPLEMENTED: Kind = Kind("not-implemented");
    pub const INTERNAL: Kind = Kind("internal");
    /// The admin API: no such resource.
    pub const NOT_FOUND: Kind = Kind("not-found");
    /// The admin API: the resource is not in a state that allows this.
    pub const CONFLICT: Kind = Kind("conflict");

    pub fn slug(self) -> &'static str {
        self.0
    }
}

/// One failure, as data. Details are written for the client and never carry Rust error
/// strings, addresses or stacks; the cause, when there is one, is kept for logs only.
///
/// A `Problem` is one pointer wide, so `Result<T, Problem>` costs the success path nothing;
/// its facts are read and written through it.
#[derive(Debug)]
pub struct Problem(Box<Facts>);

/// The facts of a [`Problem`].
#[derive(Debug)]
pub struct Facts {
    pub kind: Kind,
    pub status: StatusCode,
    /// What went wrong, written for the client.
    pub detail: String,
    /// The field of the request at fault (`body`, `header.idempotency-key`, a path value).
    pub field: Option<String>,
    pub fault: Fault,
    pub retry: RetryClass,
    /// The code a gRPC client is answered with.
    pub grpc_code: Code,
    /// The backend's own gRPC message, passed on to gRPC clients as it is.
    pub grpc_message: Option<String>,
    /// Headers the answer carries (`Retry-After`, `Allow`, `WWW-Authenticate`, …).
    pub headers: HeaderMap,
    /// Members added to the problem+json body (`grpc_code`, `details`, …).
    pub extensions: Vec<(&'static str, serde_json::Value)>,
    /// The short cause of a backend failure, for the spool and the logs.
    pub reason: Option<&'static str>,
    /// The cause was logged where it was found, once rather than per request: the edge does
    /// not log the request's failure again at WARN.
    pub logged: bool,
    source: Option<BoxError>,
}

impl std::ops::Deref for Problem {
    type Target = Facts;
    fn deref(&self) -> &Facts {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut Facts {
        &mut self.0
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.0, self.detail)
    }
}

impl StdError for Problem {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least one.
fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

impl Problem {
    /// A problem of `kind`, with the gRPC code that follows from its status; the constructors
    /// below set what differs.
    pub fn new(kind: Kind, status: StatusCode, fault: Fault, detail: impl Into<String>) -> Self {
        Problem(Box::new(Facts {
            kind,
            status,
            detail: detail.into(),
            field: None,
            fault,
            retry: RetryClass::Never,
            grpc_code: code_for_status(status),
            grpc_message: None,
            headers: HeaderMap::new(),
            extensions: Vec::new(),
            reason: None,
            logged: false,
            source: None,
        }))
    }

    /// Names the field of the request at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Names the field of the request at fault, when there is one.
    pub fn with_optional_field(mut self, field: Option<String>) -> Self {
        self.field = field;
        self
    }

    /// Keeps the cause, for logs.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets `Retry-After` to `secs` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.headers
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        self
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    pub fn not_found() -> Self {
        let mut p = Problem::new(
            Kind::ROUTE_NOT_FOUND,
            StatusCode::NOT_FOUND,
            Fault::Client,
            "No route matches this path.",
        );
        p.grpc_code = Code::Unimplemented;
        p
    }

    pub fn method_not_allowed(allow: &[Method]) -> Self {
        let allow = allow
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut p = Problem::new(
            Kind::METHOD_NOT_ALLOWED,
            StatusCode::METHOD_NOT_ALLOWED,
            Fault::Client,
            format!("This path accepts only: {allow}."),
        );
        p.grpc_code = Code::Unimplemented;
        match HeaderValue::from_str(&allow) {
            Ok(v) => p.with_header(header::ALLOW, v),
            Err(_) => p,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        let mut p = Problem::new(
            Kind::BAD_REQUEST,
            StatusCode::BAD_REQUEST,
            Fault::Client,
            detail,
        );
        p.grpc_code = Code::InvalidArgument;
        p
    }

    /// The client's body was cut short or malformed.
    pub fn bad_request_body() -> Self {
        Problem::new(
            Kind::BAD_REQUEST_BODY,
            StatusCode::BAD_REQUEST,
            Fault::Client,
            "The request body was cut short or malformed (its length or chunk framing).",
        )
        .with_field("body")
    }

    /// The client's body did not arrive before a timeout fired.
    pub fn request_timeout() -> Self {
        Problem::new(
            Kind::REQUEST_TIMEOUT,
            StatusCode::REQUEST_TIMEOUT,
            Fault::Client,
            "The request body did not arrive in time.",
        )
        .with_field("body")
    }

    /// The body went over the route's limit of `limit` bytes (0: not known here).
    pub fn payload_too_large(limit: u64) -> Self {
        Problem::new(
            Kind::PAYLOAD_TOO_LARGE,
            StatusCode::PAYLOAD_TOO_LARGE,
            Fault::Client,
            if limit > 0 {
                format!("The request body exceeds this route's limit of {limit} bytes.")
            } else {
                "The request body exceeds this route's limit.".to_string()
            },
        )
    }

    /// The backend did not answer within `after`.
    pub fn timeout(after: Duration) -> Self {
        Problem::timeout_with(format!(
            "The backend did not answer within {}.",
            humantime::format_duration(after)
        ))
    }

    fn timeout_with(detail: String) -> Self {
        let mut p = Problem::new(
            Kind::TIMEOUT,
            StatusCode::GATEWAY_TIMEOUT,
            Fault::Upstream,
            detail,
        );
        p.retry = RetryClass::Timeout;
        p.grpc_code = Code::DeadlineExceeded;
        p
    }

    /// The backend could not be reached: it certainly did not act on the request. Answers
    /// `Retry-After: 1` unless [`Problem::with_retry_after`] says otherwise.
    pub fn backend_unavailable(backend: &str, reason: &'static str) -> Self {
        let mut p = Problem::new(
            Kind::BACKEND_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Upstream,
            format!("Backend '{backend}' is unavailable: {reason}."),
        );
        p.retry = RetryClass::ConnectFailure;
        p.grpc_code = Code::Unavailable;
        p.reason = Some(reason);
        p.with_retry_after(1)
    }

    /// The exchange with the backend failed after the request left.
    pub fn bad_gateway(backend: &str, reason: &'static str) -> Self {
        let mut p = Problem::new(
            Kind::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
            Fault::Upstream,
            format!("Backend '{backend}' failed: {reason}."),
        );
        p.retry = RetryClass::Reset;
        p.grpc_code = Code::Unavailable;
        p.reason = Some(reason);
        p
    }

    /// The TLS handshake with the backend failed (`reason` says why: an expired certificate,
    /// an unknown issuer, another name, …), so the request never left. The cause is logged
    /// once per endpoint where it is found, so the edge does not log each request's.
    pub fn upstream_tls(backend: &str, reason: &str) -> Self {
        let mut p = Problem::new(
            Kind::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
            Fault::Upstream,
            format!("Backend '{backend}' failed: TLS to the upstream failed: {reason}."),
        );
        p.retry = RetryClass::ConnectFailure;
        p.grpc_code = Code::Unavailable;
        p.reason = Some("TLS to the upstream failed");
        p.logged = true;
        p
    }

    /// The breaker refuses calls for `retry_after`. A refusal made to protect a backend says
    /// nothing new about its health: the gateway's fault.
    pub fn circuit_open(backend: &str, retry_after: Duration) -> Self {
        let mut p = Problem::new(
            Kind::CIRCUIT_OPEN,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Gateway,
            format!(
                "Backend '{backend}' is failing; calls to it are paused for {}s.",
                retry_after.as_secs().max(1)
            ),
        );
        p.grpc_code = Code::Unavailable;
        p.with_retry_after(retry_secs(retry_after))
    }

    /// `scope` is over its concurrency limit.
    pub fn overloaded(scope: &str) -> Self {
        let mut p = Problem::new(
            Kind::OVERLOADED,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Gateway,
            format!("Too many requests in flight for {scope}; try again shortly."),
        );
        p.grpc_code = Code::Unavailable;
        p.with_retry_after(1)
    }

    /// The client went over `quota` requests per `window_secs`.
    pub fn rate_limited(retry_after: Duration, quota: u32, window_secs: u64) -> Self {
        let secs = retry_secs(retry_after);
        let mut p = Problem::new(
            Kind::RATE_LIMITED,
            StatusCode::TOO_MANY_REQUESTS,
            Fault::Client,
            format!("Rate limit exceeded; try again in {secs}s."),
        );
        p.grpc_code = Code::ResourceExhausted;
        crate::middleware::limit::set_ratelimit_headers(
            &mut p.headers,
            quota,
            window_secs,
            0,
            secs,
        );
        p.with_retry_after(secs)
    }

    /// The message left for the broker but its confirm never came (the connection died, or
    /// the broker did not answer in time): it may or may not have been delivered, so a retry
    /// is not made for the client.
    pub fn unconfirmed(backend: &str, reason: &'static str) -> Self {
        let mut p = Problem::new(
            Kind::UNCONFIRMED,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Upstream,
            format!(
                "Backend '{backend}' did not confirm the message: {reason}. It may or may not have been delivered; repeat the request with the same Idempotency-Key so that consumers can recognise a repeat."
            ),
        );
        p.grpc_code = Code::Unavailable;
        p.reason = Some(reason);
        p.with_retry_after(1)
    }

    /// The MQTT broker refused the gateway's subscription to a filter (its SUBACK), as an ACL
    /// does. The broker is fine and the filter is the client's: the client's fault.
    pub fn subscription_refused(backend: &str, filter: &str, reason: &str) -> Self {
        Problem::new(
            Kind::SUBSCRIPTION_REFUSED,
            StatusCode::BAD_GATEWAY,
            Fault::Client,
            format!(
                "The broker of backend '{backend}' refused the gateway's subscription to `{filter}` ({reason}); its access rules must let the gateway's client read this filter."
            ),
        )
    }

    /// A last-value read found no retained message on the topic.
    pub fn no_value(topic: &str) -> Self {
        Problem::new(
            Kind::NO_VALUE,
            StatusCode::NOT_FOUND,
            Fault::Client,
            format!("No message is retained on topic `{topic}`."),
        )
    }

    /// The broker returned a mandatory message that no queue took: a routing gap, not a broker
    /// in trouble, so it never opens the breaker. `status` is 404 or 502, as the route says.
    pub fn unroutable(
        backend: &str,
        exchange: &str,
        routing_key: &str,
        status: StatusCode,
    ) -> Self {
        let exchange = if exchange.is_empty() {
            "(default)"
        } else {
            exchange
        };
        Problem::new(
            Kind::UNROUTABLE,
            status,
            Fault::Client,
            format!(
                "Backend '{backend}' has no queue for routing key `{routing_key}` on exchange `{exchange}`; the message was not delivered."
            ),
        )
    }

    /// A WebSocket route asked for by a request that is not a valid WebSocket handshake.
    pub fn upgrade_required(detail: impl Into<String>) -> Self {
        Problem::new(
            Kind::UPGRADE_REQUIRED,
            StatusCode::UPGRADE_REQUIRED,
            Fault::Client,
            detail,
        )
        .with_header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .with_header(
            HeaderName::from_static("sec-websocket-version"),
            HeaderValue::from_static("13"),
        )
    }

    /// The request carries no credential the route accepts; `challenge` is the
    /// `WWW-Authenticate` header.
    pub fn unauthorized(detail: impl Into<String>, challenge: &str) -> Self {
        let p = Problem::new(
            Kind::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            Fault::Client,
            detail,
        );
        match HeaderValue::from_str(challenge) {
            Ok(v) => p.with_header(header::WWW_AUTHENTICATE, v),
            Err(_) => p,
        }
    }

    /// The request is understood but refused by the route's policy (an origin not allowed).
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(
            Kind::FORBIDDEN,
            StatusCode::FORBIDDEN,
            Fault::Client,
            detail,
        )
    }

    /// The state store could not record the request, so nothing was done with it.
    /// A cluster-wide rate limit with `fallback: closed` whose count the store could not give.
    pub fn rate_uncounted() -> Self {
        let mut p = Problem::new(
            Kind::STORE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Gateway,
            "The route's cluster-wide rate limit could not be counted (the state store did not answer in time), and the route refuses requests until it can; try again shortly.",
        );
        p.headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        p
    }

    pub fn store_unavailable(source: crate::store::StoreError) -> Self {
        Problem::new(
            Kind::STORE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Gateway,
            "The gateway could not record the request durably, so nothing was done with it; try again shortly.",
        )
        .with_retry_after(1)
        .with_source(source)
    }

    /// The route's backend is down and the spool is at its limit.
    pub fn spool_full(route: &str) -> Self {
        Problem::new(
            Kind::SPOOL_FULL,
            StatusCode::SERVICE_UNAVAILABLE,
            Fault::Gateway,
            format!(
                "The backend of route '{route}' is unavailable and the spool that holds requests for it is full; try again later."
            ),
        )
        .with_retry_after(1)
    }

    /// A request with this `Idempotency-Key` is still running.
    pub fn key_in_use() -> Self {
        Problem::new(
            Kind::KEY_IN_USE,
            StatusCode::CONFLICT,
            Fault::Client,
            "A request with this Idempotency-Key is still being processed; repeat it once that one has finished.",
        )
        .with_field("header.idempotency-key")
        .with_retry_after(1)
    }

    /// This `Idempotency-Key` was first used with another request.
    pub fn key_reused() -> Self {
        Problem::new(
            Kind::KEY_REUSED,
            StatusCode::UNPROCESSABLE_ENTITY,
            Fault::Client,
            "This Idempotency-Key was already used with a different request (method, path or body); use a new key for a new request.",
        )
        .with_field("header.idempotency-key")
    }

    /// No job has this id (never existed, or expired).
    pub fn job_not_found(id: &str) -> Self {
        Problem::new(
            Kind::JOB_NOT_FOUND,
            StatusCode::NOT_FOUND,
            Fault::Client,
            format!("No job `{id}` exists; it may have expired."),
        )
    }

    /// The request uses a feature of HTTP the gateway does not implement (a transfer coding
    /// other than `chunked`): refused rather than misread.
    pub fn not_implemented(detail: impl Into<String>) -> Self {
        Problem::new(
            Kind::NOT_IMPLEMENTED,
            StatusCode::NOT_IMPLEMENTED,
            Fault::Client,
            detail,
        )
    }

    /// The gateway itself failed at `what`.
    pub fn internal(what: &str) -> Self {
        Problem::new(
            Kind::INTERNAL,
            StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Gateway,
            format!("The gateway failed: {what}."),
        )
    }
}

/// The gRPC code for an answer of `status` that no constructor chose a code for, in the
/// spirit of gRPC's HTTP-to-gRPC mapping.
fn code_for_status(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        413 | 429 => Code::ResourceExhausted,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// What the error edge found in a cause chain: a [`Problem`] in it, or one made for what the
/// chain holds instead.
pub enum Seen<'a> {
    Found(&'a Problem),
    Made(Problem),
}

impl std::ops::Deref for Seen<'_> {
    type Target = Problem;
    fn deref(&self) -> &Problem {
        match self {
            Seen::Found(p) => p,
            Seen::Made(p) => p,
        }
    }
}

impl Seen<'_> {
    /// The problem a module raised, when the chain holds one (and no client body fault).
    pub fn raised(&self) -> Option<&Problem> {
        match self {
            Seen::Found(p) => Some(p),
            Seen::Made(_) => None,
        }
    }
}

/// Walks the cause chain. A fault of the client's body anywhere wins (the client sent too
/// much, a broken body or too slowly, whatever the backend made of it); otherwise the outermost
/// [`Problem`]; otherwise hyper's timeout; otherwise an internal failure that leaks nothing.
pub fn classify<'a>(err: &'a (dyn StdError + 'static)) -> Seen<'a> {
    let mut found = None;
    let mut hyper_timeout = false;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(PayloadLimit(limit)) = e.downcast_ref::<PayloadLimit>() {
            return Seen::Made(Problem::payload_too_large(*limit));
        }
        if let Some(body) = e.downcast_ref::<ClientBody>() {
            return Seen::Made(match body {
                ClientBody::Malformed(_) => Problem::bad_request_body(),
                ClientBody::TooSlow => Problem::request_timeout(),
            });
        }
        if found.is_none() {
            found = e.downcast_ref::<Problem>();
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            hyper_timeout |= h.is_timeout();
        }
        cur = e.source();
    }
    match found {
        Some(p) => Seen::Found(p),
        None if hyper_timeout => Seen::Made(Problem::timeout_with(
            "The backend did not answer in time.".into(),
        )),
        None => Seen::Made(Problem::new(
            Kind::INTERNAL,
            StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Gateway,
            "The gateway failed to handle the request.",
        )),
    }
}

/// A fault of the client's request body, raised by the front end's body wrapper (a body cut
/// mid-way or malformed, `Malformed`) or by a timeout that expired while the client was still
/// sending its body (`TooSlow`). Wherever it sits in a cause chain it makes the error the
/// client's (400 or 408): it never counts toward a breaker, a retry, an endpoint's ejection or
/// a backend's error metrics, whatever the backend made of the broken body.
#[derive(Debug, thiserror::Error)]
pub enum ClientBody {
    #[error("the request body was cut or malformed")]
    Malformed(#[source] crate::BoxError),
    #[error("the request body arrived too slowly")]
    TooSlow,
}

/// The body-limit error the front end raises, carrying the route's limit so the answer can
/// name it.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct PayloadLimit(pub u64);

/// What kind of gRPC wire format a request's content type asks for, if any: the edge answers
/// such a client in gRPC, since it reads nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    GrpcWeb,
}

impl Wire {
    pub fn of(headers: &HeaderMap) -> Option<Wire> {
        let ct = headers.get(header::CONTENT_TYPE)?.as_bytes();
        if ct.starts_with(b"application/grpc-web") {
            Some(Wire::GrpcWeb)
        } else if ct.starts_with(b"application/grpc") {
            Some(Wire::Grpc)
        } else {
            None
        }
    }
}

/// THE error edge: maps any error to a problem+json response carrying the correlation ID — or,
/// when the request was gRPC or gRPC-Web (`wire`), to a trailers-only gRPC answer whose
/// `grpc-status` and `grpc-message` say the same. Either carries the problem's headers.
pub fn rescue(
    err: &(dyn StdError + 'static),
    correlation_id: &str,
    wire: Option<Wire>,
) -> Response {
    let p = classify(err);
    match wire {
        Some(wire) => with_headers(grpc_answer(wire, &p, correlation_id), &p),
        None => problem_json(&p, Some(correlation_id)),
    }
}

/// The problem+json answer of a problem, with its headers: the body of [`rescue`], and the
/// admin API's errors (which have no correlation ID).
pub fn problem_json(p: &Problem, correlation_id: Option<&str>) -> Response {
    with_headers(problem_answer(p, correlation_id), p)
}

/// The problem's own headers (`Retry-After`, `Allow`, …) on its answer.
fn with_headers(mut resp: Response, p: &Problem) -> Response {
    for (name, value) in &p.headers {
        resp.headers_mut().insert(name, value.clone());
    }
    resp
}

/// The problem+json body of [`rescue`].
fn problem_answer(p: &Problem, correlation_id: Option<&str>) -> Response {
    let mut body = serde_json::json!({
        "type": format!("urn:switchyard:problem:{}", p.kind.0),
        "title": p.status.canonical_reason().unwrap_or("Error"),
        "status": p.status.as_u16(),
        "detail": p.detail,
    });
    if let Some(id) = correlation_id {
        body["correlation_id"] = id.into();
    }
    if let Some(field) = &p.field {
        body["field"] = field.as_str().into();
    }
    for (name, value) in &p.extensions {
        body[*name] = value.clone();
    }
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = p.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// The trailers-only gRPC answer of [`rescue`]: HTTP 200 with `grpc-status` and
/// `grpc-message` (percent-encoded) in the headers.
fn grpc_answer(wire: Wire, p: &Problem, correlation_id: &str) -> Response {
    const MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let message: Cow<'_, str> = match &p.grpc_message {
        Some(m) => m.into(),
        None => format!("{} (correlation id {correlation_id})", p.detail).into(),
    };
    let mut resp = http::Response::new(crate::empty_body());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match wire {
            Wire::Grpc => "application/grpc",
            Wire::GrpcWeb => "application/grpc-web+proto",
        }),
    );
    headers.insert("grpc-status", HeaderValue::from(p.grpc_code as i32));
    if let Ok(v) =
        HeaderValue::from_str(&percent_encoding::utf8_percent_encode(&message, MESSAGE).to_string())
    {
        headers.insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_wins_over_bad_gateway() {
        let err = Problem::bad_gateway("b", "request failed").with_source(PayloadLimit(10));
        let p = classify(&err);
        assert_eq!(p.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(p.fault, Fault::Client);
    }

    #[test]
    fn unknown_errors_leak_nothing() {
        let err = std::io::Error::other("secret at 0xdeadbeef");
        let resp = rescue(&err, "cid", None);
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn headers_and_grpc_codes_travel_with_the_problem() {
        let resp = rescue(
            &Problem::circuit_open("b", Duration::from_millis(1500)),
            "c",
            None,
        );
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let resp = rescue(
            &Problem::method_not_allowed(&[Method::GET]),
            "c",
            Some(Wire::Grpc),
        );
        assert_eq!(
            resp.headers()["grpc-status"],
            (Code::Unimplemented as i32).to_string()
        );
        assert_eq!(resp.headers()[header::ALLOW], "GET");
        let p = Problem::backend_unavailable("b", "down");
        assert!(!p.retry.may_have_acted());
        assert!(Problem::bad_gateway("b", "cut").retry.may_have_acted());
    }
}
