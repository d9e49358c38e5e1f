//! The request-body wrapper, applied by the front end to every request body before the route's
//! stack sees it: a body that grows past the route's limit fails with `PayloadLimit` (413), a
//! body the client cut or framed wrongly with `ClientBody` (400, the client's fault), and the
//! end of the body is recorded in [`BodyProgress`] for the timeout layers. Also the one wrapper
//! of response bodies: [`DrainingSse`] ends event streams when the gateway shuts down.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::error::{ClientBody, PayloadLimit};
use crate::middleware::context::BodyProgress;
use crate::{BodyError, BoxError};

/// The client's body `B` (hyper's `Incoming`), counted as it streams.
pub struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    progress: Option<BodyProgress>,
}

impl<B> LimitedBody<B> {
    /// `progress` is marked finished once the body has ended (or failed).
    pub fn new(inner: B, limit: u64, progress: Option<BodyProgress>) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
            limit,
            progress,
        }
    }

    fn finish(&mut self) {
        if let Some(p) = self.progress.take() {
            p.finish(self.limit - self.remaining);
        }
    }
}

impl<B> HttpBody for LimitedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let len = d.len() as u64;
                    if len > this.remaining {
                        this.remaining = 0;
                        this.finish();
                        return Poll::Ready(Some(Err(BodyError::new(PayloadLimit(this.limit)))));
                    }
                    this.remaining -= len;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Only the client's connection feeds this body: its failure is the client's.
                this.finish();
                Poll::Ready(Some(Err(BodyError::new(ClientBody::Malformed(e.into())))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A Server-Sent Events answer that ends when the gateway shuts down: a final
    /// `event: shutdown` is sent and the stream ends, so a rolling deploy does not wait the whole
    /// grace period for clients that would listen for ever. Clients reconnect (to another
    /// replica) as the event asks.
    pub struct DrainingSse<B> {
        #[pin]
        inner: B,
        #[pin]
        shutdown: tokio_util::sync::WaitForCancellationFutureOwned,
        done: bool,
    }
}

impl<B> DrainingSse<B> {
    pub fn new(inner: B, shutdown: tokio_util::sync::CancellationToken) -> Self {
        DrainingSse {
            inner,
            shutdown: shutdown.cancelled_owned(),
            done: false,
        }
    }
}

/// The last event of a stream the gateway ends because it shuts down.
fn shutdown_event() -> Bytes {
    super::sse::Event {
        name: Some("shutdown"),
        data: br#"{"reason":"the gateway is shutting down; reconnect"}"#,
        retry_ms: Some(1000),
        ..Default::default()
    }
    .to_bytes()
}

impl<B> HttpBody for DrainingSse<B>
where
    B: HttpBody<Data = Bytes, Error = BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.poll(cx).is_ready() {
            *this.done = true;
            return Poll::Ready(Some(Ok(Frame::data(shutdown_event()))));
        }
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            *this.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}
