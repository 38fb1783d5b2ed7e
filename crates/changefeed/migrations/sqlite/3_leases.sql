-- Leases (SQLite). Append-only: change the schema in a new file.
--
-- Singleton work (a feed's retention, any later singleton) runs on the one
-- replica holding its lease; `term` is the fencing token: it goes up each
-- time the lease changes hands, and the work checks, inside its own
-- transaction, that the lease is still at the term it was given (see
-- `lease.rs`).
CREATE TABLE leases (
    -- What the lease is for, e.g. `retention:users`.
    name       TEXT    NOT NULL PRIMARY KEY,
    -- Who holds it (or last held it); NULL once released.
    holder     TEXT,
    -- The fencing term: raised on every change of hands, kept on renewal.
    term       INTEGER NOT NULL DEFAULT 0,
    -- When it expires: milliseconds since the Unix epoch by the
    -- database's clock (never a replica's), set in the acquiring statement.
    expires_at INTEGER NOT NULL DEFAULT 0
);
