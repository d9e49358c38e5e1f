//! WebSocket pass-through, the bottom of a WebSocket route to an `http` backend: the gateway
//! opens a WebSocket to the chosen endpoint (same path rewrite, `X-Forwarded-*` and endpoint
//! choice as plain requests) before answering the client, then relays frames both ways.
//!
//! The upstream's answer decides the handshake: its chosen subprotocol goes back to the client,
//! and a refusal (any status but 101) is relayed as it came. Each direction is its own loop, so
//! a peer that is slow to read holds up only the frames going to it; both are bounded (the
//! queue towards the client, TCP towards the upstream). The upstream's close code reaches the
//! client; an upstream that fails or vanishes closes the client with 1011.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::either::Either;

use crate::backends::http::{HttpBackend, HttpRouteService, strip_hop_by_hop};
use crate::backends::websocket::{Ending, Inbound, Link, Session, WsSettings, close};
use crate::config::HttpProtocol;
use crate::error::Problem;
use crate::{Response, full_body};

/// The upstream WebSocket: over TCP to `http://` endpoints, over TLS to `https://` ones.
type Upstream = WebSocketStream<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>;

/// Where opening the upstream WebSocket stopped.
enum Failed {
    /// No TCP connection.
    Connect(std::io::Error),
    /// The TLS handshake failed.
    Tls(std::io::Error),
    /// The WebSocket handshake failed.
    Ws(WsError),
}

/// A route's pass-through settings: the HTTP route service that knows the path rewrite and
/// the endpoints.
pub struct UpstreamBridge {
    route: HttpRouteService,
}

/// What the upstream said to the handshake.
pub enum Opened {
    /// Connected: the session and the subprotocol the upstream chose.
    Open(Box<Session>, Option<String>),
    /// Refused: its answer, to relay to the client.
    Refused(Response),
}

impl UpstreamBridge {
    pub fn new(route: HttpRouteService) -> Self {
        UpstreamBridge { route }
    }

    fn backend(&self) -> &Arc<HttpBackend> {
        self.route.backend()
    }

    /// Opens the WebSocket to an endpoint, within the backend's connect timeout.
    pub async fn open(
        &self,
        parts: &http::request::Parts,
        settings: &WsSettings,
    ) -> Result<Opened, Problem> {
        let mut out = http::Request::new(());
        *out.uri_mut() = parts.uri.clone();
        *out.headers_mut() = parts.headers.clone();
        if let Some(ctx) = parts
            .extensions
            .get::<crate::middleware::context::RequestContext>()
        {
            out.extensions_mut().insert(ctx.clone());
        }
        let (mut up, ()) = out.into_parts();
        let i = self.route.prepare(&mut up, HttpProtocol::Http1)?;
        // The upstream handshake is the gateway's own; only the offered subprotocols pass.
        for h in [
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_ACCEPT,
        ] {
            up.headers.remove(h);
        }
        let h = &mut up.headers;
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).map_err(|_| Problem::internal("websocket key"))?,
        );
        let target = up.uri.authority().map(|a| {
            let secure = up.uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let host = a.host().trim_start_matches('[').trim_end_matches(']');
            (
                secure,
                host.to_string(),
                a.port_u16().unwrap_or(if secure { 443 } else { 80 }),
            )
        });
        let Some((secure, host, port)) = target else {
            return Err(Problem::internal("an endpoint without a host"));
        };
        let uri = up.uri.to_string();
        let ws_uri = match uri.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}"),
            Some(("https", rest)) => format!("wss://{rest}"),
            _ => return Err(Problem::internal("an endpoint without a scheme")),
        };
        up.uri = ws_uri
            .parse()
            .map_err(|_| Problem::bad_request("the request path cannot be forwarded"))?;
        let req = http::Request::from_parts(up, ());
        let backend = self.backend();
        let config = settings.config;
        let connect = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(Failed::Connect)?;
            let _ = tcp.set_nodelay(true);
            let stream = match (secure, backend.ws_tls()) {
                (true, Some(tls)) => {
                    Either::Right(tls.connect(&host, tcp).await.map_err(Failed::Tls)?)
                }
                _ => Either::Left(tcp),
            };
            tokio_tungstenite::client_async_with_config(req, stream, Some(config))
                .await
                .map_err(Failed::Ws)
        };
        let unavailable = |reason, source: Option<crate::BoxError>| {
            let p = Problem::backend_unavailable(backend.name(), reason)
                .with_retry_after(backend.eject_for().as_secs().max(1));
            match source {
                Some(e) => p.with_source(e),
                None => p,
            }
        };
        match tokio::time::timeout(backend.connect_timeout(), connect).await {
            Ok(Ok((ws, resp))) => {
                backend.record(i, true);
                backend.tls_ok(i);
                let protocol = resp
                    .headers()
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok(Opened::Open(
                    Box::new(Session::Upstream(Box::new(UpstreamSession { ws }))),
                    protocol,
                ))
            }
            Ok(Err(Failed::Connect(e) | Failed::Tls(e) | Failed::Ws(WsError::Io(e)))) => {
                Err(backend.connect_failed(i, Box::new(e)))
            }
            // A success that is not a 101 is not a WebSocket server; relayed, it would tell an
            // HTTP/2 client that its stream is open.
            Ok(Err(Failed::Ws(WsError::Http(resp)))) if resp.status().as_u16() < 300 => {
                backend.record(i, false);
                Err(Problem::bad_gateway(
                    backend.name(),
                    "the upstream answered the WebSocket handshake without upgrading",
                ))
            }
            Ok(Err(Failed::Ws(WsError::Http(resp)))) => {
                backend.record(i, !resp.status().is_server_error());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.remove(header::CONTENT_LENGTH);
                Ok(Opened::Refused(http::Response::from_parts(
                    parts,
                    full_body(body.unwrap_or_default()),
                )))
            }
            Ok(Err(Failed::Ws(e))) => {
                backend.record(i, false);
                Err(
                    Problem::bad_gateway(backend.name(), "the upstream WebSocket handshake failed")
                        .with_source(e),
                )
            }
            Err(_) => {
                backend.record(i, false);
                Err(unavailable(
                    "the upstream did not complete the WebSocket handshake in time",
                    None,
                ))
            }
        }
    }
}

/// One connection's upstream side.
pub struct UpstreamSession {
    ws: Upstream,
}

/// The close code to pass on from a close frame; codes that may not be sent (1005, 1006,
/// 1015) become 1000.
fn passable(frame: Option<&CloseFrame>) -> Ending {
    match frame {
        Some(f) => {
            let code = u16::from(f.code);
            let code = if matches!(code, 1005 | 1006 | 1015) {
                close::NORMAL
            } else {
                code
            };
            Ending::new(code, f.reason.as_str())
        }
        None => Ending::new(close::NORMAL, ""),
    }
}

impl UpstreamSession {
    pub async fn run(self, mut link: Link) -> Option<Ending> {
        let (mut tx, mut rx) = self.ws.split();
        let towards_client = link.sender();
        let limit = link.settings.write_timeout;
        let downstream = async {
            loop {
                match rx.next().await {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        if !towards_client.send(m).await {
                            return None;
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        // Reading on sends tungstenite's close reply to the upstream.
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.next())
                            .await;
                        return Some(passable(f.as_ref()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "The upstream WebSocket failed.");
                        return Some(Ending::new(
                            close::INTERNAL,
                            "the upstream WebSocket failed",
                        ));
                    }
                    None => {
                        return Some(Ending::new(
                            close::INTERNAL,
                            "the upstream WebSocket closed without a close frame",
                        ));
                    }
                }
            }
        };
        let upstream = async {
            loop {
                let m = match link.recv(true).await {
                    Inbound::Text(t) => Message::Text(t),
                    Inbound::Binary(b) => Message::Binary(b),
                    Inbound::End(end) => return (true, end),
                };
                // An upstream that takes nothing for the write timeout is given up on, so the
                // client's close, idling and shutdown are heard again.
                let sent = tokio::time::timeout(limit, tx.send(m)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return (
                        false,
                        Some(Ending::new(
                            close::INTERNAL,
                            "the upstream WebSocket failed",
                        )),
                    );
                }
            }
        };
        let (client_ended, end) = tokio::select! {
            end = downstream => (false, end),
            (client, end) = upstream => (client, end),
        };
        if client_ended {
            // The client closed (with its own code), broke a rule, idled or the gateway is
            // stopping: the upstream hears the same code.
            let peer = link.peer_code.load(std::sync::atomic::Ordering::Relaxed);
            let frame = match &end {
                Some(e) => CloseFrame {
                    code: CloseCode::from(e.code),
                    reason: e.reason.clone().into(),
                },
                None => CloseFrame {
                    code: CloseCode::from(if matches!(peer, 0 | 1005 | 1006 | 1015) {
                        close::NORMAL
                    } else {
                        peer
                    }),
                    reason: "".into(),
                },
            };
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tx.send(Message::Close(Some(frame))),
            )
            .await;
        }
        end
    }
}
