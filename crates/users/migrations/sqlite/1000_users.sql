-- The users service's own tables. The users themselves live in the
-- changefeed's feed_entities (feed 'users'); this is an index on them,
-- written in the same transactions.

-- E-mail addresses are unique among users (compared lowercased).
CREATE TABLE user_emails (
    email   TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE
);
