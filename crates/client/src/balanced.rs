//! [`Balanced`]: the channel generated clients call through. Each call
//! goes to one healthy endpoint (two random choices, the less loaded one),
//! over that endpoint's own tonic `Channel`.
//!
//! A call that finds no healthy endpoint fails at once with `UNAVAILABLE`
//! saying why each is out, unless some endpoint has not been judged yet
//! (just after `connect`, or a new DNS answer): then it waits for the first
//! verdict, at most `probe_timeout + connect_timeout`. A call whose
//! connection fails ejects its endpoint (passive ejection) and fails with
//! `UNAVAILABLE`, whatever hyper said, so that callers' retries and watch
//! resumption treat it as the transient failure it is.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Frame, SizeHint};
use tokio::sync::{oneshot, watch};
use tonic::{Status, body::Body, codegen::Bytes};
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::{
    error::describe,
    registry::{Cause, InFlight, Member, Registry, Replica, Snapshot},
};

/// What [`Balanced`] fails with: a `tonic::Status` inside (generated clients
/// get it back as it is).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future of a call on [`Balanced`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

/// A channel over every healthy replica of one service: a
/// `tower::Service<http::Request<tonic::body::Body>>` that generated
/// clients take in place of `tonic::transport::Channel`
/// (`UsersServiceClient<Balanced>`).
///
/// Cheap to clone; clones share the endpoints, their connections and the
/// background tasks (DNS refresh, one health watch per endpoint), which
/// stop when the last clone is dropped. Calls in flight then still finish.
///
/// `poll_ready` is always ready: backpressure is per endpoint, inside the
/// call (each endpoint's tonic channel buffers up to 1024 requests).
#[derive(Clone)]
pub struct Balanced {
    inner: Arc<Inner>,
}

struct Inner {
    /// Counts the calls, when the process keeps metrics.
    metrics: Option<lightbox_metrics::GrpcClientLayer>,
    registry: Arc<Registry>,
    snapshot: watch::Receiver<Snapshot>,
    passive: bool,
    /// How long a call waits for the first verdict on some endpoint.
    first_verdict: Duration,
    /// Never sent: dropped with the last clone, which ends the discovery
    /// task, which aborts the health watchers.
    _stop: oneshot::Sender<()>,
}

impl Balanced {
    pub(crate) fn new(
        registry: Arc<Registry>,
        snapshot: watch::Receiver<Snapshot>,
        passive: bool,
        first_verdict: Duration,
        stop: oneshot::Sender<()>,
        metrics: Option<lightbox_metrics::GrpcClientLayer>,
    ) -> Balanced {
        let inner = Inner {
            metrics,
            registry,
            snapshot,
            passive,
            first_verdict,
            _stop: stop,
        };
        Balanced { inner: Arc::new(inner) }
    }

    /// What this reaches, as messages name it (the label, or the target).
    pub fn label(&self) -> &str {
        self.inner.registry.label()
    }

    /// Every endpoint known now and whether calls go there: for logs,
    /// health pages and tests.
    pub fn replicas(&self) -> Vec<Replica> {
        self.inner.registry.replicas()
    }
}

impl fmt::Debug for Balanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced")
            .field("label", &self.label())
            .field("healthy", &self.inner.snapshot.borrow().ready.len())
            .finish_non_exhaustive()
    }
}

impl tower::Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> ResponseFuture {
        // The client's span: a child of the caller's, its context passed on
        // in the headers (W3C trace context), open until the response ends.
        let span = lightbox_metrics::call_span(request.uri().path(), "client");
        lightbox_metrics::inject(&span, request.headers_mut());
        let call = self.counted(request);
        Box::pin(async move {
            let response = call.instrument(span.clone()).await?;
            Ok(response.map(|body| Body::new(lightbox_metrics::SpanBody::new(body, span))))
        })
    }
}

impl Balanced {
    /// The call, counted in the metrics when the process keeps them.
    fn counted(&self, request: http::Request<Body>) -> ResponseFuture {
        match &self.inner.metrics {
            // Counted around the whole call: picking a replica, and failing
            // to, are part of what the caller sees.
            Some(metrics) => {
                let counted = tower::Layer::layer(metrics, Dispatch(self.clone()));
                Box::pin(async move {
                    let response = counted.oneshot(request).await?;
                    Ok(response.map(Body::new))
                })
            }
            None => self.dispatch(request),
        }
    }
}

/// [`Balanced`] without its metrics: what the metrics layer wraps.
struct Dispatch(Balanced);

impl tower::Service<http::Request<Body>> for Dispatch {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> ResponseFuture {
        self.0.dispatch(request)
    }
}

impl Balanced {
    /// Sends `request` to a healthy replica.
    fn dispatch(&self, request: http::Request<Body>) -> ResponseFuture {
        // The common case picks here, without waiting or cloning the receiver.
        let picked = pick(&self.inner.snapshot.borrow().ready);
        let registry = self.inner.registry.clone();
        let passive = self.inner.passive;
        let waiting = match picked {
            Some(_) => None,
            None => Some((self.inner.snapshot.clone(), self.inner.first_verdict)),
        };
        Box::pin(async move {
            let member = match (picked, waiting) {
                (Some(member), _) => member,
                (None, Some((snapshot, wait))) => wait_for_member(&registry, snapshot, wait).await?,
                (None, None) => return Err(registry.no_replica(&Snapshot::empty()).into()),
            };
            let call = member.enter();
            match member.channel.clone().oneshot(request).await {
                Ok(response) => Ok(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        call,
                        registry,
                        passive,
                    })
                })),
                // The call's own deadline passed: the replica is slow, not
                // gone; the caller's deadline error stands, nothing ejected.
                Err(err) if is_deadline(&err) => Err(err.into()),
                Err(err) => Err(broken(&registry, call.member(), passive, Arc::new(err)).into()),
            }
        })
    }
}

/// Two random healthy members, the less loaded one (Mitzenmacher's power
/// of two choices: near-best balance without a global view or a lock).
fn pick(ready: &[Arc<Member>]) -> Option<Arc<Member>> {
    let n = ready.len();
    if n < 2 {
        return ready.first().cloned();
    }
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    let (a, b) = (ready.get(a)?, ready.get(b)?);
    Some(if b.load() < a.load() { b } else { a }.clone())
}

/// Waits until some endpoint is healthy, or every one has been judged
/// (then fails at once), at most `wait`.
async fn wait_for_member(
    registry: &Registry,
    mut snapshot: watch::Receiver<Snapshot>,
    wait: Duration,
) -> Result<Arc<Member>, BoxError> {
    let settled = tokio::time::timeout(wait, async {
        snapshot
            .wait_for(|s| !s.ready.is_empty() || s.settled)
            .await
            .map(|s| s.clone())
    })
    .await;
    let current = match settled {
        Ok(Ok(current)) => current,
        // The registry (which holds the sender) outlives this call.
        Ok(Err(_)) => Snapshot::empty(),
        Err(_) => snapshot.borrow().clone(),
    };
    pick(&current.ready).ok_or_else(|| registry.no_replica(&current).into())
}

/// Whether `err` is the call's deadline passing (`grpc-timeout`), which
/// tonic reports as a transport error.
fn is_deadline(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if cause.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The `UNAVAILABLE` of a call whose connection failed (it never reached
/// the server, or lost it mid-call), naming the replica; the transport
/// error stays its source (so `tonic::ConnectError` can be found in it).
/// With passive ejection, the endpoint is out until its health check
/// passes again.
fn broken(registry: &Registry, member: &Arc<Member>, passive: bool, err: Cause) -> Status {
    let what = describe(&*err);
    if passive && registry.eject_member(member, &format!("a call failed: {what}"), &err) {
        member.suspect();
    }
    let mut status = Status::unavailable(format!("replica {} of {}: {what}", member.label, registry.label()));
    status.set_source(err);
    status
}

/// A response body that keeps its call counted (for picking) until it is
/// dropped, and turns a broken stream into `UNAVAILABLE` (ejecting the
/// endpoint, as a failed call does): a watch resumes elsewhere.
struct Tracked {
    body: Body,
    call: InFlight,
    registry: Arc<Registry>,
    passive: bool,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // Every field is Unpin.
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            // A body fails only below gRPC (a server's error status comes
            // in the trailers): the connection broke.
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(broken(
                &this.registry,
                this.call.member(),
                this.passive,
                Arc::new(status),
            )))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
