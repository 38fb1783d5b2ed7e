-- The photos service's own tables. The photos themselves live in the
-- changefeed's feed_entities (feed 'photos'); this is an index on them,
-- written in the same transactions.

-- Whose each photo is: to list a user's photos (newest first: ids are
-- UUIDv7, ordered by creation time) and to count them against the quota.
CREATE TABLE photo_owners (
    photo_id TEXT NOT NULL PRIMARY KEY,
    user_id  TEXT NOT NULL
);

CREATE INDEX photo_owners_by_user ON photo_owners (user_id, photo_id);
