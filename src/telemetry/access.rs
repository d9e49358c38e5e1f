//! The access log: one INFO line per request, written when the response body is finished (or
//! abandoned), so that bytes and latency cover the whole response. Wraps the outgoing body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::{Body, BodyError};

pub struct AccessEntry {
    pub route: Arc<str>,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub correlation_id: Arc<str>,
    pub backend: Option<String>,
    pub client: std::net::SocketAddr,
}

struct Guard {
    entry: AccessEntry,
    bytes: u64,
    complete: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let e = &self.entry;
        tracing::info!(
            target: "switchyard::access",
            route = %e.route,
            method = %e.method,
            path = %e.path,
            status = e.status,
            latency_ms = e.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            complete = self.complete,
            correlation_id = %e.correlation_id,
            backend = e.backend.as_deref().unwrap_or("-"),
            client = %e.client,
            "Request served."
        );
    }
}

/// A response body that logs the access line when it is done.
pub struct AccessLogBody {
    inner: Body,
    guard: Guard,
}

impl AccessLogBody {
    pub fn new(inner: Body, entry: AccessEntry) -> Self {
        AccessLogBody {
            inner,
            guard: Guard {
                entry,
                bytes: 0,
                complete: false,
            },
        }
    }
}

impl HttpBody for AccessLogBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.guard.bytes += d.len() as u64;
                }
                // hyper stops polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.guard.complete = true;
                }
            }
            Poll::Ready(None) => this.guard.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
