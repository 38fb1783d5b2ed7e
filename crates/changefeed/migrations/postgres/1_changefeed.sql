-- The changefeed's tables (PostgreSQL). Append-only: change the schema in a new file.
--
-- One database may hold several feeds (a service's own feed, the copies it
-- keeps of others); every row names its feed.

-- One row per feed. Writers update `revision` first thing in their
-- transaction: the row lock orders
-- writers, so revisions become visible in increasing order with no gap.
CREATE TABLE feed_state (
    feed               TEXT    NOT NULL PRIMARY KEY,
    -- The last committed revision.
    revision           BIGINT  NOT NULL DEFAULT 0,
    -- Changes at or below this revision were trimmed from feed_changes.
    compacted_revision BIGINT  NOT NULL DEFAULT 0,
    -- Tombstones at or below this revision were purged from feed_entities.
    tombstone_revision BIGINT  NOT NULL DEFAULT 0
);

-- The outbox: one row per committed change, written in the same
-- transaction as the entity. Trimmed by retention.
CREATE TABLE feed_changes (
    feed           TEXT    NOT NULL,
    revision       BIGINT  NOT NULL,
    entity_id      TEXT    NOT NULL,
    -- 1 for a deletion (payload NULL), 0 for an upsert.
    deleted        BIGINT  NOT NULL,
    -- The entity after the change, protobuf-encoded.
    payload        BYTEA,
    -- Commit time, microseconds since the Unix epoch.
    commit_time_us BIGINT  NOT NULL,
    PRIMARY KEY (feed, revision)
);

-- The latest state of every entity, deletions kept as tombstones (longer
-- than the changes) so that a client resuming from trimmed history gets the
-- latest state of what changed, deletions included, instead of a relist.
CREATE TABLE feed_entities (
    feed      TEXT    NOT NULL,
    entity_id TEXT    NOT NULL,
    -- The revision of the change that last wrote this entity.
    revision  BIGINT  NOT NULL,
    deleted   BIGINT  NOT NULL,
    payload   BYTEA,
    PRIMARY KEY (feed, entity_id)
);

-- Consolidated deltas and tombstone purges read entities by revision.
CREATE INDEX feed_entities_by_revision ON feed_entities (feed, revision);
