//! The whole stack on 127.0.0.1:0 ([`Stack`]) and the customers tests make
//! in it.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use lightbox_api::{
    contracts::{
        Contract, ContractOption, CreateContractRequest, Plan, contracts_service_client::ContractsServiceClient,
    },
    photos::photos_service_client::PhotosServiceClient,
    users::{CreateUserRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient},
};
use lightbox_app::{Component, Settings, Target};
use lightbox_cache::CacheOptions;
use lightbox_changefeed::{Backend, FeedOptions, FeedStats};
use lightbox_gateway::{AuthConfig, GatewayOptions, auth};
use lightbox_photos::PhotosOptions;
use lightbox_server::Faults;
use tonic::transport::Channel;

use crate::{DEADLINE, capture_logs, channel, db::TestDb};

/// The HS256 key the stack's gateway checks tokens with.
pub const TEST_JWT_SECRET: &[u8] = b"lightbox-test-key";

/// Contracts, users, photos and the gateway on 127.0.0.1:0, each over its own database;
/// each can be stopped and started again on the same address and database.
pub struct Stack {
    /// The settings they run with.
    pub settings: Settings,
    components: HashMap<Target, Component>,
    addrs: HashMap<Target, SocketAddr>,
    dbs: HashMap<Target, TestDb>,
}

impl Stack {
    /// Starts contracts, users and photos: contracts on `db`, the others on
    /// new databases of the same backend, with `feed` options.
    pub async fn start(db: TestDb, feed: FeedOptions) -> Stack {
        Stack::start_with(db, feed, |_| {}).await
    }

    /// [`Stack::start`], with `tweak` applied to the settings before any
    /// component starts (TLS, say: with `client_tls` set, the components
    /// reach each other at `https://` URLs).
    pub async fn start_with(db: TestDb, feed: FeedOptions, tweak: impl FnOnce(&mut Settings)) -> Stack {
        capture_logs();
        let mut dbs = HashMap::new();
        for target in [Target::Users, Target::Photos] {
            let other = match db.backend() {
                Backend::Sqlite => TestDb::sqlite(),
                Backend::Postgres => match TestDb::postgres().await {
                    Some(db) => db,
                    None => panic!("PostgreSQL answered a moment ago and no longer does"),
                },
            };
            dbs.insert(target, other);
        }
        dbs.insert(Target::Contracts, db);
        let mut listeners = HashMap::new();
        let mut addrs = HashMap::new();
        for target in Target::COMPONENTS.into_iter().filter(|t| t.listens()) {
            let listener = bind_any().await;
            addrs.insert(target, local(&listener));
            listeners.insert(target, listener);
        }
        let cache = CacheOptions {
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            idle_timeout: feed.progress_interval * 3,
            ..CacheOptions::default()
        };
        let metrics = lightbox_app::ProcessMetrics::new();
        let settings = Settings {
            database_url: None,
            data_dir: PathBuf::from("unused"),
            contracts_url: format!("http://{}", addrs[&Target::Contracts]),
            users_url: format!("http://{}", addrs[&Target::Users]),
            photos_url: format!("http://{}", addrs[&Target::Photos]),
            gateway: GatewayOptions {
                request_timeout: Duration::from_secs(5),
                heartbeat: Duration::from_millis(500),
                // Generous: a busy test machine may hold a frame back a while,
                // and a needless reconnect tells every phone about it.
                upstream_idle_timeout: (feed.progress_interval * 10).max(Duration::from_secs(2)),
                metrics: metrics.registry().clone(),
                ..GatewayOptions::new(
                    AuthConfig::new(auth::DEFAULT_ISSUER, auth::DEFAULT_AUDIENCE).with_hs256_secret(TEST_JWT_SECRET),
                )
            },
            contract_timeout: Duration::from_millis(500),
            feed,
            cache,
            photos: PhotosOptions {
                fresh_timeout: Duration::from_millis(800),
                miss_timeout: Duration::from_millis(300),
                wait_timeout: Duration::from_millis(500),
                ..PhotosOptions::default()
            },
            events: lightbox_events::EventsOptions::default(),
            server: lightbox_server::ServerOptions {
                metrics: metrics.registry().clone(),
                ..lightbox_server_options()
            },
            demo: false,
            metrics,
            gateway_tls: None,
            client_tls: None,
        };
        let mut settings = settings;
        tweak(&mut settings);
        if settings.scheme() == "https" {
            for url in [
                &mut settings.contracts_url,
                &mut settings.users_url,
                &mut settings.photos_url,
            ] {
                *url = url.replacen("http://", "https://", 1);
            }
        }
        let mut stack = Stack {
            settings,
            components: HashMap::new(),
            addrs,
            dbs,
        };
        for target in Target::COMPONENTS.into_iter().filter(|t| t.listens()) {
            if let Some(listener) = listeners.remove(&target) {
                stack.launch(target, listener).await;
            }
        }
        stack
    }

    async fn launch(&mut self, target: Target, listener: tokio::net::TcpListener) {
        let mut settings = self.settings.clone();
        // The gateway keeps no data.
        settings.database_url = self.dbs.get(&target).map(|db| db.url().to_owned());
        let component = start(target, &settings, listener).await;
        self.components.insert(target, component);
    }

    /// The stack's metrics (one registry for the whole stack, as in one
    /// process), as OpenMetrics text.
    pub fn metrics_text(&self) -> String {
        self.settings.metrics.encode()
    }

    /// Where `target` listens (also while stopped).
    pub fn addr(&self, target: Target) -> SocketAddr {
        self.addrs[&target]
    }

    /// The fault switches of a running component.
    pub fn faults(&self, target: Target) -> Faults {
        match self.components.get(&target) {
            Some(component) => component.faults.clone(),
            None => panic!("{target} is not running"),
        }
    }

    /// Stops `target` gracefully (really stopped: its port refuses).
    pub async fn stop_component(&mut self, target: Target) {
        if let Some(component) = self.components.remove(&target)
            && let Err(err) = component.stop().await
        {
            panic!("{target} failed to stop cleanly: {err:#}");
        }
    }

    /// Starts `target` again, on its address and database.
    pub async fn start_component(&mut self, target: Target) {
        let addr = self.addr(target);
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|err| panic!("socket: {err}"));
        // The old listener's connections may linger in TIME_WAIT.
        let _ = socket.set_reuseaddr(true);
        socket
            .bind(addr)
            .unwrap_or_else(|err| panic!("cannot bind {addr} again: {err}"));
        let listener = socket
            .listen(1024)
            .unwrap_or_else(|err| panic!("cannot listen on {addr}: {err}"));
        self.launch(target, listener).await;
    }

    /// A channel to `target`, over TLS with the stack's client
    /// certificate when the stack runs TLS.
    async fn channel_to(&self, target: Target) -> Channel {
        let addr = self.addr(target);
        match &self.settings.client_tls {
            None => channel(addr).await,
            Some(tls) => match tonic::transport::Endpoint::from_shared(format!("https://{addr}")) {
                Ok(endpoint) => tls.channel(endpoint),
                Err(err) => panic!("bad address {addr}: {err}"),
            },
        }
    }

    /// A users client.
    pub async fn users_client(&self) -> UsersServiceClient<Channel> {
        UsersServiceClient::new(self.channel_to(Target::Users).await)
    }

    /// A contracts client.
    pub async fn contracts_client(&self) -> ContractsServiceClient<Channel> {
        ContractsServiceClient::new(self.channel_to(Target::Contracts).await)
    }

    /// A photos client.
    pub async fn photos_client(&self) -> PhotosServiceClient<Channel> {
        PhotosServiceClient::new(self.channel_to(Target::Photos).await)
    }

    /// The changefeed counters of a running service (`Users`, `Contracts`
    /// or `Photos`): how many watch streams it serves, its head.
    pub fn feed_stats(&self, target: Target) -> FeedStats {
        match self.components.get(&target).map(Component::feed_stats) {
            Some(Some(stats)) => stats,
            Some(None) => panic!("{target} has no changefeed"),
            None => panic!("{target} is not running"),
        }
    }

    /// The database of `target`.
    pub fn db(&self, target: Target) -> &TestDb {
        &self.dbs[&target]
    }

    /// Stops every component gracefully.
    pub async fn stop(mut self) {
        for target in [Target::Gateway, Target::Photos, Target::Users, Target::Contracts] {
            self.stop_component(target).await;
        }
    }

    /// The gateway's base URL (`http://127.0.0.1:PORT`).
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.addr(Target::Gateway))
    }

    /// A token the stack's gateway accepts, for `user_id`, valid an hour.
    pub fn token(&self, user_id: &str) -> String {
        auth::hs256_token(
            TEST_JWT_SECRET,
            auth::DEFAULT_ISSUER,
            auth::DEFAULT_AUDIENCE,
            user_id,
            Duration::from_secs(3600),
        )
        .unwrap_or_else(|err| panic!("cannot sign a test token: {err}"))
    }
}

/// A user (with e-mail `email`) holding a contract whose `photo_quota` is
/// `quota`, created through the services; answers (user, contract).
pub async fn customer(stack: &Stack, email: &str, quota: &str) -> (User, Contract) {
    let mut users = stack.users_client().await;
    let mut contracts = stack.contracts_client().await;
    let user = users
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: "Customer".into(),
                email: email.into(),
                ..User::default()
            }),
        })
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
        .unwrap_or_else(|status| panic!("create user: {status:?}"));
    let contract = contracts
        .create_contract(CreateContractRequest {
            contract: Some(Contract {
                holder_user_id: user.id.clone(),
                plan: Plan::Standard as i32,
                options: vec![photo_quota(quota)],
                ..Contract::default()
            }),
        })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default())
        .unwrap_or_else(|status| panic!("create contract: {status:?}"));
    // Users checks the contract with Contracts: right after Contracts
    // restarted, Users may not have seen it healthy again yet and answers
    // UNAVAILABLE, "retry", as it should. Retried as a client would, until
    // the deadline (the same update each time: safe to repeat).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let user = loop {
        let answer = users
            .update_user(UpdateUserRequest {
                user: Some(User {
                    contract_id: contract.id.clone(),
                    ..user.clone()
                }),
                update_mask: None,
                expected_revision: 0,
            })
            .await;
        match answer {
            Ok(response) => break response.into_inner().user.unwrap_or_default(),
            Err(status) if status.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("update user: {status:?}"),
        }
    };
    (user, contract)
}

/// The `photo_quota` option of a contract, enabled, at `quota`.
pub fn photo_quota(quota: &str) -> ContractOption {
    ContractOption {
        code: "photo_quota".into(),
        value: quota.into(),
        enabled: true,
    }
}

fn lightbox_server_options() -> lightbox_app::ServerOptions {
    lightbox_app::ServerOptions {
        max_message_bytes: 1024 * 1024,
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn start(target: Target, settings: &Settings, listener: tokio::net::TcpListener) -> Component {
    lightbox_app::targets::start(target, settings, listener)
        .await
        .unwrap_or_else(|err| panic!("cannot start {target}: {err:#}"))
}

/// Binds 127.0.0.1:0.
pub async fn bind_any() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0: {err}"))
}

fn local(listener: &tokio::net::TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|err| panic!("bound listener has no address: {err}"))
}
