//! The pure checks of the `grpc` bridge's config: its backend section, a route's settings and a
//! WebSocket route's, each problem placed at its line and column. Run at load time, before
//! anything is built; no I/O.

use http::{HeaderName, Uri};

use crate::config::model::*;
use crate::config::validate::{Checks, USERINFO_HTTP, has_userinfo};

/// Whether `method` reads `package.Service/Method`.
pub(crate) fn valid_grpc_method(method: &str) -> bool {
    method.split_once('/').is_some_and(|(svc, m)| {
        svc.contains('.')
            && !m.is_empty()
            && !m.contains(['/', '.'])
            && svc.split('.').all(|p| !p.is_empty())
    })
}

/// The checks of a `grpc` backend's section, at `base` (`backends.<name>`).
pub(crate) fn validate_grpc_backend(cx: &mut Checks, base: &str, g: &GrpcBackendSpec) {
    if g.endpoints.is_empty() {
        cx.err(
            base,
            None,
            "a grpc backend needs at least one entry in `endpoints`",
        );
    }
    let mut https = 0;
    for (i, ep) in g.endpoints.iter().enumerate() {
        match ep.parse::<Uri>() {
            Ok(u) if has_userinfo(&u) => cx.err(
                &format!("{base}.endpoints[{i}]"),
                None,
                USERINFO_HTTP,
            ),
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some() =>
            {
                https += usize::from(u.scheme_str() == Some("https"));
            }
            _ => cx.err(
                &format!("{base}.endpoints[{i}]"),
                None,
                format!("endpoint `{ep}` is not a URL like `http://127.0.0.1:50051` (or `https://` for TLS)"),
            ),
        }
    }
    if https > 0 && https < g.endpoints.len() {
        cx.err(
            &format!("{base}.endpoints"),
            None,
            "mix of `http://` and `https://` endpoints: one backend speaks either TLS or cleartext",
        );
    }
    if let Some(tls) = &g.tls {
        crate::backends::http::validate::validate_client_tls(
            cx,
            &format!("{base}.tls"),
            tls,
            https > 0,
        );
    }
    if g.protos.is_empty() && g.descriptor_set.is_none() && !g.reflection {
        cx.err(
            base,
            None,
            "a grpc backend needs its descriptors: list `.proto` files under `protos`, give a `descriptor_set`, or set `reflection: true`",
        );
    }
}

/// The checks of a route's `grpc:` settings, at `base` (`routes[i]`).
pub(crate) fn validate_grpc_route(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    g: &GrpcRouteSpec,
) {
    if !valid_grpc_method(&g.method) {
        cx.err(
            &format!("{base}.grpc.method"),
            id,
            format!(
                "`{}` is not a method name like `package.Service/Method`",
                g.method
            ),
        );
    }
    for (i, h) in g.metadata_headers.iter().enumerate() {
        let lower = h.to_ascii_lowercase();
        if HeaderName::from_bytes(h.as_bytes()).is_err()
            || lower.starts_with("grpc-")
            || matches!(
                lower.as_str(),
                "te" | "content-type" | "host" | "connection"
            )
        {
            cx.err(
                &format!("{base}.grpc.metadata_headers[{i}]"),
                id,
                format!("`{h}` cannot be forwarded as gRPC metadata; name an application header"),
            );
        }
    }
    if let Some(b) = &g.body
        && b != "*"
        && !b.is_empty()
        && !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
    {
        cx.err(
            &format!("{base}.grpc.body"),
            id,
            "`body` is `\"*\"`, a top-level field name, or `\"\"` for none",
        );
    }
}
