//! The pure checks of the `mqtt` bridge's config: its backend section, a route's settings and a
//! WebSocket route's, each problem placed at its line and column. Run at load time, before
//! anything is built; no I/O.

use http::{HeaderName, Uri};

use crate::config::model::*;
use crate::config::template::{PathTemplate, ValueTemplate};
use crate::config::validate::{Checks, check_handshake_template, has_userinfo};

pub(crate) fn validate_mqtt_route(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    m: &MqttRouteSpec,
    template: Option<&PathTemplate>,
) {
    let captured: Vec<&str> = template.map(|t| t.captures()).unwrap_or_default();
    match ValueTemplate::parse(&m.topic) {
        Err(e) => cx.err(&format!("{base}.mqtt.topic"), id, e),
        Ok(t) => {
            cx.template(&t);
            for p in t.params() {
                if template.is_some() && !captured.contains(&p) {
                    cx.err(
                        &format!("{base}.mqtt.topic"),
                        id,
                        format!("`{{{p}}}` is not captured by the route's path; capture it or use `{{query.{p}}}`, `{{header.{p}}}` or `{{body.{p}}}`"),
                    );
                }
            }
            let literal: String = t
                .parts
                .iter()
                .filter_map(|p| match p {
                    crate::config::template::ValuePart::Lit(l) => Some(l.as_str()),
                    _ => None,
                })
                .collect();
            if m.subscribe {
                if !valid_filter(&m.topic) || literal.contains('\0') {
                    cx.err(
                        &format!("{base}.mqtt.topic"),
                        id,
                        "a topic filter: `+` stands for one whole level, `#` only for the last",
                    );
                }
            } else if m.topic.is_empty() || literal.contains(['+', '#', '\0']) {
                cx.err(
                    &format!("{base}.mqtt.topic"),
                    id,
                    "a publish topic is not empty and has no `+` or `#` wildcards",
                );
            }
            if m.subscribe && (m.last_value || m.response.is_some()) {
                cx.err(
                    &format!("{base}.mqtt.subscribe"),
                    id,
                    "a route either subscribes, reads the last value or waits for a response",
                );
            }
            if m.subscribe && t.needs_body() {
                cx.err(
                    &format!("{base}.mqtt.topic"),
                    id,
                    "a subscription has no request body to take `{body.…}` from",
                );
            }
            if !(1..=65536).contains(&m.buffer) {
                cx.err(
                    &format!("{base}.mqtt.buffer"),
                    id,
                    "from 1 to 65536 messages",
                );
            }
        }
    }
    if m.qos > 2 {
        cx.err(&format!("{base}.mqtt.qos"), id, "0, 1 or 2");
    }
    if !(200..300).contains(&m.status) {
        cx.err(
            &format!("{base}.mqtt.status"),
            id,
            "the answer after the broker's acknowledgement is a 2xx status",
        );
    }
    if m.message_expiry.is_some_and(|d| d.0.as_secs() == 0) {
        cx.err(
            &format!("{base}.mqtt.message_expiry"),
            id,
            "at least 1s (MQTT counts seconds)",
        );
    }
    for (i, h) in m.headers.iter().enumerate() {
        if HeaderName::from_bytes(h.as_bytes()).is_err() {
            cx.err(
                &format!("{base}.mqtt.headers[{i}]"),
                id,
                format!("`{h}` is not a header name"),
            );
        }
    }
}

pub(crate) fn validate_mqtt_backend(cx: &mut Checks, base: &str, m: &MqttBackendSpec) {
    let scheme = m
        .url
        .parse::<Uri>()
        .ok()
        .and_then(|u| u.scheme_str().map(str::to_string));
    for (i, url) in m.failover.iter().enumerate() {
        let why = match url.parse::<Uri>() {
            Ok(u) if u.host().is_none() || has_userinfo(&u) || !matches!(u.path(), "" | "/") => {
                Some(format!("`{url}` is not a URL like `mqtt://127.0.0.2:1883`"))
            }
            Ok(u) if u.scheme_str() != scheme.as_deref() => {
                Some("use the scheme of `url` (mqtt:// or mqtts:// for all)".to_string())
            }
            Ok(_) if *url == m.url || m.failover[..i].contains(url) => {
                Some("this broker is listed already".to_string())
            }
            Ok(_) => None,
            Err(_) => Some(format!("`{url}` is not a URL like `mqtt://127.0.0.2:1883`")),
        };
        if let Some(why) = why {
            cx.err(&format!("{base}.failover[{i}]"), None, why);
        }
    }
    match m.url.parse::<Uri>() {
        Ok(u) if has_userinfo(&u) => cx.err(
            &format!("{base}.url"),
            None,
            "an MQTT url holds no user info (`user:pass@`); use `username` and `password` (from `${VAR}`)",
        ),
        Ok(u) if u.scheme_str() == Some("mqtt") && u.host().is_some() => {
            if u.path() != "/" && !u.path().is_empty() {
                cx.err(
                    &format!("{base}.url"),
                    None,
                    "an MQTT url has no path: `mqtt://host:1883`",
                );
            }
        }
        Ok(u) if u.scheme_str() == Some("mqtts") && u.host().is_some() => {}
        _ => cx.err(
            &format!("{base}.url"),
            None,
            format!("`{}` is not a URL like `mqtt://127.0.0.1:1883`", m.url),
        ),
    }
    if m.client_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > 65535)
    {
        cx.err(&format!("{base}.client_id"), None, "1 to 65535 bytes");
    }
    if m.password.is_some() && m.username.is_none() {
        cx.err(
            &format!("{base}.password"),
            None,
            "a password needs a `username`",
        );
    }
    if m.keep_alive.0.as_secs() < 5 || m.keep_alive.0.as_secs() > 65535 {
        cx.err(&format!("{base}.keep_alive"), None, "from 5s to 65535s");
    }
    if m.max_packet_size.0 < 1024 || m.max_packet_size.0 > 268_435_455 {
        cx.err(
            &format!("{base}.max_packet_size"),
            None,
            "from 1KiB to 256MiB (the protocol's limit)",
        );
    }
    if m.session_expiry.0.as_secs() == 0 || m.session_expiry.0.as_secs() > u32::MAX as u64 {
        cx.err(
            &format!("{base}.session_expiry"),
            None,
            "above zero: a persistent session is how unacknowledged publishes survive a reconnect",
        );
    }
    if m.inflight == 0 {
        cx.err(&format!("{base}.inflight"), None, "at least 1");
    }
    if m.connect_timeout.0.as_secs() == 0 {
        cx.err(&format!("{base}.connect_timeout"), None, "at least 1s");
    }
}

pub(crate) fn validate_ws_mqtt(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    m: &WsMqttSpec,
    template: Option<&PathTemplate>,
) {
    let ops = !m.allow.is_empty();
    let fixed = !m.subscribe.is_empty() || m.publish.is_some();
    if ops == fixed {
        cx.err(
            base,
            id,
            "give either `allow` (clients send JSON operations within these filters) or `subscribe`/`publish` (fixed topics, frames are payloads)",
        );
    }
    if ops && m.acks {
        cx.err(
            &format!("{base}.acks"),
            id,
            "operations mode always acknowledges publishes; `acks` is for fixed topics",
        );
    }
    let check = |cx: &mut Checks, path: String, text: &str, filter: bool| {
        let Some(t) = check_handshake_template(cx, &path, id, text, template) else {
            return;
        };
        let literal: String = t
            .parts
            .iter()
            .map(|p| match p {
                crate::config::template::ValuePart::Lit(l) => l.as_str(),
                _ => "x",
            })
            .collect();
        if filter && !valid_filter(&literal) {
            cx.err(
                &path,
                id,
                "a topic filter: `+` stands for one whole level, `#` only for the last",
            );
        } else if !filter && (literal.is_empty() || literal.contains(['+', '#', '\0'])) {
            cx.err(
                &path,
                id,
                "a publish topic is not empty and has no `+` or `#` wildcards",
            );
        }
    };
    for (i, f) in m.allow.iter().enumerate() {
        check(cx, format!("{base}.allow[{i}]"), f, true);
    }
    for (i, f) in m.subscribe.iter().enumerate() {
        check(cx, format!("{base}.subscribe[{i}]"), f, true);
    }
    if let Some(p) = &m.publish {
        check(cx, format!("{base}.publish"), p, false);
    }
    if m.qos > 2 {
        cx.err(&format!("{base}.qos"), id, "0, 1 or 2");
    }
}

/// Whether `filter` is a well-formed MQTT topic filter: `+` a whole level, `#` only the last.
pub fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && !filter.contains('\0')
        && !levels.iter().enumerate().any(|(i, l)| {
            (l.contains('+') && *l != "+")
                || (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
        })
}
