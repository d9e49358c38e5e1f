//! The example device for the MQTT bridge: a simulated thermostat. It answers commands sent to
//! `<prefix>/<id>/cmd` on their MQTT 5 response topic (with the correlation data, a `status`
//! user property, and a `traceparent` continuing the command's trace), and publishes its
//! temperature, retained, to `<prefix>/<id>/telemetry`.
//! `cargo run --example thermostat` runs it; the integration tests start it in-process.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

pub struct Device {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    /// Connects to the broker at `addr` (`host:port`) and returns once it listens for commands.
    pub async fn start(addr: &str, prefix: &str, id: &str, telemetry_every: Duration) -> Device {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut opts = MqttOptions::new(
            format!("device-{id}-{}", std::process::id()),
            host,
            port.parse().expect("port"),
        );
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(opts, 32);
        let commands = format!("{prefix}/{id}/cmd");
        let telemetry = format!("{prefix}/{id}/telemetry");
        client
            .subscribe(commands.clone(), QoS::AtLeastOnce)
            .await
            .expect("subscribe request queued");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut tick = tokio::time::interval(telemetry_every);
            let mut celsius = 20.0_f64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        celsius += 0.5;
                        let body = serde_json::json!({ "device": id, "celsius": celsius }).to_string();
                        let props = PublishProperties { content_type: Some("application/json".into()), ..Default::default() };
                        let _ = client.publish_with_properties(telemetry.clone(), QoS::AtLeastOnce, true, body, props).await;
                    }
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(t) = ready_tx.take() {
                                let _ = t.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let props = p.properties.clone().unwrap_or_default();
                            let Some(to) = props.response_topic.clone() else { continue };
                            let (status, body) = answer(&id, &p.payload);
                            let mut user_properties = vec![("status".to_string(), status.to_string())];
                            // A command that came in a trace is answered in it, from a span of
                            // the device's own.
                            if let Some(trace) = props.user_properties.iter()
                                .find(|(k, _)| k == "traceparent")
                                .and_then(|(_, tp)| tp.split('-').nth(1))
                            {
                                let span = format!("{:016x}", fastrand::u64(1..));
                                user_properties.push(("traceparent".into(), format!("00-{trace}-{span}-01")));
                            }
                            let reply = PublishProperties {
                                correlation_data: props.correlation_data.clone(),
                                content_type: Some("application/json".into()),
                                user_properties,
                                ..Default::default()
                            };
                            let _ = client.publish_with_properties(to, QoS::AtLeastOnce, false, body, reply).await;
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("the device subscribed within 10 s")
            .expect("device task running");
        Device { task }
    }
}

/// A command is `{"setpoint": <celsius>}`; anything else is refused with 422.
fn answer(id: &str, command: &Bytes) -> (u16, String) {
    let v: serde_json::Value = serde_json::from_slice(command).unwrap_or_default();
    match v["setpoint"].as_f64() {
        Some(t) if (5.0..=30.0).contains(&t) => (
            200,
            serde_json::json!({ "device": id, "setpoint": t, "accepted": true }).to_string(),
        ),
        Some(_) => (
            422,
            serde_json::json!({ "device": id, "error": "setpoint must be 5 to 30" }).to_string(),
        ),
        None => (
            422,
            serde_json::json!({ "device": id, "error": "send {\"setpoint\": <celsius>}" })
                .to_string(),
        ),
    }
}
