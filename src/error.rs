//! The error edge: every failure on the request path ends here, in [`rescue`], which turns an
//! error's cause chain into one RFC 9457 `application/problem+json` response.
//!
//! Errors know who is at fault ([`Fault`]) and whether they may be retried; the retry policy
//! and the circuit breaker read the same facts through [`classify`].

use std::error::Error as StdError;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode, header};

use crate::{Response, full_body};

/// Who caused a failure. Client faults never count against a backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Gateway,
}

/// The gateway's own errors. Details are written for the client and never carry Rust error
/// strings, addresses or stacks; the cause, when there is one, is kept for logs only.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches the request")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: Vec<Method> },
    #[error("bad request: {detail}")]
    BadRequest {
        detail: String,
        field: Option<String>,
    },
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("request timed out after {after:?}")]
    Timeout { after: Duration },
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        backend: String,
        reason: &'static str,
        retry_after: Option<Duration>,
        #[source]
        source: Option<crate::BoxError>,
    },
    #[error("backend {backend} failed: {reason}")]
    BadGateway {
        backend: String,
        reason: &'static str,
        #[source]
        source: Option<crate::BoxError>,
    },
    #[error("circuit open for backend {backend}")]
    CircuitOpen {
        backend: String,
        retry_after: Duration,
    },
    #[error("{scope} over its concurrency limit")]
    Overloaded { scope: String },
    #[error("rate limited")]
    RateLimited {
        retry_after: Duration,
        /// Requests per window and the window in seconds, for the `RateLimit-Policy` header.
        quota: u32,
        window_secs: u64,
    },
    /// The gRPC backend answered with a non-OK status.
    #[error("backend {backend} answered gRPC status {code:?}")]
    Grpc {
        backend: String,
        code: tonic::Code,
        message: String,
        /// `google.rpc.Status` details as JSON, when the server sent any.
        details: Option<serde_json::Value>,
    },
    /// The message left for the broker but its confirm never came (the connection died, or
    /// the broker did not answer in time): it may or may not have been delivered, so a retry
    /// is not made for the client.
    #[error("backend {backend} did not confirm the message: {reason}")]
    Unconfirmed {
        backend: String,
        reason: &'static str,
        #[source]
        source: Option<crate::BoxError>,
    },
    /// The MQTT broker refused the gateway's subscription to a filter (its SUBACK), as an ACL
    /// does.
    #[error("backend {backend} refused the subscription to {filter}: {reason}")]
    SubscriptionRefused {
        backend: String,
        filter: String,
        reason: String,
    },
    /// A last-value read found no retained message on the topic.
    #[error("no retained message on {topic}")]
    NoValue { topic: String },
    /// The broker returned a mandatory message that no queue took.
    #[error("backend {backend} could not route the message")]
    Unroutable {
        backend: String,
        exchange: String,
        routing_key: String,
        /// 404 or 502, as the route says.
        status: StatusCode,
    },
    /// A WebSocket route asked for by a request that is not a valid WebSocket handshake.
    #[error("upgrade required: {detail}")]
    UpgradeRequired {
        detail: String,
        field: Option<String>,
    },
    /// The request carries no credential the route accepts.
    #[error("unauthorized: {detail}")]
    Unauthorized {
        detail: String,
        /// The `WWW-Authenticate` challenge.
        challenge: String,
    },
    /// The request is understood but refused by the route's policy (an origin not allowed).
    #[error("forbidden: {detail}")]
    Forbidden {
        detail: String,
        field: Option<String>,
    },
    /// The state store could not record the request, so nothing was done with it.
    #[error("state store failed")]
    StoreUnavailable {
        #[source]
        source: crate::store::StoreError,
    },
    /// The route's backend is down and the spool is at its limit.
    #[error("spool full for route {route}")]
    SpoolFull { route: String },
    /// A request with this `Idempotency-Key` is still running.
    #[error("idempotency key in use")]
    KeyInUse,
    /// This `Idempotency-Key` was first used with another request.
    #[error("idempotency key reused")]
    KeyReused,
    /// No job has this id (never existed, or expired).
    #[error("no job {id}")]
    JobNotFound { id: String },
    /// The request uses a feature of HTTP the gateway does not implement (a transfer coding
    /// other than `chunked`): refused rather than misread.
    #[error("not implemented: {detail}")]
    NotImplemented {
        detail: String,
        field: Option<String>,
    },
    #[error("internal gateway error: {0}")]
    Internal(&'static str),
}

impl GatewayError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            detail: detail.into(),
            field: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::BackendUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::CircuitOpen { .. } | GatewayError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Grpc { code, .. } => crate::backends::grpc::status::http_status(*code),
            GatewayError::Unroutable { status, .. } => *status,
            GatewayError::Unconfirmed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::NoValue { .. } => StatusCode::NOT_FOUND,
            GatewayError::SubscriptionRefused { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpgradeRequired { .. } => StatusCode::UPGRADE_REQUIRED,
            GatewayError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden { .. } => StatusCode::FORBIDDEN,
            GatewayError::StoreUnavailable { .. } | GatewayError::SpoolFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::KeyInUse => StatusCode::CONFLICT,
            GatewayError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::JobNotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::NotFound
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::BadRequest { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UpgradeRequired { .. }
            | GatewayError::Unauthorized { .. }
            | GatewayError::Forbidden { .. }
            | GatewayError::KeyInUse
            | GatewayError::KeyReused
            | GatewayError::JobNotFound { .. }
            | GatewayError::NotImplemented { .. }
            | GatewayError::RateLimited { .. } => Fault::Client,
            GatewayError::Timeout { .. }
            | GatewayError::BackendUnavailable { .. }
            | GatewayError::Unconfirmed { .. }
            | GatewayError::BadGateway { .. } => Fault::Upstream,
            // Refusals made to protect a backend say nothing new about its health.
            GatewayError::CircuitOpen { .. } | GatewayError::Overloaded { .. } => Fault::Gateway,
            GatewayError::Grpc { .. } if self.status().is_client_error() => Fault::Client,
            GatewayError::Grpc { .. } => Fault::Upstream,
            // A routing gap, not a broker in trouble: it never opens the breaker.
            // So is a filter the broker will not let the gateway read: the broker is fine.
            GatewayError::Unroutable { .. }
            | GatewayError::NoValue { .. }
            | GatewayError::SubscriptionRefused { .. } => Fault::Client,
            GatewayError::StoreUnavailable { .. }
            | GatewayError::SpoolFull { .. }
            | GatewayError::Internal(_) => Fault::Gateway,
        }
    }

    /// Whether the backend certainly did not act on the request, so a retry is safe whatever
    /// the method. The retry policy reads this.
    pub fn retryable(&self) -> bool {
        matches!(self, GatewayError::BackendUnavailable { .. })
    }

    /// The problem type's short name (`urn:switchyard:problem:<slug>`).
    pub fn slug(&self) -> &'static str {
        match self {
            GatewayError::NotFound => "route-not-found",
            GatewayError::MethodNotAllowed { .. } => "method-not-allowed",
            GatewayError::BadRequest { .. } => "bad-request",
            GatewayError::PayloadTooLarge { .. } => "payload-too-large",
            GatewayError::Timeout { .. } => "timeout",
            GatewayError::BackendUnavailable { .. } => "backend-unavailable",
            GatewayError::BadGateway { .. } => "bad-gateway",
            GatewayError::CircuitOpen { .. } => "circuit-open",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::RateLimited { .. } => "rate-limited",
            GatewayError::Grpc { .. } => "grpc-status",
            GatewayError::Unroutable { .. } => "unroutable",
            GatewayError::Unconfirmed { .. } => "unconfirmed",
            GatewayError::NoValue { .. } => "no-value",
            GatewayError::SubscriptionRefused { .. } => "subscription-refused",
            GatewayError::UpgradeRequired { .. } => "upgrade-required",
            GatewayError::Unauthorized { .. } => "unauthorized",
            GatewayError::Forbidden { .. } => "forbidden",
            GatewayError::StoreUnavailable { .. } => "store-unavailable",
            GatewayError::SpoolFull { .. } => "spool-full",
            GatewayError::KeyInUse => "idempotency-key-in-use",
            GatewayError::KeyReused => "idempotency-key-reused",
            GatewayError::JobNotFound { .. } => "job-not-found",
            GatewayError::NotImplemented { .. } => "not-implemented",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// The field of the request at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            GatewayError::BadRequest { field, .. }
            | GatewayError::NotImplemented { field, .. }
            | GatewayError::UpgradeRequired { field, .. }
            | GatewayError::Forbidden { field, .. } => field.as_deref(),
            GatewayError::KeyInUse | GatewayError::KeyReused => Some("header.idempotency-key"),
            _ => None,
        }
    }

    /// What went wrong, written for the client.
    pub fn detail(&self) -> String {
        match self {
            GatewayError::NotFound => "No route matches this path.".into(),
            GatewayError::NoValue { topic } => {
                format!("No message is retained on topic `{topic}`.")
            }
            GatewayError::SubscriptionRefused {
                backend,
                filter,
                reason,
            } => format!(
                "The broker of backend '{backend}' refused the gateway's subscription to `{filter}` ({reason}); its access rules must let the gateway's client read this filter."
            ),
            GatewayError::MethodNotAllowed { allow } => format!(
                "This path accepts only: {}.",
                allow
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            GatewayError::BadRequest { detail, .. }
            | GatewayError::NotImplemented { detail, .. }
            | GatewayError::UpgradeRequired { detail, .. }
            | GatewayError::Unauthorized { detail, .. }
            | GatewayError::Forbidden { detail, .. } => detail.clone(),
            GatewayError::PayloadTooLarge { limit } => {
                format!("The request body exceeds this route's limit of {limit} bytes.")
            }
            GatewayError::Timeout { after } => format!(
                "The backend did not answer within {}.",
                humantime::format_duration(*after)
            ),
            GatewayError::BackendUnavailable {
                backend, reason, ..
            } => {
                format!("Backend '{backend}' is unavailable: {reason}.")
            }
            GatewayError::BadGateway {
                backend, reason, ..
            } => {
                format!("Backend '{backend}' failed: {reason}.")
            }
            GatewayError::CircuitOpen {
                backend,
                retry_after,
            } => format!(
                "Backend '{backend}' is failing; calls to it are paused for {}s.",
                retry_after.as_secs().max(1)
            ),
            GatewayError::Overloaded { scope } => {
                format!("Too many requests in flight for {scope}; try again shortly.")
            }
            GatewayError::RateLimited { retry_after, .. } => format!(
                "Rate limit exceeded; try again in {}s.",
                retry_after.as_secs_f64().ceil().max(1.0) as u64
            ),
            GatewayError::Grpc {
                backend,
                code,
                message,
                ..
            } => {
                let name = crate::backends::grpc::status::code_name(*code);
                if message.is_empty() {
                    format!("Backend '{backend}' answered {name}.")
                } else {
                    format!("Backend '{backend}' answered {name}: {message}")
                }
            }
            GatewayError::Unroutable {
                backend,
                exchange,
                routing_key,
                ..
            } => format!(
                "Backend '{backend}' has no queue for routing key `{routing_key}` on exchange `{}`; the message was not delivered.",
                if exchange.is_empty() {
                    "(default)"
                } else {
                    exchange
                }
            ),
            GatewayError::Unconfirmed {
                backend, reason, ..
            } => format!(
                "Backend '{backend}' did not confirm the message: {reason}. It may or may not have been delivered; repeat the request with the same Idempotency-Key so that consumers can recognise a repeat."
            ),
            GatewayError::StoreUnavailable { .. } => "The gateway could not record the request durably, so nothing was done with it; try again shortly.".into(),
            GatewayError::SpoolFull { route } => format!(
                "The backend of route '{route}' is unavailable and the spool that holds requests for it is full; try again later."
            ),
            GatewayError::KeyInUse => "A request with this Idempotency-Key is still being processed; repeat it once that one has finished.".into(),
            GatewayError::KeyReused => "This Idempotency-Key was already used with a different request (method, path or body); use a new key for a new request.".into(),
            GatewayError::JobNotFound { id } => format!("No job `{id}` exists; it may have expired."),
            GatewayError::Internal(what) => format!("The gateway failed: {what}."),
        }
    }
}

/// What the error edge decided about an error.
pub struct Classified<'a> {
    pub status: StatusCode,
    pub fault: Fault,
    pub error: Option<&'a GatewayError>,
    /// Set when the request body went over its limit somewhere down the chain.
    pub too_large: Option<u64>,
    /// Set when the client's body was broken or too slow somewhere down the chain.
    pub client_body: Option<&'a ClientBody>,
}

/// Walks the cause chain. A fault of the client's body anywhere wins (the client sent too
/// much, a broken body or too slowly, whatever the backend made of it); otherwise the outermost
/// `GatewayError`; otherwise hyper's own kinds.
pub fn classify<'a>(err: &'a (dyn StdError + 'static)) -> Classified<'a> {
    let mut gateway = None;
    let mut hyper_timeout = false;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(PayloadLimit(limit)) = e.downcast_ref::<PayloadLimit>() {
            return Classified {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                fault: Fault::Client,
                error: None,
                too_large: Some(*limit),
                client_body: None,
            };
        }
        if let Some(body) = e.downcast_ref::<ClientBody>() {
            return Classified {
                status: body.status(),
                fault: Fault::Client,
                error: None,
                too_large: None,
                client_body: Some(body),
            };
        }
        if gateway.is_none() {
            gateway = e.downcast_ref::<GatewayError>();
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            hyper_timeout |= h.is_timeout();
        }
        cur = e.source();
    }
    match gateway {
        Some(g) => Classified {
            status: g.status(),
            fault: g.fault(),
            error: Some(g),
            too_large: None,
            client_body: None,
        },
        None if hyper_timeout => Classified {
            status: StatusCode::GATEWAY_TIMEOUT,
            fault: Fault::Upstream,
            error: None,
            too_large: None,
            client_body: None,
        },
        None => Classified {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            fault: Fault::Gateway,
            error: None,
            too_large: None,
            client_body: None,
        },
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

impl ClientBody {
    fn status(&self) -> StatusCode {
        match self {
            ClientBody::Malformed(_) => StatusCode::BAD_REQUEST,
            ClientBody::TooSlow => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// The body-limit error the front end raises, carrying the route's limit so the answer can
/// name it.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct PayloadLimit(pub u64);

/// THE error edge: maps any error to a problem+json response carrying the correlation ID — or,
/// when the request was gRPC or gRPC-Web (`wire`), to a trailers-only gRPC answer whose
/// `grpc-status` and `grpc-message` say the same, since gRPC clients read nothing else.
pub fn rescue(
    err: &(dyn StdError + 'static),
    correlation_id: &str,
    wire: Option<crate::backends::grpc::passthrough::Wire>,
) -> Response {
    let c = classify(err);
    let (slug, title, detail, field) = match (c.error, c.too_large) {
        (_, None) if c.client_body.is_some() => match c.client_body {
            Some(ClientBody::TooSlow) => (
                "request-timeout",
                "Request Timeout",
                "The request body did not arrive in time.".to_string(),
                Some("body".to_string()),
            ),
            _ => (
                "bad-request-body",
                "Bad Request",
                "The request body was cut short or malformed (its length or chunk framing)."
                    .to_string(),
                Some("body".to_string()),
            ),
        },
        (_, Some(limit)) => (
            "payload-too-large",
            "Payload Too Large",
            if limit > 0 {
                format!("The request body exceeds this route's limit of {limit} bytes.")
            } else {
                "The request body exceeds this route's limit.".to_string()
            },
            None,
        ),
        (Some(g), None) => (
            g.slug(),
            c.status.canonical_reason().unwrap_or("Error"),
            g.detail(),
            g.field().map(str::to_string),
        ),
        (None, None) if c.status == StatusCode::GATEWAY_TIMEOUT => (
            "timeout",
            "Gateway Timeout",
            "The backend did not answer in time.".to_string(),
            None,
        ),
        (None, None) => (
            "internal",
            "Internal Server Error",
            "The gateway failed to handle the request.".to_string(),
            None,
        ),
    };
    let mut resp = match wire {
        Some(wire) => grpc_answer(wire, &c, &detail, correlation_id),
        None => problem_answer(&c, slug, title, &detail, field, correlation_id),
    };
    let headers = resp.headers_mut();
    match c.error {
        Some(GatewayError::MethodNotAllowed { allow }) => {
            let allow = allow
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                headers.insert(header::ALLOW, v);
            }
        }
        Some(GatewayError::BackendUnavailable { retry_after, .. }) => {
            let secs = retry_after.map_or(1, |d| d.as_secs().max(1));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        Some(GatewayError::CircuitOpen { retry_after, .. }) => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        Some(GatewayError::Unauthorized { challenge, .. }) => {
            if let Ok(v) = HeaderValue::from_str(challenge) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        Some(GatewayError::UpgradeRequired { .. }) => {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
        }
        Some(
            GatewayError::Overloaded { .. }
            | GatewayError::Unconfirmed { .. }
            | GatewayError::StoreUnavailable { .. }
            | GatewayError::SpoolFull { .. }
            | GatewayError::KeyInUse,
        ) => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        Some(GatewayError::RateLimited {
            retry_after,
            quota,
            window_secs,
        }) => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            crate::middleware::limit::set_ratelimit_headers(headers, *quota, *window_secs, 0, secs);
        }
        _ => {}
    }
    resp
}

/// The problem+json body of [`rescue`].
fn problem_answer(
    c: &Classified<'_>,
    slug: &str,
    title: &str,
    detail: &str,
    field: Option<String>,
    correlation_id: &str,
) -> Response {
    let mut body = serde_json::json!({
        "type": format!("urn:switchyard:problem:{slug}"),
        "title": title,
        "status": c.status.as_u16(),
        "detail": detail,
        "correlation_id": correlation_id,
    });
    if let Some(field) = field {
        body["field"] = field.into();
    }
    if let Some(GatewayError::Grpc { code, details, .. }) = c.error {
        body["grpc_code"] = (*code as i32).into();
        body["grpc_status"] = crate::backends::grpc::status::code_name(*code).into();
        if let Some(d) = details {
            body["details"] = d.clone();
        }
    }
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = c.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// The trailers-only gRPC answer of [`rescue`]: HTTP 200 with `grpc-status` and
/// `grpc-message` (percent-encoded) in the headers.
fn grpc_answer(
    wire: crate::backends::grpc::passthrough::Wire,
    c: &Classified<'_>,
    detail: &str,
    correlation_id: &str,
) -> Response {
    use crate::backends::grpc::{passthrough::Wire, status};
    const MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let code = status::code_for(c.status, c.error);
    let message = match c.error {
        Some(GatewayError::Grpc { message, .. }) => message.clone(),
        _ => format!("{detail} (correlation id {correlation_id})"),
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
    headers.insert("grpc-status", HeaderValue::from(code as i32));
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
        let err = GatewayError::BadGateway {
            backend: "b".into(),
            reason: "request failed",
            source: Some(Box::new(PayloadLimit(10))),
        };
        let c = classify(&err);
        assert_eq!(c.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(c.fault, Fault::Client);
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
}
