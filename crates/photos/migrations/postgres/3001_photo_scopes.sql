-- Photos are written in their owner's scope (the changefeed's scope column,
-- changefeed migration 2), so that `WatchPhotos` can follow one user's
-- photos. This gives the photos written before it their owner's scope, from
-- the photo_owners index, on their entity row and every change row kept.
-- Photos deleted before it keep the empty scope on their tombstone and
-- changes (their photo_owners row went with them): a user's watcher resuming
-- from before this migration does not see those deletions; one that starts
-- from a snapshot is not affected.

UPDATE feed_entities
SET scope = (SELECT user_id FROM photo_owners WHERE photo_id = feed_entities.entity_id)
WHERE feed = 'photos'
  AND scope = ''
  AND EXISTS (SELECT 1 FROM photo_owners WHERE photo_id = feed_entities.entity_id);

UPDATE feed_changes
SET scope = (SELECT user_id FROM photo_owners WHERE photo_id = feed_changes.entity_id)
WHERE feed = 'photos'
  AND scope = ''
  AND EXISTS (SELECT 1 FROM photo_owners WHERE photo_id = feed_changes.entity_id);
