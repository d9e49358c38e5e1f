//! Request values for the message bridges: fills a [`ValueTemplate`] (exchange, routing key,
//! topic) from the request's path captures, query, headers and JSON body, at the bottom of the
//! route's stack. A value that is missing or unfit is a 400 naming where it was looked for.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::config::template::{ValuePart, ValueTemplate};
use crate::error::GatewayError;
use crate::middleware::context::RequestContext;

/// One request's values, with the JSON body parsed at most once and only when needed.
pub struct RequestValues<'a> {
    parts: &'a http::request::Parts,
    body: &'a Bytes,
    json: OnceLock<Result<serde_json::Value, String>>,
    query: OnceLock<Vec<(String, String)>>,
}

impl<'a> RequestValues<'a> {
    pub fn new(parts: &'a http::request::Parts, body: &'a Bytes) -> Self {
        RequestValues {
            parts,
            body,
            json: OnceLock::new(),
            query: OnceLock::new(),
        }
    }

    /// The parsed JSON body (an error when the body is not JSON).
    pub fn json(&self) -> Result<&serde_json::Value, GatewayError> {
        self.json
            .get_or_init(|| serde_json::from_slice(self.body).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| GatewayError::BadRequest {
                detail: format!("The request body must be JSON for this route: {e}."),
                field: Some("body".into()),
            })
    }

    /// The query parameters, percent-decoded, in order.
    pub fn query(&self) -> &[(String, String)] {
        self.query.get_or_init(|| {
            self.parts
                .uri
                .query()
                .map(crate::backends::grpc::transcode::query_pairs)
                .unwrap_or_default()
        })
    }

    /// Fills `t`; `what` names the result in error messages ("the routing key").
    pub fn render(&self, t: &ValueTemplate, what: &str) -> Result<String, GatewayError> {
        self.render_checked(t, what, |_, _| Ok(()))
    }

    /// [`render`](Self::render), with `check(name, value)` run on every value the request
    /// supplies (`name` as written in the template: `device`, `query.x`, `body.a.b`); its
    /// error becomes a 400 naming the value.
    pub fn render_checked(
        &self,
        t: &ValueTemplate,
        what: &str,
        check: impl Fn(&str, &str) -> Result<(), String>,
    ) -> Result<String, GatewayError> {
        let mut out = String::new();
        for part in &t.parts {
            let start = out.len();
            match part {
                ValuePart::Lit(l) => out.push_str(l),
                ValuePart::Param(p) => {
                    let v = self
                        .parts
                        .extensions
                        .get::<RequestContext>()
                        .and_then(|c| c.param(p))
                        .ok_or(GatewayError::Internal("a path variable was not captured"))?;
                    out.push_str(&percent_encoding::percent_decode_str(v).decode_utf8_lossy());
                }
                ValuePart::Query(q) => {
                    let v = self
                        .query()
                        .iter()
                        .find(|(k, _)| k == q)
                        .map(|(_, v)| v.as_str())
                        .ok_or_else(|| missing(&format!("query.{q}"), what))?;
                    out.push_str(v);
                }
                ValuePart::Header(h) => {
                    let v = self
                        .parts
                        .headers
                        .get(h.as_str())
                        .ok_or_else(|| missing(&format!("header.{h}"), what))?;
                    let v = v.to_str().map_err(|_| GatewayError::BadRequest {
                        detail: format!("Header `{h}` is not plain text, so {what} cannot use it."),
                        field: Some(format!("header.{h}")),
                    })?;
                    out.push_str(v);
                }
                ValuePart::Body(path) => {
                    let field = format!("body.{}", path.join("."));
                    let mut v = self.json()?;
                    for key in path {
                        v = v.get(key).ok_or_else(|| missing(&field, what))?;
                    }
                    match v {
                        serde_json::Value::String(s) => out.push_str(s),
                        serde_json::Value::Number(n) => out.push_str(&n.to_string()),
                        serde_json::Value::Bool(b) => {
                            out.push_str(if *b { "true" } else { "false" })
                        }
                        _ => {
                            return Err(GatewayError::BadRequest {
                                detail: format!(
                                    "Field `{field}` must be a string, number or boolean for {what}."
                                ),
                                field: Some(field),
                            });
                        }
                    }
                }
            }
            if let Some(name) = part_name(part)
                && let Err(why) = check(&name, &out[start..])
            {
                return Err(GatewayError::BadRequest {
                    detail: format!("The value of `{name}` cannot go into {what}: {why}."),
                    field: Some(name),
                });
            }
        }
        if out.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(GatewayError::BadRequest {
                detail: format!("{} would hold a NUL, CR or LF character.", capital(what)),
                field: None,
            });
        }
        Ok(out)
    }
}

/// The name of a template part that takes a request value, as written in the template.
fn part_name(p: &ValuePart) -> Option<String> {
    match p {
        ValuePart::Lit(_) => None,
        ValuePart::Param(n) => Some(n.clone()),
        ValuePart::Query(q) => Some(format!("query.{q}")),
        ValuePart::Header(h) => Some(format!("header.{h}")),
        ValuePart::Body(path) => Some(format!("body.{}", path.join("."))),
    }
}

fn missing(field: &str, what: &str) -> GatewayError {
    GatewayError::BadRequest {
        detail: format!(
            "{} needs `{field}`, and the request has none.",
            capital(what)
        ),
        field: Some(field.to_string()),
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
