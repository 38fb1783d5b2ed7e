//! Where changes come from, and what each becomes.
//!
//! A [`Source`] opens a watch of one feed from a revision (with an id
//! filter the server applies), yielding the changefeed's [`Frame`]s: a feed
//! in the same process ([`Feed`]), or a service's watch RPC ([`UsersSource`],
//! [`ContractsSource`], [`PhotosSource`], over [`lightbox_client`]'s balanced
//! channels, the way `lightbox_cache::sources` follows them). The resume and
//! compaction answers are the changefeed's own: a resume from revision N
//! replays what followed N, or the consolidated latest state once that
//! history is trimmed, or a `Reset` and a snapshot past the tombstones.
//!
//! [`Sources`] holds one source per [`EntityKind`]; each change is rendered
//! once, as it is read, into an [`Occurrence`]: the CloudEvent's type, time
//! and data (the entity's proto3 JSON, as the gateway writes it).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use futures_util::{Stream, StreamExt};
use lightbox_api::{
    contracts::{Contract, WatchContractsRequest, contracts_service_client::ContractsServiceClient},
    events::EntityType,
    photos::{Photo, WatchPhotosRequest, photos_service_client::PhotosServiceClient},
    users::{User, WatchUsersRequest, users_service_client::UsersServiceClient},
};
use lightbox_changefeed::{Change, Feed, Frame, feed::Entity, watch::WatchStream};
use lightbox_client::Balanced;
use prost_reflect::DescriptorPool;
use serde_json::{Map, Value};
use tonic::Status;

/// A watch being opened.
pub type Opening<T> = Pin<Box<dyn Future<Output = Result<WatchStream<T>, Status>> + Send>>;

/// Where the changes of one entity type come from.
pub trait Source<T>: Send + Sync + 'static {
    /// Opens a watch from `since_revision` (0: snapshot first; -1: from
    /// now), of the entities in `ids` only if not empty.
    fn watch(&self, since_revision: i64, ids: Vec<String>) -> Opening<T>;
}

/// The entity types events are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    /// Users (feed `users`).
    User,
    /// Contracts (feed `contracts`).
    Contract,
    /// Photos (feed `photos`).
    Photo,
}

impl EntityKind {
    /// Every kind.
    pub const ALL: [EntityKind; 3] = [EntityKind::User, EntityKind::Contract, EntityKind::Photo];

    /// The name in event types: `user`, `contract`, `photo`.
    pub fn name(self) -> &'static str {
        match self {
            EntityKind::User => "user",
            EntityKind::Contract => "contract",
            EntityKind::Photo => "photo",
        }
    }

    /// The feed (and the service's changefeed name): `users`, ….
    pub fn feed(self) -> &'static str {
        match self {
            EntityKind::User => "users",
            EntityKind::Contract => "contracts",
            EntityKind::Photo => "photos",
        }
    }

    /// The kind of a feed name.
    pub fn from_feed(feed: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|kind| kind.feed() == feed)
    }

    /// The kind of a name (`user`, …).
    pub fn from_name(name: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The protobuf message of the entity.
    fn message(self) -> &'static str {
        match self {
            EntityKind::User => "lightbox.users.v1.User",
            EntityKind::Contract => "lightbox.contracts.v1.Contract",
            EntityKind::Photo => "lightbox.photos.v1.Photo",
        }
    }

    /// The JSON name of the owner field, for the data of a deletion.
    fn owner_field(self) -> Option<&'static str> {
        match self {
            EntityKind::User => None,
            EntityKind::Contract => Some("holderUserId"),
            EntityKind::Photo => Some("userId"),
        }
    }

    /// The API's enum value.
    pub fn to_api(self) -> EntityType {
        match self {
            EntityKind::User => EntityType::User,
            EntityKind::Contract => EntityType::Contract,
            EntityKind::Photo => EntityType::Photo,
        }
    }

    /// The kind of an API enum value.
    pub fn from_api(value: i32) -> Option<EntityKind> {
        match EntityType::try_from(value).ok()? {
            EntityType::User => Some(EntityKind::User),
            EntityType::Contract => Some(EntityKind::Contract),
            EntityType::Photo => Some(EntityKind::Photo),
            EntityType::Unspecified => None,
        }
    }
}

/// An entity type events are made of: its kind, and what its state says
/// about the change that wrote it.
pub trait Watched: Entity {
    /// Its kind.
    const KIND: EntityKind;
    /// The verb of an upsert: `created` when this is the entity's first
    /// version (its create and update times are equal: the services set
    /// both on creation, only the update time afterwards), else `updated`;
    /// `upserted` when the entity cannot tell (photos have no update time).
    fn verb(&self) -> &'static str;
    /// When the change happened, if the entity says.
    fn time(&self) -> Option<SystemTime>;
}

fn system_time(stamp: Option<&pbjson_types::Timestamp>) -> Option<SystemTime> {
    let stamp = stamp?;
    let seconds = u64::try_from(stamp.seconds).ok()?;
    let nanos = u32::try_from(stamp.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(seconds, nanos))
}

fn created_or_updated(
    create: &Option<pbjson_types::Timestamp>,
    update: &Option<pbjson_types::Timestamp>,
) -> &'static str {
    match (create, update) {
        (Some(create), Some(update)) if create == update => "created",
        _ => "updated",
    }
}

impl Watched for User {
    const KIND: EntityKind = EntityKind::User;
    fn verb(&self) -> &'static str {
        created_or_updated(&self.create_time, &self.update_time)
    }
    fn time(&self) -> Option<SystemTime> {
        system_time(self.update_time.as_ref())
    }
}

impl Watched for Contract {
    const KIND: EntityKind = EntityKind::Contract;
    fn verb(&self) -> &'static str {
        created_or_updated(&self.create_time, &self.update_time)
    }
    fn time(&self) -> Option<SystemTime> {
        system_time(self.update_time.as_ref())
    }
}

impl Watched for Photo {
    const KIND: EntityKind = EntityKind::Photo;
    fn verb(&self) -> &'static str {
        "upserted"
    }
    fn time(&self) -> Option<SystemTime> {
        system_time(self.create_time.as_ref())
    }
}

/// One change, rendered: what its CloudEvent is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence {
    /// The entity type.
    pub kind: EntityKind,
    /// The change's revision in its feed.
    pub revision: i64,
    /// The entity's id.
    pub entity_id: String,
    /// `dev.lightbox.<entity>.<verb>`.
    pub event_type: String,
    /// When it happened (the entity's update time; for a deletion, when it
    /// was read), milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The entity's proto3 JSON; for a deletion, its id (and owner).
    pub data: String,
}

/// What a source stream carries, rendered.
#[derive(Debug)]
pub(crate) enum Item {
    Event(Occurrence),
    SnapshotBegin,
    SnapshotEnd(i64),
    Progress(i64),
    Reset(String),
}

pub(crate) type ItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;
type ItemOpening = Pin<Box<dyn Future<Output = Result<ItemStream, Status>> + Send>>;

/// Milliseconds since the Unix epoch.
pub(crate) fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn descriptors() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(lightbox_gateway::descriptors)
        .as_ref()
        .map_err(Clone::clone)
}

/// Renders one change.
pub(crate) fn render<T: Watched>(change: &Change<T>) -> Occurrence {
    let kind = T::KIND;
    let (verb, time, data) = match &change.entity {
        Some(entity) => {
            let json =
                descriptors().and_then(|pool| lightbox_gateway::json::message_to_json(pool, kind.message(), entity));
            let data = match json {
                Ok(value) => value.to_string(),
                Err(err) => {
                    // A bug in the mapping: deliver the id rather than hold the feed back.
                    tracing::error!(%err, entity = change.entity_id, "an entity does not map to JSON");
                    deletion_data(kind, change)
                }
            };
            (entity.verb(), entity.time().unwrap_or_else(SystemTime::now), data)
        }
        None => ("deleted", SystemTime::now(), deletion_data(kind, change)),
    };
    Occurrence {
        kind,
        revision: change.revision,
        entity_id: change.entity_id.clone(),
        event_type: format!("dev.lightbox.{}.{verb}", kind.name()),
        time_ms: millis(time),
        data,
    }
}

fn deletion_data<T>(kind: EntityKind, change: &Change<T>) -> String {
    let mut object = Map::new();
    object.insert("id".into(), Value::String(change.entity_id.clone()));
    if let Some(field) = kind.owner_field()
        && !change.scope.is_empty()
    {
        object.insert(field.into(), Value::String(change.scope.clone()));
    }
    Value::Object(object).to_string()
}

/// A source of any entity type, rendering as it goes.
trait Erased: Send + Sync {
    fn watch(&self, since_revision: i64, ids: Vec<String>) -> ItemOpening;
}

struct Rendering<T, S> {
    source: S,
    _entity: std::marker::PhantomData<fn() -> T>,
}

impl<T: Watched, S: Source<T>> Erased for Rendering<T, S> {
    fn watch(&self, since_revision: i64, ids: Vec<String>) -> ItemOpening {
        let opening = self.source.watch(since_revision, ids);
        Box::pin(async move {
            let stream = opening.await?;
            Ok(Box::pin(stream.map(|frame| {
                frame.map(|frame| match frame {
                    Frame::Change(change) => Item::Event(render(&change)),
                    Frame::SnapshotBegin { .. } => Item::SnapshotBegin,
                    Frame::SnapshotEnd { revision } => Item::SnapshotEnd(revision),
                    Frame::Progress { revision } => Item::Progress(revision),
                    Frame::Reset { reason, .. } => Item::Reset(reason),
                })
            })) as ItemStream)
        })
    }
}

/// One source per entity type (cheap to clone).
#[derive(Clone, Default)]
pub struct Sources {
    sources: HashMap<EntityKind, Arc<dyn Erased>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds()).finish()
    }
}

impl Sources {
    /// No source: add them with [`Sources::with`].
    pub fn new() -> Sources {
        Sources::default()
    }

    /// These sources and `source` for `T`'s kind (replacing any).
    pub fn with<T: Watched>(mut self, source: impl Source<T>) -> Sources {
        let erased = Rendering {
            source,
            _entity: std::marker::PhantomData,
        };
        self.sources.insert(T::KIND, Arc::new(erased));
        self
    }

    /// The three services' watch RPCs, each through its balanced channel.
    pub fn grpc(users: Balanced, contracts: Balanced, photos: Balanced) -> Sources {
        Sources::new()
            .with(UsersSource::new(users))
            .with(ContractsSource::new(contracts))
            .with(PhotosSource::new(photos))
    }

    /// The kinds with a source, in order.
    pub fn kinds(&self) -> Vec<EntityKind> {
        let mut kinds: Vec<EntityKind> = self.sources.keys().copied().collect();
        kinds.sort();
        kinds
    }

    pub(crate) fn watch(&self, kind: EntityKind, since_revision: i64, ids: Vec<String>) -> Option<ItemOpening> {
        Some(self.sources.get(&kind)?.watch(since_revision, ids))
    }
}

/// A feed in the same process.
impl<T: Entity> Source<T> for Feed<T> {
    fn watch(&self, since_revision: i64, ids: Vec<String>) -> Opening<T> {
        let stream = Feed::watch(self, since_revision, ids);
        Box::pin(async move { Ok(stream) })
    }
}

macro_rules! grpc_source {
    ($(#[$doc:meta])* $name:ident, $entity:ty, $client:ident, $method:ident, $request:ident { $ids:ident }) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            client: $client<Balanced>,
        }

        impl $name {
            /// Watches through `channel`.
            pub fn new(channel: Balanced) -> $name {
                $name { client: $client::new(channel) }
            }
        }

        impl Source<$entity> for $name {
            // Some requests have more fields (a scope filter), some not.
            #[allow(clippy::needless_update)]
            fn watch(&self, since_revision: i64, ids: Vec<String>) -> Opening<$entity> {
                let mut client = self.client.clone();
                Box::pin(async move {
                    let request = $request {
                        since_revision,
                        $ids: ids,
                        ..$request::default()
                    };
                    let stream = client.$method(request).await?.into_inner();
                    Ok(Box::pin(stream.map(|item| item.and_then(lightbox_changefeed::messages::frame))) as WatchStream<$entity>)
                })
            }
        }
    };
}

grpc_source!(
    /// The users service's `WatchUsers`.
    UsersSource, User, UsersServiceClient, watch_users, WatchUsersRequest { user_ids }
);
grpc_source!(
    /// The contracts service's `WatchContracts`.
    ContractsSource, Contract, ContractsServiceClient, watch_contracts, WatchContractsRequest { contract_ids }
);
grpc_source!(
    /// The photos service's `WatchPhotos`.
    PhotosSource, Photo, PhotosServiceClient, watch_photos, WatchPhotosRequest { photo_ids }
);
