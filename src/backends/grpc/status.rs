//! gRPC status → HTTP status, following googleapis `google/rpc/code.proto`.

use http::StatusCode;
use tonic::Code;

use crate::error::{Fault, Kind, Problem, RetryClass};

pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The problem for a non-OK status a gRPC backend answered: its HTTP status follows
/// code.proto, a 4xx is the client's fault, gRPC clients get the backend's code and message as
/// they are, and problem+json carries the code, its name and the `google.rpc.Status` details.
pub fn problem(
    backend: &str,
    code: Code,
    message: &str,
    details: Option<serde_json::Value>,
) -> Problem {
    let name = code_name(code);
    let status = http_status(code);
    let detail = if message.is_empty() {
        format!("Backend '{backend}' answered {name}.")
    } else {
        format!("Backend '{backend}' answered {name}: {message}")
    };
    let fault = if status.is_client_error() {
        Fault::Client
    } else {
        Fault::Upstream
    };
    let mut p = Problem::new(Kind::GRPC_STATUS, status, fault, detail);
    p.retry = if code == Code::Unavailable {
        RetryClass::Unavailable
    } else {
        RetryClass::Answered
    };
    p.grpc_code = code;
    p.grpc_message = Some(message.to_string());
    p.extensions.push(("grpc_code", (code as i32).into()));
    p.extensions.push(("grpc_status", name.into()));
    if let Some(d) = details {
        p.extensions.push(("details", d));
    }
    p
}

/// The `SCREAMING_CASE` name of a code, as in code.proto.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_code_proto() {
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::Unavailable), 503);
        assert_eq!(http_status(Code::DeadlineExceeded), 504);
        assert_eq!(http_status(Code::InvalidArgument), 400);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::AlreadyExists), 409);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Cancelled), 499);
        assert_eq!(http_status(Code::Unimplemented), 501);
    }
}
