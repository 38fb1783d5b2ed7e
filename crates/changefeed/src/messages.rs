//! Conversions between feed values and the API's watch and listing messages,
//! one set per watchable entity (users, contracts, photos), written once as
//! a macro because the three APIs have the same shape with other names.
//!
//! A change's scope (its owner: see [`crate::WriteTx::put_scoped`]) is on
//! the wire where the entity has one (`ContractChange.holder_user_id`,
//! `PhotoChange.user_id`), deletions included, so a client can route a
//! change to its owner without the entity; read back, it becomes the
//! change's scope again.

use lightbox_api::{contracts, feed as frames, photos, users};

use crate::{
    change::{Change, ChangePage, Entity, Frame},
    watch::WatchFilter,
};

/// The API's change kind of a change.
fn kind<T>(change: &Change<T>) -> frames::ChangeKind {
    if change.entity.is_some() {
        frames::ChangeKind::Upsert
    } else {
        frames::ChangeKind::Delete
    }
}

macro_rules! feed_messages {
    // The scope read back from a change message: its scope field, if the
    // message has one.
    (@scope $change:ident) => {
        String::new()
    };
    (@scope $change:ident, $scope:ident) => {
        $change.$scope
    };
    ($entity:ty, $change:ident { $id:ident, $field:ident $(, scope: $scope:ident)? }, $watch:ident, $event:path, $list:ident) => {
        impl From<&Change<$entity>> for $change {
            fn from(change: &Change<$entity>) -> Self {
                $change {
                    revision: change.revision,
                    kind: kind(change) as i32,
                    $id: change.entity_id.clone(),
                    $field: change.entity.clone(),
                    $($scope: change.scope.clone(),)?
                }
            }
        }

        impl From<Frame<$entity>> for $watch {
            fn from(frame: Frame<$entity>) -> Self {
                use $event as Event;
                let event = match frame {
                    Frame::Change(change) => Event::Change(change.as_ref().into()),
                    Frame::SnapshotBegin { revision } => Event::SnapshotBegin(frames::SnapshotBegin { revision }),
                    Frame::SnapshotEnd { revision } => Event::SnapshotEnd(frames::SnapshotEnd { revision }),
                    Frame::Progress { revision } => Event::Progress(frames::Progress { revision }),
                    Frame::Reset { revision, reason } => Event::Reset(frames::Reset { revision, reason }),
                };
                $watch { event: Some(event) }
            }
        }

        impl TryFrom<$watch> for Frame<$entity> {
            type Error = tonic::Status;

            /// Reads a frame received from a watch stream (for caches).
            fn try_from(response: $watch) -> Result<Self, tonic::Status> {
                use $event as Event;
                Ok(match response.event {
                    Some(Event::Change(change)) => {
                        let entity = match frames::ChangeKind::try_from(change.kind) {
                            Ok(frames::ChangeKind::Upsert) => Some(change.$field.ok_or_else(|| {
                                tonic::Status::internal(format!("upsert of {} without the entity", change.$id))
                            })?),
                            Ok(frames::ChangeKind::Delete) => None,
                            _ => {
                                return Err(tonic::Status::internal(format!(
                                    "change kind {} is unknown",
                                    change.kind
                                )));
                            }
                        };
                        Frame::Change(std::sync::Arc::new(Change {
                            revision: change.revision,
                            // Empty if the message carries no scope.
                            scope: feed_messages!(@scope change $(, $scope)?),
                            entity_id: change.$id,
                            entity,
                        }))
                    }
                    Some(Event::SnapshotBegin(begin)) => Frame::SnapshotBegin {
                        revision: begin.revision,
                    },
                    Some(Event::SnapshotEnd(end)) => Frame::SnapshotEnd {
                        revision: end.revision,
                    },
                    Some(Event::Progress(progress)) => Frame::Progress {
                        revision: progress.revision,
                    },
                    Some(Event::Reset(reset)) => Frame::Reset {
                        revision: reset.revision,
                        reason: reset.reason,
                    },
                    None => return Err(tonic::Status::internal("a watch frame without an event")),
                })
            }
        }

        impl From<ChangePage<$entity>> for $list {
            fn from(page: ChangePage<$entity>) -> Self {
                $list {
                    changes: page.changes.iter().map(|change| change.as_ref().into()).collect(),
                    next_since_revision: page.next_since_revision,
                    next_page_token: page.next_page_token,
                    reset: page.reset.map(|reason| frames::Reset {
                        revision: page.next_since_revision,
                        reason,
                    }),
                }
            }
        }
    };
}

feed_messages!(
    users::User,
    UserChange { user_id, user },
    WatchUsersResponse,
    users::watch_users_response::Event,
    ListUserChangesResponse
);
use users::{ListUserChangesResponse, UserChange, WatchUsersResponse};

feed_messages!(
    contracts::Contract,
    ContractChange {
        contract_id,
        contract,
        scope: holder_user_id
    },
    WatchContractsResponse,
    contracts::watch_contracts_response::Event,
    ListContractChangesResponse
);
use contracts::{ContractChange, ListContractChangesResponse, WatchContractsResponse};

feed_messages!(
    photos::Photo,
    PhotoChange {
        photo_id,
        photo,
        scope: user_id
    },
    WatchPhotosResponse,
    photos::watch_photos_response::Event,
    ListPhotoChangesResponse
);
use photos::{ListPhotoChangesResponse, PhotoChange, WatchPhotosResponse};

/// Serves a `Watch…` request (the same for every feed): checks the
/// arguments (see [`watch_args`]), then streams the feed's frames as the
/// API's responses.
pub fn serve_watch<T: Entity, R: From<Frame<T>> + Send + 'static>(
    feed: &crate::Feed<T>,
    since_revision: i64,
    ids: (&str, Vec<String>),
    scope: Option<(&str, &str)>,
) -> Result<crate::watch::MappedStream<R>, lightbox_api::ApiError> {
    let (since, filter) = watch_args(since_revision, ids, scope)?;
    Ok(crate::watch::mapped(feed.watch(since, filter)))
}

/// Serves a `List…Changes` request (the same for every feed): checks the
/// arguments, lists, converts.
pub async fn serve_list_changes<T: Entity, R: From<ChangePage<T>>>(
    feed: &crate::Feed<T>,
    since_revision: i64,
    page_size: i32,
    page_token: &str,
) -> Result<R, lightbox_api::ApiError> {
    let since = lightbox_api::request::since_revision(since_revision)?;
    let size = lightbox_api::request::page_size(page_size, 100, 1000)?;
    Ok(feed.list_changes(since, size, page_token).await?.into())
}

/// Validates a watch request's arguments (the same for every feed) and
/// makes its filter. `ids` is the id filter's field name (`user_ids`, …) and
/// its ids; `scope`, for a feed whose entities are scoped by owner, the
/// scope filter's field name (`holder_user_id`, …) and its value, empty for
/// none. Ids and the scope are UUIDs, normalised as the services store them.
pub fn watch_args(
    since_revision: i64,
    ids: (&str, Vec<String>),
    scope: Option<(&str, &str)>,
) -> Result<(i64, WatchFilter), lightbox_api::ApiError> {
    let since = lightbox_api::request::watch_since_revision(since_revision)?;
    let (ids_field, ids) = ids;
    if ids.len() > crate::watch::MAX_WATCH_IDS {
        return Err(lightbox_api::ApiError::InvalidArgument(format!(
            "{ids_field} has {} ids; at most {} may be watched on one stream",
            ids.len(),
            crate::watch::MAX_WATCH_IDS
        )));
    }
    let ids = ids
        .iter()
        .map(|id| lightbox_api::request::parse_id(ids_field, id).map(|id| id.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let scope = match scope {
        Some((field, value)) => lightbox_api::request::parse_optional_id(field, value)?.map(|id| id.to_string()),
        None => None,
    };
    Ok((since, WatchFilter { ids, scope }))
}
