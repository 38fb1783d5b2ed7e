//! The components, and how each one starts: its database, its gRPC server
//! on a bound listener, and its shutdown. The same code runs a component
//! alone (microservices mode) or beside the others (monolithic mode);
//! components always reach each other over real gRPC.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context;
use lightbox_cache::sources;
use lightbox_changefeed::{Feed, FeedStats};
use lightbox_events::{EventsService, Sources};
use lightbox_gateway::{Gateway, Upstreams};
use lightbox_server::{AdminService, Faults, ServerOptions, Shutdown, ShutdownTrigger};
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

use crate::{metrics::ProcessMetrics, settings::Settings, target::Target};

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
