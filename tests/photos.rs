//! Photos on SQLite and PostgreSQL: it keeps answering, one hop, from its
//! persisted copies when Users and Contracts are slow, down or stopped, and
//! after its own restart; the copies converge to the upstreams exactly;
//! reads can demand their own writes; the quota holds with Contracts down.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lightbox_api::{
    contracts::{Contract, ContractStatus, ListContractsRequest, UpdateContractRequest},
    feed::{Freshness, Source},
    photos::{Consistency, CreatePhotoRequest, ListPhotosRequest, ListPhotosResponse, Photo},
    users::{ListUsersRequest, UpdateUserRequest, User},
};
use lightbox_app::Target;
use lightbox_cache::{Cache, CacheOptions};
use lightbox_changefeed::FeedOptions;
use lightbox_server::FaultSpec;
use lightbox_testkit::{Stack, TestDb, conformance, customer, eventually, photo_quota};
use tonic::Code;

conformance!(
    cached_reads_survive_upstreams_down_stopped_and_a_photos_restart,
    the_copies_equal_the_upstreams_after_restarts_and_drops,
    reads_wait_for_their_own_writes_or_fail_fast,
    the_quota_holds_from_the_cached_contract,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

fn list(user: &User) -> ListPhotosRequest {
    ListPhotosRequest {
        user_id: user.id.clone(),
        ..ListPhotosRequest::default()
    }
}

async fn list_photos(stack: &Stack, request: ListPhotosRequest) -> Result<ListPhotosResponse, tonic::Status> {
    stack
        .photos_client()
        .await
        .list_photos(request)
        .await
        .map(|r| r.into_inner())
}

/// Waits until Photos answers from its copies at these revisions at least.
async fn photos_caught_up(stack: &Stack, user: &User, users_revision: i64, contracts_revision: i64) {
    eventually("Photos' copies to catch up", || async {
        let request = ListPhotosRequest {
            min_users_revision: users_revision,
            min_contracts_revision: contracts_revision,
            ..list(user)
        };
        list_photos(stack, request).await.ok()
    })
    .await;
}

async fn upload(stack: &Stack, user: &User, title: &str) -> Result<Photo, tonic::Status> {
    let photo = Photo {
        user_id: user.id.clone(),
        title: title.into(),
        content_type: "image/jpeg".into(),
        size_bytes: 1000,
        ..Photo::default()
    };
    stack
        .photos_client()
        .await
        .create_photo(CreatePhotoRequest { photo: Some(photo) })
        .await
        .map(|r| r.into_inner().photo.unwrap_or_default())
}

fn source(freshness: &Option<Freshness>) -> i32 {
    freshness.as_ref().map_or(0, |f| f.source)
}

fn connected(freshness: &Option<Freshness>) -> Option<bool> {
    freshness
        .as_ref()
        .and_then(|f| f.stream_state.as_ref())
        .map(|s| s.connected)
}

/// 20 cached reads in a row, all answered from the copies, with the streams
/// reported disconnected.
async fn cached_reads_answer_while_disconnected(stack: &Stack, user: &User, photos: usize) {
    eventually("Photos to notice its upstreams are gone", || async {
        let answer = list_photos(stack, list(user)).await.ok()?;
        (connected(&answer.user_freshness) == Some(false) && connected(&answer.contract_freshness) == Some(false))
            .then_some(())
    })
    .await;
    for _ in 0..20 {
        let answer = list_photos(stack, list(user))
            .await
            .unwrap_or_else(|status| panic!("cached read: {status:?}"));
        assert_eq!(answer.photos.len(), photos);
        assert_eq!(answer.user.as_ref().map(|u| u.id.as_str()), Some(user.id.as_str()));
        assert!(answer.contract.is_some());
        assert_eq!(source(&answer.user_freshness), Source::Cache as i32);
        assert_eq!(source(&answer.contract_freshness), Source::Cache as i32);
        let state = answer.user_freshness.and_then(|f| f.stream_state).unwrap_or_default();
        assert!(
            !state.connected && state.since_time.is_some(),
            "disconnected, and since when: {state:?}"
        );
    }
}

async fn fresh_fails_fast(stack: &Stack, user: &User) {
    let started = Instant::now();
    let fresh = list_photos(
        stack,
        ListPhotosRequest {
            consistency: Consistency::Fresh as i32,
            ..list(user)
        },
    )
    .await;
    assert!(matches!(&fresh, Err(s) if s.code() == Code::Unavailable), "{fresh:?}");
    assert!(started.elapsed() < stack.settings.photos.fresh_timeout + Duration::from_millis(500));
}

async fn cached_reads_survive_upstreams_down_stopped_and_a_photos_restart(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "ada@example.com", "10").await;
    photos_caught_up(&stack, &user, user.revision, contract.revision).await;
    upload(&stack, &user, "one").await.unwrap_or_else(|s| panic!("{s:?}"));
    upload(&stack, &user, "two").await.unwrap_or_else(|s| panic!("{s:?}"));
    let fresh = list_photos(
        &stack,
        ListPhotosRequest {
            consistency: Consistency::Fresh as i32,
            ..list(&user)
        },
    )
    .await
    .unwrap_or_else(|s| panic!("fresh read: {s:?}"));
    assert_eq!(source(&fresh.user_freshness), Source::Upstream as i32);
    assert_eq!(source(&fresh.contract_freshness), Source::Upstream as i32);

    // Down by fault injection.
    let down = FaultSpec {
        down: true,
        ..FaultSpec::default()
    };
    for target in [Target::Users, Target::Contracts] {
        stack.faults(target).set(down).unwrap_or_else(|e| panic!("{e}"));
    }
    cached_reads_answer_while_disconnected(&stack, &user, 2).await;
    fresh_fails_fast(&stack, &user).await;

    // Really stopped.
    for target in [Target::Users, Target::Contracts] {
        stack.faults(target).clear();
        stack.stop_component(target).await;
    }
    cached_reads_answer_while_disconnected(&stack, &user, 2).await;
    fresh_fails_fast(&stack, &user).await;
    assert!(
        upload(&stack, &user, "three").await.is_ok(),
        "uploads work from the cached contract"
    );

    // Photos restarted while both upstreams are down: its copies are on disk.
    stack.stop_component(Target::Photos).await;
    stack.start_component(Target::Photos).await;
    cached_reads_answer_while_disconnected(&stack, &user, 3).await;

    // The upstreams come back: Photos reconnects by itself.
    stack.start_component(Target::Contracts).await;
    stack.start_component(Target::Users).await;
    let renamed = stack
        .users_client()
        .await
        .update_user(UpdateUserRequest {
            user: Some(User {
                display_name: "Back".into(),
                ..user.clone()
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
        .unwrap_or_else(|s| panic!("{s:?}"));
    photos_caught_up(&stack, &user, renamed.revision, 0).await;
    let answer = list_photos(&stack, list(&user))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(answer.user.map(|u| u.display_name), Some("Back".into()));
    assert_eq!(connected(&answer.user_freshness), Some(true));
    stack.stop().await;
}

/// What a copy in Photos' database holds: id -> (revision, entity).
async fn copy_of<T: lightbox_changefeed::feed::Entity>(
    stack: &Stack,
    name: &'static str,
) -> BTreeMap<String, (i64, T)> {
    let db = stack.db(Target::Photos).connect().await;
    let cache: Cache<T> = Cache::open(db, name, CacheOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let all = cache.all().await.unwrap_or_else(|err| panic!("{err}"));
    all.into_iter()
        .map(|(id, (entity, revision))| (id, (revision, entity)))
        .collect()
}

async fn upstream_users(stack: &Stack) -> BTreeMap<String, (i64, User)> {
    let listed = stack
        .users_client()
        .await
        .list_users(ListUsersRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .map(|r| r.into_inner().users)
        .unwrap_or_else(|s| panic!("{s:?}"));
    listed.into_iter().map(|u| (u.id.clone(), (u.revision, u))).collect()
}

async fn upstream_contracts(stack: &Stack) -> BTreeMap<String, (i64, Contract)> {
    let listed = stack
        .contracts_client()
        .await
        .list_contracts(ListContractsRequest {
            page_size: 1000,
            ..ListContractsRequest::default()
        })
        .await
        .map(|r| r.into_inner().contracts)
        .unwrap_or_else(|s| panic!("{s:?}"));
    listed.into_iter().map(|c| (c.id.clone(), (c.revision, c))).collect()
}

async fn the_copies_equal_the_upstreams_after_restarts_and_drops(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let mut customers = Vec::new();
    for round in 0..4 {
        // Changes while Photos is down, then while each upstream restarts.
        stack.stop_component(Target::Photos).await;
        customers.push(customer(&stack, &format!("c{round}@example.com"), "5").await);
        stack.start_component(Target::Photos).await;
        let restarted = if round % 2 == 0 {
            Target::Users
        } else {
            Target::Contracts
        };
        stack.stop_component(restarted).await;
        stack.start_component(restarted).await;
        let contract = &customers[round / 2].1;
        let mut contracts = stack.contracts_client().await;
        let updated = contracts
            .update_contract(UpdateContractRequest {
                contract: Some(Contract {
                    options: vec![photo_quota(&format!("{}", 10 + round))],
                    ..contract.clone()
                }),
                update_mask: None,
                expected_revision: 0,
            })
            .await
            .map(|r| r.into_inner().contract.unwrap_or_default())
            .unwrap_or_else(|s| panic!("{s:?}"));
        // A dropped stream, without a restart, once Photos has caught up (so
        // that it can answer while the stream is down): down until it notices.
        let first = &customers[0].0;
        let newest = &customers[round].0;
        photos_caught_up(&stack, first, newest.revision, updated.revision).await;
        stack
            .faults(Target::Users)
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        eventually("Photos to see the users stream drop", || async {
            let answer = list_photos(&stack, list(first)).await.ok()?;
            (connected(&answer.user_freshness) == Some(false)).then_some(())
        })
        .await;
        stack.faults(Target::Users).clear();
    }
    let users = upstream_users(&stack).await;
    let contracts = upstream_contracts(&stack).await;
    eventually("Photos' copies to equal the upstreams", || async {
        let same = copy_of::<User>(&stack, lightbox_photos::USERS_CACHE).await == users
            && copy_of::<Contract>(&stack, lightbox_photos::CONTRACTS_CACHE).await == contracts;
        same.then_some(())
    })
    .await;
    assert_eq!(users.len(), 4);
    stack.stop().await;
}

async fn reads_wait_for_their_own_writes_or_fail_fast(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "grace@example.com", "10").await;
    let mut users = stack.users_client().await;
    // Write, then read at once demanding the write: never older.
    for i in 0..5 {
        let written = users
            .update_user(UpdateUserRequest {
                user: Some(User {
                    display_name: format!("Grace {i}"),
                    ..user.clone()
                }),
                update_mask: None,
                expected_revision: 0,
            })
            .await
            .map(|r| r.into_inner().user.unwrap_or_default())
            .unwrap_or_else(|s| panic!("{s:?}"));
        let answer = list_photos(
            &stack,
            ListPhotosRequest {
                min_users_revision: written.revision,
                min_contracts_revision: contract.revision,
                ..list(&user)
            },
        )
        .await
        .unwrap_or_else(|s| panic!("read-your-writes: {s:?}"));
        assert_eq!(answer.user.map(|u| u.display_name), Some(format!("Grace {i}")));
        assert!(answer.user_freshness.is_some_and(|f| f.revision >= written.revision));
    }
    // A revision the upstream has not reached: a fast, clear failure.
    let started = Instant::now();
    let future = list_photos(
        &stack,
        ListPhotosRequest {
            min_users_revision: 10_000,
            ..list(&user)
        },
    )
    .await;
    assert!(
        matches!(&future, Err(s) if s.code() == Code::Unavailable && s.message().contains("not yet at the requested 10000")),
        "{future:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Staleness: fine while connected; refused once the copy is older.
    let staleness = |ms: u64| ListPhotosRequest {
        max_staleness: Some(pbjson_types::Duration::from(Duration::from_millis(ms))),
        ..list(&user)
    };
    assert!(list_photos(&stack, staleness(2_000)).await.is_ok());
    stack
        .faults(Target::Users)
        .set(FaultSpec {
            down: true,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = eventually("a stale copy to be refused", || async {
        list_photos(&stack, staleness(300)).await.err()
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("more than max_staleness"),
        "{}",
        refused.message()
    );
    // A bad argument is not a wait.
    let bad = list_photos(
        &stack,
        ListPhotosRequest {
            min_users_revision: -1,
            ..list(&user)
        },
    )
    .await;
    assert!(matches!(bad, Err(s) if s.code() == Code::InvalidArgument));
    stack.faults(Target::Users).clear();
    stack.stop().await;
}

async fn the_quota_holds_from_the_cached_contract(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "alan@example.com", "3").await;
    photos_caught_up(&stack, &user, user.revision, contract.revision).await;
    for i in 0..3 {
        upload(&stack, &user, &format!("p{i}"))
            .await
            .unwrap_or_else(|s| panic!("upload {i}: {s:?}"));
    }
    let refused = upload(&stack, &user, "over").await;
    assert!(
        matches!(&refused, Err(s) if s.code() == Code::ResourceExhausted && s.message().contains("3 of 3")),
        "{refused:?}"
    );
    // Raise the quota; once Photos has it, Contracts may go down.
    let raised = stack
        .contracts_client()
        .await
        .update_contract(UpdateContractRequest {
            contract: Some(Contract {
                options: vec![photo_quota("4")],
                ..contract.clone()
            }),
            update_mask: None,
            expected_revision: contract.revision,
        })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default())
        .unwrap_or_else(|s| panic!("{s:?}"));
    photos_caught_up(&stack, &user, 0, raised.revision).await;
    stack
        .faults(Target::Contracts)
        .set(FaultSpec {
            down: true,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        upload(&stack, &user, "fourth").await.is_ok(),
        "the raised quota applies with Contracts down"
    );
    let refused = upload(&stack, &user, "fifth").await;
    assert!(
        matches!(&refused, Err(s) if s.code() == Code::ResourceExhausted),
        "{refused:?}"
    );
    stack.faults(Target::Contracts).clear();
    // A suspended contract stops uploads.
    let suspended = stack
        .contracts_client()
        .await
        .update_contract(UpdateContractRequest {
            contract: Some(Contract {
                status: ContractStatus::Suspended as i32,
                options: vec![photo_quota("100")],
                ..raised
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default())
        .unwrap_or_else(|s| panic!("{s:?}"));
    photos_caught_up(&stack, &user, 0, suspended.revision).await;
    let refused = upload(&stack, &user, "suspended").await;
    assert!(
        matches!(&refused, Err(s) if s.code() == Code::FailedPrecondition && s.message().contains("suspended")),
        "{refused:?}"
    );
    stack.stop().await;
}
