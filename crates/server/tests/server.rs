//! `serve` end to end: a real tonic server on 127.0.0.1:0, called by real
//! tonic clients. No test sleeps and hopes: each waits for the condition it
//! needs, with a deadline.
//!
//! The service under test is `test.Echo`, written by hand as a tower service
//! (the fault layer affects it, unlike health, reflection and admin):
//! `/test.Echo/Unary` answers one message; `/test.Echo/Stream` sends one
//! message, then waits for the test to release it (second message, `OK`) or
//! forever, like a watch stream with nothing new to say.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, uri::PathAndQuery};
use http_body::Frame;
use lightbox_api::admin::{
    ClearFaultRequest, Fault, GetFaultRequest, GetFaultResponse, SetFaultRequest,
    fault_service_client::FaultServiceClient,
};
use lightbox_server::{FaultSpec, Faults, ServeError, ServerOptions, Shutdown, ShutdownTrigger, bind, serve};
use tokio::{sync::watch, task::JoinHandle};
use tonic::{
    Code, Request, Status,
    body::Body,
    codec::Streaming,
    codegen::Bytes,
    server::NamedService,
    service::Routes,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Upper bound for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- test.Echo

/// The hand-written `test.Echo` service.
#[derive(Clone)]
struct Echo {
    /// Flipped to `true` by the test to let `Stream` calls finish.
    release: watch::Receiver<bool>,
}

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tower::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let body = match request.uri().path() {
            "/test.Echo/Unary" => EchoBody {
                frames: VecDeque::from([message_frame(), ok_trailers()]),
                release: None,
            },
            "/test.Echo/Stream" => {
                let mut release = self.release.clone();
                EchoBody {
                    frames: VecDeque::from([message_frame()]),
                    release: Some(Box::pin(async move {
                        // An error means the test dropped the sender: stay
                        // open, as the endless stream this models would.
                        if release.wait_for(|r| *r).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    })),
                }
            }
            _ => return std::future::ready(Ok(Status::unimplemented("").into_http())),
        };
        let mut response = http::Response::new(Body::new(body));
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(response))
    }
}

/// One gRPC message: an empty protobuf message (`GetFaultResponse {}`),
/// uncompressed, zero length.
fn message_frame() -> Frame<Bytes> {
    Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))
}

fn ok_trailers() -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    Frame::trailers(trailers)
}

/// Yields `frames`; then, if `release` is set, waits for it and yields a
/// second message and `OK`.
struct EchoBody {
    frames: VecDeque<Frame<Bytes>>,
    release: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl http_body::Body for EchoBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(release) = self.release.as_mut() else {
            return Poll::Ready(None);
        };
        match release.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.release = None;
                self.frames.push_back(ok_trailers());
                Poll::Ready(Some(Ok(message_frame())))
            }
        }
    }
}

async fn echo_unary(channel: &Channel) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|err| Status::unavailable(err.to_string()))?;
    grpc.unary::<GetFaultRequest, GetFaultResponse, _>(
        Request::new(GetFaultRequest {}),
        PathAndQuery::from_static("/test.Echo/Unary"),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(|_| ())
}

async fn echo_stream(channel: &Channel) -> Result<Streaming<GetFaultResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|err| Status::unavailable(err.to_string()))?;
    let response = grpc
        .server_streaming::<GetFaultRequest, GetFaultResponse, _>(
            Request::new(GetFaultRequest {}),
            PathAndQuery::from_static("/test.Echo/Stream"),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(response.into_inner())
}

// ------------------------------------------------------------------ harness

/// A server under test and what controls it.
struct Harness {
    addr: SocketAddr,
    channel: Channel,
    faults: Faults,
    trigger: ShutdownTrigger,
    server: JoinHandle<Result<(), ServeError>>,
    release: watch::Sender<bool>,
}

async fn start(drain_timeout: Duration) -> Harness {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (release, release_rx) = watch::channel(false);
    let routes = Routes::new(Echo { release: release_rx });
    let faults = Faults::new();
    let (trigger, shutdown) = Shutdown::new();
    let options = ServerOptions {
        service_name: "echo".to_owned(),
        drain_timeout,
        ..ServerOptions::default()
    };
    let server = tokio::spawn(serve(
        listener,
        routes,
        &["test.Echo"],
        faults.clone(),
        shutdown,
        options,
    ));
    // The listener is bound before `serve` runs, so connecting cannot race it.
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    Harness {
        addr,
        channel,
        faults,
        trigger,
        server,
        release,
    }
}

impl Harness {
    fn admin(&self) -> FaultServiceClient<Channel> {
        FaultServiceClient::new(self.channel.clone())
    }

    fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    async fn set_fault(&self, fault: Fault) -> Result<Fault, Status> {
        let response = self.admin().set_fault(SetFaultRequest { fault: Some(fault) }).await?;
        Ok(response.into_inner().fault.expect("fault in response"))
    }

    async fn health_status(&self, service: &str) -> Result<i32, Status> {
        let response = self
            .health()
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(response.into_inner().status)
    }

    /// Triggers shutdown and waits for `serve` to return, with how long it took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.trigger.trigger();
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("serve returned in time")
            .expect("serve did not panic")
            .expect("serve returned Ok");
        started.elapsed()
    }
}

fn down() -> Fault {
    Fault {
        latency: None,
        error_rate: 0.0,
        down: true,
    }
}

fn millis(ms: i32) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    }
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn health_is_serving_then_not_serving_after_shutdown() {
    let h = start(Duration::from_secs(1)).await;
    let serving = ServingStatus::Serving as i32;
    assert_eq!(h.health_status("").await.expect("check ''"), serving);
    assert_eq!(h.health_status("test.Echo").await.expect("check test.Echo"), serving);
    let unknown = h.health_status("no.Such").await.expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);

    // A watcher hears the change while its connection is still open.
    let mut watch = h
        .health()
        .watch(HealthCheckRequest {
            service: "test.Echo".to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("first status in time")
        .expect("ok")
        .expect("a status");
    assert_eq!(first.status, serving);

    h.trigger.trigger();
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("NOT_SERVING in time")
        .expect("ok")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);

    drop(watch);
    tokio::time::timeout(DEADLINE, h.server)
        .await
        .expect("serve returned in time")
        .expect("no panic")
        .expect("Ok");
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(h.addr).await.is_err());
}

#[tokio::test]
async fn reflection_v1alpha_and_v1_list_services_and_describe_them() {
    use tonic_reflection::pb::{v1, v1alpha};

    let h = start(Duration::from_secs(1)).await;
    // Exactly what this port serves: its own service and the shared ones,
    // not every service whose schema it knows.
    let mut wanted = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "lightbox.admin.v1.FaultService",
        "test.Echo",
    ];
    wanted.sort_unstable();

    // v1alpha: the only one grpcurl 1.8.6 speaks.
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(h.channel.clone());
    let requests = [
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "lightbox.admin.v1.FaultService".to_owned(),
                ),
            ),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let listed = responses
        .message()
        .await
        .expect("ok")
        .expect("a response")
        .message_response;
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, wanted);
    let described = responses
        .message()
        .await
        .expect("ok")
        .expect("a response")
        .message_response;
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) = described else {
        panic!("expected file descriptors, got {described:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // v1: what current tools speak.
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(h.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let listed = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner()
        .message()
        .await
        .expect("ok")
        .expect("a response")
        .message_response;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, wanted);

    h.stop().await;
}

#[tokio::test]
async fn a_service_not_served_here_is_unimplemented_naming_what_is() {
    let h = start(Duration::from_secs(1)).await;
    let mut users = lightbox_api::users::users_service_client::UsersServiceClient::new(h.channel.clone());
    let status = users
        .get_user(lightbox_api::users::GetUserRequest::default())
        .await
        .expect_err("UsersService is not served here");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    for words in ["lightbox.users.v1.UsersService is not served on this port", "test.Echo"] {
        assert!(status.message().contains(words), "{words:?} in {:?}", status.message());
    }
    // The port's own services still answer.
    assert!(echo_unary(&h.channel).await.is_ok());
    h.stop().await;
}

#[tokio::test]
async fn down_refuses_calls_while_admin_health_and_reflection_stay_reachable() {
    let h = start(Duration::from_secs(1)).await;
    echo_unary(&h.channel).await.expect("up: call succeeds");

    let now = h.set_fault(down()).await.expect("set down");
    assert!(now.down);

    let refused = echo_unary(&h.channel).await.expect_err("down: call refused");
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(refused.message(), "echo is down (fault injection)");
    let refused = echo_stream(&h.channel).await.expect_err("down: stream refused");
    assert_eq!(refused.code(), Code::Unavailable);

    // Exempt: health still answers (with NOT_SERVING: see
    // `health_follows_the_faults_not_serving_while_down`), admin reads the
    // fault, reflection lists services.
    h.health_status("").await.expect("health reachable");
    let fault = h
        .admin()
        .get_fault(GetFaultRequest {})
        .await
        .expect("admin reachable")
        .into_inner()
        .fault
        .expect("a fault");
    assert!(fault.down);
    let mut reflection =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(h.channel.clone());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection reachable")
        .into_inner()
        .message()
        .await
        .expect("reflection answers")
        .expect("a response");

    h.stop().await;
}

#[tokio::test]
async fn health_follows_the_faults_not_serving_while_down() {
    let h = start(Duration::from_secs(1)).await;
    let status_of = |wanted: ServingStatus| {
        let h = &h;
        async move {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                let both = (h.health_status("").await.ok(), h.health_status("test.Echo").await.ok());
                if both == (Some(wanted as i32), Some(wanted as i32)) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "health never became {wanted:?}: {both:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    status_of(ServingStatus::Serving).await;
    h.set_fault(down()).await.expect("set down");
    status_of(ServingStatus::NotServing).await;
    // Latency alone is not down.
    h.set_fault(Fault {
        latency: Some(pbjson_types::Duration::from(Duration::from_millis(1))),
        ..Fault::default()
    })
    .await
    .expect("set latency");
    status_of(ServingStatus::Serving).await;
    h.stop().await;
}

#[tokio::test]
async fn clear_fault_restores_service() {
    let h = start(Duration::from_secs(1)).await;
    h.set_fault(down()).await.expect("set down");
    assert!(echo_unary(&h.channel).await.is_err());

    let cleared = h
        .admin()
        .clear_fault(ClearFaultRequest {})
        .await
        .expect("clear")
        .into_inner()
        .fault
        .expect("a fault");
    assert!(!cleared.down);
    assert_eq!(cleared.error_rate, 0.0);
    assert_eq!(h.faults.get(), FaultSpec::default());
    echo_unary(&h.channel).await.expect("call succeeds again");
    let stream = echo_stream(&h.channel).await;
    assert!(stream.is_ok(), "stream succeeds again: {:?}", stream.err());

    h.stop().await;
}

#[tokio::test]
async fn latency_is_applied_before_the_call() {
    let h = start(Duration::from_secs(1)).await;
    let latency = Duration::from_millis(300);
    let now = h
        .set_fault(Fault {
            latency: Some(millis(300)),
            error_rate: 0.0,
            down: false,
        })
        .await
        .expect("set latency");
    assert_eq!(now.latency, Some(millis(300)));
    assert_eq!(h.faults.get().latency, latency);

    for _ in 0..3 {
        let started = Instant::now();
        echo_unary(&h.channel).await.expect("slow call succeeds");
        let elapsed = started.elapsed();
        assert!(elapsed >= latency, "took {elapsed:?}, latency is {latency:?}");
    }

    h.stop().await;
}

#[tokio::test]
async fn error_rate_one_fails_every_call_and_zero_none() {
    let h = start(Duration::from_secs(1)).await;
    h.set_fault(Fault {
        latency: None,
        error_rate: 1.0,
        down: false,
    })
    .await
    .expect("set error rate 1");
    for _ in 0..20 {
        let err = echo_unary(&h.channel).await.expect_err("rate 1 fails");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "injected failure (fault injection, error rate 1)");
    }

    h.set_fault(Fault {
        latency: None,
        error_rate: 0.0,
        down: false,
    })
    .await
    .expect("set error rate 0");
    for _ in 0..20 {
        echo_unary(&h.channel).await.expect("rate 0 never fails");
    }

    h.stop().await;
}

#[tokio::test]
async fn invalid_faults_are_invalid_argument_and_change_nothing() {
    let h = start(Duration::from_secs(1)).await;
    let before = h
        .set_fault(Fault {
            latency: Some(millis(5)),
            error_rate: 0.25,
            down: false,
        })
        .await
        .expect("valid fault");

    let invalid = [
        (
            "error rate above 1",
            Fault {
                latency: None,
                error_rate: 1.5,
                down: false,
            },
        ),
        (
            "negative error rate",
            Fault {
                latency: None,
                error_rate: -0.1,
                down: false,
            },
        ),
        (
            "NaN error rate",
            Fault {
                latency: None,
                error_rate: f64::NAN,
                down: false,
            },
        ),
        (
            "negative latency",
            Fault {
                latency: Some(pbjson_types::Duration { seconds: -1, nanos: 0 }),
                error_rate: 0.0,
                down: false,
            },
        ),
        (
            "malformed latency",
            Fault {
                latency: Some(pbjson_types::Duration {
                    seconds: 0,
                    nanos: 2_000_000_000,
                }),
                error_rate: 0.0,
                down: false,
            },
        ),
        (
            "latency above 60 s",
            Fault {
                latency: Some(pbjson_types::Duration { seconds: 61, nanos: 0 }),
                error_rate: 0.0,
                down: false,
            },
        ),
    ];
    for (what, fault) in invalid {
        let err = h.set_fault(fault).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let missing = h
        .admin()
        .set_fault(SetFaultRequest { fault: None })
        .await
        .expect_err("missing fault");
    assert_eq!(missing.code(), Code::InvalidArgument);

    let after = h
        .admin()
        .get_fault(GetFaultRequest {})
        .await
        .expect("get")
        .into_inner()
        .fault
        .expect("a fault");
    assert_eq!(after, before);

    h.stop().await;
}

#[tokio::test]
async fn going_down_ends_a_running_stream_with_unavailable() {
    let h = start(Duration::from_secs(1)).await;
    let mut stream = echo_stream(&h.channel).await.expect("stream");
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("first message in time")
        .expect("ok")
        .expect("a message");

    h.set_fault(down()).await.expect("set down");

    let ended = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream ends in time");
    let status = ended.expect_err("the stream ends with an error");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "echo is down (fault injection)");

    h.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_call_in_progress_finish() {
    // A drain deadline far beyond the test's: `serve` must return because
    // the calls finished, not because it gave up.
    let drain_timeout = Duration::from_secs(60);
    let h = start(drain_timeout).await;
    let mut stream = echo_stream(&h.channel).await.expect("stream");
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("first message in time")
        .expect("ok")
        .expect("a message");

    // Shutdown has begun once health turns NOT_SERVING.
    let mut watch = h
        .health()
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    h.trigger.trigger();
    loop {
        let status = tokio::time::timeout(DEADLINE, watch.message())
            .await
            .expect("status in time")
            .expect("ok")
            .expect("a status");
        if status.status == ServingStatus::NotServing as i32 {
            break;
        }
    }
    drop(watch);

    // The stream in progress still runs, and finishes normally.
    h.release.send_replace(true);
    let second = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("second message in time")
        .expect("ok");
    assert!(second.is_some());
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("end in time")
        .expect("ends with OK");
    assert!(end.is_none());

    let started = Instant::now();
    tokio::time::timeout(DEADLINE, h.server)
        .await
        .expect("serve returned once calls finished")
        .expect("no panic")
        .expect("Ok");
    assert!(started.elapsed() < drain_timeout);
}

#[tokio::test]
async fn serve_returns_at_the_drain_deadline_when_a_stream_never_ends() {
    let drain_timeout = Duration::from_secs(1);
    let h = start(drain_timeout).await;
    let mut stream = echo_stream(&h.channel).await.expect("stream");
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("first message in time")
        .expect("ok")
        .expect("a message");
    let addr = h.addr;

    let took = h.stop().await;
    // It drained for the whole timeout (the call was not cut early)...
    assert!(took >= drain_timeout, "returned after {took:?}");
    // ...and no longer than the timeout plus the time to cut connections.
    assert!(took < drain_timeout + Duration::from_secs(3), "returned after {took:?}");

    // The endless call was cut: its client sees the connection go.
    let ended = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the cut stream ends in time");
    assert!(ended.is_err(), "expected an error, got {ended:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn bind_names_the_address_in_use() {
    let first = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
    let addr = first.local_addr().expect("local addr");
    let err = bind(addr).await.expect_err("port taken");
    assert_eq!(err.to_string(), format!("cannot listen on {addr}: address in use"));
}
