//! The users service of IS 1: users written by the back office, with a
//! watchable changelog, and the seed's synchronous hop to Contracts.
//!
//! # Layout
//!
//! - [`UsersService`]: the gRPC service over a [`Feed`] of users (the
//!   transactional outbox) and the `user_emails` index that keeps e-mail
//!   addresses unique.
//! - `validate` (private): what a user must look like.
//! - `contracts` (private): the contract of a user: the synchronous call to
//!   the contracts service, with its deadline and error mapping, and the
//!   local copy of contracts (a [`Cache`] fed by `WatchContracts`) that
//!   answers when the call fails.

mod contracts;
mod validate;

use std::time::Duration;

use lightbox_api::{
    ApiError,
    contracts::Contract,
    request,
    users::{
        ContractRead, CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
        GetUserResponse, ListUserChangesRequest, ListUserChangesResponse, ListUsersRequest, ListUsersResponse,
        UpdateUserRequest, UpdateUserResponse, User, WatchUsersRequest, WatchUsersResponse,
        users_service_server::{UsersService as UsersApi, UsersServiceServer},
    },
    watch::Encoded,
};
use lightbox_cache::{Cache, CacheOptions};
use lightbox_changefeed::{
    Db, Feed, FeedOptions, Migrations, WriteTx,
    messages::{serve_list_changes, serve_watch},
};
use sqlx::AnyConnection;
use tonic::{Request, Response, Status};

pub use contracts::ContractsUpstream;

/// The name of the users feed (in the service's database).
pub const FEED: &str = "users";

/// The name of the local copy of contracts (in the service's database).
pub const CONTRACTS_CACHE: &str = "users.contracts";

/// The service's own migrations (versions 1000 to 1999).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// The users service.
#[derive(Clone)]
pub struct UsersService {
    feed: Feed<User>,
    contracts: ContractsUpstream,
    contracts_copy: Cache<Contract>,
}

impl UsersService {
    /// Opens the service over `db` (migrating it), calling the contracts
    /// service through `contracts` for `GetUser` with `include_contract`,
    /// with a local copy of contracts in `db` (to be fed by the caller:
    /// [`Cache::follow`] on [`UsersService::contracts_copy`]).
    pub async fn open(
        db: Db,
        options: FeedOptions,
        contracts: ContractsUpstream,
        cache: CacheOptions,
    ) -> Result<UsersService, lightbox_changefeed::FeedError> {
        db.migrate(&[&lightbox_cache::MIGRATIONS, &MIGRATIONS]).await?;
        let contracts_copy = Cache::open(db.clone(), CONTRACTS_CACHE, cache).await?;
        let feed = Feed::open(db, FEED, options).await?;
        Ok(UsersService {
            feed,
            contracts,
            contracts_copy,
        })
    }

    /// The local copy of contracts.
    pub fn contracts_copy(&self) -> &Cache<Contract> {
        &self.contracts_copy
    }

    /// The users feed (for shutdown and tests).
    pub fn feed(&self) -> &Feed<User> {
        &self.feed
    }

    /// The tonic server for this service, with message size limits.
    pub fn into_server(self, max_message_bytes: usize) -> UsersServiceServer<UsersService> {
        UsersServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    async fn create(&self, request: CreateUserRequest) -> Result<User, ApiError> {
        let user = validate::new_user(request.user, false)?;
        if !user.contract_id.is_empty() {
            // The new user's id is made here: no contract can be theirs yet.
            return Err(ApiError::InvalidArgument(format!(
                "user.contract_id: a new user holds no contract yet, so contract {} cannot be theirs; create \
                 the user, then their contract with holder_user_id set to the user's id, then set contract_id \
                 with UpdateUser",
                user.contract_id
            )));
        }
        self.insert(user).await
    }

    /// Checks that `contract_id` names a contract held by `user_id`: asked of
    /// Contracts, or of this service's copy of contracts when Contracts is
    /// down or slow; refused when neither can tell.
    async fn check_contract(&self, user_id: &str, contract_id: &str) -> Result<(), ApiError> {
        let contract = match self.contracts.find(contract_id).await {
            Ok(Some(contract)) => contract,
            Ok(None) => {
                return Err(ApiError::InvalidArgument(format!(
                    "user.contract_id: contract {contract_id} does not exist; create it with holder_user_id \
                     {user_id} first"
                )));
            }
            Err(err @ (ApiError::Unavailable(_) | ApiError::DeadlineExceeded(_))) => {
                match self.contracts_copy.get(contract_id) {
                    Some((contract, _)) => contract,
                    None => {
                        return Err(ApiError::Unavailable(format!(
                            "cannot check that contract {contract_id} is held by user {user_id}: {err}, and the \
                             contract is not in this service's copy of contracts; retry later"
                        )));
                    }
                }
            }
            Err(other) => return Err(other),
        };
        if contract.holder_user_id != user_id {
            return Err(ApiError::FailedPrecondition(format!(
                "user.contract_id: contract {contract_id} is held by user {}, not by user {user_id}; \
                 move it to them first (UpdateContract holder_user_id) or use one of theirs",
                contract.holder_user_id
            )));
        }
        Ok(())
    }

    /// Creates a user with the id it carries (demo data, imports from
    /// another system); `ALREADY_EXISTS` if the id is taken.
    pub async fn import(&self, user: User) -> Result<User, ApiError> {
        request::parse_id("user.id", &user.id)?;
        self.insert(validate::new_user(Some(user), true)?).await
    }

    async fn insert(&self, mut user: User) -> Result<User, ApiError> {
        let mut tx = self.feed.begin().await?;
        if tx.get(&user.id).await?.is_some() {
            return Err(ApiError::AlreadyExists(format!("user {} already exists", user.id)));
        }
        claim_email(tx.conn(), &user.email, &user.id).await?;
        user.revision = tx.next_revision();
        tx.put(&user.id, &user).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn update(&self, request: UpdateUserRequest) -> Result<User, ApiError> {
        let changes = request
            .user
            .ok_or_else(|| ApiError::InvalidArgument("user is required".into()))?;
        let id = request::parse_id("user.id", &changes.id)?.to_string();
        let paths = request::update_paths(request.update_mask.as_ref(), validate::UPDATABLE)?;
        // Checked before the write (it may ask another service), so a
        // transaction is never held open across a network call.
        if request::touches(&paths, "contract_id")
            && let Some(contract_id) = request::parse_optional_id("user.contract_id", &changes.contract_id)?
        {
            let contract_id = contract_id.to_string();
            let unchanged = self
                .feed
                .get(&id)
                .await?
                .is_some_and(|user| user.contract_id == contract_id);
            if !unchanged {
                self.check_contract(&id, &contract_id).await?;
            }
        }
        let mut tx = self.feed.begin().await?;
        let current = existing(&mut tx, &id).await?;
        request::check_expected_revision(&format!("user {id}"), request.expected_revision, current.revision)?;
        let mut user = validate::apply_update(current.clone(), changes, &paths)?;
        if user.email != current.email {
            release_email(tx.conn(), &current.id).await?;
            claim_email(tx.conn(), &user.email, &user.id).await?;
        }
        user.revision = tx.next_revision();
        user.update_time = Some(request::now());
        tx.put(&id, &user).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn delete(&self, request: DeleteUserRequest) -> Result<i64, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        let mut tx = self.feed.begin().await?;
        let current = existing(&mut tx, &id).await?;
        request::check_expected_revision(&format!("user {id}"), request.expected_revision, current.revision)?;
        release_email(tx.conn(), &id).await?;
        tx.delete(&id).await?;
        Ok(tx.commit().await?)
    }

    async fn get(&self, request: GetUserRequest) -> Result<GetUserResponse, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        let user = self
            .feed
            .get(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))?;
        let (mut contract, mut contract_freshness) = (None, None);
        if request.include_contract && !user.contract_id.is_empty() {
            let read = ContractRead::try_from(request.contract_read).map_err(|_| {
                ApiError::InvalidArgument(format!("contract_read {} is not valid", request.contract_read))
            })?;
            let (found, freshness) =
                contracts::read(&self.contracts, &self.contracts_copy, &user.contract_id, read).await?;
            contract = Some(found);
            contract_freshness = Some(freshness);
        }
        Ok(GetUserResponse {
            user: Some(user),
            contract,
            contract_freshness,
        })
    }

    async fn list(&self, request: ListUsersRequest) -> Result<ListUsersResponse, ApiError> {
        let size = request::page_size(request.page_size, 50, 1000)?;
        let after = request::decode_page_token("ListUsers", &request.page_token)?;
        let users = self
            .feed
            .list(&after, size + 1)
            .await?
            .into_iter()
            .map(|(_, user)| user)
            .collect();
        let (users, next_page_token) = request::finish_page(users, size, "ListUsers", |user: &User| &user.id);
        Ok(ListUsersResponse { users, next_page_token })
    }
}

/// The user `id` as the transaction sees it, or `NOT_FOUND`.
async fn existing(tx: &mut WriteTx<User>, id: &str) -> Result<User, ApiError> {
    tx.get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))
}

/// Records `email` as `user_id`'s; `ALREADY_EXISTS` if another user has it.
async fn claim_email(conn: &mut AnyConnection, email: &str, user_id: &str) -> Result<(), ApiError> {
    let inserted = sqlx::query("INSERT INTO user_emails (email, user_id) VALUES ($1, $2)")
        .bind(email.to_lowercase())
        .bind(user_id)
        .execute(conn)
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(err)) if err.is_unique_violation() => Err(ApiError::AlreadyExists(format!(
            "a user with email {email:?} already exists"
        ))),
        // Through the feed's mapping: a lost connection is UNAVAILABLE, not INTERNAL.
        Err(err) => Err(lightbox_changefeed::FeedError::from(err).into()),
    }
}

async fn release_email(conn: &mut AnyConnection, user_id: &str) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM user_emails WHERE user_id = $1")
        .bind(user_id)
        .execute(conn)
        .await
        .map_err(lightbox_changefeed::FeedError::from)?;
    Ok(())
}

#[tonic::async_trait]
impl UsersApi for UsersService {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<CreateUserResponse>, Status> {
        let user = self.create(request.into_inner()).await?;
        Ok(Response::new(CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<UpdateUserResponse>, Status> {
        let user = self.update(request.into_inner()).await?;
        Ok(Response::new(UpdateUserResponse { user: Some(user) }))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let revision = self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteUserResponse { revision }))
    }

    type WatchUsersStream = lightbox_changefeed::watch::MappedStream<Encoded<WatchUsersResponse>>;

    async fn watch_users(
        &self,
        request: Request<WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        let request = request.into_inner();
        let stream = serve_watch(&self.feed, request.since_revision, ("user_ids", request.user_ids), None)?;
        Ok(Response::new(stream))
    }

    async fn list_user_changes(
        &self,
        request: Request<ListUserChangesRequest>,
    ) -> Result<Response<ListUserChangesResponse>, Status> {
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

/// How long `GetUser` waits for the contracts service by default.
pub const DEFAULT_CONTRACT_TIMEOUT: Duration = Duration::from_millis(1000);
