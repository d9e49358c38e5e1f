//! Peers for the MQTT benchmark (`bench/mqtt.sh`).
//!
//! - `mqtt_bench direct`: publishes QoS 1 messages straight to the broker with rumqttc,
//!   `INFLIGHT` unacknowledged at most, for `DURATION` seconds; prints messages/s (acknowledged).
//! - `mqtt_bench fanout`: opens `CLIENTS` Server-Sent-Events streams on `SSE_URL`, publishes one
//!   message to `TOPIC` once all are subscribed, and prints how long until every client had it,
//!   with the gateway's resident memory (`GATEWAY_PID`) before and after.
//!
//! Settings from the environment: MQTT_ADDR (host:port), TOPIC, SIZE, INFLIGHT, DURATION,
//! CLIENTS, SSE_URL, GATEWAY_PID.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

#[path = "common/mod.rs"]
mod common;
use common::{env, rss_kib};

fn client(id: &str, inflight: u16) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let addr: String = env("MQTT_ADDR", "127.0.0.1:1883".to_string());
    let (host, port) = addr.rsplit_once(':').expect("MQTT_ADDR is host:port");
    let mut o = MqttOptions::new(id, host, port.parse().expect("port"));
    o.set_outgoing_inflight_upper_limit(inflight)
        .set_max_packet_size(Some(1024 * 1024));
    AsyncClient::new(o, inflight as usize)
}

#[tokio::main]
async fn main() {
    let topic: String = env("TOPIC", "bench/direct".to_string());
    match std::env::args().nth(1).as_deref() {
        Some("direct") => {
            let inflight: u16 = env("INFLIGHT", 32);
            let size: usize = env("SIZE", 256);
            let duration = Duration::from_secs(env("DURATION", 10));
            let (c, mut el) = client(&format!("bench-direct-{}", std::process::id()), inflight);
            let payload = vec![b'x'; size];
            let until = Instant::now() + duration;
            let publisher = tokio::spawn(async move {
                while Instant::now() < until {
                    if c.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            let started = Instant::now();
            let mut acked = 0u64;
            while Instant::now() < until {
                if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                    tokio::time::timeout(Duration::from_millis(100), el.poll()).await
                {
                    acked += 1;
                }
            }
            publisher.abort();
            println!(
                "direct: {acked} acknowledged in {:.1} s = {:.0} msg/s",
                started.elapsed().as_secs_f64(),
                acked as f64 / started.elapsed().as_secs_f64()
            );
        }
        Some("fanout") => {
            let clients: usize = env("CLIENTS", 1000);
            let url: String = env("SSE_URL", "http://127.0.0.1:18173/events".to_string());
            let pid: u32 = env("GATEWAY_PID", 0);
            let before = rss_kib(pid);
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
            let (go_tx, _) = tokio::sync::broadcast::channel::<Instant>(1);
            let http =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(0)
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
            for _ in 0..clients {
                let (http, url, done_tx, ready_tx) =
                    (http.clone(), url.clone(), done_tx.clone(), ready_tx.clone());
                let mut go = go_tx.subscribe();
                tokio::spawn(async move {
                    use http_body_util::BodyExt;
                    let resp = http.get(url.parse().unwrap()).await.expect("SSE stream");
                    let mut body = resp.into_body();
                    let _ = ready_tx.send(());
                    let sent = go.recv().await.expect("go");
                    while let Some(Ok(frame)) = body.frame().await {
                        if frame
                            .data_ref()
                            .is_some_and(|d| d.windows(5).any(|w| w == b"hello"))
                        {
                            let _ = done_tx.send(sent.elapsed());
                            break;
                        }
                    }
                });
            }
            for _ in 0..clients {
                ready_rx.recv().await;
            }
            // The shared subscription is made with the first client; give the broker a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let during = rss_kib(pid);
            let (c, mut el) = client(&format!("bench-fanout-{}", std::process::id()), 10);
            tokio::spawn(async move { while el.poll().await.is_ok() {} });
            let _ = go_tx.send(Instant::now());
            c.publish(topic, QoS::AtLeastOnce, false, "{\"msg\":\"hello\"}")
                .await
                .expect("publish");
            let mut last = Duration::ZERO;
            let mut got = 0;
            while got < clients {
                match tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await {
                    Ok(Some(d)) => {
                        got += 1;
                        last = last.max(d);
                    }
                    _ => break,
                }
            }
            println!(
                "fanout: {got}/{clients} clients got the message, the last after {} ms; gateway RSS {} KiB idle, {} KiB with the streams open = {:.1} KiB per client",
                last.as_millis(),
                before,
                during,
                during.saturating_sub(before) as f64 / clients as f64
            );
        }
        _ => eprintln!("usage: mqtt_bench direct|fanout (settings from the environment)"),
    }
}
