//! The WebSocket ↔ gRPC bridge, the bottom of a WebSocket route to a `grpc` backend: one call
//! per connection to the route's method, one JSON text frame per protobuf message each way,
//! with the descriptors and proto3 JSON mapping of the gRPC bridge.
//!
//! Unary and server-streaming methods take the first client frame as their request. Client-
//! and bidirectional-streaming methods take every frame until the client ends its side with an
//! empty binary frame or the text frame `{"op":"end"}`. A frame that does not fit the request
//! message answers an `error` frame naming the field and is not sent. When the call ends, a
//! final `{"op":"status", "code", "status", "message"}` frame says how, and the socket closes:
//! 1000 for OK, 1008 for PERMISSION_DENIED and UNAUTHENTICATED, 1011 otherwise. A client that
//! goes away first cancels the call (the request stream never ends on its own). Both
//! directions are bounded: requests wait in a queue of `inflight` messages (the socket is not
//! read while it is full), and replies are read from the call only as fast as the client
//! takes them, so HTTP/2 flow control holds the server back.

use std::sync::Arc;

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::Code;

use crate::backends::grpc::{GrpcBackend, codec, status, transcode};
use crate::backends::websocket::{Ending, Inbound, Link, Session, close, error_frame};
use crate::config::WsGrpcSpec;
use crate::error::Problem;

/// The largest reply frame: a 4 MiB message (tonic's decoding limit) can grow as JSON, and
/// the socket's write buffer holds twice that.
const MAX_REPLY_FRAME: usize = 8 << 20;

/// A route's gRPC bridge settings, compiled at load.
pub struct GrpcBridge {
    backend: Arc<GrpcBackend>,
    method: MethodDescriptor,
    path: PathAndQuery,
    opts: transcode::Options,
}

impl GrpcBridge {
    pub fn new(backend: Arc<GrpcBackend>, spec: &WsGrpcSpec) -> Result<Self, String> {
        let method = backend.method(&spec.method)?;
        let path = format!("/{}/{}", method.parent_service().full_name(), method.name())
            .parse()
            .map_err(|e| format!("method path: {e}"))?;
        Ok(GrpcBridge {
            method,
            path,
            opts: transcode::Options::for_route(
                spec.emit_defaults,
                spec.proto_names,
                Default::default(),
                backend.transcoding,
            ),
            backend,
        })
    }

    /// The session's call, on the backend's one connection stack (the transport its HTTP
    /// routes use). A backend none of whose endpoints accepts a connection is refused before
    /// the handshake is answered (503), so a 101 means the call can start; the metadata
    /// (correlation ID, trace context) comes from the handshake.
    pub async fn prepare(&self, parts: &http::request::Parts) -> Result<Session, Problem> {
        if !self.backend.reachable_now().await {
            return Err(Problem::backend_unavailable(
                self.backend.name(),
                "cannot connect to the backend",
            ));
        }
        let grpc = tonic::client::Grpc::new(self.backend.transport());
        let mut metadata = tonic::metadata::MetadataMap::new();
        for name in ["x-request-id", "traceparent"] {
            if let Some(v) = parts.headers.get(name)
                && let Ok(v) = tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes())
            {
                metadata.insert(name, v);
            }
        }
        Ok(Session::Grpc(Box::new(GrpcSession {
            grpc,
            method: self.method.clone(),
            path: self.path.clone(),
            metadata,
            opts: self.opts,
        })))
    }
}

/// What the session hands the call's request stream.
enum Req {
    Message(DynamicMessage),
    /// The client ended its side.
    End,
}

/// The call's request messages. The stream ends only on the client's explicit end; when the
/// session stops without one (the client went away), it stays pending, so the call is
/// cancelled (reset) as it is dropped and the server never sees a short stream that looks
/// complete.
fn requests(
    rx: mpsc::Receiver<Req>,
) -> impl futures_util::Stream<Item = DynamicMessage> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Req::Message(m)) => Some((m, rx)),
            Some(Req::End) => None,
            None => std::future::pending().await,
        }
    })
}

/// One connection's call.
pub struct GrpcSession {
    grpc: tonic::client::Grpc<super::transport::Transport>,
    method: MethodDescriptor,
    path: PathAndQuery,
    metadata: tonic::metadata::MetadataMap,
    opts: transcode::Options,
}

/// The final frame and the close for a call's status.
fn status_ending(code: Code, message: &str) -> (Value, Ending) {
    let name = status::code_name(code);
    let frame = serde_json::json!({
        "op": "status",
        "code": code as i32,
        "status": name,
        "message": message,
    });
    let close_code = match code {
        Code::Ok => close::NORMAL,
        Code::PermissionDenied | Code::Unauthenticated => close::POLICY,
        _ => close::INTERNAL,
    };
    (frame, Ending::new(close_code, name))
}

/// Whether a client frame ends the client's side of the call.
fn is_end(inbound: &Inbound) -> bool {
    match inbound {
        Inbound::Binary(b) => b.is_empty(),
        Inbound::Text(t) => {
            serde_json::from_str::<Value>(t).is_ok_and(|v| v == serde_json::json!({ "op": "end" }))
        }
        Inbound::End(_) => false,
    }
}

impl GrpcSession {
    pub async fn run(self, mut link: Link) -> Option<Ending> {
        let GrpcSession {
            mut grpc,
            method,
            path,
            metadata,
            opts,
        } = self;
        let single = !method.is_client_streaming();
        let (tx, rx) = mpsc::channel::<Req>(link.settings.inflight);
        let mut tx = Some(tx);
        let mut request = tonic::Request::new(requests(rx));
        *request.metadata_mut() = metadata;
        let codec = codec::DynamicCodec::new(method.output());
        let call = grpc.streaming(request, path, codec);
        tokio::pin!(call);
        let mut replies: Option<tonic::Streaming<DynamicMessage>> = None;
        let finish = |code: Code, message: &str| status_ending(code, message);
        let (frame, ending) = loop {
            // After the requests ended, frames are still read: a close, or a frame too many.
            let room = tx.as_ref().is_none_or(|t| t.capacity() > 0);
            tokio::select! {
                r = &mut call, if replies.is_none() => match r {
                    Ok(resp) => replies = Some(resp.into_inner()),
                    Err(s) => break finish(s.code(), s.message()),
                },
                m = async { replies.as_mut()?.next().await }, if replies.is_some() => match m {
                    Some(Ok(msg)) => {
                        let json = match transcode::message_to_json(&msg, &opts) {
                            Ok(j) => j,
                            Err(e) => break finish(Code::Internal, &format!("the reply could not be written as JSON: {e}")),
                        };
                        if json.len() > MAX_REPLY_FRAME {
                            break finish(Code::ResourceExhausted, "a reply is too large for one WebSocket frame");
                        }
                        let text = String::from_utf8(json).unwrap_or_default();
                        if !link.send(tokio_tungstenite::tungstenite::Message::text(text)).await {
                            return None;
                        }
                    }
                    Some(Err(s)) => break finish(s.code(), s.message()),
                    None => break finish(Code::Ok, ""),
                },
                inbound = link.recv(room) => {
                    if let Inbound::End(end) = inbound {
                        // Dropping the call cancels it on the server.
                        return end;
                    }
                    if is_end(&inbound) {
                        // Half-close: the server sees the end of the requests.
                        if let Some(t) = tx.take() {
                            let _ = t.send(Req::End).await;
                        }
                        continue;
                    }
                    let text = match inbound {
                        Inbound::Text(t) => t,
                        _ => {
                            let f = error_frame(
                                "bad-frame",
                                "Send each request message as a JSON text frame (an empty binary frame ends the requests).",
                                None,
                                None,
                            );
                            if !link.send_json(&f).await {
                                return None;
                            }
                            continue;
                        }
                    };
                    let Some(sender) = &tx else {
                        let f = error_frame(
                            "bad-frame",
                            "The requests have ended; this call takes no more messages.",
                            None,
                            None,
                        );
                        if !link.send_json(&f).await {
                            return None;
                        }
                        continue;
                    };
                    match transcode::message_from_json(method.input(), text.as_bytes(), &opts) {
                        Ok(msg) => {
                            // Room was checked before reading; the call may have ended meanwhile.
                            let _ = sender.send(Req::Message(msg)).await;
                            if single {
                                let _ = sender.send(Req::End).await;
                                tx = None;
                            }
                        }
                        Err(e) => {
                            let g = Problem::bad_request(format!("The frame does not fit `{}`: {}", method.input().full_name(), e.message)).with_optional_field((!e.field.is_empty()).then(|| e.field.clone()));
                            let f = crate::backends::websocket::gateway_error_frame(&g, None);
                            if !link.send_json(&f).await {
                                return None;
                            }
                        }
                    }
                }
            }
        };
        if !link.send_json(&frame).await {
            return None;
        }
        Some(ending)
    }
}
