//! Lightbox's protobuf API, generated at build time from `proto/`.
//!
//! # Layout
//!
//! - [`lightbox`]: the generated messages (with proto3 canonical JSON serde
//!   impls), gRPC clients and servers, one module per proto package.
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, for server reflection.
//! - [`request`]: the checks every service applies to requests (ids, page
//!   sizes and tokens, revisions, update masks, text, timestamps).
//! - [`error`]: [`ApiError`], the one mapping from domain errors to gRPC
//!   codes and HTTP statuses.
//! - [`watch`]: the watch protocol's messages as one shape over every
//!   entity, and [`watch::Encoded`], a watch's change encoded once for
//!   every stream (the servers' watch responses).

pub mod error;
pub mod request;
pub mod watch;

pub use error::{ApiError, call_upstream, http_status};

/// The Google API types Lightbox's protos use: `google.api.HttpBody` (the
/// raw answer of `GetPhotoThumbnail`), and the HTTP annotations.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod google {
    /// `google.api`.
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
}

/// The generated code, one module per proto package.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod lightbox {
    /// `lightbox.feed.v1`: watch frames and freshness, shared by every feed.
    pub mod feed {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.feed.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.feed.v1.serde.rs"));
        }
    }
    /// `lightbox.users.v1`: the users service.
    pub mod users {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.users.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.users.v1.serde.rs"));
            include!(concat!(env!("OUT_DIR"), "/server/lightbox.users.v1.rs"));
        }
    }
    /// `lightbox.contracts.v1`: the contracts service.
    pub mod contracts {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.contracts.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.contracts.v1.serde.rs"));
            include!(concat!(env!("OUT_DIR"), "/server/lightbox.contracts.v1.rs"));
        }
    }
    /// `lightbox.photos.v1`: the photos service.
    pub mod photos {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.photos.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.photos.v1.serde.rs"));
            include!(concat!(env!("OUT_DIR"), "/server/lightbox.photos.v1.rs"));
        }
    }
    /// `lightbox.admin.v1`: fault injection.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.admin.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.admin.v1.serde.rs"));
            include!(concat!(env!("OUT_DIR"), "/server/lightbox.admin.v1.rs"));
        }
    }
    /// `lightbox.events.v1`: subscriptions that deliver changes to functions.
    pub mod events {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lightbox.events.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/lightbox.events.v1.serde.rs"));
            include!(concat!(env!("OUT_DIR"), "/server/lightbox.events.v1.rs"));
        }
    }
}

pub use lightbox::{
    admin::v1 as admin, contracts::v1 as contracts, events::v1 as events, feed::v1 as feed, photos::v1 as photos,
    users::v1 as users,
};

/// The encoded `FileDescriptorSet` of every Lightbox proto file, for server
/// reflection (and anything else that needs the schema at run time).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lightbox_descriptor.bin"));
