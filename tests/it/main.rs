//! Integration tests: the gateway on real sockets, with real upstreams and real files.

mod amqp;
mod cli;
mod errors;
mod front;
mod grpc;
mod http_proxy;
mod httprule;
mod matching;
mod mqtt;
mod reload;
mod resilience;
mod support;
mod websocket;
