//! The pure checks of the `amqp` bridge's config: its backend section, a route's settings and a
//! WebSocket route's, each problem placed at its line and column. Run at load time, before
//! anything is built; no I/O.

use http::HeaderName;

use crate::config::model::*;
use crate::config::template::{PathTemplate, ValueTemplate};
use crate::config::validate::{Checks, check_handshake_template};

/// Request headers that never travel as AMQP message headers: RabbitMQ routes again on `CC`
/// and `BCC`, and the rest are about the HTTP hop itself.
pub(crate) const AMQP_FORBIDDEN_HEADERS: [&str; 8] = [
    "cc",
    "bcc",
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
];

pub(crate) fn validate_amqp_route(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    a: &AmqpRouteSpec,
    template: Option<&PathTemplate>,
) {
    let captured: Vec<&str> = template.map(|t| t.captures()).unwrap_or_default();
    for (key, raw) in [("exchange", &a.exchange), ("routing_key", &a.routing_key)] {
        match ValueTemplate::parse(raw) {
            Err(e) => cx.err(&format!("{base}.amqp.{key}"), id, e),
            Ok(t) => {
                cx.template(&t);
                for p in t.params() {
                    if template.is_some() && !captured.contains(&p) {
                        cx.err(
                            &format!("{base}.amqp.{key}"),
                            id,
                            format!("`{{{p}}}` is not captured by the route's path; capture it or use `{{query.{p}}}`, `{{header.{p}}}` or `{{body.{p}}}`"),
                        );
                    }
                }
            }
        }
    }
    if a.exchange.len() > 255 || a.routing_key.len() > 255 {
        cx.err(
            &format!("{base}.amqp"),
            id,
            "exchange names and routing keys are at most 255 bytes",
        );
    }
    if !matches!(a.unroutable_status, 404 | 502) {
        cx.err(
            &format!("{base}.amqp.unroutable_status"),
            id,
            "an unroutable message answers 404 or 502",
        );
    }
    if !(200..300).contains(&a.status) {
        cx.err(
            &format!("{base}.amqp.status"),
            id,
            "the answer after the broker's confirm is a 2xx status",
        );
    }
    if a.expiration.is_some_and(|d| d.0.as_millis() == 0) {
        cx.err(
            &format!("{base}.amqp.expiration"),
            id,
            "at least 1ms (the property counts milliseconds)",
        );
    }
    for (key, v) in [
        ("app_id", Some(&a.app_id)),
        ("type", a.message_type.as_ref()),
        ("reply.queue", a.reply.as_ref().map(|r| &r.queue)),
    ] {
        if v.is_some_and(|v| v.len() > 255) {
            cx.err(&format!("{base}.amqp.{key}"), id, "at most 255 bytes");
        }
    }
    for (i, h) in a.headers.iter().enumerate() {
        let lower = h.to_ascii_lowercase();
        if HeaderName::from_bytes(h.as_bytes()).is_err()
            || h.len() > 255
            || AMQP_FORBIDDEN_HEADERS.contains(&lower.as_str())
        {
            cx.err(
                &format!("{base}.amqp.headers[{i}]"),
                id,
                format!("`{h}` cannot be copied into a message's headers; name an application header (never CC or BCC, which RabbitMQ routes on)"),
            );
        }
    }
    if let Some(r) = &a.reply {
        if r.queue.is_empty() {
            cx.err(
                &format!("{base}.amqp.reply.queue"),
                id,
                "name the reply queue, or leave it out for direct reply-to",
            );
        }
        if HeaderName::from_bytes(r.status_header.as_bytes()).is_err() {
            cx.err(
                &format!("{base}.amqp.reply.status_header"),
                id,
                "not a valid header name",
            );
        }
    }
}

pub(crate) fn validate_amqp_backend(cx: &mut Checks, base: &str, a: &AmqpBackendSpec) {
    let scheme = a.url.parse::<lapin::uri::AMQPUri>().ok().map(|u| u.scheme);
    for (i, url) in a.failover.iter().enumerate() {
        let why = match url.parse::<lapin::uri::AMQPUri>() {
            Err(e) => Some(format!(
                "not an AMQP URL like `amqp://user:pass@127.0.0.2:5672/%2f`: {e}"
            )),
            Ok(u) if scheme.as_ref().is_some_and(|s| *s != u.scheme) => {
                Some("use the scheme of `url` (amqp:// or amqps:// for all)".to_string())
            }
            Ok(_) if *url == a.url || a.failover[..i].contains(url) => {
                Some("this broker is listed already".to_string())
            }
            Ok(_) => None,
        };
        if let Some(why) = why {
            cx.err(&format!("{base}.failover[{i}]"), None, why);
        }
    }
    match a.url.parse::<lapin::uri::AMQPUri>() {
        Err(e) => cx.err(
            &format!("{base}.url"),
            None,
            format!("not an AMQP URL like `amqp://user:pass@127.0.0.1:5672/%2f`: {e}"),
        ),
        Ok(u) => {
            let tls = u.scheme == lapin::uri::AMQPScheme::AMQPS;
            if a.tls.is_some() && !tls {
                cx.err(
                    &format!("{base}.tls"),
                    None,
                    "`tls` applies to an `amqps://` url",
                );
            }
        }
    }
    if let Some(tls) = &a.tls {
        if tls
            .server_name
            .as_deref()
            .is_some_and(|n| rustls_pki_types::ServerName::try_from(n).is_err())
        {
            cx.err(
                &format!("{base}.tls.server_name"),
                None,
                "not a DNS name or an IP address",
            );
        }
        if tls.cert.is_some() != tls.key.is_some() {
            cx.err(
                &format!("{base}.tls"),
                None,
                "a client certificate needs both `cert` and `key`",
            );
        }
    }
    if !(1..=64).contains(&a.channels) {
        cx.err(&format!("{base}.channels"), None, "between 1 and 64");
    }
    for (key, d) in [
        ("heartbeat", a.heartbeat),
        ("connect_timeout", a.connect_timeout),
        ("confirm_timeout", a.confirm_timeout),
        ("reconnect.min", a.reconnect.min),
    ] {
        if d.0.is_zero() {
            cx.err(&format!("{base}.{key}"), None, "must be above zero");
        }
    }
    if a.reconnect.max.0 < a.reconnect.min.0 {
        cx.err(
            &format!("{base}.reconnect.max"),
            None,
            "must be at least `reconnect.min`",
        );
    }
    let t = &a.topology;
    let mut names: Vec<(String, &String)> = Vec::new();
    for (i, e) in t.exchanges.iter().enumerate() {
        names.push((format!("{base}.topology.exchanges[{i}].name"), &e.name));
    }
    for (i, q) in t.queues.iter().enumerate() {
        names.push((format!("{base}.topology.queues[{i}].name"), &q.name));
        if let Some(d) = &q.dead_letter_exchange {
            names.push((
                format!("{base}.topology.queues[{i}].dead_letter_exchange"),
                d,
            ));
        }
        if let Some(k) = &q.dead_letter_routing_key {
            names.push((
                format!("{base}.topology.queues[{i}].dead_letter_routing_key"),
                k,
            ));
        }
    }
    for (i, b) in t.bindings.iter().enumerate() {
        for (key, v) in [
            ("queue", &b.queue),
            ("exchange", &b.exchange),
            ("routing_key", &b.routing_key),
        ] {
            names.push((format!("{base}.topology.bindings[{i}].{key}"), v));
        }
    }
    for (path, v) in names {
        if v.len() > 255 {
            cx.err(&path, None, "at most 255 bytes");
        }
    }
    for (i, e) in t.exchanges.iter().enumerate() {
        if e.name.is_empty() || e.name.starts_with("amq.") {
            cx.err(
                &format!("{base}.topology.exchanges[{i}].name"),
                None,
                "name the exchange (names starting with `amq.` belong to the broker)",
            );
        }
    }
    for (i, q) in t.queues.iter().enumerate() {
        if q.name.is_empty() || q.name.starts_with("amq.") {
            cx.err(
                &format!("{base}.topology.queues[{i}].name"),
                None,
                "name the queue (names starting with `amq.` belong to the broker)",
            );
        }
        if q.kind == QueueKindSpec::Quorum && !q.durable {
            cx.err(
                &format!("{base}.topology.queues[{i}].durable"),
                None,
                "quorum queues are always durable",
            );
        }
        if q.message_ttl
            .is_some_and(|d| d.0.as_millis() > u32::MAX as u128)
        {
            cx.err(
                &format!("{base}.topology.queues[{i}].message_ttl"),
                None,
                "at most about 49 days",
            );
        }
    }
    for (i, b) in t.bindings.iter().enumerate() {
        if b.queue.is_empty() || b.exchange.is_empty() {
            cx.err(
                &format!("{base}.topology.bindings[{i}]"),
                None,
                "a binding names its `queue` and its `exchange`",
            );
        }
    }
}

pub(crate) fn validate_ws_amqp(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    a: &WsAmqpSpec,
    template: Option<&PathTemplate>,
) {
    if a.exchange.is_none() && a.consume.is_none() {
        cx.err(
            base,
            id,
            "give `exchange` (publish client frames), `consume` (push messages), or both",
        );
    }
    if let Some(e) = &a.exchange {
        check_handshake_template(cx, &format!("{base}.exchange"), id, e, template);
        check_handshake_template(
            cx,
            &format!("{base}.routing_key"),
            id,
            &a.routing_key,
            template,
        );
    } else if a.acks {
        cx.err(
            &format!("{base}.acks"),
            id,
            "`acks` answers publishes; give `exchange`",
        );
    }
    if let Some(c) = &a.consume {
        let cb = format!("{base}.consume");
        match (&c.queue, c.bind.is_empty()) {
            (Some(q), true) => {
                if q.is_empty() {
                    cx.err(&format!("{cb}.queue"), id, "name a queue");
                }
                check_handshake_template(cx, &format!("{cb}.queue"), id, q, template);
            }
            (None, false) => {
                for (i, b) in c.bind.iter().enumerate() {
                    check_handshake_template(cx, &format!("{cb}.bind[{i}].exchange"), id, &b.exchange, template);
                    check_handshake_template(cx, &format!("{cb}.bind[{i}].routing_key"), id, &b.routing_key, template);
                    if b.exchange.is_empty() {
                        cx.err(
                            &format!("{cb}.bind[{i}].exchange"),
                            id,
                            "the default exchange cannot be bound; name an exchange",
                        );
                    }
                }
            }
            _ => cx.err(
                &cb,
                id,
                "give either `queue` (consume a named queue) or `bind` (a queue of the connection's own, bound as listed)",
            ),
        }
        if c.prefetch == 0 {
            cx.err(&format!("{cb}.prefetch"), id, "at least 1");
        }
    }
}
