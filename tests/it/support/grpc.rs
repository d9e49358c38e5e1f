//! The gRPC server the bridge tests talk to: the example order service itself, so the example
//! is exercised by the suite.

#[path = "../../../examples/shop/mod.rs"]
mod shop;

pub use shop::{GrpcServer, Reflection, pool, proto_dir};
