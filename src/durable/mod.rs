//! The durable layers of a route's stack, between its limits and its retries: what the gateway
//! answers for before the backend has: idempotency (one answer per `Idempotency-Key`), jobs
//! (`mode: async` and `on_timeout: accept`, with webhooks) and the spool (messages kept on disk
//! while the backend is down), with their dead letters. Their records live in the state store
//! (`src/store/`).

pub mod idempotency;
pub mod jobs;
pub mod spool;
