-- Local copies of other services' entities (PostgreSQL). Append-only.
--
-- One database may hold several copies (a cache of users, one of
-- contracts); every row names its cache. A copy and its cursor are written
-- in one transaction per batch, so they never disagree after a crash.

-- Where each copy stands in its upstream's revisions.
CREATE TABLE cache_state (
    cache    TEXT    NOT NULL PRIMARY KEY,
    -- Every upstream change up to this revision is applied.
    revision BIGINT  NOT NULL DEFAULT 0
);

-- The copied entities, protobuf-encoded as the upstream sent them.
CREATE TABLE cache_entities (
    cache     TEXT    NOT NULL,
    entity_id TEXT    NOT NULL,
    -- The upstream revision of this entity's state.
    revision  BIGINT  NOT NULL,
    payload   BYTEA   NOT NULL,
    PRIMARY KEY (cache, entity_id)
);
