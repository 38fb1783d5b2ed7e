//! Test support: throwaway databases on both backends, the services on
//! 127.0.0.1:0, and waiting for a condition with a deadline (never sleeping
//! and hoping).
//!
//! # Layout
//!
//! - [`TestDb`]: a fresh SQLite file or PostgreSQL database, dropped after.
//! - [`conformance!`]: runs one async test body against every backend.
//! - [`Stack`]: users and contracts on port 0 over a [`TestDb`] each.
//! - [`eventually`]: polls a condition until it holds or a deadline passes.
//!
//! PostgreSQL tests run when `LIGHTBOX_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) answers. When it does not,
//! they are skipped with a notice on stderr, unless
//! `LIGHTBOX_REQUIRE_POSTGRES=1` (set by CI) makes that a failure.

use std::{future::Future, io::Write, net::SocketAddr, path::PathBuf, sync::Once, time::Duration};

use lightbox_api::{
    contracts::contracts_service_client::ContractsServiceClient, users::users_service_client::UsersServiceClient,
};
use lightbox_app::{Component, Settings, Target};
use lightbox_changefeed::{Backend, Db, FeedOptions};
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

/// Users and contracts on 127.0.0.1:0, each over its own database.
pub struct Stack {
    /// The settings they were started with.
    pub settings: Settings,
    /// The contracts component (`None` once stopped).
    pub contracts: Option<Component>,
    /// The users component.
    pub users: Option<Component>,
    /// The contracts address (kept after a stop, to restart on it).
    pub contracts_addr: SocketAddr,
    /// The users address.
    pub users_addr: SocketAddr,
    dbs: Vec<TestDb>,
}

impl Stack {
    /// Starts contracts then users on fresh databases of `backend`'s kind
    /// (the `db` given is used for contracts, a new one of the same kind for
    /// users), with `feed` options.
    pub async fn start(db: TestDb, feed: FeedOptions) -> Stack {
        let users_db = match db.backend() {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => match TestDb::postgres().await {
                Some(db) => db,
                None => panic!("PostgreSQL answered a moment ago and no longer does"),
            },
        };
        let contracts_listener = bind_any().await;
        let contracts_addr = local(&contracts_listener);
        let mut settings = Settings {
            database_url: Some(db.url().to_owned()),
            data_dir: PathBuf::from("unused"),
            contracts_url: format!("http://{contracts_addr}"),
            contract_timeout: Duration::from_millis(500),
            feed,
            server: lightbox_server_options(),
            demo: false,
        };
        let contracts = start(Target::Contracts, &settings, contracts_listener).await;
        settings.database_url = Some(users_db.url().to_owned());
        let users_listener = bind_any().await;
        let users_addr = local(&users_listener);
        let users = start(Target::Users, &settings, users_listener).await;
        Stack {
            settings,
            contracts: Some(contracts),
            users: Some(users),
            contracts_addr,
            users_addr,
            dbs: vec![db, users_db],
        }
    }

    /// A users client.
    pub async fn users_client(&self) -> UsersServiceClient<Channel> {
        UsersServiceClient::new(channel(self.users_addr).await)
    }

    /// A contracts client.
    pub async fn contracts_client(&self) -> ContractsServiceClient<Channel> {
        ContractsServiceClient::new(channel(self.contracts_addr).await)
    }

    /// The databases (contracts', users').
    pub fn dbs(&self) -> &[TestDb] {
        &self.dbs
    }

    /// Stops every component gracefully.
    pub async fn stop(mut self) {
        for component in [self.users.take(), self.contracts.take()].into_iter().flatten() {
            if let Err(err) = component.stop().await {
                panic!("a component failed to stop cleanly: {err:#}");
            }
        }
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

/// A channel to `addr` (connected lazily).
pub async fn channel(addr: SocketAddr) -> Channel {
    match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint.connect_lazy(),
        Err(err) => panic!("bad address {addr}: {err}"),
    }
}
