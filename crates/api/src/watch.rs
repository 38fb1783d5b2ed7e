//! The watch protocol's messages as one shape, whatever the entity, and
//! [`Encoded`]: a message a server may send as bytes encoded once.
//!
//! Every watchable entity (users, contracts, photos) has the same messages
//! under other names: a change (`UserChange`: revision, kind, id, the
//! entity, and for an owned entity its owner's id), a watch response (a
//! oneof of that change and the shared frames of `lightbox.feed.v1`) and a
//! page of the pull listing. [`ChangeMessage`], [`WatchMessage`] and
//! [`ChangesPage`] name that shape, so the changefeed converts to and from
//! them without knowing any service; the API knows its messages, the
//! changefeed knows entities and frames.
//!
//! A watch's change goes to every stream that wants it: the server encodes
//! it once and writes [`Encoded::Bytes`] to each. The servers are generated
//! with `Encoded<WatchUsersResponse>` (and siblings) as their watch
//! responses; the clients keep `WatchUsersResponse`: on the wire they are
//! the same message.

use prost::{
    DecodeError, Message,
    bytes::{Buf, BufMut, Bytes},
    encoding::{DecodeContext, WireType},
};
use tonic::Status;

use crate::{contracts, feed, photos, users};

/// A message to send, as a value or as its encoding already made (by
/// `M::encode_to_vec`, once, for many streams). Encodes to the same bytes
/// either way; decodes to [`Encoded::Message`].
#[derive(Debug, Clone, PartialEq)]
pub enum Encoded<M> {
    /// A message, encoded when sent.
    Message(M),
    /// A message's encoding, sent as it is.
    Bytes(Bytes),
}

impl<M: Message + Default> Encoded<M> {
    /// The message, decoding it if it is held as bytes.
    pub fn into_message(self) -> Result<M, DecodeError> {
        match self {
            Encoded::Message(message) => Ok(message),
            Encoded::Bytes(bytes) => M::decode(bytes),
        }
    }
}

impl<M: Default> Default for Encoded<M> {
    fn default() -> Self {
        Encoded::Message(M::default())
    }
}

impl<M> From<M> for Encoded<M> {
    fn from(message: M) -> Self {
        Encoded::Message(message)
    }
}

impl<M: Message + Default> Message for Encoded<M> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Encoded::Message(message) => message.encode_raw(buf),
            Encoded::Bytes(bytes) => buf.put_slice(bytes),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match self {
            Encoded::Message(message) => message.merge_field(tag, wire_type, buf, ctx),
            Encoded::Bytes(bytes) => {
                let mut message = M::decode(bytes.as_ref())?;
                message.merge_field(tag, wire_type, buf, ctx)?;
                *self = Encoded::Message(message);
                Ok(())
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Encoded::Message(message) => message.encoded_len(),
            Encoded::Bytes(bytes) => bytes.len(),
        }
    }

    fn clear(&mut self) {
        *self = Encoded::Message(M::default());
    }
}

/// A change as the watch and the listing carry it: `UserChange`,
/// `ContractChange`, `PhotoChange`.
pub trait ChangeMessage: Message + Default + Sized + Send + 'static {
    /// The entity it carries.
    type Entity: Message + Default + Clone + Send + Sync + 'static;

    /// The message of a change at `revision` to entity `id`: an upsert
    /// carrying `entity`, or a deletion if `None`. `scope` (the owner's id)
    /// goes into the owner field where the message has one.
    fn new(revision: i64, id: String, entity: Option<Self::Entity>, scope: String) -> Self;

    /// What the message says, checked: a known kind, and an upsert carries
    /// its entity. A message without an owner field reads as the empty
    /// scope.
    fn into_parts(self) -> Result<ChangeParts<Self::Entity>, Status>;
}

/// What a [`ChangeMessage`] says.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeParts<E> {
    /// The revision of the change.
    pub revision: i64,
    /// The entity's id.
    pub id: String,
    /// The entity after the change; `None` for a deletion.
    pub entity: Option<E>,
    /// The owner's id; empty for none.
    pub scope: String,
}

/// One frame of a watch stream, as any watch response carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<C> {
    /// A change.
    Change(C),
    /// A snapshot starts.
    SnapshotBegin(feed::SnapshotBegin),
    /// The snapshot is complete.
    SnapshotEnd(feed::SnapshotEnd),
    /// Every matching change up to a revision was delivered.
    Progress(feed::Progress),
    /// The watch cannot resume; a snapshot follows.
    Reset(feed::Reset),
}

/// A watch response: `WatchUsersResponse`, `WatchContractsResponse`,
/// `WatchPhotosResponse`.
pub trait WatchMessage: Message + Default + Sized + Send + 'static {
    /// Its change message.
    type Change: ChangeMessage;

    /// The response carrying `event`.
    fn from_event(event: WatchEvent<Self::Change>) -> Self;

    /// The event it carries (`None` if it carries none).
    fn into_event(self) -> Option<WatchEvent<Self::Change>>;
}

/// A page of a pull listing: `ListUserChangesResponse` and siblings.
pub trait ChangesPage: Message + Default + Sized + Send + 'static {
    /// Its change message.
    type Change: ChangeMessage;

    /// The page of `changes`, continued from `next_since_revision` (or with
    /// `next_page_token`); `reset` if the client must list again from 0.
    fn new(
        changes: Vec<Self::Change>,
        next_since_revision: i64,
        next_page_token: String,
        reset: Option<feed::Reset>,
    ) -> Self;
}

/// The kind of a change: an upsert if it carries the entity.
fn kind<E>(entity: &Option<E>) -> feed::ChangeKind {
    match entity {
        Some(_) => feed::ChangeKind::Upsert,
        None => feed::ChangeKind::Delete,
    }
}

/// Checks a received change's kind against its entity.
fn checked_entity<E>(kind: i32, id: &str, entity: Option<E>) -> Result<Option<E>, Status> {
    match feed::ChangeKind::try_from(kind) {
        Ok(feed::ChangeKind::Upsert) => entity
            .map(Some)
            .ok_or_else(|| Status::internal(format!("upsert of {id} without the entity"))),
        Ok(feed::ChangeKind::Delete) => Ok(None),
        _ => Err(Status::internal(format!("change kind {kind} is unknown"))),
    }
}

macro_rules! watch_messages {
    (@scope $change:ident) => {
        String::new()
    };
    (@scope $change:ident, $scope:ident) => {
        $change.$scope
    };
    (
        $module:ident,
        $entity:ident,
        $change:ident { $id:ident, $field:ident $(, scope: $scope:ident)? },
        $watch:ident,
        $event:ident,
        $list:ident
    ) => {
        impl ChangeMessage for $module::$change {
            type Entity = $module::$entity;

            // A message without an owner field drops the scope.
            #[allow(unused_variables)]
            fn new(revision: i64, id: String, entity: Option<$module::$entity>, scope: String) -> Self {
                $module::$change {
                    revision,
                    kind: kind(&entity) as i32,
                    $id: id,
                    $field: entity,
                    $($scope: scope,)?
                }
            }

            fn into_parts(self) -> Result<ChangeParts<$module::$entity>, Status> {
                let entity = checked_entity(self.kind, &self.$id, self.$field)?;
                Ok(ChangeParts {
                    revision: self.revision,
                    scope: watch_messages!(@scope self $(, $scope)?),
                    id: self.$id,
                    entity,
                })
            }
        }

        impl WatchMessage for $module::$watch {
            type Change = $module::$change;

            fn from_event(event: WatchEvent<$module::$change>) -> Self {
                use $module::$event::Event;
                let event = match event {
                    WatchEvent::Change(change) => Event::Change(change),
                    WatchEvent::SnapshotBegin(begin) => Event::SnapshotBegin(begin),
                    WatchEvent::SnapshotEnd(end) => Event::SnapshotEnd(end),
                    WatchEvent::Progress(progress) => Event::Progress(progress),
                    WatchEvent::Reset(reset) => Event::Reset(reset),
                };
                $module::$watch { event: Some(event) }
            }

            fn into_event(self) -> Option<WatchEvent<$module::$change>> {
                use $module::$event::Event;
                Some(match self.event? {
                    Event::Change(change) => WatchEvent::Change(change),
                    Event::SnapshotBegin(begin) => WatchEvent::SnapshotBegin(begin),
                    Event::SnapshotEnd(end) => WatchEvent::SnapshotEnd(end),
                    Event::Progress(progress) => WatchEvent::Progress(progress),
                    Event::Reset(reset) => WatchEvent::Reset(reset),
                })
            }
        }

        impl ChangesPage for $module::$list {
            type Change = $module::$change;

            fn new(
                changes: Vec<$module::$change>,
                next_since_revision: i64,
                next_page_token: String,
                reset: Option<feed::Reset>,
            ) -> Self {
                $module::$list {
                    changes,
                    next_since_revision,
                    next_page_token,
                    reset,
                }
            }
        }
    };
}

watch_messages!(
    users,
    User,
    UserChange { user_id, user },
    WatchUsersResponse,
    watch_users_response,
    ListUserChangesResponse
);

watch_messages!(
    contracts,
    Contract,
    ContractChange {
        contract_id,
        contract,
        scope: holder_user_id
    },
    WatchContractsResponse,
    watch_contracts_response,
    ListContractChangesResponse
);

watch_messages!(
    photos,
    Photo,
    PhotoChange {
        photo_id,
        photo,
        scope: user_id
    },
    WatchPhotosResponse,
    watch_photos_response,
    ListPhotoChangesResponse
);

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> contracts::WatchContractsResponse {
        contracts::WatchContractsResponse::from_event(WatchEvent::Change(contracts::ContractChange::new(
            7,
            "c-1".into(),
            Some(contracts::Contract {
                id: "c-1".into(),
                holder_user_id: "u-1".into(),
                ..Default::default()
            }),
            "u-1".into(),
        )))
    }

    #[test]
    fn encoded_bytes_are_the_message_on_the_wire() {
        let message = change();
        let bytes = Bytes::from(message.encode_to_vec());
        let encoded = Encoded::<contracts::WatchContractsResponse>::Bytes(bytes.clone());
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        assert_eq!(
            Encoded::<contracts::WatchContractsResponse>::Message(message.clone()).encode_to_vec(),
            bytes
        );
        // What a typed client reads.
        assert_eq!(
            contracts::WatchContractsResponse::decode(bytes.clone()),
            Ok(message.clone())
        );
        // Decoding into the server's type gives the message back too.
        assert_eq!(
            Encoded::<contracts::WatchContractsResponse>::decode(bytes),
            Ok(Encoded::Message(message))
        );
    }

    #[test]
    fn a_change_reads_back_as_it_was_made() {
        let Some(WatchEvent::Change(change)) = change().into_event() else {
            panic!("a change frame reads back as a change");
        };
        let parts = change.into_parts().expect("a valid change");
        assert_eq!(
            (parts.revision, parts.id.as_str(), parts.scope.as_str()),
            (7, "c-1", "u-1")
        );
        // Users have no owner: the scope is dropped, and reads back empty.
        let user = users::UserChange::new(3, "u-1".into(), None, "ignored".into());
        let parts = user.into_parts().expect("a valid deletion");
        assert_eq!((parts.entity, parts.scope.as_str()), (None, ""));
    }

    #[test]
    fn an_upsert_without_its_entity_is_refused() {
        let broken = photos::PhotoChange {
            revision: 1,
            kind: feed::ChangeKind::Upsert as i32,
            photo_id: "p-1".into(),
            ..Default::default()
        };
        let refused = broken.into_parts().expect_err("an upsert needs its entity");
        assert_eq!(refused.code(), tonic::Code::Internal);
        let unknown = photos::PhotoChange {
            kind: 9,
            ..Default::default()
        };
        assert!(unknown.into_parts().is_err());
    }
}
