-- The contracts service's own tables. The contracts themselves live in the
-- changefeed's feed_entities (feed 'contracts'); this is an index on them,
-- written in the same transactions.

-- Who holds each contract, to list a user's contracts.
CREATE TABLE contract_holders (
    contract_id    TEXT NOT NULL PRIMARY KEY,
    holder_user_id TEXT NOT NULL
);

CREATE INDEX contract_holders_by_holder ON contract_holders (holder_user_id, contract_id);
