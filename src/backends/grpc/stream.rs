//! Server-streaming replies for HTTP clients: each gRPC message is written as soon as it arrives,
//! as NDJSON, Server-Sent Events or a JSON array, chosen by the request's `Accept` header. The
//! HTTP status goes out with the first message, so a status before it is a normal error answer
//! (the caller's); a status that ends the stream after it is written as a final error item.

use bytes::Bytes;
use http::HeaderValue;
use http::header;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost_reflect::DynamicMessage;
use tonic::Streaming;

use super::{status, transcode};
use crate::{BodyError, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/x-ndjson`: one JSON document per line.
    Ndjson,
    /// `text/event-stream`: one `data:` event per message.
    Sse,
    /// `application/json` (the default): one JSON array, streamed element by element.
    JsonArray,
}

impl Format {
    pub fn from_accept(accept: Option<&HeaderValue>) -> Format {
        let accept = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
        if accept.contains("text/event-stream") {
            Format::Sse
        } else if accept.contains("application/x-ndjson") {
            Format::Ndjson
        } else {
            Format::JsonArray
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Sse => "text/event-stream",
            Format::JsonArray => "application/json",
        }
    }
}

struct State {
    messages: Streaming<DynamicMessage>,
    /// The first message, read before the answer started; `None` once written.
    first: Option<DynamicMessage>,
    format: Format,
    started: bool,
    finished: bool,
    opts: transcode::Options,
}

impl State {
    /// Wraps one JSON document for the format.
    fn item(&mut self, json: &[u8], event: Option<&str>) -> Bytes {
        let mut out = Vec::with_capacity(json.len() + 16);
        match self.format {
            Format::Ndjson => {
                out.extend_from_slice(json);
                out.push(b'\n');
            }
            Format::Sse => {
                self.started = true;
                return crate::server::sse::Event {
                    name: event,
                    data: json,
                    ..Default::default()
                }
                .to_bytes();
            }
            Format::JsonArray => {
                out.push(if self.started { b',' } else { b'[' });
                out.extend_from_slice(json);
            }
        }
        self.started = true;
        Bytes::from(out)
    }

    fn end(&mut self) -> Option<Bytes> {
        self.finished = true;
        match self.format {
            Format::JsonArray if self.started => Some(Bytes::from_static(b"]")),
            Format::JsonArray => Some(Bytes::from_static(b"[]")),
            _ => None,
        }
    }
}

/// The streaming HTTP response for a server-streaming call whose `first` message has been read
/// (`None`: the stream ended, OK, before any).
pub fn response(
    messages: Streaming<DynamicMessage>,
    first: Option<DynamicMessage>,
    format: Format,
    opts: transcode::Options,
) -> Response {
    let state = State {
        finished: false,
        messages,
        first,
        format,
        started: false,
        opts,
    };
    let frames = futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let next = match st.first.take() {
            Some(m) => Ok(Some(m)),
            None => st.messages.message().await,
        };
        let bytes = match next {
            Ok(Some(msg)) => match transcode::message_to_json(&msg, &st.opts) {
                Ok(json) => st.item(&json, None),
                Err(_) => {
                    let err = serde_json::json!({ "error": { "message": "a message could not be written as JSON" } });
                    let mut b = st.item(err.to_string().as_bytes(), Some("error")).to_vec();
                    b.extend_from_slice(&st.end().unwrap_or_default());
                    Bytes::from(b)
                }
            },
            Ok(None) => st.end()?,
            Err(s) => {
                let err = serde_json::json!({ "error": {
                    "grpc_code": s.code() as i32,
                    "grpc_status": status::code_name(s.code()),
                    "message": s.message(),
                }});
                let mut b = st.item(err.to_string().as_bytes(), Some("error")).to_vec();
                b.extend_from_slice(&st.end().unwrap_or_default());
                Bytes::from(b)
            }
        };
        Some((Ok::<_, BodyError>(Frame::data(bytes)), st))
    });
    let mut r = http::Response::new(StreamBody::new(frames).boxed_unsync());
    match format {
        Format::Sse => crate::server::sse::set_headers(r.headers_mut()),
        _ => {
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
        }
    }
    r
}
