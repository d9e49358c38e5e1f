//! `Idempotency-Key` (IETF httpapi draft) on routes with `idempotency:`, placed below the
//! rate limit and above the spool and the backend (see `middleware::stack`). The first request
//! with a key claims it in the state store and runs; its answer is stored and replayed to
//! repeats with the same key and request, which never reach the backend. A repeat while the
//! first runs gets 409; the key with another request gets 422. The key also becomes the
//! message id, so consumers can spot repeats that do reach them (after a release).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::config::IdempotencySpec;
use crate::error::Problem;
use crate::middleware::context::MessageId;
use crate::store::{Ns, SharedStore, StoredResponse, now_ms, read_limited};
use crate::{BoxError, Request, Response, RouteService, full_body};

pub const HEADER: &str = "idempotency-key";
/// Set on a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Running {
        fingerprint: String,
        started_ms: u64,
        /// Tells this claim from a later one on the same key (after this one expired).
        token: String,
    },
    Done {
        fingerprint: String,
        response: StoredResponse,
    },
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Record::Running { fingerprint, .. } | Record::Done { fingerprint, .. } => fingerprint,
        }
    }
}

fn bad_key(detail: &str) -> Problem {
    Problem::bad_request(detail).with_field("header.idempotency-key")
}

/// The key from the header: an sf-string (`"…"`, the draft's form) or, for older clients, a
/// bare token of visible ASCII.
pub fn parse_key(raw: &HeaderValue, max_len: usize) -> Result<String, Problem> {
    let s = raw
        .to_str()
        .map_err(|_| bad_key("Idempotency-Key must be visible ASCII."))?
        .trim();
    let key = if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| bad_key("Idempotency-Key opens a quoted string it does not close."))?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e @ ('"' | '\\')) => out.push(e),
                    _ => {
                        return Err(bad_key(
                            "Idempotency-Key has a bad escape; only \\\" and \\\\ are allowed.",
                        ));
                    }
                },
                '"' => return Err(bad_key("Idempotency-Key has an unescaped quote inside.")),
                c if (' '..='~').contains(&c) => out.push(c),
                _ => return Err(bad_key("Idempotency-Key must be visible ASCII.")),
            }
        }
        out
    } else {
        if s.bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'\\' || b == b'"' || b == b',')
        {
            return Err(bad_key(
                "Idempotency-Key must be a quoted string (\"…\") or visible ASCII without quotes, commas or backslashes.",
            ));
        }
        s.to_string()
    };
    if key.is_empty() {
        return Err(bad_key("Idempotency-Key is empty."));
    }
    if key.len() > max_len {
        return Err(bad_key(&format!(
            "Idempotency-Key is {} characters long; this route accepts at most {max_len}.",
            key.len()
        )));
    }
    Ok(key)
}

fn fingerprint(parts: &http::request::Parts, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(parts.method.as_str().as_bytes());
    h.update(b"\n");
    // Path and query only: a retry over another HTTP version (absolute URI) is the same request.
    h.update(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    h.update(b"\n");
    h.update(body);
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
pub struct IdempotencyService {
    inner: RouteService,
    store: SharedStore,
    spec: Arc<IdempotencySpec>,
    route: Arc<str>,
    /// How long a running claim lives: the route's deadline and a margin, so the key of a
    /// gateway that died mid-request frees itself.
    lock_ttl: Duration,
}

impl IdempotencyService {
    pub fn new(
        inner: RouteService,
        store: SharedStore,
        spec: &IdempotencySpec,
        route: Arc<str>,
        deadline: Duration,
    ) -> Self {
        IdempotencyService {
            inner,
            store,
            spec: Arc::new(spec.clone()),
            route,
            lock_ttl: deadline + Duration::from_secs(10),
        }
    }
}

crate::backends::route_service!(IdempotencyService);

impl IdempotencyService {
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let this = self;
        let key = match req.headers().get(HEADER) {
            Some(v) => parse_key(v, this.spec.max_key_length)?,
            None if this.spec.required => {
                return Err(bad_key("This route requires an Idempotency-Key header.").into());
            }
            None => return this.inner.oneshot(req).await,
        };
        let (mut parts, body) = req.into_parts();
        let body = crate::collect_body(body).await?;
        let fp = fingerprint(&parts, &body);
        let store_key = format!("{}:{key}", this.route);
        let claim = serde_json::to_vec(&Record::Running {
            fingerprint: fp.clone(),
            started_ms: now_ms(),
            token: uuid::Uuid::now_v7().to_string(),
        })
        .map_err(|_| Problem::internal("encoding an idempotency record"))?;
        let found = this
            .store
            .insert(Ns::Idempotency, &store_key, &claim, this.lock_ttl)
            .await
            .map_err(Problem::store_unavailable)?;
        if let Some(raw) = found {
            let rec: Record = serde_json::from_slice(&raw).map_err(|_| {
                Problem::store_unavailable(crate::store::StoreError::Corrupt(
                    "idempotency record".into(),
                ))
            })?;
            if rec.fingerprint() != fp {
                return Err(Problem::key_reused().into());
            }
            return match rec {
                Record::Running { .. } => Err(Problem::key_in_use().into()),
                Record::Done { response, .. } => {
                    let mut resp = response.response().map_err(Problem::store_unavailable)?;
                    resp.headers_mut()
                        .insert(REPLAYED, HeaderValue::from_static("true"));
                    Ok(resp)
                }
            };
        }
        parts.extensions.insert(MessageId(key.as_str().into()));
        let req = http::Request::from_parts(parts, full_body(body));
        let result = this.inner.clone().oneshot(req).await;
        let resp = match result {
            Ok(r) if !r.status().is_server_error() => r,
            other => {
                this.release(&store_key, &claim).await;
                return other;
            }
        };
        this.finish(store_key, &claim, fp, resp).await
    }
}

impl IdempotencyService {
    /// Frees the key after a failure, so that the client may try again with it (unless the
    /// claim expired and someone else holds the key now).
    async fn release(&self, store_key: &str, claim: &[u8]) {
        let freed = self
            .store
            .swap(Ns::Idempotency, store_key, claim, None, self.lock_ttl)
            .await;
        if let Err(e) = freed {
            tracing::warn!(route = %self.route, error = %e, "Releasing an idempotency key failed; it frees itself when its claim expires.");
        }
    }

    /// Stores the answer for replay and passes it on. An answer too large to store is passed
    /// on as it streams, and the key released; so is one with trailers (gRPC), which a stored
    /// answer cannot carry.
    async fn finish(
        &self,
        store_key: String,
        claim: &[u8],
        fp: String,
        resp: Response,
    ) -> Result<Response, BoxError> {
        let (parts, body) = resp.into_parts();
        let bytes = match read_limited(body, self.spec.max_response_size.0 as usize).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(whole)) => {
                self.release(&store_key, claim).await;
                return Ok(http::Response::from_parts(parts, whole));
            }
            Err(e) => {
                self.release(&store_key, claim).await;
                return Err(e);
            }
        };
        let record = Record::Done {
            fingerprint: fp,
            response: StoredResponse::new(&parts, &bytes),
        };
        let stored = match serde_json::to_vec(&record) {
            Ok(v) => match self
                .store
                .swap(
                    Ns::Idempotency,
                    &store_key,
                    claim,
                    Some(&v),
                    self.spec.ttl.0,
                )
                .await
            {
                Ok(true) => Ok(()),
                Ok(false) => Err("the claim expired and the key was taken again".into()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            tracing::warn!(route = %self.route, error = %e, "Storing an answer for its idempotency key failed; a repeat after the claim expires runs again.");
        }
        Ok(http::Response::from_parts(parts, full_body(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::store::embedded::{EmbeddedStore, LocalDb};

    fn layer(
        required: bool,
    ) -> (
        IdempotencyService,
        tower_test::mock::Handle<Request, Response>,
    ) {
        let (mock, handle) = tower_test::mock::pair::<Request, Response>();
        let inner = RouteService::boxing(tower::util::MapErr::new(mock, |e: BoxError| e));
        let store: SharedStore = Arc::new(EmbeddedStore::new(
            LocalDb::in_memory().unwrap(),
            Duration::from_secs(60),
        ));
        let spec = IdempotencySpec {
            required,
            ..IdempotencySpec::default()
        };
        let svc = IdempotencyService::new(inner, store, &spec, "r".into(), Duration::from_secs(5));
        (svc, handle)
    }

    fn post(key: Option<&str>, body: &'static str) -> Request {
        let mut req = http::Request::post("/orders");
        if let Some(k) = key {
            req = req.header(HEADER, k);
        }
        req.body(full_body(body)).unwrap()
    }

    fn kind(e: &BoxError) -> Kind {
        e.downcast_ref::<Problem>().expect("a Problem").kind
    }

    #[tokio::test]
    async fn one_answer_per_key_replayed_and_guarded() {
        let (svc, mut handle) = layer(false);
        let first = tokio::spawn(svc.clone().oneshot(post(Some("k1"), "{\"n\":1}")));
        let (_, send) = handle.next_request().await.unwrap();
        // The same request while the first runs: 409, the backend is not called.
        let busy = svc
            .clone()
            .oneshot(post(Some("k1"), "{\"n\":1}"))
            .await
            .unwrap_err();
        assert_eq!(kind(&busy), Kind::KEY_IN_USE);
        let mut answer = http::Response::new(full_body("done"));
        *answer.status_mut() = http::StatusCode::CREATED;
        send.send_response(answer);
        let resp = first.await.unwrap().unwrap();
        assert_eq!(resp.status(), 201);
        assert!(resp.headers().get(REPLAYED).is_none());
        // Again: the stored answer, marked as replayed, without the backend.
        let again = svc
            .clone()
            .oneshot(post(Some("k1"), "{\"n\":1}"))
            .await
            .unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()[REPLAYED], "true");
        let body = crate::collect_body(again.into_body()).await.unwrap();
        assert_eq!(&body[..], b"done");
        // The same key with another body: 422.
        let reused = svc
            .clone()
            .oneshot(post(Some("k1"), "{\"n\":2}"))
            .await
            .unwrap_err();
        assert_eq!(kind(&reused), Kind::KEY_REUSED);
        // Without a key the request passes as it is.
        let plain = tokio::spawn(svc.oneshot(post(None, "{}")));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(full_body("")));
        assert!(plain.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_required_key_that_is_missing_or_malformed_is_a_400_naming_the_header() {
        let (svc, _handle) = layer(true);
        for key in [None, Some("")] {
            let err = svc.clone().oneshot(post(key, "{}")).await.unwrap_err();
            let p = err.downcast_ref::<Problem>().expect("a Problem");
            assert_eq!(
                (p.kind, p.status.as_u16()),
                (Kind::BAD_REQUEST, 400),
                "{key:?}"
            );
            assert_eq!(p.field.as_deref(), Some("header.idempotency-key"));
        }
    }
}
