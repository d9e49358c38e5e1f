//! Native gRPC and gRPC-Web on gRPC routes: a request whose content type is `application/grpc*`
//! is not transcoded but forwarded as it is (frames, metadata, trailers) over the backend's
//! shared channel to the route's method; gRPC-Web (`application/grpc-web*`, also over
//! HTTP/1.1 from browsers) is translated to gRPC and back by tonic-web. Sits at the bottom of
//! the route's stack, beside the transcoder, so the route's middleware applies to both.

use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

use crate::error::Problem;
use crate::middleware::context::Deadline;
use crate::{BodyError, BoxError, Request, Response, ResponseFuture};

pub use crate::error::Wire;

/// Forwards gRPC requests to one method of a backend.
#[derive(Clone)]
pub struct Passthrough {
    backend: std::sync::Arc<str>,
    transport: super::transport::Transport,
    path: PathAndQuery,
}

impl Passthrough {
    pub fn new(backend: &str, transport: super::transport::Transport, path: PathAndQuery) -> Self {
        Passthrough {
            backend: backend.into(),
            transport,
            path,
        }
    }

    /// Serves a request in either wire format.
    pub fn serve(&self, wire: Wire, req: Request) -> ResponseFuture {
        let this = self.clone();
        match wire {
            Wire::Grpc => Box::pin(async move {
                let (parts, body) = req.into_parts();
                let req = http::Request::from_parts(parts, tonic::body::Body::new(body));
                this.forward(req).await.map(into_gateway_body)
            }),
            Wire::GrpcWeb => Box::pin(async move {
                // tonic-web passes the body's exact size through even when it decodes base64,
                // and hyper would send that stale length as Content-Length: hide the size.
                let req = req.map(|b| {
                    http_body_util::StreamBody::new(http_body_util::BodyStream::new(b))
                        .boxed_unsync()
                });
                let resp = tonic_web::GrpcWebLayer::new()
                    .layer(this)
                    .oneshot(req)
                    .await?;
                Ok(into_gateway_body(resp))
            }),
        }
    }

    async fn forward(
        self,
        mut req: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, BoxError> {
        // Always the route's own method: the route, not the client, chooses what is called.
        *req.uri_mut() = http::Uri::from(self.path.clone());
        *req.version_mut() = http::Version::HTTP_2;
        let headers = req.headers_mut();
        super::super::http::strip_hop_by_hop(headers);
        headers.remove(header::HOST);
        // gRPC-Web text bodies shrink when decoded: a stale length would make the server reset
        // the stream. HTTP/2 frames the body itself.
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        // The client's own grpc-timeout stands unless the route's deadline is sooner.
        if let Some(d) = req.extensions().get::<Deadline>() {
            let remaining = d.remaining();
            let client = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| parse_grpc_timeout(v.as_bytes()));
            if client.is_none_or(|c| c > remaining) {
                req.headers_mut()
                    .insert("grpc-timeout", grpc_timeout(remaining));
            }
        }
        // The call's client span (the stream's head: its status may come in the trailers),
        // whose context the server receives; the transport names the endpoint on it.
        let span = crate::telemetry::otel::Trace::of(req.extensions()).map(|t| {
            let method = self.path.as_str().trim_start_matches('/').to_owned();
            t.child(method.clone(), crate::telemetry::otel::Kind::Client, || {
                use crate::telemetry::otel::{Attr, semconv};
                vec![
                    Attr::new(semconv::RPC_SYSTEM_NAME, "grpc"),
                    Attr::new(semconv::RPC_METHOD, method),
                ]
            })
        });
        if let Some(span) = span.as_ref().filter(|s| s.recording()) {
            span.inject(req.headers_mut());
            req.extensions_mut().insert(span.clone());
        }
        let backend = self.backend.to_string();
        let result = self.transport.oneshot(req).await;
        if let Some(span) = &span {
            span.end_with(
                &result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| e.to_string().into()),
            );
        }
        let resp = result.map_err(|e| -> BoxError {
            if let Some(reason) = crate::backends::tls::failure(&*e) {
                Problem::upstream_tls(&backend, &reason)
                    .with_source(e)
                    .into()
            } else if super::transport::is_connect_failure(&*e) {
                Problem::backend_unavailable(&backend, "cannot connect to the backend")
                    .with_source(e)
                    .into()
            } else {
                // The request may have reached the server before the connection failed.
                Problem::bad_gateway(&backend, "the connection to the backend failed")
                    .with_source(e)
                    .into()
            }
        })?;
        Ok(resp.map(tonic::body::Body::new))
    }
}

impl Service<http::Request<tonic::body::Body>> for Passthrough {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.clone().forward(req))
    }
}

fn into_gateway_body(resp: http::Response<tonic::body::Body>) -> Response {
    resp.map(|b| b.map_err(BodyError::new).boxed_unsync())
}

/// A `grpc-timeout` value (at most 8 digits and a unit), rounded up to the millisecond.
pub fn grpc_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis().max(1);
    let v = if ms <= 99_999_999 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_round_trip() {
        assert_eq!(grpc_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"5H"), Some(Duration::from_secs(18_000)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
    }
}
