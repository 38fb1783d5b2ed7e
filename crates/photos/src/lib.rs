//! The photos service of IS 1: a user's photos, answered together with the
//! user and their contract from local copies of Users and Contracts that the
//! upstreams keep current through their watch streams. One hop, and it keeps
//! answering when the upstreams are slow or down.
//!
//! # Layout
//!
//! - [`PhotosService`]: the gRPC service over a [`Feed`] of photos (its own
//!   watchable changelog, each photo in its owner's scope, so that
//!   `WatchPhotos` can follow one user), the photos in memory by owner (a
//!   [`View`] of that feed: `CACHED` reads list from it), and the
//!   `photo_owners` index (the quota count under the write lock); two
//!   [`Cache`]s (users, contracts) in the same database, fed by
//!   [`PhotosService::follow`].
//! - `reads` (private): how `ListPhotos` and `GetProfile` read the user and
//!   contract: consistency modes (`CACHED`, `FRESH`), the fallback on a
//!   cache miss, read-your-writes and `max_staleness`.
//! - `validate` (private): what a photo must look like, and the quota.
//! - Processing the image uploaded with a photo, after `CreatePhoto` has
//!   answered (fire and forget, done safely): [`decode`] (limits from the
//!   header, EXIF, thumbnail); `jobs` (the job table: outbox, claim, lease,
//!   fencing) and `job_rows` (the operators' reads); `options`
//!   ([`JobOptions`]); `worker` (the pool: wake-ups, leases, retries, dead
//!   letter); `processing` (the photo's `Processing` state through the
//!   feed, the thumbnails); [`PhotoJobsAdmin`] (the operators' RPCs, for
//!   the admin listener).

mod admin;
pub mod decode;
mod job_rows;
mod jobs;
mod options;
mod processing;
mod reads;
mod validate;
mod worker;

pub use admin::PhotoJobsAdmin;
pub use decode::{ImageLimits, Processed};
pub use jobs::Claim;
pub use options::{JobFailure, JobOptions, ProcessFn, Processor};

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lightbox_api::{
    ApiError,
    contracts::{Contract, contracts_service_client::ContractsServiceClient},
    google::api::HttpBody,
    photos::{
        CreatePhotoRequest, CreatePhotoResponse, DeletePhotoRequest, DeletePhotoResponse, GetPhotoRequest,
        GetPhotoResponse, GetPhotoThumbnailRequest, GetProfileRequest, GetProfileResponse, ListPhotoChangesRequest,
        ListPhotoChangesResponse, ListPhotosRequest, ListPhotosResponse, Photo, WatchPhotosRequest,
        WatchPhotosResponse,
        photos_service_server::{PhotosService as PhotosApi, PhotosServiceServer},
    },
    request,
    users::{User, users_service_client::UsersServiceClient},
    watch::Encoded,
};
use lightbox_cache::{Cache, CacheOptions, sources};
use lightbox_changefeed::{
    Db, Feed, FeedError, FeedOptions, Migrations, View,
    messages::{serve_list_changes, serve_watch},
    watch,
};
use lightbox_client::Balanced;
use tonic::{Request, Response, Status};

/// The name of the photos feed (in the service's database).
pub const FEED: &str = "photos";

/// The name of the local copy of users (in the service's database). Named
/// after its owner: several services may share one database.
pub const USERS_CACHE: &str = "photos.users";

/// The name of the local copy of contracts.
pub const CONTRACTS_CACHE: &str = "photos.contracts";

/// The service's own migrations (versions 3000 to 3999).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// Deadlines of the calls Photos makes to its upstreams.
#[derive(Debug, Clone)]
pub struct PhotosOptions {
    /// `FRESH` reads: the whole synchronous chain must answer within this.
    pub fresh_timeout: Duration,
    /// A cache miss falls back to the synchronous path with this deadline.
    pub miss_timeout: Duration,
    /// How long a read waits for the copy to reach `min_*_revision` or
    /// `max_staleness` before failing.
    pub wait_timeout: Duration,
    /// How the images uploaded with photos are processed.
    pub jobs: JobOptions,
}

impl Default for PhotosOptions {
    fn default() -> Self {
        PhotosOptions {
            fresh_timeout: Duration::from_secs(1),
            miss_timeout: Duration::from_millis(300),
            wait_timeout: Duration::from_secs(1),
            jobs: JobOptions::default(),
        }
    }
}

/// The photos service.
#[derive(Clone)]
pub struct PhotosService {
    feed: Feed<Photo>,
    /// The photos in memory, by owner: what `CACHED` reads list. Writes wait
    /// for it to hold what they committed before answering.
    view: View<Photo>,
    users_copy: Cache<User>,
    contracts_copy: Cache<Contract>,
    users_channel: Balanced,
    contracts_channel: Balanced,
    options: PhotosOptions,
    /// Calls made to the upstreams (for the benchmark's "upstream calls per
    /// request").
    upstream_calls: Arc<AtomicU64>,
    /// Cached reads that fell back to the synchronous path (an entity not
    /// in the copies yet).
    sync_fallbacks: Arc<AtomicU64>,
    /// The photo jobs' options and wake-up, shared with the worker pool.
    jobs: worker::Jobs,
}

impl PhotosService {
    /// Opens the service over `db` (migrating it), with its copies of users
    /// and contracts in the same database, reaching the upstreams through
    /// the channels given (connected lazily).
    pub async fn open(
        db: Db,
        feed: FeedOptions,
        cache: CacheOptions,
        users: Balanced,
        contracts: Balanced,
        options: PhotosOptions,
    ) -> Result<PhotosService, FeedError> {
        db.migrate(&[&lightbox_cache::MIGRATIONS, &MIGRATIONS]).await?;
        let photos = Feed::open(db.clone(), FEED, feed).await?;
        Ok(PhotosService {
            users_copy: Cache::open(db.clone(), USERS_CACHE, cache.clone()).await?,
            contracts_copy: Cache::open(db.clone(), CONTRACTS_CACHE, cache).await?,
            view: View::open(&photos, true).await,
            feed: photos,
            users_channel: users,
            contracts_channel: contracts,
            jobs: worker::Jobs::new(options.jobs.clone()),
            options,
            upstream_calls: Arc::default(),
            sync_fallbacks: Arc::default(),
        })
    }

    /// Feeds the two copies from the upstreams' watch streams until dropped.
    pub async fn follow(&self) {
        let users = self
            .users_copy
            .follow_upstream(sources::UsersSource::new(self.users_channel.clone()));
        let contracts = self
            .contracts_copy
            .follow_upstream(sources::ContractsSource::new(self.contracts_channel.clone()));
        tokio::join!(users, contracts);
    }

    /// The photos feed (for shutdown and tests).
    pub fn feed(&self) -> &Feed<Photo> {
        &self.feed
    }

    /// The local copy of users.
    pub fn users_copy(&self) -> &Cache<User> {
        &self.users_copy
    }

    /// The local copy of contracts.
    pub fn contracts_copy(&self) -> &Cache<Contract> {
        &self.contracts_copy
    }

    /// Calls made to the upstreams so far.
    pub fn upstream_calls(&self) -> u64 {
        self.upstream_calls.load(Ordering::Relaxed)
    }

    /// Cached reads that fell back to the synchronous path so far (the user
    /// was not in the copies yet).
    pub fn sync_fallbacks(&self) -> u64 {
        self.sync_fallbacks.load(Ordering::Relaxed)
    }

    /// The tonic server for this service, with message size limits; it
    /// accepts requests of at least the largest image and 1 MiB more, so
    /// that an upload is never refused for its transport.
    pub fn into_server(self, max_message_bytes: usize) -> PhotosServiceServer<PhotosService> {
        let uploads = self.jobs.options.limits.max_bytes.saturating_add(1024 * 1024);
        PhotosServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes.max(uploads))
            .max_encoding_message_size(max_message_bytes)
    }

    fn contracts_client(&self) -> ContractsServiceClient<Balanced> {
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        ContractsServiceClient::new(self.contracts_channel.clone())
    }

    fn users_client(&self) -> UsersServiceClient<Balanced> {
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        UsersServiceClient::new(self.users_channel.clone())
    }

    async fn create(&self, request: CreatePhotoRequest) -> Result<Photo, ApiError> {
        let (mut photo, image) = validate::new_photo(request.photo, self.jobs.options.limits.max_bytes)?;
        // The owner and their contract, from the copies (uploads keep working
        // when Users or Contracts is down); the synchronous path on a miss.
        let owner = reads::owner(self, &photo.user_id, reads::Mode::CACHED).await?;
        let mut tx = self.feed.begin().await?;
        // Under the feed's lock: the count cannot change before the commit.
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM photo_owners WHERE user_id = $1")
            .bind(photo.user_id.as_str())
            .fetch_one(tx.conn())
            .await
            .map_err(FeedError::from)?;
        validate::may_upload(&owner.user, owner.contract.as_ref(), count)?;
        sqlx::query("INSERT INTO photo_owners (photo_id, user_id) VALUES ($1, $2)")
            .bind(photo.id.as_str())
            .bind(photo.user_id.as_str())
            .execute(tx.conn())
            .await
            .map_err(FeedError::from)?;
        if let Some(image) = &image {
            // The outbox: the job commits with the photo, or neither does.
            worker::enqueue(self, &mut tx, &mut photo, image).await?;
        }
        photo.revision = tx.next_revision();
        // Scoped by owner: `WatchPhotos` may follow one user's photos.
        tx.put_scoped(&photo.id, &photo.user_id, &photo).await?;
        let revision = tx.commit().await?;
        if image.is_some() {
            // After the commit: the job is there to be claimed.
            self.jobs.wake.notify_one();
        }
        self.settle(revision).await;
        Ok(photo)
    }

    async fn get(&self, request: GetPhotoRequest) -> Result<Photo, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        let owner = request::parse_optional_id("user_id", &request.user_id)?.map(|id| id.to_string());
        // What a client saw on WatchPhotos (a job's DONE) is in it.
        let snapshot = self.view.seen(self.options.wait_timeout).await;
        let photo = snapshot.get(&id).map(|(photo, _)| photo.clone());
        owned_by(photo, owner.as_deref()).ok_or_else(|| photo_not_found(&id))
    }

    async fn delete(&self, request: DeletePhotoRequest) -> Result<i64, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        let owner = request::parse_optional_id("user_id", &request.user_id)?.map(|id| id.to_string());
        let mut tx = self.feed.begin().await?;
        // Under the feed's lock: the photo cannot change owner or go before
        // the commit. Someone else's photo is not found, and stays (the
        // transaction is dropped, rolled back, with nothing written).
        if owned_by(tx.get(&id).await?, owner.as_deref()).is_none() {
            return Err(photo_not_found(&id));
        }
        sqlx::query("DELETE FROM photo_owners WHERE photo_id = $1")
            .bind(id.as_str())
            .execute(tx.conn())
            .await
            .map_err(FeedError::from)?;
        // Its job, image and thumbnail go with it; a running attempt's
        // outcome is then refused (no job to fence on).
        jobs::forget(tx.conn(), &id).await.map_err(FeedError::from)?;
        if tx.delete(&id).await?.is_none() {
            return Err(photo_not_found(&id));
        }
        let revision = tx.commit().await?;
        self.settle(revision).await;
        Ok(revision)
    }

    /// Read-your-writes: waits until the in-memory photos hold `revision`,
    /// so the next read on this server sees the write just answered. The
    /// local tail is woken by the commit itself, so this is short; if it
    /// were not (a stalled tail), the write still stands and is answered.
    async fn settle(&self, revision: i64) {
        if !self.view.wait_for(revision, self.options.wait_timeout).await {
            tracing::warn!(
                revision,
                "the in-memory photos did not reach a committed write in time; a read right after it may miss it"
            );
        }
    }

    /// A page of `user_id`'s photos, newest first (ids are time-ordered):
    /// from memory, or with `fresh` from the database (one query on the
    /// scope index), for a reader that wants what another replica has just
    /// written too.
    async fn photos_of(
        &self,
        user_id: &str,
        size: i64,
        token: &str,
        fresh: bool,
    ) -> Result<(Vec<Photo>, String), ApiError> {
        let listing = format!("ListPhotos user_id={user_id}");
        let before = request::decode_page_token(&listing, token)?;
        let before = (!before.is_empty()).then_some(before.as_str());
        let photos = if fresh {
            self.feed.list_scope(user_id, before, size + 1, true).await?
        } else {
            let snapshot = self.view.seen(self.options.wait_timeout).await;
            let page = snapshot.scope(user_id, before, usize::try_from(size + 1).unwrap_or(usize::MAX), true);
            page.unwrap_or_default().into_iter().cloned().collect()
        };
        Ok(request::finish_page(photos, size, &listing, |p: &Photo| &p.id))
    }

    async fn list(&self, request: ListPhotosRequest) -> Result<ListPhotosResponse, ApiError> {
        let user_id = request::parse_id("user_id", &request.user_id)?.to_string();
        let size = request::page_size(request.page_size, 50, 1000)?;
        let mode = reads::Mode::of((&request).into())?;
        let fresh = matches!(mode, reads::Mode::Fresh);
        let owner = reads::owner(self, &user_id, mode).await?;
        let (photos, next_page_token) = self.photos_of(&user_id, size, &request.page_token, fresh).await?;
        Ok(ListPhotosResponse {
            photos,
            user: Some(owner.user),
            contract: owner.contract,
            next_page_token,
            user_freshness: Some(owner.user_freshness),
            contract_freshness: owner.contract_freshness,
        })
    }

    /// `GetProfile`: the user part of `ListPhotos`, read the same way.
    async fn profile(&self, request: GetProfileRequest) -> Result<GetProfileResponse, ApiError> {
        let user_id = request::parse_id("user_id", &request.user_id)?.to_string();
        let owner = reads::owner(self, &user_id, reads::Mode::of((&request).into())?).await?;
        Ok(GetProfileResponse {
            user: Some(owner.user),
            contract: owner.contract,
            user_freshness: Some(owner.user_freshness),
            contract_freshness: owner.contract_freshness,
        })
    }
}

/// `photo` if it exists and, when an `owner` is given, belongs to them.
fn owned_by(photo: Option<Photo>, owner: Option<&str>) -> Option<Photo> {
    photo.filter(|photo| owner.is_none_or(|owner| owner == photo.user_id))
}

/// The one answer for a photo that is missing or someone else's: the same
/// words, so that a caller learns nothing about other users' photos.
fn photo_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("photo {id} not found"))
}

#[tonic::async_trait]
impl PhotosApi for PhotosService {
    async fn create_photo(
        &self,
        request: Request<CreatePhotoRequest>,
    ) -> Result<Response<CreatePhotoResponse>, Status> {
        let photo = self.create(request.into_inner()).await?;
        Ok(Response::new(CreatePhotoResponse { photo: Some(photo) }))
    }

    async fn get_photo(&self, request: Request<GetPhotoRequest>) -> Result<Response<GetPhotoResponse>, Status> {
        let photo = self.get(request.into_inner()).await?;
        Ok(Response::new(GetPhotoResponse { photo: Some(photo) }))
    }

    async fn list_photos(&self, request: Request<ListPhotosRequest>) -> Result<Response<ListPhotosResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn delete_photo(
        &self,
        request: Request<DeletePhotoRequest>,
    ) -> Result<Response<DeletePhotoResponse>, Status> {
        let revision = self.delete(request.into_inner()).await?;
        Ok(Response::new(DeletePhotoResponse { revision }))
    }

    async fn get_profile(&self, request: Request<GetProfileRequest>) -> Result<Response<GetProfileResponse>, Status> {
        Ok(Response::new(self.profile(request.into_inner()).await?))
    }

    async fn get_photo_thumbnail(
        &self,
        request: Request<GetPhotoThumbnailRequest>,
    ) -> Result<Response<HttpBody>, Status> {
        let request = request.into_inner();
        let photo = self
            .get(GetPhotoRequest {
                id: request.id,
                user_id: request.user_id,
            })
            .await?;
        Ok(Response::new(processing::thumbnail(self.feed.db(), &photo).await?))
    }

    type WatchPhotosStream = watch::MappedStream<Encoded<WatchPhotosResponse>>;

    async fn watch_photos(
        &self,
        request: Request<WatchPhotosRequest>,
    ) -> Result<Response<Self::WatchPhotosStream>, Status> {
        let request = request.into_inner();
        let stream = serve_watch(
            &self.feed,
            request.since_revision,
            ("photo_ids", request.photo_ids),
            Some(("user_id", &request.user_id)),
        )?;
        Ok(Response::new(stream))
    }

    async fn list_photo_changes(
        &self,
        request: Request<ListPhotoChangesRequest>,
    ) -> Result<Response<ListPhotoChangesResponse>, Status> {
        let request = request.into_inner();
        let page = serve_list_changes(
            &self.feed,
            request.since_revision,
            request.page_size,
            &request.page_token,
        )
        .await?;
        Ok(Response::new(page))
    }
}
