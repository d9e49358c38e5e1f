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

/// Whether the client has sent its whole request body: set by the front end's body wrapper,
/// read by the timeout layers, which answer 408 (the client's fault) rather than 504 when
/// they expire while the body is still arriving. Present only on requests that have a body.
#[derive(Debug, Clone, Default)]
pub struct BodyProgress(Arc<std::sync::atomic::AtomicBool>);

impl BodyProgress {
    pub fn finish(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn finished(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
