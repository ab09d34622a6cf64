//! Response bodies: whole (JSON, small) or streamed from a channel as their parts arrive
//! (command events, file bytes), never buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// What a stream's producer sends: the next part, or the failure that ends the body early
/// (the client then sees the response cut short, never a complete-looking one).
pub type Part = Result<Bytes, std::io::Error>;

/// A response body: one buffer, or parts from a channel.
pub enum ApiBody {
    /// All of it (or nothing).
    Whole(Option<Bytes>),
    /// Parts as they come (after `first`, one already received); the body ends when every
    /// sender is gone.
    Stream {
        /// A part received before the answer began.
        first: Option<Bytes>,
        /// The rest.
        parts: mpsc::Receiver<Part>,
    },
}

impl ApiBody {
    /// A body of these bytes.
    pub fn whole(bytes: impl Into<Bytes>) -> Self {
        ApiBody::Whole(Some(bytes.into()))
    }

    /// No body.
    pub fn empty() -> Self {
        ApiBody::Whole(None)
    }

    /// A body of the parts `parts` will send.
    pub fn stream(parts: mpsc::Receiver<Part>) -> Self {
        ApiBody::Stream { first: None, parts }
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ApiBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream { first, parts } => match first.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => parts
                    .poll_recv(cx)
                    .map(|part| part.map(|part| part.map(Frame::data))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ApiBody::Stream { .. } => SizeHint::default(),
        }
    }
}
