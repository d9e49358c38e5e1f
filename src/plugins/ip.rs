//! The `ip` plugin: admits a request by the client's address, in a route's plugin chain before
//! the middleware (a refusal never reaches the backend, its breaker or its rate limit); on
//! WebSocket routes before the upgrade.
//!
//! The client's address is the connection's peer, unless the peer is one of
//! `trusted_proxies`: then `X-Forwarded-For` is read from the right, past every trusted proxy,
//! and the first address that is not one is the client (what a client writes into the header
//! itself is never believed, since it sits left of the addresses the proxies appended). A
//! `deny` entry wins over an `allow` entry; with `allow` set, only the addresses it holds pass.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use super::Guard;
use crate::error::Problem;
use crate::middleware::context::RequestContext;
use crate::{Request, ResponseFuture, RouteService, fail};

pub struct IpPlugin;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpConfig {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

const USAGE: &str = "write `ip: { allow: [\"10.0.0.0/8\"] }` or `ip: { deny: [\"192.0.2.0/24\"] }` (addresses or CIDR blocks), optionally with `trusted_proxies`";

/// Addresses and blocks, as written (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`).
#[derive(Debug, Default)]
struct Nets(Vec<IpNet>);

impl Nets {
    fn parse(list: &[String], key: &str) -> Result<Nets, String> {
        list.iter()
            .enumerate()
            .map(|(i, s)| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        format!(
                            "{key}[{i}]: `{s}` is not an address or a CIDR block like `10.0.0.0/8`"
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Nets)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }
}

pub struct Compiled {
    allow: Nets,
    deny: Nets,
    trusted: Nets,
}

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: IpConfig =
        serde_json::from_value(config.clone()).map_err(|e| format!("{e}; {USAGE}"))?;
    if cfg.allow.is_empty() && cfg.deny.is_empty() {
        return Err(format!(
            "neither `allow` nor `deny` lists an address; {USAGE}"
        ));
    }
    Ok(Compiled {
        allow: Nets::parse(&cfg.allow, "allow")?,
        deny: Nets::parse(&cfg.deny, "deny")?,
        trusted: Nets::parse(&cfg.trusted_proxies, "trusted_proxies")?,
    })
}

impl Compiled {
    /// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    /// address of `X-Forwarded-For` that is not one (the proxy itself when it sent none).
    /// `None` when a hop to read is not an address: nobody can be judged.
    fn client(&self, peer: IpAddr, headers: &http::HeaderMap) -> Option<IpAddr> {
        let mut client = peer.to_canonical();
        if !self.trusted.contains(client) {
            return Some(client);
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.into_iter().rev() {
            client = hop.trim().parse::<IpAddr>().ok()?.to_canonical();
            if !self.trusted.contains(client) {
                break;
            }
        }
        Some(client)
    }

    fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.0.is_empty() || self.allow.contains(ip))
    }
}

impl Guard for IpPlugin {
    const NAME: &'static str = "ip";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let Some(peer) = req
            .extensions()
            .get::<RequestContext>()
            .map(|c| c.client_addr.ip())
        else {
            return fail(Problem::internal("the request has no client address"));
        };
        let Some(client) = c.client(peer, req.headers()) else {
            return fail(
                Problem::forbidden(
                    "X-Forwarded-For holds a hop that is not an address; the client cannot be told.",
                )
                .with_field("header.x-forwarded-for"),
            );
        };
        if c.admits(client) {
            Box::pin(inner.clone().oneshot(req))
        } else {
            fail(Problem::forbidden(format!(
                "The address {client} may not use this route."
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(v: serde_json::Value) -> Compiled {
        compile(&v).unwrap()
    }

    fn xff(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let c = compiled(serde_json::json!({
            "allow": ["10.0.0.0/8"],
            "trusted_proxies": ["127.0.0.1", "192.168.0.0/16"],
        }));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // A client behind two trusted proxies; what it wrote itself (left) is ignored.
        let h = xff("10.9.9.9, 203.0.113.5, 192.168.1.1");
        assert_eq!(c.client(ip("127.0.0.1"), &h), Some(ip("203.0.113.5")));
        // An untrusted peer is the client, whatever the header says.
        assert_eq!(
            c.client(ip("198.51.100.1"), &xff("10.1.1.1")),
            Some(ip("198.51.100.1"))
        );
        // IPv4-mapped IPv6 peers are their IPv4 address.
        assert_eq!(
            c.client(ip("::ffff:127.0.0.1"), &xff("10.1.1.1")),
            Some(ip("10.1.1.1"))
        );
        // A hop that is not an address: nobody to judge.
        assert_eq!(
            c.client(ip("127.0.0.1"), &xff("10.1.1.1, junk, 192.168.1.1")),
            None
        );
        // A trusted proxy that sent no header is the client itself.
        assert_eq!(
            c.client(ip("127.0.0.1"), &http::HeaderMap::new()),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let c = compiled(serde_json::json!({ "allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"] }));
        assert!(c.admits("10.2.3.4".parse().unwrap()));
        assert!(!c.admits("10.1.3.4".parse().unwrap()));
        assert!(!c.admits("11.0.0.1".parse().unwrap()));
        let d = compiled(serde_json::json!({ "deny": ["2001:db8::/32"] }));
        assert!(!d.admits("2001:db8::1".parse().unwrap()));
        assert!(d.admits("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn entries_that_are_not_addresses_are_refused() {
        for bad in [
            serde_json::json!({}),
            serde_json::json!({ "allow": ["10.0.0.0/33"] }),
            serde_json::json!({ "deny": ["example.com"] }),
            serde_json::json!({ "allow": ["10.0.0.1"], "trusted_proxies": ["x"] }),
        ] {
            assert!(compile(&bad).is_err(), "{bad}");
        }
    }
}
