//! Request values for the message bridges: fills a [`ValueTemplate`] (exchange, routing key,
//! queue, binding key, topic, topic filter) from the request's path captures, query, headers
//! and JSON body, at the bottom of the route's stack. Every render names its [`Target`], whose
//! rules each value the request supplies must pass; a value that is missing or breaks them is
//! a 400 naming it, before anything reaches a broker. Path rewrites for HTTP upstreams are
//! filled here too ([`render_path`]), with the rules of an upstream path.

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::config::template::{Part, Template, ValuePart, ValueTemplate};
use crate::error::Problem;
use crate::middleware::context::RequestContext;

/// Where a rendered value lands. Each target has its rules for values that came from a
/// request (the template's literal text is the operator's and is taken as written):
///
/// - every target: valid UTF-8 (escapes are decoded strictly, never lossily), not empty, and
///   no control character (U+0000–U+001F, U+007F–U+009F), which brokers drop connections
///   over;
/// - AMQP names and keys: one word — no `.` (unless the value is listed in `spans`, and then
///   no empty word), and no `*` or `#`; at most 255 bytes in all;
/// - AMQP binding key: exactly one word, always (a pattern's wildcards are the operator's);
/// - MQTT topic name or filter: no `+` or `#`, no `/` unless listed in `spans` (and then no
///   empty level), a topic that starts with `$` only when the template says so; at most 65535
///   bytes in all.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    AmqpExchange {
        spans: &'a [String],
    },
    AmqpQueue {
        spans: &'a [String],
    },
    /// The routing key of a publish.
    AmqpRoutingKey {
        spans: &'a [String],
    },
    /// The binding key of a queue (a pattern on topic exchanges).
    AmqpBindingKey,
    /// The topic of a publish.
    MqttTopic {
        spans: &'a [String],
    },
    /// The filter of a subscription (or a last-value read).
    MqttFilter {
        spans: &'a [String],
    },
}

impl Target<'_> {
    /// What the target is called in answers ("the routing key").
    pub fn what(&self) -> &'static str {
        match self {
            Target::AmqpExchange { .. } => "the exchange",
            Target::AmqpQueue { .. } => "the queue name",
            Target::AmqpRoutingKey { .. } => "the routing key",
            Target::AmqpBindingKey => "the binding key",
            Target::MqttTopic { .. } => "the topic",
            Target::MqttFilter { .. } => "the topic filter",
        }
    }

    /// The field named when the whole result is unfit.
    fn field(&self) -> &'static str {
        match self {
            Target::AmqpExchange { .. } => "exchange",
            Target::AmqpQueue { .. } => "queue",
            Target::AmqpRoutingKey { .. } => "routing_key",
            Target::AmqpBindingKey => "bind.routing_key",
            Target::MqttTopic { .. } | Target::MqttFilter { .. } => "topic",
        }
    }

    fn spans(&self) -> &[String] {
        match self {
            Target::AmqpExchange { spans }
            | Target::AmqpQueue { spans }
            | Target::AmqpRoutingKey { spans }
            | Target::MqttTopic { spans }
            | Target::MqttFilter { spans } => spans,
            Target::AmqpBindingKey => &[],
        }
    }

    fn max_len(&self) -> usize {
        match self {
            Target::MqttTopic { .. } | Target::MqttFilter { .. } => 65535,
            _ => 255,
        }
    }

    /// Checks one value a request supplied (`name` as written in the template).
    pub fn check(&self, name: &str, v: &str) -> Result<(), String> {
        if v.is_empty() {
            return Err("it is empty".into());
        }
        if let Some(c) = v.chars().find(|c| c.is_control()) {
            return Err(format!(
                "it holds the control character U+{:04X}",
                u32::from(c)
            ));
        }
        let spans = self.spans().iter().any(|s| s == name);
        match self {
            Target::MqttTopic { .. } | Target::MqttFilter { .. } => {
                if v.contains(['+', '#']) {
                    Err("it holds an MQTT wildcard (`+` or `#`)".into())
                } else if v.contains('/') && !spans {
                    Err("it holds `/`, and this value may not span topic levels".into())
                } else if v.split('/').any(str::is_empty) {
                    Err("it holds an empty topic level".into())
                } else {
                    Ok(())
                }
            }
            _ => {
                if v.contains(['*', '#']) {
                    Err("it holds an AMQP wildcard (`*` or `#`)".into())
                } else if v.contains('.') && !spans {
                    Err("it holds `.`, and this value may not span words of the key".into())
                } else if v.split('.').any(str::is_empty) {
                    Err("it holds an empty word".into())
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Checks the whole result.
    fn check_whole(&self, t: &ValueTemplate, out: &str) -> Result<(), String> {
        if out.len() > self.max_len() {
            return Err(format!(
                "it would be longer than the broker allows ({} bytes)",
                self.max_len()
            ));
        }
        if matches!(self, Target::MqttTopic { .. } | Target::MqttFilter { .. })
            && out.starts_with('$')
            && !matches!(t.parts.first(), Some(ValuePart::Lit(l)) if l.starts_with('$'))
        {
            return Err("it would start with `$`, which the broker keeps for itself".into());
        }
        Ok(())
    }
}

/// One request's values, with the JSON body parsed at most once and only when needed.
pub struct RequestValues<'a> {
    parts: &'a http::request::Parts,
    body: &'a Bytes,
    json: OnceLock<Result<serde_json::Value, String>>,
}

impl<'a> RequestValues<'a> {
    pub fn new(parts: &'a http::request::Parts, body: &'a Bytes) -> Self {
        RequestValues {
            parts,
            body,
            json: OnceLock::new(),
        }
    }

    /// The parsed JSON body (an error when the body is not JSON).
    pub fn json(&self) -> Result<&serde_json::Value, Problem> {
        self.json
            .get_or_init(|| serde_json::from_slice(self.body).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                Problem::bad_request(format!(
                    "The request body must be JSON for this route: {e}."
                ))
                .with_field("body")
            })
    }

    /// The first value of query parameter `name`, percent-decoded (`+` is a space).
    fn query(&self, name: &str) -> Result<Option<String>, Problem> {
        let Some(q) = self.parts.uri.query() else {
            return Ok(None);
        };
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let field = || format!("query.{name}");
            if decode(k, true).as_deref() == Some(name) {
                return decode(v, true)
                    .map(|v| Some(v.into_owned()))
                    .ok_or_else(|| not_utf8(&field()));
            }
        }
        Ok(None)
    }

    /// Fills `t` for `target`: every value the request supplies must pass the target's rules
    /// ([`Target::check`]), and so must the whole result; otherwise a 400 names the value.
    pub fn render(&self, t: &ValueTemplate, target: Target<'_>) -> Result<String, Problem> {
        let what = target.what();
        let mut out = String::new();
        for part in &t.parts {
            let value: Cow<'_, str> = match part {
                ValuePart::Lit(l) => {
                    out.push_str(l);
                    continue;
                }
                ValuePart::Param(p) => {
                    let v = self
                        .parts
                        .extensions
                        .get::<RequestContext>()
                        .and_then(|c| c.param(p))
                        .ok_or(Problem::internal("a path variable was not captured"))?;
                    decode(v, false).ok_or_else(|| not_utf8(p))?
                }
                ValuePart::Query(q) => self
                    .query(q)?
                    .ok_or_else(|| missing(&format!("query.{q}"), what))?
                    .into(),
                ValuePart::Header(h) => {
                    let v = self
                        .parts
                        .headers
                        .get(h.as_str())
                        .ok_or_else(|| missing(&format!("header.{h}"), what))?;
                    std::str::from_utf8(v.as_bytes())
                        .map_err(|_| not_utf8(&format!("header.{h}")))?
                        .into()
                }
                ValuePart::ClientCert(f) => {
                    let field = format!("client_cert.{f}");
                    let cert = self
                        .parts
                        .extensions
                        .get::<RequestContext>()
                        .and_then(|c| c.client_cert.as_deref())
                        .ok_or_else(|| {
                            Problem::forbidden(format!(
                                "{} is made from the client certificate, and the connection presented none.",
                                capital(what)
                            ))
                            .with_field(field.clone())
                        })?;
                    let v = match f.as_str() {
                        "cn" => cert.cn(),
                        "subject" => Some(cert.subject.as_str()),
                        "dns" => cert.dns.first().map(String::as_str),
                        "uri" => cert.uri.first().map(String::as_str),
                        "email" => cert.email.first().map(String::as_str),
                        _ => Some(cert.hash.as_str()),
                    };
                    v.ok_or_else(|| missing(&field, what))?.to_string().into()
                }
                ValuePart::Ctx(name) => {
                    let field = format!("ctx.{name}");
                    let v = self
                        .parts
                        .extensions
                        .get::<crate::plugins::script::Values>()
                        .and_then(|c| c.0.get(name))
                        .ok_or_else(|| missing(&field, what))?;
                    Cow::Owned(v.clone())
                }
                ValuePart::Claim(path) => {
                    let field = format!("claims.{}", path.join("."));
                    let v = self
                        .parts
                        .extensions
                        .get::<crate::plugins::jwt::Claims>()
                        .and_then(|c| c.get(path))
                        .ok_or_else(|| missing(&field, what))?;
                    scalar(v, &field, what)?
                }
                ValuePart::Body(path) => {
                    let field = format!("body.{}", path.join("."));
                    let mut v = self.json()?;
                    for key in path {
                        v = v.get(key).ok_or_else(|| missing(&field, what))?;
                    }
                    scalar(v, &field, what)?
                }
            };
            let name = part_name(part);
            if let Err(why) = target.check(&name, &value) {
                return Err(Problem::bad_request(format!(
                    "The value of `{name}` cannot go into {what}: {why}."
                ))
                .with_field(name.into_owned()));
            }
            out.push_str(&value);
        }
        if let Err(why) = target.check_whole(t, &out) {
            return Err(
                Problem::bad_request(format!("{} cannot be used: {why}.", capital(what)))
                    .with_field(target.field()),
            );
        }
        Ok(out)
    }
}

/// Fills a path rewrite template (`http.rewrite`) from the request's path captures, for the
/// upstream's request target. The captures come from the normalised path (no `.` or `..`
/// segments, no NUL, CR or LF); here each value must also hold no encoded `/` or `\` (`%2F`,
/// `%5C`, kept by `encoded_slash: keep`), which an upstream that decodes before routing would
/// take as a separator. A catch-all's value spans segments by design.
pub fn render_path(t: &Template, ctx: Option<&RequestContext>) -> Result<String, Problem> {
    let mut out = String::new();
    for part in &t.parts {
        match part {
            Part::Lit(l) => out.push_str(l),
            Part::Var(name) => {
                let v = ctx
                    .and_then(|c| c.param(name))
                    .ok_or(Problem::internal("a rewrite variable was not captured"))?;
                let lower = v.to_ascii_lowercase();
                if lower.contains("%2f") || lower.contains("%5c") || v.contains('\\') {
                    return Err(Problem::bad_request(format!(
                            "The value of `{name}` cannot go into the upstream path: it holds an encoded `/` or `\\`."
                        )).with_field(name.clone()));
                }
                if v.split('/').any(|seg| seg == "." || seg == "..") {
                    return Err(Problem::bad_request(format!(
                            "The value of `{name}` cannot go into the upstream path: it holds a dot segment."
                        )).with_field(name.clone()));
                }
                out.push_str(v);
            }
        }
    }
    Ok(out)
}

/// Percent-decodes `s` (with `+` as a space in a query); `None` when the bytes are not UTF-8.
/// Borrows `s` when there is nothing to decode.
fn decode(s: &str, plus: bool) -> Option<Cow<'_, str>> {
    if plus && s.contains('+') {
        let spaced = s.replace('+', " ");
        return percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .ok()
            .map(|c| Cow::Owned(c.into_owned()));
    }
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
}

/// The name of a template part that takes a request value, as written in the template
/// (borrowed for a path capture, the common case, so that a publish allocates nothing for it).
fn part_name(p: &ValuePart) -> Cow<'_, str> {
    match p {
        ValuePart::Lit(l) => Cow::Borrowed(l),
        ValuePart::Param(n) => Cow::Borrowed(n),
        ValuePart::Query(q) => Cow::Owned(format!("query.{q}")),
        ValuePart::Header(h) => Cow::Owned(format!("header.{h}")),
        ValuePart::Body(path) => Cow::Owned(format!("body.{}", path.join("."))),
        ValuePart::Claim(path) => Cow::Owned(format!("claims.{}", path.join("."))),
        ValuePart::ClientCert(f) => Cow::Owned(format!("client_cert.{f}")),
        ValuePart::Ctx(c) => Cow::Owned(format!("ctx.{c}")),
    }
}

/// A JSON value as a template's text: strings, numbers and booleans only.
fn scalar<'v>(v: &'v serde_json::Value, field: &str, what: &str) -> Result<Cow<'v, str>, Problem> {
    match v {
        serde_json::Value::String(s) => Ok(s.as_str().into()),
        serde_json::Value::Number(n) => Ok(n.to_string().into()),
        serde_json::Value::Bool(b) => Ok((if *b { "true" } else { "false" }).into()),
        _ => Err(Problem::bad_request(format!(
            "Field `{field}` must be a string, number or boolean for {what}."
        ))
        .with_field(field.to_string())),
    }
}

fn not_utf8(field: &str) -> Problem {
    Problem::bad_request(format!(
        "The value of `{field}` is not valid UTF-8 once percent-decoded."
    ))
    .with_field(field.to_string())
}

fn missing(field: &str, what: &str) -> Problem {
    Problem::bad_request(format!(
        "{} needs `{field}`, and the request has none.",
        capital(what)
    ))
    .with_field(field.to_string())
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(t: Target<'_>, v: &str) -> bool {
        t.check("v", v).is_ok()
    }

    #[test]
    fn each_target_refuses_what_would_change_its_meaning() {
        let none: &[String] = &[];
        let v = ["v".to_string()];
        for t in [
            Target::AmqpBindingKey,
            Target::AmqpRoutingKey { spans: none },
            Target::AmqpExchange { spans: none },
            Target::AmqpQueue { spans: none },
        ] {
            assert!(check(t, "eu-1_x"), "{t:?}");
            for bad in ["*", "#", "a.b", "", "a\u{1}", "\u{85}"] {
                assert!(!check(t, bad), "{t:?} {bad:?}");
            }
        }
        assert!(check(Target::AmqpRoutingKey { spans: &v }, "a.b"));
        assert!(!check(Target::AmqpRoutingKey { spans: &v }, "a..b"));
        assert!(!check(Target::AmqpRoutingKey { spans: &v }, "a.#"));
        for t in [
            Target::MqttTopic { spans: none },
            Target::MqttFilter { spans: none },
        ] {
            assert!(check(t, "kitchen é"), "{t:?}");
            for bad in [
                "+", "#", "a/b", "", "\u{0}", "\u{1b}", "\u{7f}", "\u{80}", "\u{9f}",
            ] {
                assert!(!check(t, bad), "{t:?} {bad:?}");
            }
        }
        assert!(check(Target::MqttTopic { spans: &v }, "a/b"));
        assert!(!check(Target::MqttTopic { spans: &v }, "a//b"));
        assert!(!check(Target::MqttTopic { spans: &v }, "/a"));
    }

    #[test]
    fn decoding_is_strict() {
        assert_eq!(decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(decode("%C3%A9", false).as_deref(), Some("é"));
        assert_eq!(decode("%FF", false), None);
        assert_eq!(decode("%FE", false), None);
    }
}
