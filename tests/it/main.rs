//! Integration tests: the gateway on real sockets, with real upstreams and real files.

mod amqp;
mod auth;
mod cli;
mod errors;
mod front;
mod grpc;
mod hardening;
mod http_proxy;
mod httprule;
mod idempotency;
mod jobs;
mod jwt;
mod live;
mod logs;
mod matching;
mod mqtt;
mod reload;
mod resilience;
mod runtimes;
mod spool;
mod store;
mod support;
mod traces;
mod transcoding;
mod upstream_tls;
mod websocket;
