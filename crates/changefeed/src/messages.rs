//! Conversions between the feed's values and the API's messages, through
//! the one shape every watchable entity's messages have
//! ([`lightbox_api::watch`]): this crate knows entities and frames, the API
//! knows its messages, no service is named here.
//!
//! A change's scope (its owner: see [`crate::WriteTx::put_scoped`]) is on
//! the wire where the entity has one (`ContractChange.holder_user_id`,
//! `PhotoChange.user_id`), deletions included, so a client can route a
//! change to its owner without the entity; read back, it becomes the
//! change's scope again.
//!
//! A watch serves its frames as [`Encoded`] responses: a change is encoded
//! once ([`Change::encoded`]) and every stream that wants it is written the
//! same bytes; the other frames are each stream's own.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use lightbox_api::{
    feed as frames,
    watch::{ChangeMessage, ChangesPage, Encoded, WatchEvent, WatchMessage},
};
use prost::bytes::Bytes;

use crate::{
    change::{Change, ChangePage, Frame},
    watch::WatchFilter,
};

/// The entity a watch response carries.
pub type EntityOf<R> = <<R as WatchMessage>::Change as ChangeMessage>::Entity;

/// The API's message of a change.
pub fn change_message<C: ChangeMessage>(change: &Change<C::Entity>) -> C {
    C::new(
        change.revision,
        change.entity_id.clone(),
        change.entity.clone(),
        change.scope.clone(),
    )
}

/// The API's watch response of a frame.
pub fn watch_message<R: WatchMessage>(frame: &Frame<EntityOf<R>>) -> R {
    R::from_event(match frame {
        Frame::Change(change) => WatchEvent::Change(change_message(change)),
        Frame::SnapshotBegin { revision } => WatchEvent::SnapshotBegin(frames::SnapshotBegin { revision: *revision }),
        Frame::SnapshotEnd { revision } => WatchEvent::SnapshotEnd(frames::SnapshotEnd { revision: *revision }),
        Frame::Progress { revision } => WatchEvent::Progress(frames::Progress { revision: *revision }),
        Frame::Reset { revision, reason } => WatchEvent::Reset(frames::Reset {
            revision: *revision,
            reason: reason.clone(),
        }),
    })
}

/// A frame as a watch serves it: a change as its encoding, made once for
/// every stream (`encoded` counts each encoding); any other frame as a
/// message.
pub fn encoded<R: WatchMessage>(frame: Frame<EntityOf<R>>, encoded: &AtomicU64) -> Encoded<R> {
    match &frame {
        Frame::Change(change) => Encoded::Bytes(change.encoded::<R>(|change| {
            encoded.fetch_add(1, Ordering::Relaxed);
            Bytes::from(R::from_event(WatchEvent::Change(change_message(change))).encode_to_vec())
        })),
        _ => Encoded::Message(watch_message(&frame)),
    }
}

/// Reads a change received from a watch or a listing, checked (see
/// [`ChangeMessage::into_parts`]).
pub fn change<C: ChangeMessage>(message: C) -> Result<Arc<Change<C::Entity>>, tonic::Status> {
    let parts = message.into_parts()?;
    Ok(Arc::new(Change::new(
        parts.revision,
        parts.id,
        parts.scope,
        parts.entity,
    )))
}

/// Reads a frame received from a watch stream (for caches and followers).
pub fn frame<R: WatchMessage>(response: R) -> Result<Frame<EntityOf<R>>, tonic::Status> {
    Ok(match response.into_event() {
        Some(WatchEvent::Change(message)) => Frame::Change(change(message)?),
        Some(WatchEvent::SnapshotBegin(begin)) => Frame::SnapshotBegin {
            revision: begin.revision,
        },
        Some(WatchEvent::SnapshotEnd(end)) => Frame::SnapshotEnd { revision: end.revision },
        Some(WatchEvent::Progress(progress)) => Frame::Progress {
            revision: progress.revision,
        },
        Some(WatchEvent::Reset(reset)) => Frame::Reset {
            revision: reset.revision,
            reason: reset.reason,
        },
        None => return Err(tonic::Status::internal("a watch frame without an event")),
    })
}

/// The API's page of a pull listing.
pub fn changes_page<L: ChangesPage>(page: ChangePage<<L::Change as ChangeMessage>::Entity>) -> L {
    let reset = page.reset.map(|reason| frames::Reset {
        revision: page.next_since_revision,
        reason,
    });
    L::new(
        page.changes.iter().map(|change| change_message(change)).collect(),
        page.next_since_revision,
        page.next_page_token,
        reset,
    )
}

/// Serves a `Watch…` request (the same for every feed): checks the
/// arguments (see [`watch_args`]), then streams the feed's frames as the
/// API's responses, each change encoded once for every stream.
pub fn serve_watch<R: WatchMessage>(
    feed: &crate::Feed<EntityOf<R>>,
    since_revision: i64,
    ids: (&str, Vec<String>),
    scope: Option<(&str, &str)>,
) -> Result<crate::watch::MappedStream<Encoded<R>>, lightbox_api::ApiError> {
    let (since, filter) = watch_args(since_revision, ids, scope)?;
    let stream = feed.watch(since, filter);
    let hub = Arc::clone(&feed.inner.shared.hub);
    Ok(Box::pin(futures_util::StreamExt::map(stream, move |item| {
        item.map(|frame| encoded::<R>(frame, &hub.changes_encoded))
    })))
}

/// Serves a `List…Changes` request (the same for every feed): checks the
/// arguments, lists, converts.
pub async fn serve_list_changes<L: ChangesPage>(
    feed: &crate::Feed<<L::Change as ChangeMessage>::Entity>,
    since_revision: i64,
    page_size: i32,
    page_token: &str,
) -> Result<L, lightbox_api::ApiError> {
    let since = lightbox_api::request::since_revision(since_revision)?;
    let size = lightbox_api::request::page_size(page_size, 100, 1000)?;
    Ok(changes_page(feed.list_changes(since, size, page_token).await?))
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
