-- Scopes. Append-only: change the schema in a new file.
--
-- Every entity may belong to a scope: the id of its owner (a photo's user, a
-- contract's holder), '' for none. A watcher may ask for one scope only (the
-- mobile gateway follows one user's photos): its snapshot reads the
-- entities of that scope through the index below, and its changes are
-- matched on the scope each change row carries. A deletion keeps the scope
-- of the entity it deleted, on its change row and on the tombstone, so a
-- scoped watcher sees its owner's deletions too.
--
-- Rows written before this migration have the empty scope; a service that
-- scopes its entities backfills its own rows (it knows their owners).

ALTER TABLE feed_changes ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE feed_entities ADD COLUMN scope TEXT NOT NULL DEFAULT '';

-- Scoped snapshots: a scope's live entities, in id order.
CREATE INDEX feed_entities_by_scope ON feed_entities (feed, scope, entity_id);
