//! The `headers` plugin: sets, adds and removes request headers on the way to the backend and
//! response headers on the way back. Sits in a route's plugin chain, outside the middleware.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use tower::ServiceBuilder;

use super::Plugin;
use crate::{Request, Response, RouteService};

pub struct HeadersPlugin;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersConfig {
    #[serde(default)]
    request: HeaderOpsSpec,
    #[serde(default)]
    response: HeaderOpsSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsSpec {
    /// Replace (or create) these headers. Values are strings; numbers and booleans are taken
    /// as written.
    #[serde(default)]
    set: BTreeMap<String, serde_json::Value>,
    /// Append these values, keeping existing ones.
    #[serde(default)]
    add: BTreeMap<String, serde_json::Value>,
    /// Remove these headers.
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Default)]
struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(spec: &HeaderOpsSpec, side: &str) -> Result<Self, String> {
        let name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                format!("{side}: `{n}` is not a valid header name; use letters, digits and `-`")
            })
        };
        let pair =
            |(n, v): (&String, &serde_json::Value)| -> Result<(HeaderName, HeaderValue), String> {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(format!(
                            "{side}: the value of `{n}` must be a string; quote it, such as `{n}: \"v1\"`"
                        ));
                    }
                };
                let value = HeaderValue::from_str(&v).map_err(|_| {
                    format!(
                        "{side}: the value of `{n}` holds characters not allowed in headers; remove control characters (line breaks, NUL)"
                    )
                })?;
                Ok((name(n)?, value))
            };
        Ok(HeaderOps {
            set: spec.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: spec.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: spec
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
        })
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

fn compile(config: &serde_json::Value) -> Result<(HeaderOps, HeaderOps), String> {
    let cfg: HeadersConfig = serde_json::from_value(config.clone()).map_err(|e| {
        format!(
            "{e}; write `headers: {{ request: {{ set: {{ x-a: v }}, add: {{ x-b: v }}, remove: [x-c] }}, response: {{ … }} }}`"
        )
    })?;
    Ok((
        HeaderOps::compile(&cfg.request, "request")?,
        HeaderOps::compile(&cfg.response, "response")?,
    ))
}

impl Plugin for HeadersPlugin {
    fn name(&self) -> &'static str {
        "headers"
    }

    fn validate(&self, config: &serde_json::Value) -> Result<(), String> {
        compile(config).map(|_| ())
    }

    fn wrap(
        &self,
        config: &serde_json::Value,
        inner: RouteService,
        _route: &crate::config::RouteSpec,
        _cx: &crate::backends::BuildContext<'_>,
    ) -> Result<RouteService, String> {
        let (req_ops, resp_ops) = compile(config)?;
        let (req_ops, resp_ops) = (Arc::new(req_ops), Arc::new(resp_ops));
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request| {
                req_ops.apply(req.headers_mut());
                req
            })
            .map_response(move |mut resp: Response| {
                resp_ops.apply(resp.headers_mut());
                resp
            })
            .service(inner);
        Ok(RouteService::boxing(svc))
    }
}
