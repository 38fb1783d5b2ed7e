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
    feed::{Freshness, Source, StreamState},
    photos::{
        Consistency, CreatePhotoRequest, DeletePhotoRequest, GetPhotoRequest, GetProfileRequest, GetProfileResponse,
        ListPhotosRequest, ListPhotosResponse, Photo, WatchPhotosRequest, WatchPhotosResponse,
        watch_photos_response::Event as PhotoEvent,
    },
    users::{ListUsersRequest, UpdateUserRequest, User},
};
use lightbox_app::Target;
use lightbox_cache::{Cache, CacheOptions};
use lightbox_changefeed::{Backend, Feed, FeedOptions, Frame, WatchFilter};
use lightbox_server::FaultSpec;
use lightbox_testkit::{DEADLINE, Stack, TestDb, conformance, customer, eventually, photo_quota};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;

conformance!(
    cached_reads_survive_upstreams_down_stopped_and_a_photos_restart,
    the_copies_equal_the_upstreams_after_restarts_and_drops,
    reads_wait_for_their_own_writes_or_fail_fast,
    a_tight_max_staleness_on_a_quiet_stream_is_confirmed_with_the_upstream,
    the_quota_holds_from_the_cached_contract,
    another_users_photo_is_not_found_and_stays,
    watch_photos_follows_one_user,
    get_profile_is_served_from_the_copies_with_the_upstreams_stopped,
    the_scope_migration_backfills_the_photos_written_before_it,
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
        .map(|s| s.state == StreamState::Connected as i32)
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
            state.state == StreamState::Disconnected as i32 && state.since_time.is_some(),
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

/// What a copy in Photos' database holds, as persisted: id -> (revision, entity).
async fn copy_of<T: lightbox_changefeed::feed::Entity>(
    stack: &Stack,
    name: &'static str,
) -> BTreeMap<String, (i64, T)> {
    let db = stack.db(Target::Photos).connect().await;
    let cache: Cache<T> = Cache::open(db, name, CacheOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let (_, all) = cache.persisted().await.unwrap_or_else(|err| panic!("{err}"));
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

/// Progress frames come every 10 s here, so a quiet copy is seconds old: a
/// read asking for 200 ms is served once the upstream confirms the copy is
/// at its head (the copy's age then resets), and refused only when that
/// cannot be confirmed.
async fn a_tight_max_staleness_on_a_quiet_stream_is_confirmed_with_the_upstream(db: TestDb) {
    let quiet = FeedOptions {
        progress_interval: Duration::from_secs(10),
        ..feed_options()
    };
    let stack = Stack::start(db, quiet).await;
    let (user, contract) = customer(&stack, "quiet@example.com", "10").await;
    photos_caught_up(&stack, &user, user.revision, contract.revision).await;
    let tight = ListPhotosRequest {
        max_staleness: Some(pbjson_types::Duration::from(Duration::from_millis(200))),
        ..list(&user)
    };
    // Let the copies go quiet for longer than asked.
    eventually("the users copy to be older than 200 ms", || async {
        let answer = list_photos(&stack, list(&user)).await.ok()?;
        let age = answer.user_freshness.and_then(|f| f.age)?;
        (age.seconds > 0 || age.nanos > 300_000_000).then_some(())
    })
    .await;
    for _ in 0..3 {
        let answer = list_photos(&stack, tight.clone())
            .await
            .unwrap_or_else(|s| panic!("a current, quiet copy is confirmed, not refused: {s:?}"));
        let age = answer.user_freshness.and_then(|f| f.age).unwrap_or_default();
        assert!(
            age.seconds == 0 && age.nanos < 200_000_000,
            "confirmed just now: {age:?}"
        );
    }
    // Quiet again, then a write: a read asking for 200 ms must see it (the
    // copy either has it, and heard it just now, or is older than 200 ms,
    // and the upstream says there is a change to wait for).
    eventually("the users copy to be older than 200 ms again", || async {
        let answer = list_photos(&stack, list(&user)).await.ok()?;
        let age = answer.user_freshness.and_then(|f| f.age)?;
        (age.seconds > 0 || age.nanos > 300_000_000).then_some(())
    })
    .await;
    let mut users = stack.users_client().await;
    users
        .update_user(UpdateUserRequest {
            user: Some(User {
                display_name: "Quiet".into(),
                ..user.clone()
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let answer = list_photos(&stack, tight.clone())
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(answer.user.map(|u| u.display_name), Some("Quiet".into()));
    // With Users down, nothing can confirm the copy: refused, and soon.
    stack
        .faults(Target::Users)
        .set(FaultSpec {
            down: true,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = eventually("an unconfirmable copy to be refused", || async {
        list_photos(&stack, tight.clone()).await.err()
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("could not confirm"), "{}", refused.message());
    stack.faults(Target::Users).clear();
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
        // One meaning of `revision`: the part's own (the user's), wherever
        // it was read; the copy's cursor is `copy_revision`.
        let freshness = answer.user_freshness.unwrap_or_default();
        assert_eq!(freshness.revision, written.revision);
        assert!(freshness.copy_revision >= written.revision, "{freshness:?}");
    }
    // Another user's write moves the copy on, not this user's revision.
    let other = customer(&stack, "other@example.com", "1").await.0;
    let answer = list_photos(
        &stack,
        ListPhotosRequest {
            min_users_revision: other.revision,
            ..list(&user)
        },
    )
    .await
    .unwrap_or_else(|s| panic!("{s:?}"));
    let freshness = answer.user_freshness.unwrap_or_default();
    assert!(freshness.copy_revision >= other.revision, "{freshness:?}");
    assert!(
        freshness.revision < other.revision,
        "the user's own revision: {freshness:?}"
    );
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

async fn get_photo(stack: &Stack, id: &str, user_id: &str) -> Result<Photo, tonic::Status> {
    stack
        .photos_client()
        .await
        .get_photo(GetPhotoRequest {
            id: id.into(),
            user_id: user_id.into(),
        })
        .await
        .map(|r| r.into_inner().photo.unwrap_or_default())
}

async fn delete_photo(stack: &Stack, id: &str, user_id: &str) -> Result<i64, tonic::Status> {
    stack
        .photos_client()
        .await
        .delete_photo(DeletePhotoRequest {
            id: id.into(),
            user_id: user_id.into(),
        })
        .await
        .map(|r| r.into_inner().revision)
}

/// A status's message with `id` blotted out, to compare the words alone.
fn words(status: &tonic::Status, id: &str) -> String {
    status.message().replace(id, "<id>")
}

async fn another_users_photo_is_not_found_and_stays(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (ada, _) = customer(&stack, "ada@example.com", "10").await;
    let (bob, bobs) = customer(&stack, "bob@example.com", "10").await;
    photos_caught_up(&stack, &bob, bob.revision, bobs.revision).await;
    let photo = upload(&stack, &ada, "mine").await.unwrap_or_else(|s| panic!("{s:?}"));
    // The owner, or no owner given: found.
    for owner in [ada.id.as_str(), ""] {
        let found = get_photo(&stack, &photo.id, owner).await;
        assert_eq!(found.ok().as_ref(), Some(&photo), "as {owner:?}");
    }
    // Someone else: the very answer of a photo that does not exist.
    let missing_id = "00000000-0000-7000-8000-0000000000ff";
    let missing = get_photo(&stack, missing_id, "")
        .await
        .err()
        .unwrap_or_else(|| panic!("a missing photo was found"));
    assert_eq!(missing.code(), Code::NotFound);
    let refused = get_photo(&stack, &photo.id, &bob.id)
        .await
        .err()
        .unwrap_or_else(|| panic!("Bob got Ada's photo"));
    assert_eq!(refused.code(), Code::NotFound);
    assert_eq!(words(&refused, &photo.id), words(&missing, missing_id));
    // Bob cannot delete it either: same answer, and nothing is written.
    let refused = delete_photo(&stack, &photo.id, &bob.id)
        .await
        .err()
        .unwrap_or_else(|| panic!("Bob deleted Ada's photo"));
    let missing = delete_photo(&stack, missing_id, &bob.id)
        .await
        .err()
        .unwrap_or_else(|| panic!("a missing photo was deleted"));
    assert_eq!((refused.code(), missing.code()), (Code::NotFound, Code::NotFound));
    assert_eq!(words(&refused, &photo.id), words(&missing, missing_id));
    assert_eq!(get_photo(&stack, &photo.id, "").await.ok().as_ref(), Some(&photo));
    let listed = list_photos(&stack, list(&ada))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(listed.photos, vec![photo.clone()]);
    let next = upload(&stack, &ada, "next").await.unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(next.revision, photo.revision + 1, "the refused delete wrote no change");
    // The owner deletes it.
    let deleted = delete_photo(&stack, &photo.id, &ada.id)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(deleted, next.revision + 1);
    let gone = get_photo(&stack, &photo.id, &ada.id).await;
    assert!(matches!(&gone, Err(s) if s.code() == Code::NotFound), "{gone:?}");
    // A malformed owner is a bad request, not a miss.
    for bad in [
        get_photo(&stack, &next.id, "nope").await.map(|_| ()),
        delete_photo(&stack, &next.id, "nope").await.map(|_| ()),
    ] {
        assert!(
            matches!(&bad, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("user_id")),
            "{bad:?}"
        );
    }
    assert!(get_photo(&stack, &next.id, "").await.is_ok());
    stack.stop().await;
}

async fn watch_photos(
    stack: &Stack,
    since_revision: i64,
    user_id: &str,
) -> Result<tonic::Streaming<WatchPhotosResponse>, tonic::Status> {
    stack
        .photos_client()
        .await
        .watch_photos(WatchPhotosRequest {
            since_revision,
            user_id: user_id.into(),
            ..WatchPhotosRequest::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The next frame of a photos watch that is not progress.
async fn next_photo_event(stream: &mut tonic::Streaming<WatchPhotosResponse>) -> PhotoEvent {
    loop {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(WatchPhotosResponse {
                event: Some(PhotoEvent::Progress(_)),
            }))) => {}
            Ok(Some(Ok(WatchPhotosResponse { event: Some(event) }))) => return event,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// The next change of a photos watch, as (revision, photo id, the photo or
/// `None` for a deletion).
async fn next_photo_change(stream: &mut tonic::Streaming<WatchPhotosResponse>) -> (i64, String, Option<Photo>) {
    match next_photo_event(stream).await {
        PhotoEvent::Change(change) => (change.revision, change.photo_id, change.photo),
        other => panic!("expected a change, got {other:?}"),
    }
}

async fn watch_photos_follows_one_user(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (ada, _) = customer(&stack, "ada@example.com", "10").await;
    let (bob, bobs) = customer(&stack, "bob@example.com", "10").await;
    photos_caught_up(&stack, &bob, bob.revision, bobs.revision).await;
    let upload_as =
        async |user: &User, title: &str| upload(&stack, user, title).await.unwrap_or_else(|s| panic!("{s:?}"));
    let first = upload_as(&ada, "ada 1").await;
    let bobs_first = upload_as(&bob, "bob 1").await;
    // From 0: a snapshot of Ada's photos only.
    let mut stream = watch_photos(&stack, 0, &ada.id)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let at = bobs_first.revision;
    assert!(matches!(next_photo_event(&mut stream).await, PhotoEvent::SnapshotBegin(b) if b.revision == at));
    assert_eq!(
        next_photo_change(&mut stream).await,
        (first.revision, first.id.clone(), Some(first.clone()))
    );
    assert!(matches!(next_photo_event(&mut stream).await, PhotoEvent::SnapshotEnd(e) if e.revision == at));
    // Live: Ada's changes only, her deletions included.
    upload_as(&bob, "bob 2").await;
    let second = upload_as(&ada, "ada 2").await;
    delete_photo(&stack, &bobs_first.id, "")
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let deleted = delete_photo(&stack, &first.id, &ada.id)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let third = upload_as(&ada, "ada 3").await;
    let expected = [
        (second.revision, second.id.clone(), Some(second.clone())),
        (deleted, first.id.clone(), None),
        (third.revision, third.id.clone(), Some(third.clone())),
    ];
    for change in &expected {
        assert_eq!(&next_photo_change(&mut stream).await, change);
    }
    // Resume from the snapshot's revision: the same changes, and only those.
    let mut resumed = watch_photos(&stack, at, &ada.id)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    for change in &expected {
        assert_eq!(&next_photo_change(&mut resumed).await, change);
    }
    let fourth = upload_as(&ada, "ada 4").await;
    assert_eq!(next_photo_change(&mut resumed).await.0, fourth.revision);
    // A malformed user id is refused before streaming.
    let refused = watch_photos(&stack, 0, "nope").await;
    assert!(
        matches!(&refused, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("user_id")),
        "{:?}",
        refused.map(|_| ())
    );
    stack.stop().await;
}

fn profile_of(user: &User) -> GetProfileRequest {
    GetProfileRequest {
        user_id: user.id.clone(),
        ..GetProfileRequest::default()
    }
}

async fn get_profile(stack: &Stack, request: GetProfileRequest) -> Result<GetProfileResponse, tonic::Status> {
    stack
        .photos_client()
        .await
        .get_profile(request)
        .await
        .map(|r| r.into_inner())
}

async fn get_profile_is_served_from_the_copies_with_the_upstreams_stopped(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "ada@example.com", "10").await;
    // Read-your-writes, as ListPhotos: answered once the copies have the
    // writes, never older.
    let cached = eventually("GetProfile to answer with the writes", || async {
        let request = GetProfileRequest {
            min_users_revision: user.revision,
            min_contracts_revision: contract.revision,
            ..profile_of(&user)
        };
        get_profile(&stack, request).await.ok()
    })
    .await;
    assert_eq!(cached.user.as_ref(), Some(&user));
    assert_eq!(cached.contract.as_ref(), Some(&contract));
    assert_eq!(source(&cached.user_freshness), Source::Cache as i32);
    assert_eq!(source(&cached.contract_freshness), Source::Cache as i32);
    // The same parts as ListPhotos answers.
    let listed = list_photos(&stack, list(&user))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(
        (listed.user, listed.contract),
        (cached.user.clone(), cached.contract.clone())
    );
    let fresh = get_profile(
        &stack,
        GetProfileRequest {
            consistency: Consistency::Fresh as i32,
            ..profile_of(&user)
        },
    )
    .await
    .unwrap_or_else(|s| panic!("fresh profile: {s:?}"));
    assert_eq!(source(&fresh.user_freshness), Source::Upstream as i32);
    assert_eq!(fresh.user.as_ref(), Some(&user));
    // Nobody: the miss falls back to Users, which says so.
    let stranger = User {
        id: "00000000-0000-7000-8000-0000000000ff".into(),
        ..User::default()
    };
    let nobody = get_profile(&stack, profile_of(&stranger)).await;
    assert!(matches!(&nobody, Err(s) if s.code() == Code::NotFound), "{nobody:?}");

    // Users and Contracts stopped: answered from the copies, saying so.
    for target in [Target::Users, Target::Contracts] {
        stack.stop_component(target).await;
    }
    let answer = eventually("GetProfile to report its streams disconnected", || async {
        let answer = get_profile(&stack, profile_of(&user)).await.ok()?;
        (connected(&answer.user_freshness) == Some(false) && connected(&answer.contract_freshness) == Some(false))
            .then_some(answer)
    })
    .await;
    assert_eq!(answer.user.as_ref(), Some(&user));
    assert_eq!(answer.contract.as_ref(), Some(&contract));
    assert_eq!(source(&answer.user_freshness), Source::Cache as i32);
    assert_eq!(source(&answer.contract_freshness), Source::Cache as i32);
    let state = answer.user_freshness.and_then(|f| f.stream_state).unwrap_or_default();
    assert!(state.since_time.is_some(), "disconnected since when: {state:?}");
    // What the copies cannot answer fails fast and clearly.
    let started = Instant::now();
    for request in [
        GetProfileRequest {
            consistency: Consistency::Fresh as i32,
            ..profile_of(&user)
        },
        GetProfileRequest {
            min_users_revision: 10_000,
            ..profile_of(&user)
        },
        profile_of(&stranger),
    ] {
        let refused = get_profile(&stack, request).await;
        assert!(
            matches!(&refused, Err(s) if s.code() == Code::Unavailable),
            "{refused:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let bad = get_profile(
        &stack,
        GetProfileRequest {
            user_id: "nope".into(),
            ..GetProfileRequest::default()
        },
    )
    .await;
    assert!(matches!(&bad, Err(s) if s.code() == Code::InvalidArgument), "{bad:?}");
    stack.stop().await;
}

/// Photos stored before scopes existed get their owner's scope from the
/// migration, so that a user's watch finds them; what it cannot know (the
/// owner of a photo deleted before) keeps the empty scope.
async fn the_scope_migration_backfills_the_photos_written_before_it(db: TestDb) {
    const ADA: &str = "00000000-0000-7000-8000-00000000000a";
    const BOB: &str = "00000000-0000-7000-8000-00000000000b";
    let pool = db.connect().await;
    // The schema before scopes: the changefeed's first migration and the
    // photos service's first.
    for (set, last) in [
        (&lightbox_changefeed::db::CHANGEFEED_MIGRATIONS, 1),
        (&lightbox_photos::MIGRATIONS, 3000),
    ] {
        let source = match db.backend() {
            Backend::Sqlite => set.sqlite,
            Backend::Postgres => set.postgres,
        };
        let mut before =
            sqlx::migrate::Migrator::with_migrations(source.iter().filter(|m| m.version <= last).cloned().collect());
        before.set_ignore_missing(true);
        before
            .run(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("migrate: {err}"));
    }
    // Bob's photo, Ada's photo, Ada's deleted photo (no owner row left), and
    // an entity of another feed with the same id as Ada's photo.
    let photo = |id: &str, user_id: &str| Photo {
        id: id.into(),
        user_id: user_id.into(),
        title: id.into(),
        ..Photo::default()
    };
    let (bobs, adas, gone) = (
        photo("00000000-0000-7000-8000-000000000001", BOB),
        photo("00000000-0000-7000-8000-000000000002", ADA),
        photo("00000000-0000-7000-8000-000000000003", ADA),
    );
    let rows: [(&str, &str, i64, Option<&Photo>); 5] = [
        (lightbox_photos::FEED, &bobs.id, 1, Some(&bobs)),
        (lightbox_photos::FEED, &adas.id, 2, Some(&adas)),
        (lightbox_photos::FEED, &gone.id, 3, Some(&gone)),
        (lightbox_photos::FEED, &gone.id, 4, None),
        ("elsewhere", &adas.id, 1, Some(&adas)),
    ];
    for (feed, id, revision, entity) in rows {
        let payload = entity.map(|p| p.encode_to_vec());
        sqlx::query(
            "INSERT INTO feed_changes (feed, revision, entity_id, deleted, payload, commit_time_us) \
             VALUES ($1, $2, $3, $4, $5, 0)",
        )
        .bind(feed)
        .bind(revision)
        .bind(id)
        .bind(i64::from(payload.is_none()))
        .bind(payload.clone())
        .execute(pool.pool())
        .await
        .unwrap_or_else(|err| panic!("insert change: {err}"));
        sqlx::query(
            "INSERT INTO feed_entities (feed, entity_id, revision, deleted, payload) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (feed, entity_id) DO UPDATE SET revision = excluded.revision, deleted = excluded.deleted, \
             payload = excluded.payload",
        )
        .bind(feed)
        .bind(id)
        .bind(revision)
        .bind(i64::from(payload.is_none()))
        .bind(payload)
        .execute(pool.pool())
        .await
        .unwrap_or_else(|err| panic!("insert entity: {err}"));
    }
    for (feed, revision) in [(lightbox_photos::FEED, 4_i64), ("elsewhere", 1)] {
        sqlx::query("INSERT INTO feed_state (feed, revision) VALUES ($1, $2)")
            .bind(feed)
            .bind(revision)
            .execute(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("insert state: {err}"));
    }
    for p in [&bobs, &adas] {
        sqlx::query("INSERT INTO photo_owners (photo_id, user_id) VALUES ($1, $2)")
            .bind(p.id.as_str())
            .bind(p.user_id.as_str())
            .execute(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("insert owner: {err}"));
    }

    // Every migration, as the service runs them at start.
    pool.migrate(&[&lightbox_cache::MIGRATIONS, &lightbox_photos::MIGRATIONS])
        .await
        .unwrap_or_else(|err| panic!("migrate: {err}"));
    let scopes = async |table: &'static str| {
        let sql = match table {
            "feed_changes" => "SELECT feed, entity_id, revision, scope FROM feed_changes ORDER BY feed, revision",
            _ => "SELECT feed, entity_id, revision, scope FROM feed_entities ORDER BY feed, revision",
        };
        sqlx::query_as::<_, (String, String, i64, String)>(sql)
            .fetch_all(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("read scopes: {err}"))
            .into_iter()
            .map(|(feed, id, revision, scope)| ((feed, id, revision), scope))
            .collect::<BTreeMap<_, _>>()
    };
    let key = |feed: &str, id: &str, revision: i64| (feed.to_owned(), id.to_owned(), revision);
    let changes = scopes("feed_changes").await;
    assert_eq!(changes[&key("photos", &bobs.id, 1)], BOB);
    assert_eq!(changes[&key("photos", &adas.id, 2)], ADA);
    assert_eq!(
        changes[&key("photos", &gone.id, 3)],
        "",
        "its owner is not known any more"
    );
    assert_eq!(changes[&key("photos", &gone.id, 4)], "");
    assert_eq!(
        changes[&key("elsewhere", &adas.id, 1)],
        "",
        "other feeds are not touched"
    );
    let entities = scopes("feed_entities").await;
    assert_eq!(entities[&key("photos", &bobs.id, 1)], BOB);
    assert_eq!(entities[&key("photos", &adas.id, 2)], ADA);
    assert_eq!(entities[&key("photos", &gone.id, 4)], "");
    assert_eq!(entities[&key("elsewhere", &adas.id, 1)], "");

    // A watch of Ada's photos finds hers, from a snapshot and from the log.
    let feed: Feed<Photo> = Feed::open(pool, lightbox_photos::FEED, FeedOptions::default())
        .await
        .unwrap_or_else(|err| panic!("open: {err}"));
    let mut stream = feed.watch(0, WatchFilter::scope(ADA));
    let mut frames = Vec::new();
    for _ in 0..3 {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(frame))) => frames.push(frame),
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    assert!(matches!(&frames[0], Frame::SnapshotBegin { revision: 4 }), "{frames:?}");
    assert!(matches!(&frames[1], Frame::Change(c) if c.entity.as_ref() == Some(&adas) && c.scope == ADA));
    assert!(matches!(&frames[2], Frame::SnapshotEnd { revision: 4 }), "{frames:?}");
    let mut resumed = feed.watch(1, WatchFilter::scope(ADA));
    let newer = photo("00000000-0000-7000-8000-000000000004", ADA);
    let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("begin: {err}"));
    tx.put_scoped(&newer.id, ADA, &newer)
        .await
        .unwrap_or_else(|err| panic!("put: {err}"));
    tx.commit().await.unwrap_or_else(|err| panic!("commit: {err}"));
    // Ada's photo, then the new one: the deleted photo's changes, unscoped,
    // are not Ada's any more.
    for (revision, expected) in [(2, &adas), (5, &newer)] {
        match tokio::time::timeout(DEADLINE, resumed.next()).await {
            Ok(Some(Ok(Frame::Change(change)))) => {
                assert_eq!(change.revision, revision);
                assert_eq!(change.entity.as_ref(), Some(expected));
            }
            other => panic!("expected Ada's photo at {revision}, got {other:?}"),
        }
    }
}
