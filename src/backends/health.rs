//! How a backend's availability is logged, the same way for every protocol, beside the bridges'
//! connection tasks and readiness probes: one WARN when it becomes unavailable (with the
//! cause), one INFO when it is back (with how long it was gone), and while it stays down, a
//! repeat only when the cause changes, at most once a minute. Reconnect attempts themselves
//! are DEBUG.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The least time between two WARNs of a backend that stays unavailable.
const REPEAT_AFTER: Duration = Duration::from_secs(60);

pub struct Health {
    backend: String,
    /// The protocol, in the log lines (`amqp`, `mqtt`, `http`, `grpc`).
    kind: &'static str,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `None` until the first outcome is known.
    up: Option<bool>,
    /// When it went down, and the cause last logged then.
    down_since: Option<Instant>,
    cause: String,
    warned: Option<Instant>,
    /// Failed attempts since the last line.
    attempts: u64,
}

impl Health {
    pub fn new(backend: &str, kind: &'static str) -> Self {
        Health {
            backend: backend.to_string(),
            kind,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backend is available (connected, or answering its probe).
    pub fn up(&self) {
        let mut s = self.state();
        match (s.up, s.down_since) {
            (Some(false), Some(since)) => {
                tracing::info!(backend = %self.backend, kind = self.kind, down_ms = since.elapsed().as_millis() as u64, failed_attempts = s.attempts, "Backend available again.");
            }
            (None, _) => {
                tracing::info!(backend = %self.backend, kind = self.kind, "Backend available.");
            }
            _ => {}
        }
        *s = State {
            up: Some(true),
            ..State::default()
        };
    }

    /// The backend is unavailable because of `cause` (a failed connect, a lost connection, a
    /// probe no endpoint answered).
    pub fn down(&self, cause: &str) {
        let mut s = self.state();
        s.attempts += 1;
        let now = Instant::now();
        if s.up != Some(false) {
            tracing::warn!(backend = %self.backend, kind = self.kind, %cause, "Backend unavailable; its routes answer 503 until it is back.");
            s.up = Some(false);
            s.down_since = Some(now);
            s.cause = cause.to_string();
            s.warned = Some(now);
            s.attempts = 0;
            return;
        }
        let quiet = s
            .warned
            .is_some_and(|w| now.duration_since(w) < REPEAT_AFTER);
        if s.cause != cause && !quiet {
            let since = s.down_since.map_or(0, |d| now.duration_since(d).as_secs());
            tracing::warn!(backend = %self.backend, kind = self.kind, %cause, down_s = since, failed_attempts = s.attempts, "Backend still unavailable, for another reason.");
            s.cause = cause.to_string();
            s.warned = Some(now);
            s.attempts = 0;
        } else {
            tracing::debug!(backend = %self.backend, kind = self.kind, %cause, "Backend still unavailable.");
        }
    }
}
