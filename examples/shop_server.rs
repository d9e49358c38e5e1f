//! The example gRPC order service for the gRPC bridge: `cargo run --example shop_server`
//! (listens on `SHOP_ADDR`, default 127.0.0.1:50051), then run Switchyard on the repository's
//! routes.yaml and `curl localhost:8080/v2/orders/7`.

mod shop;

#[tokio::main]
async fn main() {
    let addr = std::env::var("SHOP_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let server = shop::GrpcServer::start_on(addr.parse().expect("SHOP_ADDR is host:port")).await;
    println!("shop.v1.Orders listening on {}", server.addr);
    tokio::signal::ctrl_c().await.ok();
}
