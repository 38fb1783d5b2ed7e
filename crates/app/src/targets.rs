//! The components, and how each one starts: its database, its gRPC server
//! on a bound listener, and its shutdown. The same code runs a component
//! alone (microservices mode) or beside the others (monolithic mode);
//! components always reach each other over real gRPC.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use lightbox_cache::{CacheOptions, sources};
use lightbox_changefeed::{Db, Feed, FeedOptions, FeedStats, Retention};
use lightbox_client::Balanced;
use lightbox_events::{EventsOptions, EventsService, Sources};
use lightbox_gateway::{AuthConfig, Gateway, GatewayOptions, Upstreams};
use lightbox_photos::{JobOptions, PhotosOptions};
use lightbox_server::{AdminService, Faults, ServerOptions, Shutdown, ShutdownTrigger};
use lightbox_tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
use tokio::{net::TcpListener, task::JoinHandle};

use tonic::{
    body::Body,
    codegen::{
        Service,
        http::{Request, Response},
    },
    server::NamedService,
    service::Routes,
};

use crate::{config::ServeArgs, metrics::ProcessMetrics, target::Target};

/// Everything a component needs to start, resolved from the command line
/// (or built directly by tests).
#[derive(Debug, Clone)]
pub struct Settings {
    /// One database for every component; `None`: an SQLite file per
    /// component in `data_dir`.
    pub database_url: Option<String>,
    /// Where SQLite files live.
    pub data_dir: PathBuf,
    /// Where the users and photos services reach the contracts service.
    pub contracts_url: String,
    /// Where the photos service reaches the users service.
    pub users_url: String,
    /// Where the gateway reaches the photos service.
    pub photos_url: String,
    /// The gateway's auth and limits.
    pub gateway: GatewayOptions,
    /// `GetUser`'s deadline on the contracts service.
    pub contract_timeout: Duration,
    /// Changefeed tuning.
    pub feed: FeedOptions,
    /// Local copies' tuning (users' copy of contracts, photos' copies).
    pub cache: CacheOptions,
    /// Photos' deadlines on its upstreams.
    pub photos: PhotosOptions,
    /// The delivery of events to functions.
    pub events: EventsOptions,
    /// Server tuning (message size, drain deadline).
    pub server: ServerOptions,
    /// Load the demo data into an empty database on start.
    pub demo: bool,
    /// The process's metrics (the same registry as `server.metrics` and
    /// `gateway.metrics`), which each component reports into.
    pub metrics: ProcessMetrics,
    /// The gateway's TLS (never asking phones for certificates); `None`:
    /// plaintext. The gRPC servers' is `server.tls`.
    pub gateway_tls: Option<ServerTls>,
    /// What clients trust (and present, under mutual TLS) when they reach
    /// an upstream at an `https://` URL.
    pub client_tls: Option<ClientTls>,
}

impl Settings {
    /// Settings from the command line; `dev` accepts development tokens.
    pub fn from_args(args: &ServeArgs, dev: bool) -> anyhow::Result<Settings> {
        let metrics = ProcessMetrics::new();
        let tls = tls(args)?;
        // With a CA to trust, the upstreams left unset are reached over TLS.
        let scheme = match tls.client {
            Some(_) => "https",
            None => "http",
        };
        Ok(Settings {
            database_url: args.database_url.clone(),
            data_dir: args.data_dir.clone(),
            contracts_url: args
                .contracts_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.contracts_addr)),
            users_url: args
                .users_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.users_addr)),
            photos_url: args
                .photos_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.photos_addr)),
            gateway: GatewayOptions {
                request_timeout: args.gateway_timeout,
                max_body_bytes: args.gateway_max_body_bytes,
                max_upload_bytes: args.gateway_max_upload_bytes,
                max_concurrent_uploads: args.gateway_max_uploads,
                max_concurrent_requests: args.gateway_max_requests,
                max_event_streams: args.gateway_max_event_streams,
                heartbeat: args.gateway_heartbeat,
                phone_queue: args.gateway_phone_queue,
                // Three progress intervals without a word: the stream is dead.
                upstream_idle_timeout: args.progress_interval * 3,
                metrics: metrics.registry().clone(),
                ..GatewayOptions::new(auth(args, dev)?)
            },
            contract_timeout: args.contract_timeout,
            cache: CacheOptions {
                // Three progress intervals without a word: the stream is dead.
                idle_timeout: args.progress_interval * 3,
                follow: match args.follow {
                    crate::config::Follow::Watch => lightbox_cache::FollowMode::Watch,
                    crate::config::Follow::Poll => lightbox_cache::FollowMode::poll(args.poll_interval),
                },
                ..CacheOptions::default()
            },
            photos: PhotosOptions {
                fresh_timeout: args.fresh_timeout,
                miss_timeout: args.miss_timeout,
                jobs: photo_jobs(args),
                ..PhotosOptions::default()
            },
            events: events(args, dev),
            feed: FeedOptions {
                watcher_buffer: args.watcher_buffer,
                progress_interval: args.progress_interval,
                retention: Retention {
                    keep_changes: args.keep_changes,
                    keep_tombstones: args.keep_tombstones,
                    ..Retention::default()
                },
                ..FeedOptions::default()
            },
            server: ServerOptions {
                max_message_bytes: args.max_message_bytes,
                drain_timeout: args.drain_timeout,
                drain_delay: args.drain_delay,
                metrics: metrics.registry().clone(),
                tls: tls.grpc,
                ..ServerOptions::default()
            },
            demo: false,
            metrics,
            gateway_tls: tls.gateway,
            client_tls: tls.client,
        })
    }

    /// A client of the service `label` at `spec` (one URL or several,
    /// comma-separated; a DNS name is re-resolved): balanced over its
    /// healthy replicas, over TLS for `https://` URLs, its calls counted in
    /// the process's metrics. Connects on first use.
    pub fn upstream(&self, label: &str, spec: &str, connect_timeout: Duration) -> anyhow::Result<Balanced> {
        let target =
            lightbox_client::Target::parse(spec).with_context(|| format!("the {label} service's address {spec:?}"))?;
        let types = lightbox_metrics::GrpcTypes::from_descriptor_set(lightbox_api::FILE_DESCRIPTOR_SET)
            .context("the descriptors do not decode")?;
        let options = lightbox_client::ConnectOptions {
            label: Some(label.to_owned()),
            tls: self.client_tls.clone(),
            metrics: Some(lightbox_metrics::GrpcClientLayer::new(self.metrics.registry(), &types)),
            ..lightbox_client::ConnectOptions::with_connect_timeout(connect_timeout)
        };
        lightbox_client::connect(&target, options).with_context(|| format!("cannot reach the {label} service"))
    }

    /// The scheme the servers' URLs start with, from what they serve.
    pub fn scheme(&self) -> &'static str {
        match self.client_tls {
            Some(_) => "https",
            None => "http",
        }
    }

    /// Polls every certificate file for changes, until the handles are
    /// dropped (see [`lightbox_tls::ServerTls::spawn_reloader`]).
    pub fn spawn_tls_reloaders(&self) -> Vec<JoinHandle<()>> {
        let every = Duration::from_secs(2);
        let servers = [&self.server.tls, &self.gateway_tls];
        let mut handles: Vec<JoinHandle<()>> = servers
            .into_iter()
            .flatten()
            .map(|tls| tls.spawn_reloader(every))
            .collect();
        handles.extend(self.client_tls.iter().map(|tls| tls.spawn_reloader(every)));
        handles
    }

    /// Opens the database of `component`.
    pub async fn database(&self, component: Target) -> anyhow::Result<Db> {
        match &self.database_url {
            Some(url) => Db::connect(url)
                .await
                .with_context(|| format!("cannot open the {component} database")),
            None => {
                let path = self.data_dir.join(format!("{component}.db"));
                Db::sqlite_file(&path)
                    .await
                    .with_context(|| format!("cannot open the {component} database at {}", path.display()))
            }
        }
    }
}

/// The delivery of events, from the command line: `dev` may deliver to
/// functions on loopback (where `cargo run --example contract_function`
/// listens).
fn events(args: &ServeArgs, dev: bool) -> EventsOptions {
    let mut allowed_networks = args.events_allow_network.clone();
    if dev {
        allowed_networks.extend(
            ["127.0.0.0/8", "::1/128"]
                .into_iter()
                .filter_map(|net| net.parse::<lightbox_events::Cidr>().ok()),
        );
    }
    EventsOptions {
        allowed_networks,
        ..EventsOptions::default()
    }
}

/// How the photos component processes images, from the command line.
fn photo_jobs(args: &ServeArgs) -> JobOptions {
    let defaults = JobOptions::default();
    JobOptions {
        workers: args.photo_workers.unwrap_or(defaults.workers),
        lease: args.photo_job_lease,
        poll_interval: args.photo_job_poll,
        max_attempts: args.photo_job_attempts.max(1),
        min_duration: args.photo_job_min_duration,
        ..defaults
    }
}

/// The TLS of a process, from the command line.
struct Tls {
    /// The gRPC servers' (mutual TLS with a client CA).
    grpc: Option<ServerTls>,
    /// The gateway's (no client certificates).
    gateway: Option<ServerTls>,
    /// The clients'.
    client: Option<ClientTls>,
}

/// Loads the certificates the flags name; a file that does not load fails
/// the start, naming it.
fn tls(args: &ServeArgs) -> anyhow::Result<Tls> {
    let pair = args.tls_cert.clone().zip(args.tls_key.clone());
    let server = |client_ca: Option<PathBuf>| -> anyhow::Result<Option<ServerTls>> {
        pair.clone()
            .map(|(cert, key)| ServerTls::load(ServerTlsFiles { cert, key, client_ca }))
            .transpose()
            .context("cannot load the TLS certificate (--tls-cert, --tls-key, --tls-client-ca)")
    };
    let grpc = server(args.tls_client_ca.clone())?
        .map(|tls| tls.with_alpn(&[b"h2"]))
        .transpose()
        .context("cannot set up TLS for gRPC")?;
    let client = args
        .tls_ca
        .clone()
        .map(|ca| {
            let (cert, key) = pair.clone().unzip();
            ClientTls::load(ClientTlsFiles { ca, cert, key })
        })
        .transpose()
        .context("cannot load the TLS CA (--tls-ca) or this process's certificate")?;
    Ok(Tls {
        grpc,
        gateway: server(None)?,
        client,
    })
}

/// The gateway's token checks from the command line. Production keys come
/// from `--jwt-secret` or `--jwt-public-key`; the development key only with
/// `--jwt-dev-key` or in `dev`.
fn auth(args: &ServeArgs, dev: bool) -> anyhow::Result<AuthConfig> {
    let mut auth = AuthConfig::new(&args.jwt_issuer, &args.jwt_audience);
    if let Some(secret) = &args.jwt_secret {
        auth = auth.with_hs256_secret(secret.as_bytes());
    }
    for path in &args.jwt_public_key {
        let pem = std::fs::read(path).with_context(|| format!("cannot read the public key {}", path.display()))?;
        auth = auth
            .with_public_key_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if dev || args.jwt_dev_key {
        auth = auth.with_hs256_secret(lightbox_gateway::auth::DEVELOPMENT_SECRET.as_bytes());
    }
    Ok(auth)
}

/// A running component: its address, and how to stop it.
pub struct Component {
    /// Which component.
    pub target: Target,
    /// The address its gRPC server listens on (for `Events`, which has no
    /// port of its own, the admin listener's).
    pub addr: SocketAddr,
    /// Its fault switches (also reachable over its admin service).
    pub faults: Faults,
    /// The services it adds to its process's admin listener, behind the
    /// admin credential (Photos' jobs).
    pub admin_services: Vec<AdminService>,
    /// Reads its changefeed's counters (watch streams, head); `None` for
    /// the gateway, which keeps no data.
    feed_stats: Option<Arc<dyn Fn() -> FeedStats + Send + Sync>>,
    stop: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Component {
    /// Its changefeed's counters now (how many watch streams it serves, its
    /// head); `None` for the gateway.
    pub fn feed_stats(&self) -> Option<FeedStats> {
        self.feed_stats.as_ref().map(|stats| stats())
    }

    /// Asks the component to shut down gracefully and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.trigger();
        self.task.await.context("a component's task panicked")?
    }

    /// Waits until the component stops by itself (it failed) or `shutdown` fires.
    pub async fn run_until(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Component {
            stop, mut task, target, ..
        } = self;
        tokio::select! {
            result = &mut task => return result.with_context(|| format!("the {target} component's task panicked"))?,
            _ = shutdown.wait() => {}
        }
        stop.trigger();
        task.await
            .with_context(|| format!("the {target} component's task panicked"))?
    }
}

/// Starts `component` (not `All`) on `listener`.
pub async fn start(component: Target, settings: &Settings, listener: TcpListener) -> anyhow::Result<Component> {
    if component == Target::Gateway {
        return start_gateway(settings, listener);
    }
    let db = settings.database(component).await?;
    let max = settings.server.max_message_bytes;
    match component {
        Target::Users => {
            let channel = settings.upstream("contracts", &settings.contracts_url, settings.contract_timeout)?;
            let contracts = lightbox_users::ContractsUpstream::new(channel, settings.contract_timeout);
            let channel = contracts.channel();
            let service =
                lightbox_users::UsersService::open(db, settings.feed.clone(), contracts, settings.cache.clone())
                    .await
                    .context("cannot open the users service")?;
            let copy = service.contracts_copy().clone();
            report_copy(&settings.metrics, "users.contracts", copy.clone());
            let follow = Box::pin(async move { copy.follow_upstream(sources::ContractsSource::new(channel)).await });
            if settings.demo && service.feed().head() == 0 {
                for user in crate::demo::users() {
                    service.import(user).await.context("cannot load the demo users")?;
                }
            }
            let feed = service.feed().clone();
            let server_svc = service.into_server(max);
            launch(component, listener, server_svc, feed, settings, Some(follow))
        }
        Target::Contracts => {
            let service = lightbox_contracts::ContractsService::open(db, settings.feed.clone())
                .await
                .context("cannot open the contracts service")?;
            if settings.demo && service.feed().head() == 0 {
                for contract in crate::demo::contracts() {
                    service
                        .import(contract)
                        .await
                        .context("cannot load the demo contracts")?;
                }
            }
            let feed = service.feed().clone();
            let server_svc = service.into_server(max);
            launch(component, listener, server_svc, feed, settings, None)
        }
        Target::Photos => {
            let timeout = settings.photos.fresh_timeout;
            let users = settings.upstream("users", &settings.users_url, timeout)?;
            let contracts = settings.upstream("contracts", &settings.contracts_url, timeout)?;
            let service = lightbox_photos::PhotosService::open(
                db,
                settings.feed.clone(),
                settings.cache.clone(),
                users,
                contracts,
                settings.photos.clone(),
            )
            .await
            .context("cannot open the photos service")?;
            if settings.demo && service.feed().head() == 0 {
                crate::demo::load_photos(&service).await?;
            }
            let follower = service.clone();
            // Beside the server: the copies of users and contracts, and the
            // processing of uploaded images.
            let follow = Box::pin(async move { tokio::join!(follower.follow(), follower.process_jobs()).0 });
            let jobs = AdminService::new(service.jobs_admin().into_server(max));
            report_copy(&settings.metrics, "photos.users", service.users_copy().clone());
            report_copy(&settings.metrics, "photos.contracts", service.contracts_copy().clone());
            let counted = service.clone();
            settings
                .metrics
                .add_photos(Arc::new(move || (counted.sync_fallbacks(), counted.upstream_calls())));
            let feed = service.feed().clone();
            let server_svc = service.into_server(max);
            let mut component = launch(component, listener, server_svc, feed, settings, Some(follow))?;
            component.admin_services.push(jobs);
            Ok(component)
        }
        Target::Gateway | Target::Events | Target::All => {
            anyhow::bail!("{component} does not start on a listener of its own")
        }
    }
}

/// Starts the delivery of events to functions: it reads the services'
/// watch streams at their URLs (connections are made on first use, so they
/// may start later) and has no port of its own; its `SubscriptionsService`
/// goes on the admin listener, at `admin` (behind the admin credential).
pub async fn start_events(settings: &Settings, admin: SocketAddr) -> anyhow::Result<Component> {
    let db = settings.database(Target::Events).await?;
    // Its own connect timeout, for the services as for the functions.
    let timeout = settings.events.connect_timeout;
    let sources = Sources::grpc(
        settings.upstream("users", &settings.users_url, timeout)?,
        settings.upstream("contracts", &settings.contracts_url, timeout)?,
        settings.upstream("photos", &settings.photos_url, timeout)?,
    );
    let service = EventsService::open(db, settings.events.clone(), sources)
        .await
        .context("cannot open the events component")?;
    let subscriptions = AdminService::new(service.clone().into_bare_server(settings.server.max_message_bytes));
    let (stop, shutdown) = Shutdown::new();
    let task = tokio::spawn(async move {
        let db = service.db().clone();
        // Deliveries in flight finish (each within its timeout) on shutdown.
        service.run(async move { shutdown.wait().await }).await;
        db.close().await;
        Ok(())
    });
    Ok(Component {
        target: Target::Events,
        addr: admin,
        faults: Faults::new(),
        admin_services: vec![subscriptions],
        feed_stats: None,
        stop,
        task,
    })
}

/// Starts the gateway: HTTP on `listener`, calling the services at their
/// URLs (connections are made on first use, so upstreams may start later).
fn start_gateway(settings: &Settings, listener: TcpListener) -> anyhow::Result<Component> {
    if !settings.gateway.auth.has_keys() {
        anyhow::bail!(
            "the gateway has no key to check tokens with: give --jwt-secret or --jwt-public-key \
             (or --jwt-dev-key to accept development tokens)"
        );
    }
    let timeout = settings.gateway.request_timeout;
    let upstreams = Upstreams {
        users: settings.upstream("users", &settings.users_url, timeout)?,
        contracts: settings.upstream("contracts", &settings.contracts_url, timeout)?,
        photos: settings.upstream("photos", &settings.photos_url, timeout)?,
    };
    let (stop, shutdown) = Shutdown::new();
    // Event streams end once the drain delay is over, when phones resuming
    // them reach another gateway.
    let streams_end = shutdown.delayed(settings.server.drain_delay);
    let router = Gateway::new(settings.gateway.clone(), upstreams, streams_end)
        .map_err(anyhow::Error::msg)?
        .router();
    let addr = listener.local_addr().context("the listener has no local address")?;
    let (delay, drain) = (settings.server.drain_delay, settings.server.drain_timeout);
    let tls = settings.gateway_tls.clone();
    let task = tokio::spawn(async move {
        lightbox_gateway::serve(listener, router, shutdown, delay, drain, tls)
            .await
            .context("the gateway server failed")
    });
    Ok(Component {
        target: Target::Gateway,
        addr,
        faults: Faults::new(),
        admin_services: Vec::new(),
        feed_stats: None,
        stop,
        task,
    })
}

/// Reports the copy `name` in the process's metrics.
fn report_copy<T: lightbox_changefeed::feed::Entity>(
    metrics: &ProcessMetrics,
    name: &str,
    copy: lightbox_cache::Cache<T>,
) {
    metrics.add_copy(name.to_owned(), Arc::new(move || copy.state()));
}

/// Serves `routes` on `listener` until stopped; on stop, ends the feed's
/// watch streams (they tell clients where to resume) so the drain is quick.
fn launch<T, S>(
    target: Target,
    listener: TcpListener,
    service: S,
    feed: Feed<T>,
    settings: &Settings,
    background: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) -> anyhow::Result<Component>
where
    T: lightbox_changefeed::feed::Entity,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    // The name health reports, from the generated server itself.
    let service_name = S::NAME;
    let routes = Routes::new(service);
    let (stop, shutdown) = Shutdown::new();
    let faults = Faults::new();
    let addr = listener.local_addr().context("the listener has no local address")?;
    let options = ServerOptions {
        service_name: target.name().to_owned(),
        ..settings.server.clone()
    };
    let feed_stats: Arc<dyn Fn() -> FeedStats + Send + Sync> = {
        let feed = feed.clone();
        Arc::new(move || feed.stats())
    };
    settings.metrics.add_feed(feed.name(), Arc::clone(&feed_stats));
    settings.metrics.add_faults(target.name(), faults.clone());
    let task = {
        let faults = faults.clone();
        tokio::spawn(async move {
            // Watch streams end once the drain delay is over, telling their
            // clients where to resume (on another replica, by then).
            let closer = {
                let streams_end = shutdown.delayed(options.drain_delay);
                let feed = feed.clone();
                tokio::spawn(async move {
                    streams_end.wait().await;
                    feed.close();
                })
            };
            // The component's own background work (feeding its local copies):
            // runs while it serves, stops with it.
            let background = background.map(tokio::spawn);
            let served = lightbox_server::serve(listener, routes, &[service_name], faults, shutdown, options).await;
            closer.abort();
            if let Some(task) = background {
                task.abort();
            }
            feed.db().close().await;
            served.with_context(|| format!("the {target} server failed"))
        })
    };
    Ok(Component {
        target,
        addr,
        faults,
        admin_services: Vec::new(),
        feed_stats: Some(feed_stats),
        stop,
        task,
    })
}
