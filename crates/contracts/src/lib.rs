//! The contracts service of IS 2: contracts, their plans and options, with a
//! watchable changelog.
//!
//! # Layout
//!
//! - [`ContractsService`]: the gRPC service over a [`Feed`] of contracts (the
//!   transactional outbox, each contract in its holder's scope, so that
//!   `WatchContracts` can follow one holder and `ListContracts` can list a
//!   holder's contracts with one query on the scope index).
//! - `validate` (private): what a contract must look like.

mod validate;

use lightbox_api::{
    ApiError,
    contracts::{
        Contract, CreateContractRequest, CreateContractResponse, DeleteContractRequest, DeleteContractResponse,
        GetContractRequest, GetContractResponse, ListContractChangesRequest, ListContractChangesResponse,
        ListContractsRequest, ListContractsResponse, UpdateContractRequest, UpdateContractResponse,
        WatchContractsRequest, WatchContractsResponse,
        contracts_service_server::{ContractsService as ContractsApi, ContractsServiceServer},
    },
    request,
    watch::Encoded,
};
use lightbox_changefeed::{
    Db, Feed, FeedError, FeedOptions, Migrations, WriteTx,
    messages::{serve_list_changes, serve_watch},
    watch,
};
use tonic::{Request, Response, Status};

/// The name of the contracts feed (in the service's database).
pub const FEED: &str = "contracts";

/// The service's own migrations (versions 2000 to 2999).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &sqlx::migrate!("migrations/sqlite"),
    postgres: &sqlx::migrate!("migrations/postgres"),
};

/// The contracts service.
#[derive(Clone)]
pub struct ContractsService {
    feed: Feed<Contract>,
}

impl ContractsService {
    /// Opens the service over `db`, migrating it.
    pub async fn open(db: Db, options: FeedOptions) -> Result<ContractsService, FeedError> {
        db.migrate(&[&MIGRATIONS]).await?;
        let feed = Feed::open(db, FEED, options).await?;
        Ok(ContractsService { feed })
    }

    /// The contracts feed (for shutdown and tests).
    pub fn feed(&self) -> &Feed<Contract> {
        &self.feed
    }

    /// The tonic server for this service, with message size limits.
    pub fn into_server(self, max_message_bytes: usize) -> ContractsServiceServer<ContractsService> {
        ContractsServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    async fn create(&self, request: CreateContractRequest) -> Result<Contract, ApiError> {
        self.insert(validate::new_contract(request.contract, false)?).await
    }

    /// Creates a contract with the id it carries (demo data, imports from
    /// another system); `ALREADY_EXISTS` if the id is taken.
    pub async fn import(&self, contract: Contract) -> Result<Contract, ApiError> {
        request::parse_id("contract.id", &contract.id)?;
        self.insert(validate::new_contract(Some(contract), true)?).await
    }

    async fn insert(&self, mut contract: Contract) -> Result<Contract, ApiError> {
        let mut tx = self.feed.begin().await?;
        if tx.get(&contract.id).await?.is_some() {
            return Err(ApiError::AlreadyExists(format!(
                "contract {} already exists",
                contract.id
            )));
        }
        contract.revision = tx.next_revision();
        // Scoped by holder: `WatchContracts` may follow one holder's contracts.
        tx.put_scoped(&contract.id, &contract.holder_user_id, &contract).await?;
        tx.commit().await?;
        Ok(contract)
    }

    async fn update(&self, request: UpdateContractRequest) -> Result<Contract, ApiError> {
        let changes = request
            .contract
            .ok_or_else(|| ApiError::InvalidArgument("contract is required".into()))?;
        let id = request::parse_id("contract.id", &changes.id)?.to_string();
        let paths = request::update_paths(request.update_mask.as_ref(), validate::UPDATABLE)?;
        let mut tx = self.feed.begin().await?;
        let current = existing(&mut tx, &id).await?;
        request::check_expected_revision(&format!("contract {id}"), request.expected_revision, current.revision)?;
        let mut contract = validate::apply_update(current, changes, &paths)?;
        contract.revision = tx.next_revision();
        contract.update_time = Some(request::now());
        // A new holder moves the contract to their scope.
        tx.put_scoped(&id, &contract.holder_user_id, &contract).await?;
        tx.commit().await?;
        Ok(contract)
    }

    async fn delete(&self, request: DeleteContractRequest) -> Result<i64, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        let mut tx = self.feed.begin().await?;
        let current = existing(&mut tx, &id).await?;
        request::check_expected_revision(&format!("contract {id}"), request.expected_revision, current.revision)?;
        tx.delete(&id).await?;
        Ok(tx.commit().await?)
    }

    async fn get(&self, request: GetContractRequest) -> Result<Contract, ApiError> {
        let id = request::parse_id("id", &request.id)?.to_string();
        self.feed
            .get(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("contract {id} not found")))
    }

    async fn list(&self, request: ListContractsRequest) -> Result<ListContractsResponse, ApiError> {
        let size = request::page_size(request.page_size, 50, 1000)?;
        let holder = request::parse_optional_id("holder_user_id", &request.holder_user_id)?;
        let listing = match holder {
            Some(holder) => format!("ListContracts holder_user_id={holder}"),
            None => "ListContracts".to_owned(),
        };
        let after = request::decode_page_token(&listing, &request.page_token)?;
        let contracts = match holder {
            None => self
                .feed
                .list(&after, size + 1)
                .await?
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            // One query on the scope index: each contract is in its holder's scope.
            Some(holder) => {
                let after = (!after.is_empty()).then_some(after.as_str());
                self.feed
                    .list_scope(&holder.to_string(), after, size + 1, false)
                    .await?
            }
        };
        let (contracts, next_page_token) = request::finish_page(contracts, size, &listing, |c: &Contract| &c.id);
        Ok(ListContractsResponse {
            contracts,
            next_page_token,
        })
    }
}

/// The contract `id` as the transaction sees it, or `NOT_FOUND`.
async fn existing(tx: &mut WriteTx<Contract>, id: &str) -> Result<Contract, ApiError> {
    tx.get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("contract {id} not found")))
}

#[tonic::async_trait]
impl ContractsApi for ContractsService {
    async fn create_contract(
        &self,
        request: Request<CreateContractRequest>,
    ) -> Result<Response<CreateContractResponse>, Status> {
        let contract = self.create(request.into_inner()).await?;
        Ok(Response::new(CreateContractResponse {
            contract: Some(contract),
        }))
    }

    async fn get_contract(
        &self,
        request: Request<GetContractRequest>,
    ) -> Result<Response<GetContractResponse>, Status> {
        let contract = self.get(request.into_inner()).await?;
        Ok(Response::new(GetContractResponse {
            contract: Some(contract),
        }))
    }

    async fn list_contracts(
        &self,
        request: Request<ListContractsRequest>,
    ) -> Result<Response<ListContractsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn update_contract(
        &self,
        request: Request<UpdateContractRequest>,
    ) -> Result<Response<UpdateContractResponse>, Status> {
        let contract = self.update(request.into_inner()).await?;
        Ok(Response::new(UpdateContractResponse {
            contract: Some(contract),
        }))
    }

    async fn delete_contract(
        &self,
        request: Request<DeleteContractRequest>,
    ) -> Result<Response<DeleteContractResponse>, Status> {
        let revision = self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteContractResponse { revision }))
    }

    type WatchContractsStream = watch::MappedStream<Encoded<WatchContractsResponse>>;

    async fn watch_contracts(
        &self,
        request: Request<WatchContractsRequest>,
    ) -> Result<Response<Self::WatchContractsStream>, Status> {
        let request = request.into_inner();
        let stream = serve_watch(
            &self.feed,
            request.since_revision,
            ("contract_ids", request.contract_ids),
            Some(("holder_user_id", &request.holder_user_id)),
        )?;
        Ok(Response::new(stream))
    }

    async fn list_contract_changes(
        &self,
        request: Request<ListContractChangesRequest>,
    ) -> Result<Response<ListContractChangesResponse>, Status> {
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
