-- Events to functions (SQLite). Append-only: change the schema in a new file.
--
-- A subscription reads changes from the feeds it follows into its delivery
-- queue, moving its cursor in the same transaction, so a restart resumes
-- reading from the cursor with nothing lost; deliveries take the queue's
-- rows, the oldest of each entity first, and delete them once delivered.
-- Times are milliseconds since the Unix epoch.

-- One row per subscription.
CREATE TABLE event_subscriptions (
    -- The subscription's id (the {id} of `subscriptions/{id}`).
    id               TEXT    NOT NULL PRIMARY KEY,
    endpoint         TEXT    NOT NULL,
    -- The entity types, comma-separated (`user,contract`).
    entity_types     TEXT    NOT NULL,
    -- The entity ids filtered on, comma-separated; empty: every entity.
    entity_ids       TEXT    NOT NULL,
    -- 1 binary, 2 structured (the API's ContentMode values).
    content_mode     INTEGER NOT NULL,
    -- The `whsec_` signing secrets, newest first, newline-separated.
    secrets          TEXT    NOT NULL,
    -- 1 active, 2 paused (the API's SubscriptionState values).
    state            INTEGER NOT NULL,
    -- Deliveries per second; 0: none set.
    rate_limit       REAL    NOT NULL,
    max_attempts     INTEGER NOT NULL,
    timeout_ms       INTEGER NOT NULL,
    -- Raised by every change of configuration, state or cursor: the
    -- delivery task of the previous generation stops writing (it checks it
    -- under this row's lock) and a new one starts.
    generation       INTEGER NOT NULL DEFAULT 1,
    create_time_ms   INTEGER NOT NULL,
    update_time_ms   INTEGER NOT NULL
);

-- Where each subscription stands in each feed it follows.
CREATE TABLE event_cursors (
    subscription TEXT    NOT NULL,
    -- The feed (`users`, `contracts`, `photos`).
    feed         TEXT    NOT NULL,
    -- Every change up to here was queued or filtered out; -1: "from now",
    -- not yet connected.
    revision     INTEGER NOT NULL,
    PRIMARY KEY (subscription, feed)
);

-- Events waiting to be delivered: at most one per change.
CREATE TABLE event_queue (
    subscription    TEXT    NOT NULL,
    feed            TEXT    NOT NULL,
    revision        INTEGER NOT NULL,
    entity_id       TEXT    NOT NULL,
    -- The CloudEvent's type, time and data (the entity's JSON).
    event_type      TEXT    NOT NULL,
    event_time_ms   INTEGER NOT NULL,
    data            TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Not tried again before this.
    next_attempt_ms INTEGER NOT NULL,
    -- Every failed attempt so far, a JSON array.
    errors          TEXT    NOT NULL DEFAULT '[]',
    PRIMARY KEY (subscription, feed, revision)
);

-- Per-entity order: an event is due only when no older one of its entity
-- is queued.
CREATE INDEX event_queue_by_entity ON event_queue (subscription, feed, entity_id, revision);

-- Events given up on, with every attempt's error; redelivery moves them
-- back to the queue.
CREATE TABLE event_dead_letters (
    subscription  TEXT    NOT NULL,
    feed          TEXT    NOT NULL,
    revision      INTEGER NOT NULL,
    entity_id     TEXT    NOT NULL,
    event_type    TEXT    NOT NULL,
    event_time_ms INTEGER NOT NULL,
    data          TEXT    NOT NULL,
    attempts      INTEGER NOT NULL,
    errors        TEXT    NOT NULL,
    dead_time_ms  INTEGER NOT NULL,
    PRIMARY KEY (subscription, feed, revision)
);
