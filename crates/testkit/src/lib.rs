//! Test support: throwaway databases on both backends, the services on
//! 127.0.0.1:0, and waiting for a condition with a deadline (never sleeping
//! and hoping).
//!
//! # Layout
//!
//! - [`TestDb`]: a fresh SQLite file or PostgreSQL database, dropped after.
//! - [`conformance!`]: runs one async test body against every backend.
//! - [`Stack`]: contracts, users and photos on port 0 over a [`TestDb`]
//!   each, to stop and start again at will.
//! - [`eventually`]: polls a condition until it holds or a deadline passes.
//! - [`sse`]: a client of the gateway's Server-Sent Events stream.
//!
//! PostgreSQL tests run when `LIGHTBOX_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) answers. When it does not,
//! they are skipped with a notice on stderr, unless
//! `LIGHTBOX_REQUIRE_POSTGRES=1` (set by CI) makes that a failure.

pub mod sse;

use std::{
    collections::HashMap, future::Future, io::Write, net::SocketAddr, path::PathBuf, sync::Once, time::Duration,
};

use lightbox_api::{
    contracts::{
        Contract, ContractOption, CreateContractRequest, Plan, contracts_service_client::ContractsServiceClient,
    },
    photos::photos_service_client::PhotosServiceClient,
    users::{CreateUserRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient},
};
use lightbox_app::{Component, Settings, Target};
use lightbox_cache::CacheOptions;
use lightbox_changefeed::{Backend, Db, FeedOptions, FeedStats};
use lightbox_gateway::{AuthConfig, GatewayOptions, auth};
use lightbox_photos::PhotosOptions;
use lightbox_server::Faults;
use sqlx::Connection;
use tonic::transport::Channel;

/// How long anything that should happen "soon" may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A throwaway database: an SQLite file in a temporary directory, or a
/// PostgreSQL database with a unique name, dropped when this is dropped.
pub struct TestDb {
    url: String,
    backend: Backend,
    /// Keeps the SQLite directory alive; removed on drop.
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL server (maintenance database) and the name to drop.
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh SQLite database.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("cannot make a temporary directory: {err}"));
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        TestDb {
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            postgres: None,
        }
    }

    /// A fresh PostgreSQL database, or `None` (with a notice) if PostgreSQL
    /// is unreachable and not required.
    pub async fn postgres() -> Option<TestDb> {
        let server = std::env::var("LIGHTBOX_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
        let mut conn = match sqlx::PgConnection::connect(&server).await {
            Ok(conn) => conn,
            Err(err) => {
                if std::env::var("LIGHTBOX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!("PostgreSQL is required (LIGHTBOX_REQUIRE_POSTGRES=1) but {server} is unreachable: {err}");
                }
                static NOTICE: Once = Once::new();
                NOTICE.call_once(|| {
                    // Straight to stderr, past the test harness's capture.
                    let _ = writeln!(
                        std::io::stderr(),
                        "NOTICE: PostgreSQL tests SKIPPED: {server} is unreachable ({err}). \
                         Set LIGHTBOX_REQUIRE_POSTGRES=1 to make this a failure."
                    );
                });
                return None;
            }
        };
        let name = format!("lightbox_test_{}_{:08x}", std::process::id(), fastrand::u32(..));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|err| panic!("cannot create test database {name}: {err}"));
        let _ = conn.close().await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("LIGHTBOX_TEST_POSTGRES_URL {server:?} has no database path"),
        };
        Some(TestDb {
            url,
            backend: Backend::Postgres,
            _dir: None,
            postgres: Some((server, name)),
        })
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens a pool on it.
    pub async fn connect(&self) -> Db {
        Db::connect(&self.url)
            .await
            .unwrap_or_else(|err| panic!("cannot open test database {}: {err}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.postgres.take() else {
            return;
        };
        // Drop may run inside a runtime: do the async work on a thread of
        // its own. FORCE ends connections a test left open.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&server).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Runs each listed `async fn(TestDb)` against SQLite and PostgreSQL, as
/// tests named `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::TestDb::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::TestDb::postgres().await {
                        super::$name(db).await
                    }
                }
            )*
        }
    };
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sends the servers' warnings and errors (such as the cause of an
/// `INTERNAL`, which the client never sees) to the test's captured output,
/// so a failing test shows them. `RUST_LOG` overrides the level.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only the first call in a test binary installs it; later ones find it set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

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

/// Writes the user `id` named `name` straight into `feed`, as the users
/// service would; answers its revision.
pub async fn put_user(feed: &lightbox_changefeed::Feed<User>, id: &str, name: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    let user = User {
        id: id.into(),
        display_name: name.into(),
        revision: tx.next_revision(),
        ..User::default()
    };
    let revision = tx.put(id, &user).await.unwrap_or_else(|err| panic!("{err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
    revision
}

/// Deletes the entity `id` straight from `feed`.
pub async fn delete_entity<T: lightbox_changefeed::feed::Entity>(feed: &lightbox_changefeed::Feed<T>, id: &str) {
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
    tx.delete(id).await.unwrap_or_else(|err| panic!("{err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
}

/// A balanced client channel to `addr`, as the services use between
/// themselves (connected lazily).
pub fn upstream(addr: SocketAddr) -> lightbox_client::Balanced {
    lightbox_client::channel(&format!("http://{addr}"), Duration::from_secs(5))
        .unwrap_or_else(|err| panic!("bad address {addr}: {err}"))
}

/// A channel to `addr` (connected lazily).
pub async fn channel(addr: SocketAddr) -> Channel {
    match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint.connect_lazy(),
        Err(err) => panic!("bad address {addr}: {err}"),
    }
}
