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
    /// The route's path template; `None` when no route took the request.
    pub template: Option<Arc<str>>,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub correlation_id: Arc<str>,
    pub trace_id: Arc<str>,
    pub backend: Option<String>,
    pub client: std::net::SocketAddr,
    pub user_agent: Option<http::HeaderValue>,
    /// The request body's progress (its length once read); `None` without a body.
    pub request_body: Option<crate::middleware::context::BodyProgress>,
    pub upstream: Option<Upstream>,
    pub tries: u32,
}

/// Which upstream endpoint answered, and how long after the request left its answer's head
/// came: put in the answer's extensions by the bridges that talk to an endpoint, when the
/// access log is on.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: Arc<str>,
    pub took: std::time::Duration,
}

/// Marks an answer with the endpoint that made it and the time since the request left
/// (`sent`, taken only when the access log is on).
pub fn mark_upstream(r: &mut crate::Response, addr: &Arc<str>, sent: Option<Instant>) {
    if let Some(sent) = sent {
        r.extensions_mut().insert(Upstream {
            addr: addr.clone(),
            took: sent.elapsed(),
        });
    }
}

/// How many tries a request took: put in the request's extensions by the front end when the
/// access log is on, counted by the retry layer, read when the answer (or the error) is
/// logged.
#[derive(Debug, Clone, Default)]
pub struct Tries(Arc<std::sync::atomic::AtomicU32>);

impl Tries {
    /// Try number `n` (from 1) is under way.
    pub fn set(&self, n: u32) {
        self.0.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::Relaxed).max(1)
    }
}

/// Whether access lines are written (the `switchyard::access` target at INFO): the bridges
/// gather [`Upstream`] facts only then.
pub fn enabled() -> bool {
    tracing::enabled!(target: "switchyard::access", tracing::Level::INFO)
}

struct Guard {
    entry: AccessEntry,
    bytes: u64,
    complete: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let e = &self.entry;
        let user_agent = e.user_agent.as_ref().and_then(|v| v.to_str().ok());
        tracing::info!(
            target: "switchyard::access",
            route = %e.route,
            template = e.template.as_deref().unwrap_or("-"),
            method = %e.method,
            path = %e.path,
            status = e.status,
            latency_us = e.started.elapsed().as_micros() as u64,
            upstream = e.upstream.as_ref().map_or("-", |u| &*u.addr),
            upstream_us = e.upstream.as_ref().map(|u| u.took.as_micros() as u64),
            tries = e.tries,
            bytes_in = e.request_body.as_ref().map_or(Some(0), |p| p.bytes()),
            bytes_out = self.bytes,
            complete = self.complete,
            correlation_id = %e.correlation_id,
            trace_id = %e.trace_id,
            backend = e.backend.as_deref().unwrap_or("-"),
            client = %e.client,
            user_agent = user_agent.unwrap_or("-"),
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
