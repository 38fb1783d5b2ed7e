//! [`FaultLayer`]: applies the fault in force to every call of a tonic
//! server, except the calls that must keep working to observe and undo it.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::{Status, body::Body, codegen::Bytes};
use tower::{Layer, Service};

use super::{Faults, body::DownAwareBody};

/// Path prefixes never affected by faults: health (so orchestrators and
/// tests can tell a "down" server is really alive), reflection (so grpcurl
/// still works) and the admin service (so the fault can be cleared).
const EXEMPT_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection.", "/lightbox.admin.v1."];

/// Whether calls to `path` escape fault injection.
fn is_exempt(path: &str) -> bool {
    EXEMPT_PREFIXES.iter().any(|prefix| path.starts_with(prefix))
}

/// A tower layer that injects the fault in force into every call of the
/// server it wraps, except health, reflection and `lightbox.admin.v1`:
///
/// - `down`: answers at once with `UNAVAILABLE` "`<name>` is down (fault
///   injection)", and ends the calls already streaming with the same status;
/// - otherwise waits `latency`, then refuses a share `error_rate` of calls
///   with `UNAVAILABLE` "injected failure (fault injection, error rate X)";
/// - otherwise hands the call on.
///
/// Put it on the whole server:
/// `tonic::transport::Server::builder().layer(FaultLayer::new(faults))`.
/// Refusals are proper trailers-only gRPC responses, so clients see the
/// status, not a transport error.
#[derive(Debug, Clone)]
pub struct FaultLayer {
    faults: Faults,
    /// The refusal of a server that is down, written once and shared by
    /// every connection's copy of the service; `None` names the service from
    /// each call's path.
    down_message: Option<Arc<str>>,
}

impl FaultLayer {
    /// Applies `faults`. Refusals name the gRPC service of the call (e.g.
    /// "lightbox.users.v1.UsersService is down"), unless
    /// [`FaultLayer::with_service_name`] says otherwise.
    pub fn new(faults: Faults) -> FaultLayer {
        FaultLayer {
            faults,
            down_message: None,
        }
    }

    /// Names the server in refusals ("users is down (fault injection)").
    pub fn with_service_name(mut self, name: impl Into<String>) -> FaultLayer {
        self.down_message = Some(Arc::from(down_message(&name.into())));
        self
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultInjection<S>;

    fn layer(&self, inner: S) -> FaultInjection<S> {
        FaultInjection {
            inner,
            faults: self.faults.clone(),
            down_message: self.down_message.clone(),
        }
    }
}

/// The service [`FaultLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct FaultInjection<S> {
    inner: S,
    faults: Faults,
    down_message: Option<Arc<str>>,
}

/// The future of [`FaultInjection`]: boxed, because it may sleep before
/// calling the inner service.
type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for FaultInjection<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if is_exempt(path) {
            let response = self.inner.call(request);
            return Box::pin(async move { Ok(response.await?.map(Body::new)) });
        }

        let message: Arc<str> = match &self.down_message {
            Some(message) => Arc::clone(message),
            None => Arc::from(down_message(service_of(path))),
        };
        let faults = self.faults.clone();
        faults.count_call();
        // The inner service was made ready by `poll_ready` on `self.inner`;
        // take that one into the future (which may call it only after a
        // sleep) and leave a fresh clone behind for the next `poll_ready`.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        Box::pin(async move {
            let spec = faults.get();
            if spec.down {
                return Ok(refuse(message.to_string()));
            }
            if !spec.latency.is_zero() {
                tokio::time::sleep(spec.latency).await;
            }
            // Look again after the sleep: the fault may have changed while
            // the call waited, and a server that went down must not start it.
            let spec = faults.get();
            if spec.down {
                return Ok(refuse(message.to_string()));
            }
            // `fastrand::f64` is in [0, 1): a rate of 0 never fails, 1 always.
            if spec.error_rate > 0.0 && fastrand::f64() < spec.error_rate {
                return Ok(refuse(format!(
                    "injected failure (fault injection, error rate {})",
                    spec.error_rate
                )));
            }

            let response = inner.call(request).await?;
            let changes = faults.subscribe();
            Ok(response.map(|body| Body::new(DownAwareBody::new(Body::new(body), changes, message))))
        })
    }
}

fn down_message(name: &str) -> String {
    format!("{name} is down (fault injection)")
}

/// A trailers-only `UNAVAILABLE` response.
fn refuse(message: String) -> Response<Body> {
    Status::unavailable(message).into_http()
}

/// The gRPC service of a call path: `/pkg.Service/Method` → `pkg.Service`.
fn service_of(path: &str) -> &str {
    let trimmed = path.trim_start_matches('/');
    trimmed.split('/').next().unwrap_or(trimmed)
}

// `Infallible` is the error of tonic's `Routes`; asserting the layer keeps it
// means the layered server still satisfies tonic's bounds.
const _: fn() = || {
    fn assert_infallible<S: Service<Request<Body>, Error = Infallible>>() {}
    assert_infallible::<FaultInjection<tonic::service::Routes>>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_paths() {
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(is_exempt("/lightbox.admin.v1.FaultService/SetFault"));
        assert!(!is_exempt("/lightbox.users.v1.UsersService/GetUser"));
        assert!(!is_exempt("/grpc.healthy.Fake/Check"));
    }

    #[test]
    fn service_names_from_paths() {
        assert_eq!(
            service_of("/lightbox.users.v1.UsersService/GetUser"),
            "lightbox.users.v1.UsersService"
        );
        assert_eq!(service_of("/"), "");
    }
}
