//! `validate --live` for an MQTT backend: connects with a clean session of its own (the
//! backend's client id with a `-check-…` suffix, so that the running gateway's session is not
//! taken over), then subscribes to every fixed filter the routes read: the broker's SUBACK
//! says whether its access rules let the gateway read them. Nothing is published.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;

use crate::backends::live::{Findings, Verdict, templated};
use crate::config::{MqttBackendSpec, MqttProtocol, RouteSpec};

pub async fn check(
    name: &str,
    spec: &MqttBackendSpec,
    routes: &[&RouteSpec],
    base: &std::path::Path,
) -> Findings {
    let mut f = Findings::new(name);
    let (host, port, transport) = match super::broker(spec, base) {
        Ok(b) => b,
        Err(e) => {
            f.backend("connect", Verdict::Fail, &e);
            return f;
        }
    };
    let own = super::client_id(name, spec);
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let id = format!("{own}-check-{}", &suffix[suffix.len() - 8..]);
    let within = spec.connect_timeout.0 + Duration::from_secs(5);
    let mut probe = Probe::new(spec, host, port, transport, id);
    match tokio::time::timeout(within, probe.connect()).await {
        Ok(Ok(())) => f.backend("connect", Verdict::Ok, "connected"),
        Ok(Err(e)) => {
            f.backend("connect", Verdict::Fail, &e);
            return f;
        }
        Err(_) => {
            f.backend("connect", Verdict::Fail, "no CONNACK in time");
            return f;
        }
    }
    // What the gateway subscribes to: per route, and the backend's response topic.
    let mut filters: Vec<(Option<&str>, String)> = Vec::new();
    for r in routes {
        if let Some(m) = &r.mqtt
            && (m.subscribe || m.last_value)
        {
            filters.push((Some(&r.id), m.topic.clone()));
        }
        if let Some(ws) = r.websocket.as_ref().and_then(|w| w.mqtt.as_ref()) {
            filters.extend(
                ws.subscribe
                    .iter()
                    .map(|t| (Some(r.id.as_str()), t.clone())),
            );
        }
    }
    if spec.protocol == MqttProtocol::V5
        && routes
            .iter()
            .any(|r| r.mqtt.as_ref().is_some_and(|m| m.response.is_some()))
    {
        filters.push((None, super::response_topic(&own)));
    }
    for (route, filter) in filters {
        let check = format!("subscribe {filter}");
        let (result, detail) = if templated(&filter) {
            (
                Verdict::Warn,
                "not checked: named by the request".to_string(),
            )
        } else {
            match tokio::time::timeout(within, probe.subscribe(&filter)).await {
                Ok(Ok(None)) => (Verdict::Ok, "granted".to_string()),
                Ok(Ok(Some(code))) => (
                    Verdict::Fail,
                    format!(
                        "the broker refused it ({code}); its access rules must let the gateway read this filter"
                    ),
                ),
                Ok(Err(e)) => (
                    Verdict::Fail,
                    format!("the broker dropped the connection over it: {e}"),
                ),
                Err(_) => (Verdict::Fail, "no SUBACK in time".to_string()),
            }
        };
        match route {
            Some(id) => f.route(id, check, result, &detail),
            None => f.backend(check, result, &detail),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), probe.disconnect()).await;
    f
}

/// The checker's own client, in the backend's protocol.
enum Probe {
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

impl Probe {
    fn new(
        spec: &MqttBackendSpec,
        host: String,
        port: u16,
        transport: Option<rumqttc::Transport>,
        id: String,
    ) -> Probe {
        let credentials = spec
            .username
            .as_ref()
            .map(|u| (u.clone(), spec.password.clone().unwrap_or_default()));
        match spec.protocol {
            MqttProtocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
                o.set_clean_start(true)
                    .set_keep_alive(spec.keep_alive.0)
                    .set_max_packet_size(Some(spec.max_packet_size.0 as u32))
                    .set_connection_timeout(spec.connect_timeout.0.as_secs().max(1));
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                let (c, l) = rumqttc::v5::AsyncClient::new(o, 8);
                Probe::V5(c, Box::new(l))
            }
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, host, port);
                o.set_clean_session(true)
                    .set_keep_alive(spec.keep_alive.0)
                    .set_max_packet_size(268_435_455, spec.max_packet_size.0 as usize);
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                let (c, mut l) = rumqttc::AsyncClient::new(o, 8);
                l.network_options
                    .set_connection_timeout(spec.connect_timeout.0.as_secs().max(1));
                Probe::V311(c, Box::new(l))
            }
        }
    }

    /// Polls until the broker's CONNACK.
    async fn connect(&mut self) -> Result<(), String> {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        loop {
            match self {
                Probe::V5(_, l) => match l.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(P5::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                },
                Probe::V311(_, l) => match l.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                },
            }
        }
    }

    /// Subscribes to `filter`: `None` when granted, the broker's reason code when refused.
    async fn subscribe(&mut self, filter: &str) -> Result<Option<String>, String> {
        use rumqttc::v5::mqttbytes::v5::{Packet as P5, SubscribeReasonCode as R5};
        let sent = match self {
            Probe::V5(c, _) => c
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            Probe::V311(c, _) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        };
        sent?;
        loop {
            match self {
                Probe::V5(_, l) => match l.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(P5::SubAck(ack))) => {
                        return Ok(match ack.return_codes.first() {
                            Some(R5::Success(_)) => None,
                            other => Some(format!("{other:?}")),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                },
                Probe::V311(_, l) => match l.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                        return Ok(match ack.return_codes.first() {
                            Some(rumqttc::SubscribeReasonCode::Success(_)) => None,
                            _ => Some("Failure (0x80)".into()),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                },
            }
        }
    }

    async fn disconnect(&mut self) {
        match self {
            Probe::V5(c, l) => {
                let _ = c.disconnect().await;
                while l.poll().await.is_ok() {}
            }
            Probe::V311(c, l) => {
                let _ = c.disconnect().await;
                while l.poll().await.is_ok() {}
            }
        }
    }
}
