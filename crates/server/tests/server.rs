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
use lightbox_server::{
    AdminCredential, AdminOptions, FaultSpec, Faults, ProcessHealth, ServeError, ServerOptions, Shutdown,
    ShutdownTrigger, bind, serve, serve_admin,
};
use tokio::{sync::watch, task::JoinHandle};
use tonic::{
    Code, Request, Status,
    body::Body,
    codec::Streaming,
    codegen::Bytes,
    server::NamedService,
    service::Routes,
    service::{Interceptor, interceptor::InterceptedService},
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
        Request::new(GetFaultRequest::default()),
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
            Request::new(GetFaultRequest::default()),
            PathAndQuery::from_static("/test.Echo/Stream"),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(response.into_inner())
}

// ------------------------------------------------------------------ harness

/// The admin token of the servers under test.
const TOKEN: &str = "test-admin-token-0123456789";

/// A server under test, its process's admin listener, and what controls
/// them.
struct Harness {
    addr: SocketAddr,
    channel: Channel,
    admin_channel: Channel,
    faults: Faults,
    trigger: ShutdownTrigger,
    server: JoinHandle<Result<(), ServeError>>,
    /// Stops the admin listener (after the server, as a process does).
    _admin_trigger: ShutdownTrigger,
    release: watch::Sender<bool>,
}

async fn start(drain_timeout: Duration) -> Harness {
    start_with(ServerOptions {
        drain_timeout,
        ..ServerOptions::default()
    })
    .await
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
struct Bearer(&'static str);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = format!("Bearer {}", self.0).parse().expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

async fn start_with(options: ServerOptions) -> Harness {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let admin_listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind admin");
    let admin_addr = admin_listener.local_addr().expect("admin local addr");
    let (release, release_rx) = watch::channel(false);
    let routes = Routes::new(Echo { release: release_rx });
    let faults = Faults::new();
    let process_health = ProcessHealth::new();
    let (trigger, shutdown) = Shutdown::new();
    let options = ServerOptions {
        service_name: "echo".to_owned(),
        process_health: Some(process_health.clone()),
        ..options
    };
    let server = tokio::spawn(serve(
        listener,
        routes,
        &["test.Echo"],
        faults.clone(),
        shutdown,
        options,
    ));
    let (admin_trigger, admin_shutdown) = Shutdown::new();
    let admin = AdminOptions {
        faults: true,
        credential: AdminCredential::bearer(TOKEN).expect("a long token"),
        metrics: None,
        max_message_bytes: 1024 * 1024,
        tls: None,
    };
    tokio::spawn(serve_admin(
        admin_listener,
        process_health,
        vec![("echo".to_owned(), faults.clone())],
        admin,
        admin_shutdown,
    ));
    // The listeners are bound before the servers run, so connecting cannot
    // race them.
    Harness {
        addr,
        channel: connect(addr).await,
        admin_channel: connect(admin_addr).await,
        faults,
        trigger,
        server,
        _admin_trigger: admin_trigger,
        release,
    }
}

impl Harness {
    fn admin(&self) -> FaultServiceClient<InterceptedService<Channel, Bearer>> {
        FaultServiceClient::with_interceptor(self.admin_channel.clone(), Bearer(TOKEN))
    }

    /// The process's health, as its admin listener reports it.
    async fn process_health_status(&self, service: &str) -> Result<i32, Status> {
        let response = HealthClient::new(self.admin_channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(response.into_inner().status)
    }

    fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    async fn set_fault(&self, fault: Fault) -> Result<Fault, Status> {
        let response = self
            .admin()
            .set_fault(SetFaultRequest {
                fault: Some(fault),
                component: String::new(),
            })
            .await?;
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
    // A drain deadline far away: the server must not need it.
    let h = start(Duration::from_secs(600)).await;
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

    // Then the watch ends as the port closes: it does not hold the drain
    // (every replica's balancer keeps one open).
    let end = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("the watch ends in time");
    assert!(matches!(end, Ok(None)), "the watch ends cleanly: {end:?}");
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
async fn service_ports_serve_no_fault_service_and_the_admin_needs_the_token() {
    let h = start(Duration::from_secs(1)).await;
    // Not on the service port: reaching a service is no licence to break it.
    let status = FaultServiceClient::new(h.channel.clone())
        .set_fault(SetFaultRequest {
            fault: Some(down()),
            component: String::new(),
        })
        .await
        .expect_err("no fault service on a service port");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("admin listener"), "{}", status.message());

    // On the admin listener, without the token or with another one: refused,
    // saying why, and nothing changes.
    let anonymous = FaultServiceClient::new(h.admin_channel.clone())
        .set_fault(SetFaultRequest {
            fault: Some(down()),
            component: String::new(),
        })
        .await
        .expect_err("no credential");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert!(anonymous.message().contains("--admin-token"), "{}", anonymous.message());
    let wrong = FaultServiceClient::with_interceptor(h.admin_channel.clone(), Bearer("another-token-0123456789"))
        .set_fault(SetFaultRequest {
            fault: Some(down()),
            component: String::new(),
        })
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(wrong.message().contains("not the one"), "{}", wrong.message());
    assert_eq!(h.faults.get(), FaultSpec::default());
    echo_unary(&h.channel).await.expect("still up");

    // With it: faults work, for the component named or the only one.
    let named = h
        .admin()
        .get_fault(GetFaultRequest {
            component: "echo".to_owned(),
        })
        .await
        .expect("named component")
        .into_inner();
    assert_eq!(named.component, "echo");
    let unknown = h
        .admin()
        .get_fault(GetFaultRequest {
            component: "users".to_owned(),
        })
        .await
        .expect_err("no such component");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("it runs echo"), "{}", unknown.message());
    h.set_fault(down()).await.expect("with the token");
    assert!(h.faults.get().down);
    h.stop().await;
}

#[tokio::test]
async fn an_admin_without_fault_injection_says_how_to_turn_it_on() {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind admin");
    let addr = listener.local_addr().expect("local addr");
    let faults = Faults::new();
    let (_trigger, shutdown) = Shutdown::new();
    let options = AdminOptions {
        faults: false,
        credential: AdminCredential::Open,
        metrics: None,
        max_message_bytes: 1024 * 1024,
        tls: None,
    };
    tokio::spawn(serve_admin(
        listener,
        ProcessHealth::new(),
        vec![("echo".to_owned(), faults.clone())],
        options,
        shutdown,
    ));
    let status = FaultServiceClient::new(connect(addr).await)
        .set_fault(SetFaultRequest {
            fault: Some(down()),
            component: String::new(),
        })
        .await
        .expect_err("fault injection is off");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("--faults"), "{}", status.message());
    assert_eq!(faults.get(), FaultSpec::default());
}

#[tokio::test]
async fn during_the_drain_delay_health_says_not_serving_and_calls_still_succeed() {
    let h = start_with(ServerOptions {
        drain_timeout: Duration::from_secs(1),
        // Far longer than the test: the listener must still be open.
        drain_delay: Duration::from_secs(60),
        ..ServerOptions::default()
    })
    .await;
    h.trigger.trigger();
    let deadline = Instant::now() + DEADLINE;
    while h.health_status("").await.ok() != Some(ServingStatus::NotServing as i32)
        || h.process_health_status("").await.ok() != Some(ServingStatus::NotServing as i32)
    {
        assert!(Instant::now() < deadline, "health never said NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Out of rotation, but still answering: on this connection and on a new one.
    echo_unary(&h.channel).await.expect("a call during the drain delay");
    echo_unary(&connect(h.addr).await)
        .await
        .expect("a new connection during the drain delay");
    h.server.abort();
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
        .get_fault(GetFaultRequest::default())
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
                // The port's health, and the process's on the admin listener.
                let all = [
                    h.health_status("").await.ok(),
                    h.health_status("test.Echo").await.ok(),
                    h.process_health_status("").await.ok(),
                    h.process_health_status("test.Echo").await.ok(),
                ];
                if all == [Some(wanted as i32); 4] {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "health never became {wanted:?}: {all:?}"
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
        .clear_fault(ClearFaultRequest::default())
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
        .set_fault(SetFaultRequest {
            fault: None,
            component: String::new(),
        })
        .await
        .expect_err("missing fault");
    assert_eq!(missing.code(), Code::InvalidArgument);

    let after = h
        .admin()
        .get_fault(GetFaultRequest::default())
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

/// Reads one HTTP/2 frame: (type, stream, payload).
async fn read_frame(socket: &mut tokio::net::TcpStream) -> (u8, u32, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.expect("a frame header");
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; length];
    socket.read_exact(&mut payload).await.expect("a frame payload");
    (head[3], stream, payload)
}

#[tokio::test]
async fn the_server_announces_its_http2_limits() {
    use lightbox_server::http2;
    use tokio::io::AsyncWriteExt;
    let h = start(Duration::from_secs(10)).await;
    let mut socket = tokio::net::TcpStream::connect(h.addr).await.expect("connect");
    // The client preface and an empty SETTINGS frame.
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let (kind, stream, payload) = tokio::time::timeout(DEADLINE, read_frame(&mut socket))
        .await
        .expect("the server's first frame in time");
    assert_eq!((kind, stream), (0x4, 0), "the server's SETTINGS come first");
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    let setting = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    // SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE; the frame
    // size is HTTP/2's default, which a server need not announce.
    assert_eq!(setting(0x3), Some(http2::MAX_CONCURRENT_STREAMS), "{settings:?}");
    assert_eq!(setting(0x4), Some(http2::STREAM_WINDOW), "{settings:?}");
    assert!(
        setting(0x5).is_none_or(|size| size == http2::MAX_FRAME_SIZE),
        "{settings:?}"
    );
    // The connection window grows from HTTP/2's 65,535 by a WINDOW_UPDATE
    // on stream 0.
    let grown = tokio::time::timeout(DEADLINE, async {
        loop {
            let (kind, stream, payload) = read_frame(&mut socket).await;
            if kind == 0x8 && stream == 0 {
                break u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            }
        }
    })
    .await
    .expect("the connection window's update in time");
    assert_eq!(grown + 65_535, http2::CONNECTION_WINDOW);
    h.trigger.trigger();
}
