//! Per-request facts the front end learns before routing (correlation ID, client address,
//! captured path variables) carried to every layer and backend in the request's extensions.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// Inserted by the front end into every request's extensions before the route stack runs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub correlation_id: Arc<str>,
    pub client_addr: SocketAddr,
    /// Whether the client connected over TLS.
    pub tls: bool,
    /// The host the client asked for (Host header or `:authority`), if any.
    pub host: Option<String>,
    pub route_id: Arc<str>,
    /// Path variables captured by the route's template, by name.
    pub params: Vec<(Arc<str>, String)>,
    /// The client's verified certificate (mutual TLS).
    pub client_cert: Option<Arc<crate::server::client_cert::ClientCert>>,
}

impl RequestContext {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The id a message published for this request carries (AMQP `message_id`), set by the layers
/// that may publish one request more than once (idempotency keys, the spool) so that every
/// copy carries the same id and consumers can deduplicate.
#[derive(Debug, Clone)]
pub struct MessageId(pub Arc<str>);

/// The request's overall deadline, set by the timeout layer so backends can pass the remaining
/// time on (gRPC `grpc-timeout`, message expiry) and inner layers can tell a deadline from a
/// client that left. On Tokio's clock, so tests with paused time see it as the layers do.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    /// The whole allowance, for error messages.
    pub total: std::time::Duration,
}

impl Deadline {
    pub fn remaining(&self) -> std::time::Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// Whether the client has sent its whole request body, and how many bytes it was: set by the
/// front end's body wrapper, read by the timeout layers, which answer 408 (the client's fault)
/// rather than 504 when they expire while the body is still arriving, and by the access log.
/// Present only on requests that have a body.
#[derive(Debug, Clone, Default)]
pub struct BodyProgress(Arc<std::sync::atomic::AtomicU64>);

/// The bit of [`BodyProgress`] that says the body ended; the others hold its length.
const FINISHED: u64 = 1 << 63;

impl BodyProgress {
    /// The body ended (or failed) after `bytes` bytes.
    pub fn finish(&self, bytes: u64) {
        self.0.store(
            FINISHED | (bytes & !FINISHED),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn finished(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) & FINISHED != 0
    }

    /// The body's length, once it ended.
    pub fn bytes(&self) -> Option<u64> {
        let v = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (v & FINISHED != 0).then_some(v & !FINISHED)
    }
}
