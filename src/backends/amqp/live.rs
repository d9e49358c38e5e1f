//! `validate --live` for an AMQP backend: connects as the gateway would, then asks the broker,
//! with passive declarations only, whether each exchange and queue the topology and the routes
//! name exists; one the topology declares is then declared again as configured, which changes
//! nothing when it matches and is refused, in the broker's words, when it does not.

use std::collections::BTreeSet;

use lapin::Connection;

use crate::backends::live::{Findings, Verdict, templated};
use crate::config::{AmqpBackendSpec, DIRECT_REPLY_TO, ExchangeSpec, QueueSpec, RouteSpec};

pub async fn check(
    name: &str,
    spec: &AmqpBackendSpec,
    routes: &[&RouteSpec],
    base: &std::path::Path,
) -> Findings {
    let mut f = Findings::new(name);
    let tls = match super::tls_config(spec, base) {
        Ok(t) => t,
        Err(e) => {
            f.backend("tls", Verdict::Fail, &e);
            return f;
        }
    };
    let conn = match super::open_connection(name, spec, tls.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            f.backend("connect", Verdict::Fail, &e.message);
            return f;
        }
    };
    f.backend("connect", Verdict::Ok, "connected");
    let t = &spec.topology;
    for x in &t.exchanges {
        let check = format!("exchange {} ({:?})", x.name, x.kind).to_lowercase();
        let (result, detail) = declared(&conn, Object::Exchange(x)).await;
        f.backend(check, result, &detail);
    }
    for q in &t.queues {
        let check = format!("queue {}", q.name);
        let (result, detail) = declared(&conn, Object::Queue(q)).await;
        f.backend(check, result, &detail);
    }
    let exchanges: BTreeSet<&str> = t.exchanges.iter().map(|x| x.name.as_str()).collect();
    let queues: BTreeSet<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
    for r in routes {
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &r.amqp {
            wanted.push(("exchange", &a.exchange));
            if let Some(reply) = &a.reply {
                wanted.push(("queue", &reply.queue));
            }
        }
        if let Some(ws) = r.websocket.as_ref().and_then(|w| w.amqp.as_ref()) {
            if let Some(x) = &ws.exchange {
                wanted.push(("exchange", x));
            }
            if let Some(c) = &ws.consume {
                if let Some(q) = &c.queue {
                    wanted.push(("queue", q));
                }
                for b in &c.bind {
                    wanted.push(("exchange", &b.exchange));
                }
            }
        }
        for (what, named) in wanted {
            let check = format!("{what} {named}");
            // The default exchange and direct reply-to always exist; what the topology
            // declares is reported above.
            if named.is_empty()
                || named == DIRECT_REPLY_TO
                || (what == "exchange" && exchanges.contains(named))
                || (what == "queue" && queues.contains(named))
            {
                continue;
            }
            if templated(named) {
                f.route(
                    &r.id,
                    check,
                    Verdict::Warn,
                    "not checked: named by the request",
                );
                continue;
            }
            let (result, detail) = match exists(&conn, what, named).await {
                Ok(()) => (Verdict::Ok, "exists".to_string()),
                Err(e) if not_found(&e) => (
                    Verdict::Fail,
                    format!(
                        "does not exist, and the gateway does not declare it (add it under `topology`): {e}"
                    ),
                ),
                Err(e) => (Verdict::Fail, e.to_string()),
            };
            f.route(&r.id, check, result, &detail);
        }
    }
    let _ = conn.close(200, "checked".into()).await;
    f
}

enum Object<'a> {
    Exchange(&'a ExchangeSpec),
    Queue(&'a QueueSpec),
}

/// An object the topology declares: missing is a warning (the gateway declares it when it
/// connects); present, it must match the declaration. Each question is asked on a channel of
/// its own, since the broker closes the channel of a refused one.
async fn declared(conn: &Connection, o: Object<'_>) -> (Verdict, String) {
    let ask = async |passive: bool| -> lapin::Result<String> {
        let ch = conn.create_channel().await?;
        let found = match o {
            Object::Exchange(x) => super::declare_exchange(&ch, x, passive)
                .await
                .map(|()| String::new()),
            Object::Queue(q) => super::declare_queue(&ch, q, passive).await.map(|q| {
                format!(
                    ", {} messages, {} consumers",
                    q.message_count(),
                    q.consumer_count()
                )
            }),
        }?;
        let _ = ch.close(200, "checked".into()).await;
        Ok(found)
    };
    match ask(true).await {
        Err(e) if not_found(&e) => (
            Verdict::Warn,
            "missing; the gateway declares it when it connects".into(),
        ),
        Err(e) => (Verdict::Fail, e.to_string()),
        Ok(_) => match ask(false).await {
            Ok(counts) => (Verdict::Ok, format!("exists as declared{counts}")),
            Err(e) => (
                Verdict::Fail,
                format!("exists but differs from the declaration: {e}"),
            ),
        },
    }
}

/// Whether an exchange or queue the gateway does not declare exists (a passive declaration).
async fn exists(conn: &Connection, what: &str, name: &str) -> lapin::Result<()> {
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let ch = conn.create_channel().await?;
    if what == "exchange" {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await?;
    } else {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare(name.into(), passive, FieldTable::default())
            .await?;
    }
    let _ = ch.close(200, "checked".into()).await;
    Ok(())
}

/// The broker's 404 NOT_FOUND: the object does not exist.
fn not_found(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            amqp.kind()
                == &lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        }
        _ => false,
    }
}
