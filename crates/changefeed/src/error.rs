//! [`FeedError`], a failure of the changefeed's storage, and
//! [`is_transient`], which tells an outage that passes from a bug.

/// A failure of the changefeed's storage.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored payload does not decode: a bug or a corrupted database.
    #[error("stored entity {entity_id:?} at revision {revision} does not decode: {source}")]
    Decode {
        /// The entity.
        entity_id: String,
        /// Its revision.
        revision: i64,
        /// The decoder's complaint.
        source: prost::DecodeError,
    },
    /// The database could not be migrated.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A request to the feed is malformed (a forged page token, a token
    /// given with a revision).
    #[error("{0}")]
    InvalidRequest(String),
    /// A feed option is out of range.
    #[error("invalid feed options: {0}")]
    Options(String),
}

impl From<FeedError> for lightbox_api::ApiError {
    fn from(err: FeedError) -> Self {
        match err {
            FeedError::InvalidRequest(message) => lightbox_api::ApiError::InvalidArgument(message),
            // A database that is down, restarting or out of connections is
            // an outage callers retry, not a bug: UNAVAILABLE (503), saying so.
            // The cause goes to the log, not to the caller: it can name the
            // database's host and say what the server replied.
            FeedError::Db(err) if is_transient(&err) => {
                tracing::warn!(%err, "the database is unreachable; answering UNAVAILABLE");
                lightbox_api::ApiError::Unavailable("the database is unreachable; retry in a moment".into())
            }
            other => lightbox_api::ApiError::internal(other),
        }
    }
}

/// Whether a database error is the database being unreachable, restarting
/// or out of connections (an outage that passes), rather than a bug: a lost
/// or refused connection, a pool that timed out or was closed, PostgreSQL's
/// connection-exception class (08) and shutdown / too-many-connections
/// codes, SQLite's busy and locked.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "5" | "6")
        }),
        _ => false,
    }
}
