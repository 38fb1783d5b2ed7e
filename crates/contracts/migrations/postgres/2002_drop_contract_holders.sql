-- The contract_holders index is no longer read: a holder's contracts are
-- listed from the changefeed's scope index (feed_entities_by_scope), each
-- contract being written in its holder's scope (2001). Dropped, so that no
-- write keeps a second copy of the holder in step.

DROP TABLE contract_holders;
