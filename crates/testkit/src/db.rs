//! Throwaway databases on both backends, and [`conformance!`](crate::conformance)
//! to run one test body on each.

use std::{io::Write, sync::Once};

use lightbox_changefeed::{Backend, Db};
use sqlx::Connection;

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
