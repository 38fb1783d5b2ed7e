//! What travels through a feed: an [`Entity`], one committed [`Change`] to
//! it, the [`Frame`]s of a watch stream and a [`ChangePage`] of the pull
//! listing. It depends on no other module of the crate.

use std::{
    any::TypeId,
    sync::{Arc, OnceLock},
};

use prost::bytes::Bytes;

/// One committed change to an entity.
///
/// A change also holds its encoding as a watch response once a watch stream
/// has made it (see [`Change::encoded`]): a live change goes to every
/// watcher as the same `Arc`, so it is encoded once for all of them.
#[derive(Debug, Clone)]
pub struct Change<T> {
    /// The revision of the change.
    pub revision: i64,
    /// The entity's id.
    pub entity_id: String,
    /// The scope the entity belongs to (its owner's id, see
    /// [`crate::WriteTx::put_scoped`]; empty for none). A deletion carries the
    /// scope of the entity it deleted. The API's watch messages carry it
    /// where the entity has an owner (`ContractChange.holder_user_id`,
    /// `PhotoChange.user_id`), and it is read back from them; a change read
    /// back from a watch of users has the empty scope.
    pub scope: String,
    /// The entity after the change; `None` for a deletion.
    pub entity: Option<T>,
    /// The change's encoding as a watch response, and the type of that
    /// response (a feed is served as one type; the check keeps another
    /// from reading the wrong bytes).
    encoded: OnceLock<(TypeId, Bytes)>,
}

impl<T> Change<T> {
    /// A change at `revision` to entity `entity_id` in `scope` (empty for
    /// none): `entity` after it, `None` for a deletion.
    pub fn new(revision: i64, entity_id: String, scope: String, entity: Option<T>) -> Change<T> {
        Change {
            revision,
            entity_id,
            scope,
            entity,
            encoded: OnceLock::new(),
        }
    }

    /// This change encoded as a message of type `M`, by `encode` the first
    /// time only: later calls (other watchers of the same change) get the
    /// same bytes. Asked for another type, it encodes again (not kept).
    pub fn encoded<M: 'static>(&self, encode: impl Fn(&Change<T>) -> Bytes) -> Bytes {
        let (kind, bytes) = self.encoded.get_or_init(|| (TypeId::of::<M>(), encode(self)));
        if *kind == TypeId::of::<M>() {
            bytes.clone()
        } else {
            encode(self)
        }
    }
}

/// Changes are equal when they say the same (whether either was encoded
/// yet does not count).
impl<T: PartialEq> PartialEq for Change<T> {
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision
            && self.entity_id == other.entity_id
            && self.scope == other.scope
            && self.entity == other.entity
    }
}

/// One frame of a watch stream.
#[derive(Debug, Clone)]
pub enum Frame<T> {
    /// A change (in a snapshot, the entity's current state at its revision).
    Change(Arc<Change<T>>),
    /// A snapshot at `revision` starts.
    SnapshotBegin {
        /// The revision the snapshot is taken at.
        revision: i64,
    },
    /// The snapshot at `revision` is complete.
    SnapshotEnd {
        /// The revision the snapshot is taken at.
        revision: i64,
    },
    /// Every matching change up to `revision` was delivered.
    Progress {
        /// The revision the watcher is now at.
        revision: i64,
    },
    /// The watch cannot resume; a snapshot at `revision` follows.
    Reset {
        /// The revision of the snapshot that follows.
        revision: i64,
        /// Why, for people and logs.
        reason: String,
    },
}

/// Bound on what an entity type must be to travel through a feed.
pub trait Entity: prost::Message + Default + Clone + Send + Sync + 'static {}
impl<T: prost::Message + Default + Clone + Send + Sync + 'static> Entity for T {}

/// A page of the pull listing.
#[derive(Debug, Clone)]
pub struct ChangePage<T> {
    /// The changes, in revision order (in entity id order while listing the
    /// state from 0).
    pub changes: Vec<Arc<Change<T>>>,
    /// The revision to list from next (0 while the state listing goes on).
    pub next_since_revision: i64,
    /// While listing the state from 0: the token of the next page.
    pub next_page_token: String,
    /// Set when the requested revision cannot be resumed from: the client
    /// drops its copy and lists again from 0. Holds the reason.
    pub reset: Option<String>,
}

impl<T> ChangePage<T> {
    pub(crate) fn reset(reason: String) -> ChangePage<T> {
        ChangePage {
            changes: Vec::new(),
            next_since_revision: 0,
            next_page_token: String::new(),
            reset: Some(reason),
        }
    }
}
