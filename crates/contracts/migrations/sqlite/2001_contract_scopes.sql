-- Contracts are written in their holder's scope (the changefeed's scope
-- column, changefeed migration 2), so that `WatchContracts` can follow one
-- holder's contracts. This gives the contracts written before it their
-- holder's scope, from the contract_holders index, on their entity row and
-- every change row kept. Contracts deleted before it keep the empty scope on
-- their tombstone and changes (their contract_holders row went with them):
-- a holder's watcher resuming from before this migration does not see
-- those deletions; one that starts from a snapshot is not affected.

UPDATE feed_entities
SET scope = (SELECT holder_user_id FROM contract_holders WHERE contract_id = feed_entities.entity_id)
WHERE feed = 'contracts'
  AND scope = ''
  AND EXISTS (SELECT 1 FROM contract_holders WHERE contract_id = feed_entities.entity_id);

-- A change row of a contract whose holder changed since gets the current
-- holder: the past holders are not kept anywhere.
UPDATE feed_changes
SET scope = (SELECT holder_user_id FROM contract_holders WHERE contract_id = feed_changes.entity_id)
WHERE feed = 'contracts'
  AND scope = ''
  AND EXISTS (SELECT 1 FROM contract_holders WHERE contract_id = feed_changes.entity_id);
