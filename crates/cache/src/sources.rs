//! Watch sources: the Lightbox services over gRPC, and a feed in the same
//! process (tests, and anything that needs no network hop).

use std::{future::Future, pin::Pin, time::Duration};

use lightbox_client::Balanced;

use futures_util::StreamExt;
use lightbox_api::{
    contracts::{Contract, WatchContractsRequest, contracts_service_client::ContractsServiceClient},
    users::{User, WatchUsersRequest, users_service_client::UsersServiceClient},
};
use lightbox_changefeed::{Feed, Frame, feed::Entity, watch::WatchStream};
use tonic::Status;

use crate::Source;

type Opening<T> = Pin<Box<dyn Future<Output = Result<WatchStream<T>, Status>> + Send>>;

/// A channel to the service at `spec` (a URL, or several, comma-separated:
/// see [`lightbox_client::Target`]), balanced over its healthy replicas,
/// connected on first use, with default options.
pub fn channel(spec: &str, connect_timeout: Duration) -> Result<Balanced, String> {
    lightbox_client::channel(spec, connect_timeout).map_err(|err| err.to_string())
}

/// The users service's `WatchUsers`.
#[derive(Clone)]
pub struct UsersSource {
    client: UsersServiceClient<Balanced>,
}

impl UsersSource {
    /// Watches every user through `channel`.
    pub fn new(channel: Balanced) -> UsersSource {
        UsersSource {
            client: UsersServiceClient::new(channel),
        }
    }
}

impl Source<User> for UsersSource {
    fn watch(&self, since_revision: i64) -> Opening<User> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = WatchUsersRequest {
                since_revision,
                user_ids: Vec::new(),
            };
            let stream = client.watch_users(request).await?.into_inner();
            Ok(Box::pin(stream.map(|item| item.and_then(Frame::try_from))) as WatchStream<User>)
        })
    }
}

/// The contracts service's `WatchContracts`.
#[derive(Clone)]
pub struct ContractsSource {
    client: ContractsServiceClient<Balanced>,
}

impl ContractsSource {
    /// Watches every contract through `channel`.
    pub fn new(channel: Balanced) -> ContractsSource {
        ContractsSource {
            client: ContractsServiceClient::new(channel),
        }
    }
}

impl Source<Contract> for ContractsSource {
    fn watch(&self, since_revision: i64) -> Opening<Contract> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = WatchContractsRequest {
                since_revision,
                ..WatchContractsRequest::default()
            };
            let stream = client.watch_contracts(request).await?.into_inner();
            Ok(Box::pin(stream.map(|item| item.and_then(Frame::try_from))) as WatchStream<Contract>)
        })
    }
}

/// A feed in the same process.
impl<T: Entity> Source<T> for Feed<T> {
    fn watch(&self, since_revision: i64) -> Opening<T> {
        let stream = Feed::watch(self, since_revision, Vec::new());
        Box::pin(async move { Ok(stream) })
    }
}
