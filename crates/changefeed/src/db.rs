//! The database handle shared by a service and its feeds: one pool over
//! SQLite or PostgreSQL, chosen by URL, with the transaction flavours the
//! changefeed needs on each.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    Any, AnyPool, Transaction,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file (the embedded default).
    Sqlite,
    /// A PostgreSQL server (production; several replicas may share it).
    Postgres,
}

/// A service's migrations, for each backend (see [`Db::migrate`]).
pub struct Migrations {
    /// Migrations for SQLite.
    pub sqlite: &'static Migrator,
    /// Migrations for PostgreSQL.
    pub postgres: &'static Migrator,
}

/// The changefeed's own tables (`feed_state`, `feed_changes`,
/// `feed_entities`, `leases`), versions 1 to 499 (see [`Db::migrate`]).
pub static CHANGEFEED_MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// A pool of connections to one database, and which engine it is.
///
/// Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    url: String,
}

impl Db {
    /// Connects to `url`: `sqlite://PATH` (the file is created if missing) or
    /// `postgres://…`.
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}: expected sqlite://PATH or postgres://…").into(),
            ));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                // One writer at a time anyway; a few readers for watch
                // snapshots and reads alongside it.
                Backend::Sqlite => 8,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers (watch snapshots) never block the writer.
                        // busy_timeout: writers queue instead of failing at once.
                        // synchronous=NORMAL: durable at checkpoints, safe with WAL.
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; \
                             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                        )
                        .execute(conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Db { pool, backend, url })
    }

    /// Connects to an SQLite file at `path`, creating it (and its directory)
    /// if missing.
    pub async fn sqlite_file(path: &Path) -> Result<Db, sqlx::Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Db::connect(&format!("sqlite://{}", path.display())).await
    }

    /// The engine behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for a service's own queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The URL this pool was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Applies the changefeed's migrations, then each of `others` (a cache's,
    /// a service's) in order. Each set ignores the others' versions in the
    /// shared migrations table, so their version ranges must not overlap:
    /// changefeed 1-499, cache 500-999, users 1000-1999, contracts
    /// 2000-2999, photos 3000-3999, events 5000-5999: one database can hold
    /// them all.
    pub async fn migrate(&self, others: &[&Migrations]) -> Result<(), crate::FeedError> {
        for set in std::iter::once(&CHANGEFEED_MIGRATIONS).chain(others.iter().copied()) {
            let source = match self.backend {
                Backend::Sqlite => set.sqlite,
                Backend::Postgres => set.postgres,
            };
            let mut migrator = Migrator::with_migrations(source.iter().cloned().collect());
            migrator.set_ignore_missing(true);
            migrator.run(&self.pool).await?;
        }
        Ok(())
    }

    /// Begins a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so a transaction that reads before it writes
    /// never fails to upgrade its lock.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let statement = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        self.begin_with(statement).await
    }

    /// Begins a read-only transaction whose reads all see one snapshot
    /// (PostgreSQL: `REPEATABLE READ`; SQLite: a WAL read transaction).
    pub async fn begin_snapshot(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let statement = match self.backend {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        self.begin_with(statement).await
    }

    /// Begins a transaction with `statement`, safe to cancel.
    ///
    /// sqlx 0.9 counts a transaction as open only once the server has
    /// answered its `BEGIN`: a caller cancelled in between (a client gone
    /// while its watch opens a snapshot) would hand the connection back to
    /// the pool still inside the transaction, and the next caller's writes
    /// would run in it (read-only, or part of a transaction nobody
    /// commits). So the `BEGIN` runs in its own task, which always sees it
    /// through: if the caller is gone, the transaction is dropped there and
    /// rolled back as usual.
    async fn begin_with(&self, statement: &'static str) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let pool = self.pool.clone();
        tokio::spawn(async move { pool.begin_with(statement).await })
            .await
            .map_err(|e| sqlx::Error::Io(std::io::Error::other(format!("the transaction's start failed: {e}"))))?
    }

    /// Closes every connection of the pool (waits for those in use to be
    /// returned). The feeds' tails, PostgreSQL listeners and retention on
    /// this database then stop (their progress tickers, which use no
    /// connection, run while the feed does).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether [`Db::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }
}
