//! Bodies that count the gRPC messages passing through them and, for a
//! response, finish the call when its status goes by.

use std::{
    any::Any,
    error::Error as StdError,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tonic::{Code, Status, codegen::Bytes};

use crate::families::{Call, Side};

/// Counts gRPC length-prefixed messages (a 1-byte flag, a 4-byte
/// big-endian length, then that many bytes) across data frames, which may
/// cut a message, or its prefix, anywhere. A message counts when its last
/// byte has gone by.
#[derive(Debug, Default)]
pub(crate) struct Framing {
    /// Bytes of the current prefix seen so far (0 to 5).
    prefix_seen: u8,
    /// The length being read from the prefix.
    len: u32,
    /// Bytes of the current message still to come once the prefix is read.
    left: u32,
}

impl Framing {
    /// Feeds `data`, returning how many messages it completed.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut completed = 0;
        while !data.is_empty() {
            if self.prefix_seen < 5 {
                let Some((&byte, rest)) = data.split_first() else { break };
                data = rest;
                if self.prefix_seen > 0 {
                    self.len = (self.len << 8) | u32::from(byte);
                }
                self.prefix_seen += 1;
                if self.prefix_seen == 5 {
                    if self.len == 0 {
                        completed += 1;
                        *self = Framing::default();
                    } else {
                        self.left = self.len;
                    }
                }
            } else {
                // `left` is at most u32::MAX, and so fits a usize here.
                let take = data.len().min(self.left as usize);
                data = &data[take..];
                // `take` is at most `left`, so this cannot underflow.
                self.left -= take as u32;
                if self.left == 0 {
                    completed += 1;
                    *self = Framing::default();
                }
            }
        }
        completed
    }
}

/// A message count: where the frames go and the counter they move.
#[derive(Debug)]
pub(crate) struct Messages {
    framing: Framing,
    counter: Counter,
}

impl Messages {
    pub(crate) fn new(counter: Counter) -> Self {
        Messages {
            framing: Framing::default(),
            counter,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request or response body passing through a metrics layer: counts
    /// the gRPC messages in its data frames and, for a measured response,
    /// counts the call as handled when its trailers go by (with their
    /// `grpc-status`), when it ends without them (`Unknown`), when it fails,
    /// or when it is dropped first (`Canceled`, or `DeadlineExceeded` once
    /// the call's `grpc-timeout` has passed).
    ///
    /// Bodies of requests the layer does not measure pass through as they
    /// are.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        messages: Option<Messages>,
        call: Option<Call>,
    }
}

impl<B> MeteredBody<B> {
    /// A body that only passes `inner` through.
    pub(crate) fn unmeasured(inner: B) -> Self {
        MeteredBody {
            inner,
            messages: None,
            call: None,
        }
    }

    pub(crate) fn new(inner: B, messages: Messages, call: Option<Call>) -> Self {
        MeteredBody {
            inner,
            messages: Some(messages),
            call,
        }
    }
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("measured", &self.messages.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(messages) = this.messages {
                        let completed = messages.framing.feed(data);
                        if completed > 0 {
                            messages.counter.inc_by(completed);
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_in_headers(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(error)) => {
                if let Some(call) = this.call.take() {
                    let side = call.method().side();
                    call.finish(status_in_error(error).unwrap_or_else(|| side.error_code()));
                }
            }
            // The body ended with no trailers, so with no status.
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // While the call is open, ask to be polled once more even if the
        // inner body has nothing left, so that the end is seen (and counted
        // as `Unknown`) rather than the body being dropped unpolled (and
        // counted as `Canceled`).
        self.call.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header or trailer map, if it has one.
pub(crate) fn status_in_headers(headers: &HeaderMap) -> Option<Code> {
    headers
        .get(Status::GRPC_STATUS)
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// The code of the first [`Status`] in an error or its sources, if the
/// error's type is one that can hold one: a `Status` itself (tonic's body
/// error), a boxed error, or a tonic transport error.
pub(crate) fn status_in_error<E: 'static>(error: &E) -> Option<Code> {
    let error: &dyn Any = error;
    if let Some(status) = error.downcast_ref::<Status>() {
        return Some(status.code());
    }
    let mut next: Option<&(dyn StdError + 'static)> =
        if let Some(boxed) = error.downcast_ref::<Box<dyn StdError + Send + Sync>>() {
            Some(boxed.as_ref())
        } else if let Some(transport) = error.downcast_ref::<tonic::transport::Error>() {
            Some(transport)
        } else {
            None
        };
    while let Some(error) = next {
        if let Some(status) = error.downcast_ref::<Status>() {
            return Some(status.code());
        }
        next = error.source();
    }
    None
}

/// The code of a response whose headers already carry the status: a
/// Trailers-Only response (`grpc-status` in the headers), or one whose HTTP
/// status is not 200, mapped as gRPC's `http-grpc-status-mapping.md` says
/// (tonic's client does the same).
pub(crate) fn status_at_headers<B>(response: &http::Response<B>) -> Option<Code> {
    if let Some(code) = status_in_headers(response.headers()) {
        return Some(code);
    }
    let code = match response.status().as_u16() {
        200 => return None,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(code)
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`
/// and the like; not `application/grpc-web`, whose status travels in the
/// body).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let Some(rest) = content_type.as_bytes().strip_prefix(b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';'))
}

/// Used by the layers: which end's fallback code a failed call gets.
pub(crate) fn error_code<E: 'static>(error: &E, side: Side) -> Code {
    status_in_error(error).unwrap_or_else(|| side.error_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    #[test]
    fn counts_whole_messages_in_one_frame() {
        let mut data = message(3);
        data.extend(message(0));
        data.extend(message(10));
        assert_eq!(Framing::default().feed(&data), 3);
    }

    #[test]
    fn counts_messages_cut_anywhere() {
        let mut data = message(3);
        data.extend(message(0));
        data.extend(message(300));
        data.extend(message(1));
        // Every way of cutting the stream in two, and byte by byte.
        for cut in 0..=data.len() {
            let mut framing = Framing::default();
            let (a, b) = data.split_at(cut);
            assert_eq!(framing.feed(a) + framing.feed(b), 4, "cut at {cut}");
        }
        let mut framing = Framing::default();
        let total: u64 = data.iter().map(|byte| framing.feed(std::slice::from_ref(byte))).sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn an_unfinished_message_does_not_count() {
        let data = message(5);
        let mut framing = Framing::default();
        assert_eq!(framing.feed(&data[..data.len() - 1]), 0);
        assert_eq!(framing.feed(&data[data.len() - 1..]), 1);
    }

    #[test]
    fn grpc_content_types() {
        let headers = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(value));
            headers
        };
        assert!(is_grpc(&headers("application/grpc")));
        assert!(is_grpc(&headers("application/grpc+proto")));
        assert!(!is_grpc(&headers("application/grpc-web")));
        assert!(!is_grpc(&headers("text/plain")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn statuses_are_found_in_errors() {
        assert_eq!(status_in_error(&Status::not_found("x")), Some(Code::NotFound));
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(Status::aborted("x"));
        assert_eq!(status_in_error(&boxed), Some(Code::Aborted));
        assert_eq!(status_in_error(&std::io::Error::other("x")), None);
        assert_eq!(error_code(&std::io::Error::other("x"), Side::Client), Code::Unavailable);
        assert_eq!(error_code(&std::io::Error::other("x"), Side::Server), Code::Unknown);
    }
}
