//! Leases in the database, for singleton work across replicas (a feed's
//! retention, and any later singleton): the replica that holds a lease
//! does the work; the others do not, until it expires or is released.
//!
//! # Terms (fencing)
//!
//! A lease has a [`Term`] that goes up every time it changes hands (taken
//! free, expired or released) and stays the same while its holder renews
//! it. A lease alone cannot stop a holder that was paused past its expiry
//! (a long GC pause, a stopped VM, a slow disk) from waking up and acting
//! as if it still held it. So work done under a lease checks, inside its
//! own transaction, that the lease is still at the term it was granted
//! ([`Lease::fence`]); a holder whose lease was taken over finds a higher
//! term and does nothing. On PostgreSQL the check locks the lease's row to
//! the end of the transaction, so a takeover waits for work already under
//! way to commit: the new holder starts from what it left. On SQLite the
//! write transaction's lock does the same.
//!
//! The fence checks the term, not the expiry: a holder whose lease expired
//! with nobody taking it over still has the latest term, and nobody else
//! has acted since; its work is as safe as before the expiry.
//!
//! # Clock
//!
//! Expiry is decided by the database's clock alone: the statement that
//! takes or renews a lease computes `expires_at` (integer milliseconds
//! since the Unix epoch) from the database's own time, and compares the
//! current holder's `expires_at` with that same time. The replicas' clocks
//! never enter, so a replica whose clock is off cannot steal a lease that
//! is still held, nor hold one forever. PostgreSQL's `clock_timestamp()`
//! is used, not `now()` (the start of the transaction, stale for a
//! statement that waited for the row's lock behind a fenced transaction).
//! SQLite's time is the host's, which every process on the one file shares.
//! Integers, not timestamp types, so both backends (and sqlx's `Any`
//! driver) store and compare them alike. A holder does not need to know
//! the database's time: it acts only just after a successful acquire, and
//! the fence, not the clock, is what makes a late action safe.

use std::time::Duration;

use sqlx::{AnyConnection, Row};

use crate::{
    db::{Backend, Db},
    error::FeedError,
};

/// The fencing term of a lease: higher each time the lease changed hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(i64);

impl Term {
    /// The term as stored.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who holds a lease now, as [`Lease::current`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The holder (`None` once released).
    pub holder: Option<String>,
    /// The term.
    pub term: Term,
    /// Milliseconds until it expires, by the database's clock (zero or
    /// less: expired, anyone may take it).
    pub remaining_ms: i64,
}

/// The leases of a database (table `leases`, from the changefeed's
/// migrations). A namespace: every lease lives in the database, named.
#[derive(Debug)]
pub enum Lease {}

/// The database's clock in milliseconds since the Unix epoch, per backend,
/// as an SQL expression (a macro, so that statements stay `&'static str`).
macro_rules! postgres_now_ms {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}
macro_rules! sqlite_now_ms {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
}

/// Takes the lease `$1` for holder `$2` for `$3` ms, in one statement:
/// inserted at term 1 if it never existed; renewed at the same term if the
/// holder has it and it has not expired; taken at the next term if it
/// expired or was released (by anyone, the same holder included); else
/// nothing is returned.
macro_rules! acquire_sql {
    ($now:expr) => {
        concat!(
            "INSERT INTO leases (name, holder, term, expires_at) VALUES ($1, $2, 1, ",
            $now,
            " + $3) ON CONFLICT (name) DO UPDATE SET ",
            "term = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > ",
            $now,
            " THEN leases.term ELSE leases.term + 1 END, ",
            "holder = excluded.holder, expires_at = excluded.expires_at ",
            "WHERE leases.holder = excluded.holder OR leases.expires_at <= ",
            $now,
            " RETURNING term"
        )
    };
}

macro_rules! current_sql {
    ($now:expr) => {
        concat!(
            "SELECT holder, term, expires_at - ",
            $now,
            " FROM leases WHERE name = $1"
        )
    };
}

impl Lease {
    /// Takes the lease `name` for `holder` for `ttl`, or renews it if
    /// `holder` has it: its term, or `None` if someone else holds it and it
    /// has not expired. Atomic (one statement): of replicas racing for a
    /// free lease, one gets it. `holder` must be unique to one process (see
    /// [`holder_id`]); the term is the same on renewal and higher on every
    /// change of hands, including a holder taking back its own lease after
    /// it expired.
    pub async fn try_acquire(db: &Db, name: &str, holder: &str, ttl: Duration) -> Result<Option<Term>, FeedError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        if ttl_ms < 1 {
            return Err(FeedError::Options(
                "a lease's ttl must be at least one millisecond".into(),
            ));
        }
        let sql = match db.backend() {
            Backend::Postgres => acquire_sql!(postgres_now_ms!()),
            Backend::Sqlite => acquire_sql!(sqlite_now_ms!()),
        };
        let term: Option<i64> = sqlx::query_scalar(sql)
            .bind(name)
            .bind(holder)
            .bind(ttl_ms)
            .fetch_optional(db.pool())
            .await?;
        Ok(term.map(Term))
    }

    /// Gives up the lease `name` if `holder` has it, so another replica can
    /// take it at once instead of after its expiry; whether it had it.
    pub async fn release(db: &Db, name: &str, holder: &str) -> Result<bool, FeedError> {
        let done = sqlx::query("UPDATE leases SET holder = NULL, expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(db.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The fence: whether the lease `name` is still at `term`, checked on
    /// `conn`, inside the transaction of the work done under it. True: go
    /// on (on PostgreSQL the lease's row is now locked to the end of the
    /// transaction, so it cannot change hands before the work commits);
    /// false: the lease changed hands since `term` was granted, and the
    /// work must be rolled back.
    pub async fn fence(conn: &mut AnyConnection, name: &str, term: Term) -> Result<bool, FeedError> {
        let done = sqlx::query("UPDATE leases SET term = term WHERE name = $1 AND term = $2")
            .bind(name)
            .bind(term.0)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Who holds the lease `name` now, and until when; `None` if it was
    /// never taken.
    pub async fn current(db: &Db, name: &str) -> Result<Option<LeaseState>, FeedError> {
        let sql = match db.backend() {
            Backend::Postgres => current_sql!(postgres_now_ms!()),
            Backend::Sqlite => current_sql!(sqlite_now_ms!()),
        };
        let row = sqlx::query(sql).bind(name).fetch_optional(db.pool()).await?;
        row.map(|row| {
            Ok(LeaseState {
                holder: row.try_get(0)?,
                term: Term(row.try_get(1)?),
                remaining_ms: row.try_get(2)?,
            })
        })
        .transpose()
    }
}

/// The lease a feed's periodic retention runs under.
pub fn retention_lease(feed: &str) -> String {
    format!("retention:{feed}")
}

/// A holder name unique to this call in this process: the host (from
/// `HOSTNAME`, as containers set it), the process id and a random part, so
/// an operator reading `leases` can tell which replica holds what.
pub fn holder_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let host = if host.is_empty() { "host" } else { host.as_str() };
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}
