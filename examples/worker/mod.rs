//! The example AMQP worker: consumes the orders queue that Switchyard publishes to (acking each
//! message after handling it) and answers request/reply messages on the quotes queue, replying
//! to `reply_to` with the request's correlation id and an `x-status` header. `cargo run
//! --example amqp_worker` runs it; the integration tests start it in-process.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

pub struct Worker {
    /// Orders handled so far.
    pub orders: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _conn: Arc<Connection>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Worker {
    pub async fn start(url: &str, orders_queue: &str, quotes_queue: &str) -> lapin::Result<Worker> {
        let conn = Arc::new(Connection::connect(url, ConnectionProperties::default()).await?);
        let orders = Arc::new(AtomicUsize::new(0));
        let ch = conn.create_channel().await?;
        ch.basic_qos(32, BasicQosOptions::default()).await?;
        let mut incoming = ch
            .basic_consume(
                orders_queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let count = orders.clone();
        let consume = tokio::spawn(async move {
            while let Some(Ok(d)) = incoming.next().await {
                println!(
                    "order {} ({}): {}",
                    d.routing_key,
                    d.properties
                        .message_id()
                        .as_ref()
                        .map_or("-", |m| m.as_str()),
                    String::from_utf8_lossy(&d.data)
                );
                count.fetch_add(1, Ordering::SeqCst);
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        let rpc = conn.create_channel().await?;
        let mut requests = rpc
            .basic_consume(
                quotes_queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let answer = tokio::spawn(async move {
            while let Some(Ok(d)) = requests.next().await {
                let p = &d.properties;
                if let (Some(to), Some(cid)) = (p.reply_to().clone(), p.correlation_id().clone()) {
                    let (status, body) = quote(&d.data);
                    let mut h = FieldTable::default();
                    h.insert(
                        "x-status".into(),
                        AMQPValue::LongString(status.to_string().into()),
                    );
                    let props = BasicProperties::default()
                        .with_correlation_id(cid)
                        .with_content_type("application/json".into())
                        .with_headers(h);
                    let _ = rpc
                        .basic_publish(
                            "".into(),
                            to,
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            props,
                        )
                        .await;
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Worker {
            orders,
            tasks: vec![consume, answer],
            _conn: conn,
        })
    }
}

/// A price for `{"item": …, "quantity": n}`: 2.50 a piece; 422 for a request without them.
fn quote(request: &[u8]) -> (u16, String) {
    let v: serde_json::Value = serde_json::from_slice(request).unwrap_or_default();
    match (v["item"].as_str(), v["quantity"].as_u64()) {
        (Some(item), Some(q)) => (
            200,
            serde_json::json!({ "item": item, "quantity": q, "price": q as f64 * 2.5 }).to_string(),
        ),
        _ => (
            422,
            serde_json::json!({ "error": "a quote needs `item` and `quantity`" }).to_string(),
        ),
    }
}
