//! The admin API's view of the asynchronous state: `GET /spool` (what waits, per route) and
//! the dead letters: `GET /dead-letters`, `GET|DELETE /dead-letters/{id}`,
//! `POST /dead-letters/{id}/replay`.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{json_response, not_allowed, problem};
use crate::Response;
use crate::app::Shared;
use crate::durable::spool::DeadLetter;
use crate::store::{Ns, State};

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Answers the state paths, or `None` for a path that is not one of them.
pub async fn handle(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Option<Response> {
    let table = shared.table.load_full();
    let rest = match path {
        "/spool" => "",
        p => p.strip_prefix("/dead-letters")?,
    };
    let Some(state) = table.state.clone() else {
        return Some(problem(
            StatusCode::NOT_FOUND,
            "no route uses the state store, so there is no spool and no dead letters",
        ));
    };
    Some(match (method, path, rest) {
        (&Method::GET, "/spool", _) => spool(&state),
        (_, "/spool", _) => not_allowed(&[Method::GET]),
        (&Method::GET, _, "") => list(&state, query).await,
        (_, _, "") => not_allowed(&[Method::GET]),
        (m, _, r) => {
            let r = r.strip_prefix('/').unwrap_or(r);
            match (m, r.split_once('/')) {
                (&Method::GET, None) => read(&state, r).await,
                (&Method::DELETE, None) => delete(&state, r).await,
                (&Method::POST, Some((id, "replay"))) => replay(&table, &state, id).await,
                (_, None) => not_allowed(&[Method::GET, Method::DELETE]),
                (_, Some((_, "replay"))) => not_allowed(&[Method::POST]),
                _ => problem(StatusCode::NOT_FOUND, "not found"),
            }
        }
    })
}

fn spool(state: &State) -> Response {
    let routes: serde_json::Map<String, Value> = state
        .spool
        .status()
        .into_iter()
        .map(|(id, s)| (id.to_string(), json!(s)))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "path": state.spool.path().display().to_string(), "routes": routes }),
    )
}

fn summary(d: &DeadLetter) -> Value {
    json!({
        "id": d.id,
        "source": d.source,
        "route": d.route,
        "reason": d.reason,
        "attempts": d.attempts,
        "dead_at": humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.dead_ms)).to_string(),
        "method": d.request.method,
        "uri": d.request.uri,
        "message_id": d.request.message_id,
        "correlation_id": d.request.correlation_id,
    })
}

async fn list(state: &State, query: Option<&str>) -> Response {
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let after = query_param(query, "after");
    match state.store.list(Ns::DeadLetters, after, limit).await {
        Ok(items) => {
            let items: Vec<Value> = items
                .iter()
                .filter_map(|(_, v)| serde_json::from_slice::<DeadLetter>(v).ok())
                .map(|d| summary(&d))
                .collect();
            let next = (items.len() == limit)
                .then(|| {
                    items
                        .last()
                        .and_then(|d| d["id"].as_str().map(str::to_string))
                })
                .flatten();
            json_response(
                StatusCode::OK,
                &json!({ "dead_letters": items, "next_after": next }),
            )
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn load(state: &State, id: &str) -> Result<DeadLetter, Response> {
    match state.store.get(Ns::DeadLetters, id).await {
        Ok(Some(v)) => serde_json::from_slice(&v).map_err(|_| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the dead letter cannot be read",
            )
        }),
        Ok(None) => Err(problem(
            StatusCode::NOT_FOUND,
            format!("no dead letter `{id}`"),
        )),
        Err(e) => Err(problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

async fn read(state: &State, id: &str) -> Response {
    match load(state, id).await {
        Ok(d) => {
            let mut v = summary(&d);
            v["headers"] = d
                .request
                .headers
                .iter()
                .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
                .collect();
            v["body_base64"] = d.body.into();
            json_response(StatusCode::OK, &v)
        }
        Err(r) => r,
    }
}

async fn delete(state: &State, id: &str) -> Response {
    match state.store.delete(Ns::DeadLetters, id).await {
        Ok(true) => json_response(StatusCode::OK, &json!({ "deleted": id })),
        Ok(false) => problem(StatusCode::NOT_FOUND, format!("no dead letter `{id}`")),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Puts a spooled message back in its route's spool, where the forwarder sends it in turn, or
/// delivers a webhook again; then deletes it from the dead letters.
async fn replay(table: &crate::router::RouteTable, state: &State, id: &str) -> Response {
    // One replay at a time, across replicas sharing the store: a second one would send twice.
    let lock = format!("replay:{id}");
    match state
        .store
        .insert(Ns::Leases, &lock, b"1", Duration::from_secs(60))
        .await
    {
        Ok(None) => {}
        Ok(Some(_)) => {
            return problem(
                StatusCode::CONFLICT,
                format!("dead letter `{id}` is being replayed already"),
            );
        }
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    let answer = replay_locked(table, state, id).await;
    let _ = state
        .store
        .swap(Ns::Leases, &lock, b"1", None, Duration::from_secs(60))
        .await;
    answer
}

async fn replay_locked(table: &crate::router::RouteTable, state: &State, id: &str) -> Response {
    let d = match load(state, id).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Err(refused) = requeue(table, state, &d).await {
        return refused;
    }
    if let Err(e) = state.store.delete(Ns::DeadLetters, id).await {
        tracing::warn!(dead_letter = %id, error = %e, "A replayed dead letter could not be deleted; it may be replayed twice.");
    }
    json_response(
        StatusCode::ACCEPTED,
        &json!({ "replayed": id, "route": d.route }),
    )
}

/// Sends a dead letter on its way again: a webhook is delivered again, a spooled message goes
/// back into its route's spool.
async fn requeue(
    table: &crate::router::RouteTable,
    state: &State,
    d: &DeadLetter,
) -> Result<(), Response> {
    if d.source == "webhook" {
        return state
            .jobs
            .redeliver(d)
            .await
            .map_err(|why| problem(StatusCode::CONFLICT, why));
    }
    let Some(route) = table
        .routes
        .iter()
        .find(|r| *r.id == *d.route && r.spool_inner.is_some())
    else {
        return Err(problem(
            StatusCode::CONFLICT,
            format!(
                "route `{}` is not loaded with `spool: true`, so there is nothing to replay the message through",
                d.route
            ),
        ));
    };
    let body = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &d.body)
        .map_err(|_| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the dead letter's body cannot be read",
            )
        })?;
    state
        .spool
        .append(&route.id, &d.request, &body)
        .await
        .map(drop)
        .map_err(|e| problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}
