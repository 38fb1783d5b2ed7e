//! Watch and pull sources: the Lightbox services over gRPC, and a feed in
//! the same process (tests, and anything that needs no network hop). Each
//! is both a [`Source`] (its watch) and a [`PullSource`] (its change
//! listing), so one value follows either way
//! ([`crate::Cache::follow_upstream`]).

use std::{future::Future, pin::Pin, time::Duration};

use lightbox_client::Balanced;

use futures_util::StreamExt;
use lightbox_api::{
    contracts::{
        Contract, ListContractChangesRequest, WatchContractsRequest, contracts_service_client::ContractsServiceClient,
    },
    feed::Reset,
    users::{ListUserChangesRequest, User, WatchUsersRequest, users_service_client::UsersServiceClient},
    watch::ChangeMessage,
};
use lightbox_changefeed::{ChangePage, Feed, feed::Entity, messages, watch::WatchStream};
use tonic::Status;

use crate::{PullSource, Source, pull::Listing};

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
            Ok(Box::pin(stream.map(|item| item.and_then(messages::frame))) as WatchStream<User>)
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
            Ok(Box::pin(stream.map(|item| item.and_then(messages::frame))) as WatchStream<Contract>)
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

impl PullSource<User> for UsersSource {
    fn list_changes(&self, since_revision: i64, page_size: i32, page_token: String) -> Listing<User> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ListUserChangesRequest {
                since_revision,
                page_size,
                page_token,
            };
            let page = client.list_user_changes(request).await?.into_inner();
            page_of(page.changes, page.next_since_revision, page.next_page_token, page.reset)
        })
    }
}

impl PullSource<Contract> for ContractsSource {
    fn list_changes(&self, since_revision: i64, page_size: i32, page_token: String) -> Listing<Contract> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ListContractChangesRequest {
                since_revision,
                page_size,
                page_token,
            };
            let page = client.list_contract_changes(request).await?.into_inner();
            page_of(page.changes, page.next_since_revision, page.next_page_token, page.reset)
        })
    }
}

/// A feed's pull listing in the same process.
impl<T: Entity> PullSource<T> for Feed<T> {
    fn list_changes(&self, since_revision: i64, page_size: i32, page_token: String) -> Listing<T> {
        let feed = self.clone();
        Box::pin(async move {
            feed.list_changes(since_revision, i64::from(page_size.max(1)), &page_token)
                .await
                .map_err(|err| Status::from(lightbox_api::ApiError::from(err)))
        })
    }
}

/// A listing's answer as a [`ChangePage`]: each change read as a watch's
/// change is, with the same checks.
fn page_of<C: ChangeMessage>(
    changes: Vec<C>,
    next_since_revision: i64,
    next_page_token: String,
    reset: Option<Reset>,
) -> Result<ChangePage<C::Entity>, Status> {
    let changes = changes
        .into_iter()
        .map(messages::change)
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(ChangePage {
        changes,
        next_since_revision,
        next_page_token,
        reset: reset.map(|reset| reset.reason),
    })
}
