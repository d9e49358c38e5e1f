//! The example AMQP worker for the AMQP bridge: `cargo run --example amqp_worker` (broker from
//! `AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f), then run Switchyard on the
//! repository's routes.yaml and
//! `curl -X POST localhost:8080/v1/events/orders/eu -d '{"id":7}'` (a confirmed publish) or
//! `curl -X POST localhost:8080/v1/quotes -d '{"item":"tea","quantity":4}'` (request/reply).
//! The queues are declared by Switchyard's topology, so start Switchyard first.

mod worker;

#[tokio::main]
async fn main() {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let _worker = worker::Worker::start(&url, "shop.orders", "shop.quotes")
        .await
        .expect("connects to RabbitMQ; are the queues declared (start Switchyard first)?");
    println!("consuming shop.orders, answering shop.quotes");
    tokio::signal::ctrl_c().await.ok();
}
