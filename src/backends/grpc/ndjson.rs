//! Client-streaming requests from HTTP clients: an NDJSON request body (one JSON document per
//! line) becomes the stream of request messages of a client-streaming gRPC call, each message
//! sent as soon as its line has arrived. A line that does not fit the message, or a body that
//! fails (too large, client gone), is reported through a one-shot channel; the caller then drops
//! the call, which cancels the gRPC stream, so the server never sees a half request as complete.

use bytes::BytesMut;
use futures_core::Stream;
use http_body_util::BodyExt;
use prost_reflect::DynamicMessage;
use tokio::sync::oneshot;

use crate::{Body, BodyError, BoxError};

/// Parses one line into a message; errors name the field.
pub type LineParser =
    Box<dyn Fn(&[u8]) -> Result<DynamicMessage, BoxError> + Send + Sync + 'static>;

struct State {
    body: Body,
    buf: BytesMut,
    line: usize,
    done: bool,
    parse: LineParser,
    failed: Option<oneshot::Sender<BoxError>>,
}

impl State {
    /// The next complete line from the buffer (without its newline), or the rest at the end.
    fn next_line(&mut self) -> Option<BytesMut> {
        if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line = self.buf.split_to(i + 1);
            line.truncate(i);
            return Some(line);
        }
        (self.done && !self.buf.is_empty()).then(|| self.buf.split())
    }

    fn fail(&mut self, e: BoxError) {
        if let Some(tx) = self.failed.take() {
            let _ = tx.send(e);
        }
    }
}

/// The request messages of `body`, one per non-blank line. On the first failure the error goes
/// to `failed` and the stream stays pending forever: it must not end as if complete.
pub fn messages(
    body: Body,
    parse: LineParser,
    failed: oneshot::Sender<BoxError>,
) -> impl Stream<Item = DynamicMessage> + Send + 'static {
    let state = State {
        body,
        buf: BytesMut::new(),
        line: 0,
        done: false,
        parse,
        failed: Some(failed),
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.next_line() {
                st.line += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match (st.parse)(&line) {
                    Ok(msg) => return Some((msg, st)),
                    Err(e) => {
                        let line_no = st.line;
                        st.fail(at_line(e, line_no));
                        return std::future::pending().await;
                    }
                }
            }
            if st.done {
                return None;
            }
            match st.body.frame().await {
                None => st.done = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        st.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    st.fail(Box::new(e as BodyError));
                    return std::future::pending().await;
                }
            }
        }
    })
}

/// Prefixes a bad-request detail with the NDJSON line it came from.
fn at_line(e: BoxError, line: usize) -> BoxError {
    match e.downcast::<crate::error::Problem>() {
        Ok(mut p) if p.kind == crate::error::Kind::BAD_REQUEST => {
            p.detail = format!("Line {line}: {}", p.detail);
            p
        }
        Ok(p) => p,
        Err(e) => e,
    }
}
