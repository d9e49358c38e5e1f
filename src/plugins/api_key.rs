//! The `api_key` plugin: admits a request only when it carries one of the route's API keys, in
//! a header or (for browsers' WebSockets, which cannot set headers) a query parameter. Sits in
//! a route's plugin chain, outside the middleware, so a refusal never reaches the backend, its
//! breaker or its rate limit; on WebSocket routes it runs before the upgrade.
//!
//! Keys are compared in constant time, and the key is removed from the request before it goes
//! on. Write keys as `${ENV_VAR}` so that they stay out of routes.yaml.

use std::sync::Arc;

use http::HeaderName;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::Guard;
use crate::error::Problem;
use crate::{Request, ResponseFuture, RouteService, fail};

pub struct ApiKeyPlugin;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyConfig {
    /// Accepted keys.
    keys: Vec<String>,
    /// The header that carries the key.
    #[serde(default = "default_header")]
    header: String,
    /// A query parameter that may carry the key instead.
    #[serde(default)]
    query: Option<String>,
}

fn default_header() -> String {
    "x-api-key".into()
}

pub struct Compiled {
    keys: Vec<Vec<u8>>,
    header: HeaderName,
    query: Option<String>,
    challenge: String,
}

/// What the settings look like, for the messages that refuse them.
const USAGE: &str = "write `api_key: { keys: [\"${API_KEY}\"] }`, optionally with `header:` (default `x-api-key`) and `query:`";

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: ApiKeyConfig =
        serde_json::from_value(config.clone()).map_err(|e| format!("{e}; {USAGE}"))?;
    if cfg.keys.is_empty() {
        return Err(format!("`keys` lists no key; {USAGE}"));
    }
    if let Some(i) = cfg.keys.iter().position(|k| k.len() < 16) {
        return Err(format!(
            "keys[{i}] is shorter than 16 characters; use a long random key (from the environment: `${{APP_KEY}}`)"
        ));
    }
    let header = HeaderName::from_bytes(cfg.header.as_bytes())
        .map_err(|_| {
            format!(
                "`header: {}` is not a valid header name; use letters, digits and `-`, such as `x-api-key`",
                cfg.header
            )
        })?;
    if cfg.query.as_deref().is_some_and(str::is_empty) {
        return Err(
            "`query` is empty; name the query parameter that may carry the key (`query: api_key`), or leave `query` out"
                .into(),
        );
    }
    Ok(Compiled {
        keys: cfg.keys.into_iter().map(String::into_bytes).collect(),
        challenge: format!("ApiKey header=\"{header}\""),
        header,
        query: cfg.query,
    })
}

/// Whether `given` is one of `keys`, taking the same time whichever matches.
fn accepted(keys: &[Vec<u8>], given: &[u8]) -> bool {
    keys.iter()
        .fold(false, |ok, k| ok | bool::from(k.ct_eq(given)))
}

impl Compiled {
    /// The key the request carries (the header first, then the query parameter), and the
    /// request without any of them: every copy of the header and every parameter whose
    /// decoded name matches are removed, whichever carried the key.
    fn take_key(&self, req: &mut Request) -> Option<Vec<u8>> {
        let mut key = req
            .headers()
            .get(&self.header)
            .map(|v| v.as_bytes().to_vec());
        while req.headers_mut().remove(&self.header).is_some() {}
        let Some(name) = self.query.as_deref() else {
            return key;
        };
        match super::take_query_param(req, name) {
            Ok(Some(v)) if key.is_none() => key = Some(v),
            Ok(_) => {}
            // Never forward a target that still holds the key.
            Err(()) => return None,
        }
        key
    }
}

impl Guard for ApiKeyPlugin {
    const NAME: &'static str = "api_key";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, mut req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let detail = match c.take_key(&mut req) {
            Some(k) if accepted(&c.keys, &k) => return Box::pin(inner.clone().oneshot(req)),
            Some(_) => "The API key is not accepted.".to_string(),
            None => match &c.query {
                Some(q) => format!(
                    "This route needs an API key in the `{}` header or the `{q}` query parameter.",
                    c.header
                ),
                None => format!("This route needs an API key in the `{}` header.", c.header),
            },
        };
        fail(Problem::unauthorized(detail, &c.challenge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_whole_and_only_whole() {
        let keys = vec![b"0123456789abcdef".to_vec(), b"fedcba9876543210".to_vec()];
        assert!(accepted(&keys, b"fedcba9876543210"));
        assert!(!accepted(&keys, b"0123456789abcde"));
        assert!(!accepted(&keys, b"0123456789abcdefX"));
        assert!(!accepted(&keys, b""));
    }

    #[test]
    fn short_keys_and_empty_lists_are_refused() {
        assert!(compile(&serde_json::json!({ "keys": [] })).is_err());
        assert!(compile(&serde_json::json!({ "keys": ["short"] })).is_err());
        assert!(compile(&serde_json::json!({ "keys": ["0123456789abcdef"] })).is_ok());
    }
}
