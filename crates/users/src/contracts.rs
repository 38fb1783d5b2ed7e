//! The seed's synchronous hop: Users asks Contracts for a user's contract,
//! with a deadline, and says plainly when Contracts is down or slow.

use std::time::Duration;

use lightbox_api::{
    ApiError,
    contracts::{Contract, GetContractRequest, contracts_service_client::ContractsServiceClient},
};
use tonic::{Code, transport::Channel};

/// A client of the contracts service with the deadline `GetUser` gives it.
#[derive(Clone)]
pub struct ContractsUpstream {
    client: ContractsServiceClient<Channel>,
    timeout: Duration,
}

impl ContractsUpstream {
    /// A client of the contracts service at `url` (connected on first use,
    /// and reconnected by the channel after failures).
    pub fn new(url: &str, timeout: Duration) -> Result<ContractsUpstream, String> {
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|err| format!("invalid contracts service address {url:?}: {err}"))?
            .connect_timeout(timeout)
            .connect_lazy();
        Ok(ContractsUpstream {
            client: ContractsServiceClient::new(channel),
            timeout,
        })
    }

    /// Gets a contract, within the deadline.
    pub(crate) async fn get(&self, id: &str) -> Result<Contract, ApiError> {
        let mut request = tonic::Request::new(GetContractRequest { id: id.to_owned() });
        // Sent as grpc-timeout, so Contracts can give up too.
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        let answer = match tokio::time::timeout(self.timeout, client.get_contract(request)).await {
            Ok(answer) => answer,
            Err(_) => return Err(too_slow(self.timeout)),
        };
        match answer {
            Ok(response) => response
                .into_inner()
                .contract
                .ok_or_else(|| ApiError::Unavailable("the contracts service answered without a contract".into())),
            Err(status) => Err(match status.code() {
                Code::NotFound => ApiError::FailedPrecondition(format!(
                    "the user's contract {id} does not exist in the contracts service"
                )),
                Code::DeadlineExceeded | Code::Cancelled => too_slow(self.timeout),
                _ => ApiError::Unavailable(format!("the contracts service is unavailable: {}", status.message())),
            }),
        }
    }
}

fn too_slow(timeout: Duration) -> ApiError {
    ApiError::DeadlineExceeded(format!(
        "the contracts service did not answer within {} ms",
        timeout.as_millis()
    ))
}
