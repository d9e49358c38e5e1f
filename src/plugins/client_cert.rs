//! The `client_cert` plugin: admits a request only when its connection presented a client
//! certificate (mutual TLS, `server.tls.client_auth`) whose subject or SANs the route allows.
//! Sits in a route's plugin chain before the middleware (a refusal never reaches the backend,
//! its breaker or its rate limit); on WebSocket routes before the upgrade. The certificate was
//! verified against the CA bundle by the TLS handshake; this decides which of those clients
//! the route serves.

use std::sync::Arc;

use serde::Deserialize;

use super::Guard;
use crate::error::Problem;
use crate::middleware::context::RequestContext;
use crate::server::client_cert::ClientCert;
use crate::{Request, ResponseFuture, RouteService, fail};

pub struct ClientCertPlugin;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientCertConfig {
    /// Allowed subjects, each a list of attributes the subject must hold (`CN=svc-a,O=Acme`).
    #[serde(default)]
    subjects: Vec<String>,
    /// Allowed SANs (DNS names, URIs such as SPIFFE IDs, e-mail addresses, IP addresses).
    #[serde(default)]
    sans: Vec<String>,
}

pub struct Compiled {
    subjects: Vec<Vec<(String, String)>>,
    sans: Vec<String>,
}

/// `CN=svc-a,O=Acme` as (attribute, value) pairs; `\,` escapes a comma in a value.
fn attributes(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ',' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .filter(|(k, v)| !k.trim().is_empty() && !v.is_empty())
                .ok_or_else(|| format!("`{s}` is not a subject like `CN=svc-a,O=Acme`"))?;
            Ok((k.trim().to_ascii_uppercase(), v.trim().to_string()))
        })
        .collect()
}

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: ClientCertConfig = serde_json::from_value(config.clone()).map_err(|e| {
        format!("{e}; write `client_cert: {{ subjects: [\"CN=svc-a,O=Acme\"], sans: [\"spiffe://acme/svc-a\"] }}`, or `client_cert: {{}}` for any verified certificate")
    })?;
    Ok(Compiled {
        subjects: cfg
            .subjects
            .iter()
            .enumerate()
            .map(|(i, s)| attributes(s).map_err(|e| format!("subjects[{i}]: {e}")))
            .collect::<Result<_, _>>()?,
        sans: cfg.sans,
    })
}

impl Compiled {
    /// Whether the route serves `cert`: any verified certificate when no list is set, else one
    /// whose subject holds every attribute of an allowed subject, or that carries an allowed
    /// SAN.
    fn admits(&self, cert: &ClientCert) -> bool {
        if self.subjects.is_empty() && self.sans.is_empty() {
            return true;
        }
        self.subjects.iter().any(|wanted| {
            wanted.iter().all(|(k, v)| {
                cert.attributes
                    .iter()
                    .any(|(ck, cv)| ck.eq_ignore_ascii_case(k) && cv == v)
            })
        }) || cert.sans().any(|s| self.sans.iter().any(|a| a == s))
    }
}

impl Guard for ClientCertPlugin {
    const NAME: &'static str = "client_cert";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let cert = req
            .extensions()
            .get::<RequestContext>()
            .and_then(|ctx| ctx.client_cert.clone());
        match cert {
            None => fail(
                Problem::forbidden(
                    "This route needs a client certificate (mutual TLS); connect with one.",
                )
                .with_field("tls.client_certificate"),
            ),
            Some(cert) if !c.admits(&cert) => fail(
                Problem::forbidden(format!(
                    "The client certificate `{}` may not use this route.",
                    cert.subject
                ))
                .with_field("tls.client_certificate"),
            ),
            Some(_) => Box::pin(inner.clone().oneshot(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_attribute_lists() {
        assert_eq!(
            attributes("CN=svc-a, o=Acme\\, Inc").unwrap(),
            [
                ("CN".to_string(), "svc-a".to_string()),
                ("O".to_string(), "Acme, Inc".to_string())
            ]
        );
        assert!(attributes("svc-a").is_err());
        assert!(attributes("CN=").is_err());
    }
}
