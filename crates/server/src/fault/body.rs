//! The response body that ends a running call when the server goes down.
//!
//! Refusing new calls is not enough to look like a dead server: a client
//! holding a long-lived server-streaming call (a watch) would keep receiving
//! and never notice. So each response body of an affected call waits on the
//! [`Faults`](super::Faults) watch channel next to the data it forwards, and
//! the moment `down` becomes true it drops the handler's body (the handler
//! sees its stream closed and stops, as it would on a client going away) and
//! ends the call with `UNAVAILABLE` trailers, which a client treats like a
//! lost server: reconnect with backoff.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tonic::{Status, body::Body, codegen::Bytes};

use super::FaultSpec;

/// Resolves to `true` when the server goes down, `false` when it never can
/// any more (every `Faults` handle is gone).
type DownSignal = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A response body that forwards `inner` until the server goes down, then
/// ends with `grpc-status: 14` (`UNAVAILABLE`) and `message`.
///
/// Cheap per frame: the fault state is read (a lock) only on the first
/// poll and after it changed (its version, an atomic, says so); only a body
/// left waiting for data (a stream) registers to be woken when the server
/// goes down, and that registration is polled again only when the state
/// changed or the body is polled from another task.
pub(crate) struct DownAwareBody {
    /// The handler's body; `None` once the call has been ended here, which
    /// drops it at once.
    inner: Option<Body>,
    /// The fault state; `None` once it can no longer matter (the inner body
    /// sent its own trailers, or every `Faults` handle is gone).
    changes: Option<watch::Receiver<FaultSpec>>,
    /// Set the first time the inner body is pending: wakes this body when
    /// the server goes down while it waits.
    down: Option<DownSignal>,
    /// Whether the fault state was read since it last changed (always
    /// false before the first poll).
    read: bool,
    /// The waker `down` was last polled with, and whether the state changed
    /// since: `down` needs polling again only if one of them did.
    registered: Option<Waker>,
    changed: bool,
    message: Arc<str>,
}

impl DownAwareBody {
    /// Wraps `inner`, watching `changes`. A server that is already down when
    /// the body is first polled ends it at once, so a `down` set between the
    /// layer's check and the response is not missed.
    pub(crate) fn new(inner: Body, changes: watch::Receiver<FaultSpec>, message: Arc<str>) -> DownAwareBody {
        DownAwareBody {
            inner: Some(inner),
            changes: Some(changes),
            down: None,
            read: false,
            registered: None,
            changed: false,
            message,
        }
    }

    fn down_trailers(&self) -> HeaderMap {
        let mut trailers = HeaderMap::new();
        // `add_header` percent-encodes the message; it fails only on a
        // message it cannot encode, and then the status alone still ends the
        // call with the right code.
        if Status::unavailable(&*self.message).add_header(&mut trailers).is_err() {
            trailers.insert(
                http::HeaderName::from_static("grpc-status"),
                http::HeaderValue::from_static("14"),
            );
        }
        trailers
    }

    /// Ends the call here: the handler's body is dropped, our trailers go.
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.inner = None;
        self.stop_watching();
        Poll::Ready(Some(Ok(Frame::trailers(self.down_trailers()))))
    }

    fn stop_watching(&mut self) {
        self.changes = None;
        self.down = None;
        self.registered = None;
    }

    /// Whether the server is down, reading the fault state only on the
    /// first call and after it changed.
    fn is_down(&mut self) -> bool {
        let Some(changes) = self.changes.as_mut() else {
            return false;
        };
        // An error means every `Faults` handle is gone: read once more, and
        // the `down` signal ends the watching.
        if self.read && !changes.has_changed().unwrap_or(true) {
            return false;
        }
        self.read = true;
        self.changed = true;
        changes.borrow_and_update().down
    }
}

impl HttpBody for DownAwareBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // `DownAwareBody` is `Unpin` (its fields are boxed), so plain `&mut`.
        let this = &mut *self;
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        // Down already? Looked at before the data, so that a stream with data
        // always ready is still cut as soon as the server goes down.
        if this.is_down() {
            return this.end();
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                match &frame {
                    // The handler ended the call itself: nothing more may
                    // follow its trailers, so stop watching.
                    Some(Ok(f)) if f.is_trailers() => this.stop_watching(),
                    Some(Err(_)) | None => {
                        this.stop_watching();
                        this.inner = None;
                    }
                    Some(Ok(_)) => {}
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                // Waiting for data: be woken if the server goes down meanwhile.
                if this.down.is_none()
                    && let Some(mut changes) = this.changes.clone()
                {
                    // `wait_for` checks the current value first, then sleeps
                    // until the sender notifies a change: no timer, no
                    // polling. Its error means every `Faults` handle is gone.
                    this.down = Some(Box::pin(
                        async move { changes.wait_for(|spec| spec.down).await.is_ok() },
                    ));
                }
                // Registered with this waker, and nothing changed since: the
                // signal's registration stands, no need to poll it again.
                let current = !std::mem::take(&mut this.changed)
                    && this
                        .registered
                        .as_ref()
                        .is_some_and(|waker| waker.will_wake(cx.waker()));
                if !current && let Some(down) = this.down.as_mut() {
                    match down.as_mut().poll(cx) {
                        Poll::Ready(true) => return this.end(),
                        Poll::Ready(false) => this.stop_watching(),
                        Poll::Pending => this.registered = Some(cx.waker().clone()),
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => inner.is_end_stream(),
            // Ended here (or finished): our trailers, if any, were sent by the
            // poll that cleared `inner`.
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            // The trailers we may add carry no data, so the inner hint holds.
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, time::Duration};

    use super::*;
    use crate::fault::Faults;

    const DEADLINE: Duration = Duration::from_secs(5);

    /// A body that yields its frames, then never ends (like a watch stream
    /// with nothing new to say).
    struct Endless(VecDeque<Frame<Bytes>>);

    impl HttpBody for Endless {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            match self.0.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Poll::Pending,
            }
        }
    }

    fn next_frame(body: &mut DownAwareBody) -> impl Future<Output = Option<Result<Frame<Bytes>, Status>>> + '_ {
        std::future::poll_fn(move |cx| Pin::new(&mut *body).poll_frame(cx))
    }

    #[tokio::test]
    async fn going_down_ends_an_endless_stream_with_unavailable() {
        let faults = Faults::new();
        let inner = Body::new(Endless(VecDeque::from([Frame::data(Bytes::from_static(b"hello"))])));
        let mut body = DownAwareBody::new(inner, faults.subscribe(), "users is down".into());

        let first = next_frame(&mut body).await.expect("a frame").expect("ok");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"hello")));

        // Nothing more is coming while the server is up.
        let waiting = tokio::spawn(async move {
            let trailers = next_frame(&mut body).await;
            (trailers, body)
        });
        faults
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .expect("valid");

        let (trailers, mut body) = tokio::time::timeout(DEADLINE, waiting)
            .await
            .expect("going down must wake the body")
            .expect("no panic");
        let trailers = trailers
            .expect("a frame")
            .expect("ok")
            .into_trailers()
            .expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"14"[..]));
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "users is down");

        assert!(body.is_end_stream());
        assert!(next_frame(&mut body).await.is_none());
    }

    /// Between changes the body skips its signal's poll; a change that is
    /// not "down" must still leave it registered for the next one, with the
    /// same waker all along (as hyper polls a body from one task).
    #[tokio::test]
    async fn a_waiting_stream_woken_by_another_change_still_ends_when_the_server_goes_down() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(Arc::clone(&flag));
        let woken = || flag.0.swap(false, std::sync::atomic::Ordering::SeqCst);
        let faults = Faults::new();
        let mut body = DownAwareBody::new(Body::new(Endless(VecDeque::new())), faults.subscribe(), "down".into());
        let poll = |body: &mut DownAwareBody| Pin::new(body).poll_frame(&mut Context::from_waker(&waker));

        assert!(poll(&mut body).is_pending(), "nothing to send");
        assert!(poll(&mut body).is_pending(), "polled again, unchanged: still waiting");
        faults
            .set(FaultSpec {
                latency: Duration::from_millis(1),
                ..FaultSpec::default()
            })
            .expect("valid");
        assert!(woken(), "a change wakes the waiting body");
        assert!(poll(&mut body).is_pending(), "another change does not end the stream");
        assert!(poll(&mut body).is_pending());
        faults
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .expect("valid");
        assert!(woken(), "going down after another change must wake the body");
        let Poll::Ready(Some(Ok(trailers))) = poll(&mut body) else {
            panic!("going down ends the stream");
        };
        let status = Status::from_header_map(trailers.trailers_ref().expect("trailers")).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn already_down_ends_at_first_poll() {
        let faults = Faults::new();
        faults
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .expect("valid");
        let mut body = DownAwareBody::new(Body::new(Endless(VecDeque::new())), faults.subscribe(), "down".into());
        let frame = tokio::time::timeout(DEADLINE, next_frame(&mut body))
            .await
            .expect("must not wait")
            .expect("a frame")
            .expect("ok");
        assert!(frame.is_trailers());
    }

    #[tokio::test]
    async fn other_changes_do_not_end_the_stream_and_handler_trailers_pass_through() {
        let faults = Faults::new();
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        let inner = Body::new(Endless(VecDeque::from([
            Frame::data(Bytes::from_static(b"a")),
            Frame::trailers(ok),
        ])));
        let mut body = DownAwareBody::new(inner, faults.subscribe(), "down".into());

        // A change that is not "down" wakes the body, which carries on.
        faults
            .set(FaultSpec {
                error_rate: 0.5,
                ..FaultSpec::default()
            })
            .expect("valid");
        let data = next_frame(&mut body).await.expect("frame").expect("ok");
        assert!(data.is_data());
        let trailers = next_frame(&mut body).await.expect("frame").expect("ok");
        let trailers = trailers.into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));

        // Going down after the handler's own trailers adds nothing.
        faults
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .expect("valid");
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
                .await
                .is_pending(),
            "the endless inner body is still the only source of frames"
        );
    }
}
