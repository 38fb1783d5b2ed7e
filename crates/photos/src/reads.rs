//! Where `ListPhotos`, `GetProfile` (and `CreatePhoto`) get the user and the
//! contract:
//! `CACHED` from the local copies, never calling upstream except for an
//! entity not in the copy yet; `FRESH` through the seed's synchronous chain,
//! Photos → Users → Contracts, with a deadline. Every answer says where each
//! part came from and how fresh it is.

use std::time::Duration;

use lightbox_api::{
    ApiError, call_upstream,
    contracts::Contract,
    contracts::ListContractChangesRequest,
    feed::Freshness,
    photos::{Consistency, GetProfileRequest, ListPhotosRequest},
    users::{ContractRead, GetUserRequest, ListUserChangesRequest, User},
};
use lightbox_cache::{Cache, upstream_freshness};
use lightbox_changefeed::feed::Entity;

use crate::PhotosService;

/// How a read may be served.
pub(crate) enum Mode {
    /// From the copies, once they satisfy the read's requirements.
    Cached {
        min_users_revision: i64,
        min_contracts_revision: i64,
        max_staleness: Option<Duration>,
    },
    /// Through the synchronous chain.
    Fresh,
}

impl Mode {
    /// From the copies, with no requirement (uploads).
    pub(crate) const CACHED: Mode = Mode::Cached {
        min_users_revision: 0,
        min_contracts_revision: 0,
        max_staleness: None,
    };

    /// The mode a read (`ListPhotos`, `GetProfile`) asks for, checked.
    pub(crate) fn of(request: ReadArgs<'_>) -> Result<Mode, ApiError> {
        for (field, value) in [
            ("min_users_revision", request.min_users_revision),
            ("min_contracts_revision", request.min_contracts_revision),
        ] {
            if value < 0 {
                return Err(ApiError::InvalidArgument(format!(
                    "{field} must not be negative (got {value})"
                )));
            }
        }
        let max_staleness = match request.max_staleness {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 => {
                return Err(ApiError::InvalidArgument(
                    "max_staleness must be a non-negative duration".into(),
                ));
            }
            Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
        };
        match Consistency::try_from(request.consistency) {
            Ok(Consistency::Unspecified | Consistency::Cached) => Ok(Mode::Cached {
                min_users_revision: request.min_users_revision,
                min_contracts_revision: request.min_contracts_revision,
                max_staleness,
            }),
            Ok(Consistency::Fresh) => Ok(Mode::Fresh),
            Err(_) => Err(ApiError::InvalidArgument(format!(
                "consistency {} is not valid (CONSISTENCY_CACHED or CONSISTENCY_FRESH)",
                request.consistency
            ))),
        }
    }
}

/// How a read asks for the user and contract to be served: the fields that
/// `ListPhotos` and `GetProfile` share, so that both take one code path.
pub(crate) struct ReadArgs<'a> {
    consistency: i32,
    min_users_revision: i64,
    min_contracts_revision: i64,
    max_staleness: Option<&'a pbjson_types::Duration>,
}

impl<'a> From<&'a ListPhotosRequest> for ReadArgs<'a> {
    fn from(request: &'a ListPhotosRequest) -> Self {
        ReadArgs {
            consistency: request.consistency,
            min_users_revision: request.min_users_revision,
            min_contracts_revision: request.min_contracts_revision,
            max_staleness: request.max_staleness.as_ref(),
        }
    }
}

impl<'a> From<&'a GetProfileRequest> for ReadArgs<'a> {
    fn from(request: &'a GetProfileRequest) -> Self {
        ReadArgs {
            consistency: request.consistency,
            min_users_revision: request.min_users_revision,
            min_contracts_revision: request.min_contracts_revision,
            max_staleness: request.max_staleness.as_ref(),
        }
    }
}

/// A user and their contract, with where each came from.
pub(crate) struct Owner {
    pub(crate) user: User,
    pub(crate) contract: Option<Contract>,
    pub(crate) user_freshness: Freshness,
    pub(crate) contract_freshness: Option<Freshness>,
}

/// The user `user_id` and their contract, as `mode` allows.
pub(crate) async fn owner(photos: &PhotosService, user_id: &str, mode: Mode) -> Result<Owner, ApiError> {
    let options = &photos.options;
    let Mode::Cached {
        min_users_revision,
        min_contracts_revision,
        max_staleness,
    } = mode
    else {
        return synchronous(photos, user_id, options.fresh_timeout, ContractRead::Upstream).await;
    };
    ready(
        photos,
        Part::Users,
        &photos.users_copy,
        min_users_revision,
        max_staleness,
        options.wait_timeout,
    )
    .await?;
    ready(
        photos,
        Part::Contracts,
        &photos.contracts_copy,
        min_contracts_revision,
        max_staleness,
        options.wait_timeout,
    )
    .await?;
    // Each part from one snapshot of its copy: the user at one revision of
    // the users copy, the contract at one revision of the contracts copy.
    let users = photos.users_copy.snapshot();
    let Some((user, user_revision)) = users.get(user_id) else {
        return miss(photos, user_id).await;
    };
    let user = user.clone();
    let user_freshness = photos.users_copy.freshness_of(&users, user_revision);
    if user.contract_id.is_empty() {
        return Ok(Owner {
            user,
            contract: None,
            user_freshness,
            contract_freshness: None,
        });
    }
    let contracts = photos.contracts_copy.snapshot();
    match contracts.get(&user.contract_id) {
        Some((contract, contract_revision)) => Ok(Owner {
            contract: Some(contract.clone()),
            contract_freshness: Some(photos.contracts_copy.freshness_of(&contracts, contract_revision)),
            user,
            user_freshness,
        }),
        None => {
            // The contract has not arrived yet: ask for it (through Users).
            let fetched = miss(photos, user_id).await?;
            Ok(Owner {
                user,
                user_freshness,
                ..fetched
            })
        }
    }
}

/// A cache miss (an entity just created, not arrived yet): the synchronous
/// path with a short deadline, then a clear `UNAVAILABLE`.
async fn miss(photos: &PhotosService, user_id: &str) -> Result<Owner, ApiError> {
    photos.sync_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let timeout = photos.options.miss_timeout;
    synchronous(photos, user_id, timeout, ContractRead::UpstreamOrCache)
        .await
        .map_err(|err| match err {
            ApiError::NotFound(_) => ApiError::NotFound(format!("user {user_id} not found")),
            // Answers about the request itself are not outages: pass them on.
            err @ (ApiError::InvalidArgument(_) | ApiError::FailedPrecondition(_) | ApiError::PermissionDenied(_)) => {
                err
            }
            other => ApiError::Unavailable(format!(
                "user {user_id} is not in the local copy yet, and the users service did not help: {other}"
            )),
        })
}

/// The seed's chain: Photos asks Users, which asks Contracts (as `read` says).
async fn synchronous(
    photos: &PhotosService,
    user_id: &str,
    timeout: Duration,
    read: ContractRead,
) -> Result<Owner, ApiError> {
    let mut request = tonic::Request::new(GetUserRequest {
        id: user_id.to_owned(),
        include_contract: true,
        contract_read: read as i32,
    });
    request.set_timeout(timeout);
    let mut client = photos.users_client();
    let answer = call_upstream("users", timeout, client.get_user(request)).await?;
    let user = answer
        .user
        .ok_or_else(|| ApiError::Unavailable("the users service answered without a user".into()))?;
    Ok(Owner {
        user_freshness: upstream_freshness(user.revision),
        user,
        contract: answer.contract,
        contract_freshness: answer.contract_freshness,
    })
}

/// Which copy a read waits for.
#[derive(Clone, Copy)]
enum Part {
    Users,
    Contracts,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Users => "users",
            Part::Contracts => "contracts",
        }
    }
}

/// Waits briefly for a copy to satisfy a read (read-your-writes, staleness),
/// or fails fast saying what it waited for.
async fn ready<T: Entity>(
    photos: &PhotosService,
    part: Part,
    copy: &Cache<T>,
    min_revision: i64,
    max_staleness: Option<Duration>,
    wait: Duration,
) -> Result<(), ApiError> {
    let name = part.name();
    if min_revision > 0 && !copy.wait_for(min_revision, wait).await {
        let state = copy.state();
        return Err(ApiError::Unavailable(format!(
            "the local copy of {name} is at revision {}, not yet at the requested {min_revision} (waited {} ms; \
             stream {}); retry, or read with consistency FRESH",
            state.applied_revision,
            wait.as_millis(),
            if state.connected { "connected" } else { "disconnected" },
        )));
    }
    let Some(max) = max_staleness else {
        return Ok(());
    };
    if copy.is_fresh(max) {
        return Ok(());
    }
    // Older than asked, yet maybe current: a quiet stream only hears from
    // its upstream once per progress interval. Ask the upstream for its head
    // and, once the copy has it, the copy is current as of now.
    let deadline = tokio::time::Instant::now() + wait;
    if copy.state().connected {
        match confirm(photos, part, copy, deadline).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => tracing::debug!(copy = name, %err, "cannot confirm the copy is current"),
        }
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if copy.wait_fresh(max, left).await {
        return Ok(());
    }
    let state = copy.state();
    Err(ApiError::Unavailable(format!(
        "the local copy of {name} is {} ms old, more than max_staleness {} ms, and its upstream could not \
         confirm it is current within {} ms (stream {}); retry, or read with consistency FRESH",
        state.age().as_millis(),
        max.as_millis(),
        wait.as_millis(),
        if state.connected { "connected" } else { "disconnected" },
    )))
}

/// Asks the upstream for its latest revision (the changes after the copy's
/// cursor, one at most: nothing, when the copy is current) and waits, until
/// `deadline`, for the copy to reach it. Whether the copy is then confirmed
/// current.
async fn confirm<T: Entity>(
    photos: &PhotosService,
    part: Part,
    copy: &Cache<T>,
    deadline: tokio::time::Instant,
) -> Result<bool, ApiError> {
    loop {
        let cursor = copy.state().applied_revision;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if cursor <= 0 || left.is_zero() {
            // From 0, a listing is of the state, not the head.
            return Ok(false);
        }
        let (changes, next, reset) = match part {
            Part::Users => {
                let request = ListUserChangesRequest {
                    since_revision: cursor,
                    page_size: 1,
                    page_token: String::new(),
                };
                let mut client = photos.users_client();
                let page = call_upstream("users", left, client.list_user_changes(request)).await?;
                let last = page.changes.last().map(|c| c.revision);
                (last, page.next_since_revision, page.reset.is_some())
            }
            Part::Contracts => {
                let request = ListContractChangesRequest {
                    since_revision: cursor,
                    page_size: 1,
                    page_token: String::new(),
                };
                let mut client = photos.contracts_client();
                let page = call_upstream("contracts", left, client.list_contract_changes(request)).await?;
                let last = page.changes.last().map(|c| c.revision);
                (last, page.next_since_revision, page.reset.is_some())
            }
        };
        if reset {
            return Ok(false);
        }
        match changes {
            // Nothing after the cursor: the upstream's head is where the copy is.
            None => return Ok(copy.confirm_current(next.max(cursor))),
            // Behind by at least that change: let the stream bring it, then ask again.
            Some(revision) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if !copy.wait_for(revision, left).await {
                    return Ok(false);
                }
            }
        }
    }
}
