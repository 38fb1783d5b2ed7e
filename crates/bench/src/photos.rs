//! The seed's three problems in numbers, on `ListPhotos`: answered the
//! event-driven way (`CACHED`, from Photos' local copies, one hop) and the
//! synchronous way (`FRESH`, Photos → Users → Contracts), against a
//! `lightbox dev` child process whose upstreams are made slow, down or
//! failing through its fault service:
//!
//! - slowness: latency injected on each upstream, one client;
//! - down or overloaded: upstreams down or at 30 % errors, one client;
//! - many users: 1 → 256 concurrent clients, with the load that reaches
//!   the upstreams, and a minimal tonic server as the ceiling.
//!
//! Also the Lightbox half of the unary peer comparison: `GetUser`, the
//! same generator as etcd's `Range`.

use std::time::Duration;

use lightbox_api::{
    admin::{
        ClearFaultRequest, ClearFaultResponse, Fault, GetFaultRequest, GetFaultResponse, SetFaultRequest,
        SetFaultResponse, fault_service_client::FaultServiceClient, fault_service_server::FaultService,
    },
    contracts::{
        Contract, ContractOption, CreateContractRequest, Plan, contracts_service_client::ContractsServiceClient,
    },
    photos::{Consistency, CreatePhotoRequest, ListPhotosRequest, Photo, photos_service_client::PhotosServiceClient},
    users::{CreateUserRequest, GetUserRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient},
};
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    harness::{Res, Server, connect, metric_sum, scrape},
    load::{Run, closed_loop, sequential},
    report::{Latency, LoadRow, OutageRow, SlownessRow, UnaryRow},
};

/// Photos in the customer's listing.
const PHOTOS: usize = 10;
/// Connections the many-users clients share.
const CONNECTIONS: usize = 4;

/// The two ways to read, as `ListPhotos` names them.
const MODES: [(Consistency, &str); 2] = [(Consistency::Cached, "CACHED"), (Consistency::Fresh, "FRESH")];

/// A `lightbox dev` with a customer who has photos, ready to be read.
pub struct Photos {
    server: Server,
    user_id: String,
    admin: FaultServiceClient<Channel>,
    channels: Vec<Channel>,
    users: UsersServiceClient<Channel>,
    /// [`CONNECTIONS`] channels to Users, for the unary cells.
    users_channels: Vec<Channel>,
}

impl Photos {
    /// Starts `lightbox dev` (on core 0 when pinning) and makes the
    /// customer: a user, a contract, the link, `PHOTOS` photos; answers
    /// once Photos' copies hold them.
    pub async fn start(pinned: bool) -> Res<Photos> {
        let server = Server::dev(
            pinned,
            &["users", "contracts", "photos", "admin"],
            &["--target", "users,contracts,photos", "--no-demo"],
        )
        .await?;
        let (user, contract) = create_customer(&server, "Bench Customer", "bench@example.com", 1000).await?;
        let users = UsersServiceClient::new(connect(&server.url("users")).await?);
        let mut photos = PhotosServiceClient::new(connect(&server.url("photos")).await?);
        // Photos' copies hold the customer (and the link) before uploads.
        photos
            .list_photos(ListPhotosRequest {
                user_id: user.id.clone(),
                min_users_revision: user.revision,
                min_contracts_revision: contract.revision,
                ..ListPhotosRequest::default()
            })
            .await?;
        for i in 0..PHOTOS {
            photos
                .create_photo(CreatePhotoRequest {
                    photo: Some(Photo {
                        user_id: user.id.clone(),
                        title: format!("Photo {i}"),
                        content_type: "image/jpeg".into(),
                        size_bytes: 1024,
                        ..Photo::default()
                    }),
                })
                .await?;
        }
        let mut channels = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            channels.push(connect(&server.url("photos")).await?);
        }
        let mut users_channels = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            users_channels.push(connect(&server.url("users")).await?);
        }
        let admin = FaultServiceClient::new(connect(&server.url("admin")).await?);
        Ok(Photos {
            server,
            user_id: user.id,
            admin,
            channels,
            users,
            users_channels,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.pid
    }

    /// Sets `fault` on `component` (`users`, `contracts`); none: clears it.
    async fn set(&mut self, component: &str, fault: Option<Fault>) -> Res<()> {
        let component = component.to_owned();
        match fault {
            Some(fault) => drop(
                self.admin
                    .set_fault(SetFaultRequest {
                        fault: Some(fault),
                        component,
                    })
                    .await?,
            ),
            None => drop(self.admin.clear_fault(ClearFaultRequest { component }).await?),
        }
        Ok(())
    }

    /// Sets `fault` on Users and Contracts (none: clears them).
    async fn upstreams(&mut self, fault: Option<Fault>) -> Res<()> {
        for component in ["users", "contracts"] {
            self.set(component, fault).await?;
        }
        Ok(())
    }

    /// Unary calls Users and Contracts have received so far: the load a
    /// read puts on them (the copies' watch streams, and their reconnects
    /// after an outage, are not counted).
    async fn upstream_calls(&self) -> Res<f64> {
        let text = scrape(self.server.addr("admin")).await?;
        Ok([
            "lightbox.users.v1.UsersService",
            "lightbox.contracts.v1.ContractsService",
        ]
        .iter()
        .map(|service| {
            let service = format!("grpc_service=\"{service}\"");
            metric_sum(&text, "grpc_server_started_total", &["grpc_type=\"unary\"", &service])
        })
        .sum())
    }

    /// One `ListPhotos` of the customer, on connection `client`.
    fn list(&self, consistency: Consistency, client: usize) -> impl Future<Output = Result<(), Status>> + 'static {
        list_photos(
            self.channels[client % self.channels.len()].clone(),
            self.user_id.clone(),
            consistency,
        )
    }

    /// `requests` sequential `ListPhotos` in `consistency`.
    async fn sequential(&self, consistency: Consistency, requests: usize) -> Run {
        sequential(requests, |_| self.list(consistency, 0)).await
    }

    /// Slowness: each delay of `delays_ms` on each upstream, each mode.
    pub async fn slowness(&mut self, delays_ms: &[u64], requests: usize) -> Res<Vec<SlownessRow>> {
        let mut rows = Vec::new();
        for &delay_ms in delays_ms {
            self.upstreams(Some(Fault {
                latency: Some(pbjson_duration(Duration::from_millis(delay_ms))),
                ..Fault::default()
            }))
            .await?;
            for (consistency, mode) in MODES {
                let before = self.upstream_calls().await?;
                let run = self.sequential(consistency, requests).await;
                let calls = self.upstream_calls().await? - before;
                if run.errors > 0 {
                    return Err(format!("{mode} with {delay_ms} ms: {} of {requests} failed", run.errors).into());
                }
                rows.push(SlownessRow {
                    delay_ms,
                    mode: mode.into(),
                    requests,
                    latency: run.latency,
                    upstream_calls_per_request: calls / requests as f64,
                });
            }
        }
        self.upstreams(None).await?;
        Ok(rows)
    }

    /// Propagation: `requests` updates of the customer on Users, each
    /// followed by a `ListPhotos` that must reflect it (`min_users_revision`):
    /// write acknowledged → readable from Photos' copy.
    pub async fn propagation(&mut self, requests: usize) -> Res<Latency> {
        let mut samples = Vec::with_capacity(requests);
        let mut photos = PhotosServiceClient::new(self.channels[0].clone());
        for i in 0..requests {
            let user = self
                .users
                .get_user(GetUserRequest {
                    id: self.user_id.clone(),
                    ..GetUserRequest::default()
                })
                .await?
                .into_inner()
                .user
                .ok_or("GetUser answered no user")?;
            let written = self
                .users
                .update_user(UpdateUserRequest {
                    user: Some(User {
                        display_name: format!("Bench Customer {i}"),
                        ..user
                    }),
                    update_mask: None,
                    expected_revision: 0,
                })
                .await?
                .into_inner()
                .user
                .ok_or("UpdateUser answered no user")?;
            let acknowledged = std::time::Instant::now();
            photos
                .list_photos(ListPhotosRequest {
                    user_id: self.user_id.clone(),
                    min_users_revision: written.revision,
                    ..ListPhotosRequest::default()
                })
                .await?;
            samples.push(acknowledged.elapsed().as_secs_f64() * 1e3);
        }
        Ok(Latency::of(samples))
    }

    /// Down or overloaded: each scenario, each mode.
    pub async fn outage(&mut self, requests: usize) -> Res<Vec<OutageRow>> {
        let down = Fault {
            down: true,
            ..Fault::default()
        };
        let failing = Fault {
            error_rate: 0.3,
            ..Fault::default()
        };
        let scenarios: [(&str, [Option<Fault>; 2]); 4] = [
            ("Users down", [Some(down), None]),
            ("Contracts down", [None, Some(down)]),
            ("both down", [Some(down), Some(down)]),
            ("both at 30 % errors", [Some(failing), Some(failing)]),
        ];
        let mut rows = Vec::new();
        for (scenario, faults) in scenarios {
            for (component, fault) in ["users", "contracts"].into_iter().zip(faults) {
                self.set(component, fault).await?;
            }
            for (consistency, mode) in MODES {
                let run = self.sequential(consistency, requests).await;
                rows.push(OutageRow {
                    scenario: scenario.into(),
                    mode: mode.into(),
                    requests: run.requests(),
                    success_rate: run.success_rate(),
                    latency: run.latency,
                });
            }
        }
        self.upstreams(None).await?;
        Ok(rows)
    }

    /// Many users: each count of `clients`, each mode, for `duration` each;
    /// and the minimal server at `minimal` with the same clients.
    pub async fn load(&self, clients: &[usize], duration: Duration, minimal: &Minimal) -> Res<Vec<LoadRow>> {
        let mut rows = Vec::new();
        for &n in clients {
            for (consistency, mode) in MODES {
                let before = self.upstream_calls().await?;
                let (channels, user_id) = (self.channels.clone(), self.user_id.clone());
                let calls = closed_loop(n, duration, move |client| {
                    list_photos(channels[client % channels.len()].clone(), user_id.clone(), consistency)
                })
                .await;
                let upstream = self.upstream_calls().await? - before;
                rows.push(LoadRow {
                    clients: n,
                    cell: mode.into(),
                    requests_per_s: calls.requests_per_s(),
                    latency: calls.latency,
                    upstream_calls_per_s: upstream / calls.elapsed.as_secs_f64(),
                    errors: calls.errors,
                });
            }
            let run = minimal.load(n, duration).await;
            rows.push(LoadRow {
                clients: n,
                cell: "minimal tonic server".into(),
                requests_per_s: run.requests_per_s(),
                latency: run.latency,
                upstream_calls_per_s: 0.0,
                errors: run.errors,
            });
        }
        Ok(rows)
    }

    /// The Lightbox half of the unary peer cells: `GetUser` of one user.
    pub async fn unary(&self, clients: usize, duration: Duration) -> Res<UnaryRow> {
        let channels = self.users_channels.clone();
        let id = self.user_id.clone();
        let run = closed_loop(clients, duration, move |client| {
            let mut users = UsersServiceClient::new(channels[client % channels.len()].clone());
            let request = GetUserRequest {
                id: id.clone(),
                ..GetUserRequest::default()
            };
            async move { users.get_user(request).await.map(|_| ()) }
        })
        .await;
        Ok(UnaryRow {
            system: "Lightbox".into(),
            call: "GetUser".into(),
            clients,
            requests_per_s: run.requests_per_s(),
            latency: run.latency,
        })
    }

    /// Stops `lightbox dev`.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// A user (`display_name`, `email`), a contract with a photo quota of
/// `quota`, and the link, created over gRPC on `server` (its `users` and
/// `contracts` listeners): (the linked user, the contract).
pub async fn create_customer(server: &Server, display_name: &str, email: &str, quota: usize) -> Res<(User, Contract)> {
    let mut users = UsersServiceClient::new(connect(&server.url("users")).await?);
    let mut contracts = ContractsServiceClient::new(connect(&server.url("contracts")).await?);
    let user = users
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: display_name.into(),
                email: email.into(),
                ..User::default()
            }),
        })
        .await?
        .into_inner()
        .user
        .ok_or("CreateUser answered no user")?;
    let contract = contracts
        .create_contract(CreateContractRequest {
            contract: Some(Contract {
                holder_user_id: user.id.clone(),
                plan: Plan::Standard as i32,
                options: vec![ContractOption {
                    code: "photo_quota".into(),
                    value: quota.to_string(),
                    enabled: true,
                }],
                ..Contract::default()
            }),
        })
        .await?
        .into_inner()
        .contract
        .ok_or("CreateContract answered no contract")?;
    let user = users
        .update_user(UpdateUserRequest {
            user: Some(User {
                contract_id: contract.id.clone(),
                ..user
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await?
        .into_inner()
        .user
        .ok_or("UpdateUser answered no user")?;
    Ok((user, contract))
}

/// `ListPhotos` of `user_id` on `channel`, checked: every photo listed.
async fn list_photos(channel: Channel, user_id: String, consistency: Consistency) -> Result<(), Status> {
    let request = ListPhotosRequest {
        user_id,
        consistency: consistency as i32,
        ..ListPhotosRequest::default()
    };
    let answer = PhotosServiceClient::new(channel)
        .list_photos(request)
        .await?
        .into_inner();
    if answer.photos.len() == PHOTOS {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "{} photos listed, not {PHOTOS}",
            answer.photos.len()
        )))
    }
}

fn pbjson_duration(duration: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// The ceiling: a tonic server that answers `GetFault` from memory, this
/// binary run as `lightbox bench --serve-minimal` (one tokio worker, on
/// core 0 when pinning).
pub struct Minimal {
    server: Server,
    channels: Vec<Channel>,
}

impl Minimal {
    /// Starts it and connects `CONNECTIONS` channels.
    pub async fn start(pinned: bool) -> Res<Minimal> {
        let server = Server::start(pinned, &["bench", "--serve-minimal"], None, &["minimal"]).await?;
        let mut channels = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            channels.push(connect(&server.url("minimal")).await?);
        }
        Ok(Minimal { server, channels })
    }

    async fn load(&self, clients: usize, duration: Duration) -> Run {
        let channels = self.channels.clone();
        closed_loop(clients, duration, move |client| {
            let mut client = FaultServiceClient::new(channels[client % channels.len()].clone());
            async move { client.get_fault(GetFaultRequest::default()).await.map(|_| ()) }
        })
        .await
    }

    /// Stops it.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// The minimal server's one answer.
struct Constant;

#[tonic::async_trait]
impl FaultService for Constant {
    async fn get_fault(&self, _: Request<GetFaultRequest>) -> Result<Response<GetFaultResponse>, Status> {
        Ok(Response::new(GetFaultResponse {
            fault: Some(Fault::default()),
            component: "minimal".into(),
        }))
    }

    async fn set_fault(&self, _: Request<SetFaultRequest>) -> Result<Response<SetFaultResponse>, Status> {
        Err(Status::unimplemented("the minimal server only answers GetFault"))
    }

    async fn clear_fault(&self, _: Request<ClearFaultRequest>) -> Result<Response<ClearFaultResponse>, Status> {
        Err(Status::unimplemented("the minimal server only answers GetFault"))
    }
}

/// `lightbox bench --serve-minimal`: serves `Constant` on a free loopback
/// port, after printing `  minimal  grpc://ADDR`, on the process's runtime
/// (one tokio worker: [`Server::start`] sets `TOKIO_WORKER_THREADS=1`).
pub async fn serve_minimal() -> Res<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("  minimal  grpc://{}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(lightbox_api::admin::fault_service_server::FaultServiceServer::new(
            Constant,
        ))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
