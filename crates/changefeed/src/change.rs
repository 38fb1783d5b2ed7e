//! What travels through a feed: an [`Entity`], one committed [`Change`] to
//! it, the [`Frame`]s of a watch stream and a [`ChangePage`] of the pull
//! listing. It depends on no other module of the crate.

use std::sync::Arc;

/// One committed change to an entity.
#[derive(Debug, Clone, PartialEq)]
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
