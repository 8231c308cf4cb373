//! The body of an ingress response: the replica's body streamed through, or one the ingress wrote, carrying the
//! request's in-flight count until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

use crate::route::InFlight;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body from the ingress.
pub struct IngressBody {
    inner: UnsyncBoxBody<Bytes, BoxError>,
    /// Dropped with the body, which is when the request stops counting as in flight.
    _in_flight: Option<InFlight>,
}

impl IngressBody {
    pub(crate) fn new<B>(body: B, in_flight: Option<InFlight>) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self { inner: body.map_err(Into::into).boxed_unsync(), _in_flight: in_flight }
    }

    pub(crate) fn text(text: String) -> Self {
        Self::new(http_body_util::Full::new(Bytes::from(text)), None)
    }
}

impl Body for IngressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
