//! A user's contract: the seed's synchronous hop (Users asks Contracts, with
//! a deadline, and says plainly when Contracts is down or slow), and the
//! local copy that answers instead when asked to, or when the hop fails.

use std::time::Duration;

use lightbox_api::{
    ApiError, call_upstream,
    contracts::{Contract, GetContractRequest, contracts_service_client::ContractsServiceClient},
    feed::Freshness,
    users::ContractRead,
};
use lightbox_cache::{Cache, upstream_freshness};
use lightbox_client::Balanced;

/// A client of the contracts service with the deadline `GetUser` gives it.
#[derive(Clone)]
pub struct ContractsUpstream {
    client: ContractsServiceClient<Balanced>,
    channel: Balanced,
    timeout: Duration,
}

impl ContractsUpstream {
    /// A client of the contracts service over `channel` (balanced over its
    /// replicas, connected on first use), giving each call `timeout`.
    pub fn new(channel: Balanced, timeout: Duration) -> ContractsUpstream {
        ContractsUpstream {
            client: ContractsServiceClient::new(channel.clone()),
            channel,
            timeout,
        }
    }

    /// The channel to the contracts service (shared with the watch that
    /// feeds the local copy).
    pub fn channel(&self) -> Balanced {
        // A generated client has no channel accessor; a clone shares it.
        self.channel.clone()
    }

    /// Gets a contract the user points at, within the deadline.
    pub(crate) async fn get(&self, id: &str) -> Result<Contract, ApiError> {
        self.find(id).await?.ok_or_else(|| {
            // The user points at a contract Contracts does not know.
            ApiError::FailedPrecondition(format!(
                "the user's contract {id} does not exist in the contracts service"
            ))
        })
    }

    /// Looks a contract up, within the deadline: `None` if Contracts says
    /// it does not exist.
    pub(crate) async fn find(&self, id: &str) -> Result<Option<Contract>, ApiError> {
        let mut request = tonic::Request::new(GetContractRequest { id: id.to_owned() });
        // Sent as grpc-timeout, so Contracts can give up too.
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        match call_upstream("contracts", self.timeout, client.get_contract(request)).await {
            Ok(answer) => answer
                .contract
                .map(Some)
                .ok_or_else(|| ApiError::Unavailable("the contracts service answered without a contract".into())),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Reads contract `id` as `read` says, with where it came from.
pub(crate) async fn read(
    upstream: &ContractsUpstream,
    copy: &Cache<Contract>,
    id: &str,
    read: ContractRead,
) -> Result<(Contract, Freshness), ApiError> {
    let from_copy = || -> Option<(Contract, Freshness)> {
        let snapshot = copy.snapshot();
        let (contract, revision) = snapshot.get(id)?;
        Some((contract.clone(), copy.freshness_of(&snapshot, revision)))
    };
    match read {
        ContractRead::Cache => from_copy()
            .ok_or_else(|| ApiError::Unavailable(format!("contract {id} is not in the local copy of contracts"))),
        ContractRead::Upstream => {
            let contract = upstream.get(id).await?;
            let revision = contract.revision;
            Ok((contract, upstream_freshness(revision)))
        }
        ContractRead::Unspecified | ContractRead::UpstreamOrCache => match upstream.get(id).await {
            Ok(contract) => {
                let revision = contract.revision;
                Ok((contract, upstream_freshness(revision)))
            }
            Err(err @ (ApiError::Unavailable(_) | ApiError::DeadlineExceeded(_))) => match from_copy() {
                Some(found) => {
                    tracing::debug!(contract = id, %err, "contracts unreachable; answering from the local copy");
                    Ok(found)
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        },
    }
}
