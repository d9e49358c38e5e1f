//! The direct peer of the AMQP benchmark (`bench/amqp.sh`): publishes persistent messages with
//! publisher confirms straight to RabbitMQ with lapin, `CONCURRENCY` in flight at once (one per
//! channel, as the gateway does), for `DURATION` seconds, and prints messages/s and latency
//! percentiles. Settings from the environment: AMQP_URL, EXCHANGE, ROUTING_KEY, SIZE (bytes),
//! CONCURRENCY, DURATION, PROPERTIES.
//!
//! `PROPERTIES=gateway` (the default) sends the properties the gateway's publish route sets on
//! every message (message id, correlation id, timestamp, app id, an empty header table, content
//! type, persistent), so both sides hand the broker the same message, not just the same body;
//! `PROPERTIES=minimal` sends only delivery mode and content type. The last line also gives the
//! process's CPU time in clock ticks (`cpu_ticks`), for the CPU per message.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let url: String = env(
        "AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
    );
    let exchange: String = env("EXCHANGE", "bench.x".to_string());
    let key: String = env("ROUTING_KEY", "bench".to_string());
    let size: usize = env("SIZE", 256);
    let concurrency: usize = env("CONCURRENCY", 64);
    let duration = Duration::from_secs(env("DURATION", 10));
    let full = env("PROPERTIES", "gateway".to_string()) != "minimal";
    let conn = Arc::new(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connects to RabbitMQ"),
    );
    let payload = Arc::new(vec![b'x'; size]);
    let until = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let (exchange, key, payload) = (exchange.clone(), key.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let mut props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/octet-stream".into());
                if full {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    props = props
                        .with_message_id(uuid::Uuid::now_v7().to_string().into())
                        .with_correlation_id(uuid::Uuid::now_v7().to_string().into())
                        .with_timestamp(now.as_secs())
                        .with_app_id("switchyard".into())
                        .with_headers(FieldTable::default());
                }
                let confirm = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &payload,
                        props,
                    )
                    .await
                    .expect("publish");
                match confirm.await.expect("confirm") {
                    Confirmation::Ack(None) => latencies.push(t.elapsed()),
                    other => panic!("not confirmed: {other:?}"),
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("publisher task"));
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_micros();
    // This process's CPU time (user + system, in clock ticks), for the CPU per message.
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    println!(
        "direct: {} messages in {secs:.1} s = {:.0} msg/s; latency p50 {} us, p99 {} us; cpu_ticks {ticks}",
        all.len(),
        all.len() as f64 / secs,
        pct(0.50),
        pct(0.99)
    );
}
