//! Watch sources: the Lightbox services over gRPC, and a feed in the same
//! process (tests, and anything that needs no network hop).

use std::{future::Future, pin::Pin, time::Duration};

use futures_util::StreamExt;
use lightbox_api::{
    contracts::{Contract, WatchContractsRequest, contracts_service_client::ContractsServiceClient},
    users::{User, WatchUsersRequest, users_service_client::UsersServiceClient},
};
use lightbox_changefeed::{Feed, Frame, feed::Entity, watch::WatchStream};
use tonic::{Status, transport::Channel};

use crate::Source;

type Opening<T> = Pin<Box<dyn Future<Output = Result<WatchStream<T>, Status>> + Send>>;

/// A channel to `url`, connected on first use and reconnected by itself.
pub fn channel(url: &str, connect_timeout: Duration) -> Result<Channel, String> {
    Ok(Channel::from_shared(url.to_owned())
        .map_err(|err| format!("invalid address {url:?}: {err}"))?
        .connect_timeout(connect_timeout)
        .connect_lazy())
}

/// The users service's `WatchUsers`.
#[derive(Clone)]
pub struct UsersSource {
    client: UsersServiceClient<Channel>,
}

impl UsersSource {
    /// Watches every user through `channel`.
    pub fn new(channel: Channel) -> UsersSource {
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
    client: ContractsServiceClient<Channel>,
}

impl ContractsSource {
    /// Watches every contract through `channel`.
    pub fn new(channel: Channel) -> ContractsSource {
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
