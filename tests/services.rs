//! Users and Contracts over real gRPC, on SQLite and PostgreSQL: CRUD with
//! revisions and optimistic concurrency, pagination, the bad inputs each
//! with its status (and nothing stored changed), the synchronous hop to
//! Contracts when it is down or slow, and watching over the wire.

use std::time::{Duration, Instant};

use lightbox_api::{
    contracts::{
        Contract, ContractOption, CreateContractRequest, DeleteContractRequest, ListContractsRequest, Plan,
        UpdateContractRequest, WatchContractsRequest, contracts_service_client::ContractsServiceClient,
        watch_contracts_response::Event as ContractEvent,
    },
    users::{
        ContractRead, CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUserChangesRequest, ListUsersRequest,
        UpdateUserRequest, User, WatchUsersRequest, users_service_client::UsersServiceClient,
        watch_users_response::Event as UserEvent,
    },
};
use lightbox_app::Target;
use lightbox_changefeed::{Backend, FeedOptions};
use lightbox_server::FaultSpec;
use lightbox_testkit::{DEADLINE, Stack, TestDb, conformance, eventually};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;

conformance!(
    users_crud_with_revisions_and_optimistic_concurrency,
    listing_pages_with_opaque_tokens,
    bad_input_gets_its_status_and_changes_nothing,
    get_user_with_contract_makes_the_synchronous_hop,
    the_hop_fails_clearly_when_contracts_is_down_or_slow,
    watch_over_grpc_is_snapshot_then_live,
    watch_contracts_follows_one_holder,
    contracts_stored_before_scopes_are_found_by_holder,
    contracts_are_listed_by_holder_in_pages_as_written,
    a_users_contract_must_exist_and_be_theirs,
    a_client_that_stops_reading_is_dropped_and_resumes_losslessly,
    a_change_is_encoded_once_and_read_as_its_typed_message,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

fn new_user(name: &str, email: &str, contract_id: &str) -> CreateUserRequest {
    CreateUserRequest {
        user: Some(User {
            display_name: name.into(),
            email: email.into(),
            contract_id: contract_id.into(),
            ..User::default()
        }),
    }
}

async fn create_user(stack: &Stack, name: &str, email: &str) -> User {
    let mut users = stack.users_client().await;
    match users.create_user(new_user(name, email, "")).await {
        Ok(response) => response.into_inner().user.unwrap_or_default(),
        Err(status) => panic!("create user: {status:?}"),
    }
}

async fn create_contract(stack: &Stack, holder: &str, quota: &str) -> Contract {
    let mut contracts = stack.contracts_client().await;
    let request = CreateContractRequest {
        contract: Some(Contract {
            holder_user_id: holder.into(),
            plan: Plan::Standard as i32,
            options: vec![ContractOption {
                code: "photo_quota".into(),
                value: quota.into(),
                enabled: true,
            }],
            ..Contract::default()
        }),
    };
    match contracts.create_contract(request).await {
        Ok(response) => response.into_inner().contract.unwrap_or_default(),
        Err(status) => panic!("create contract: {status:?}"),
    }
}

/// The users feed's head, as the pull listing reports it.
async fn users_head(stack: &Stack) -> i64 {
    let mut users = stack.users_client().await;
    let (mut since, mut page_token) = (0, String::new());
    loop {
        let page = match users
            .list_user_changes(ListUserChangesRequest {
                since_revision: since,
                page_size: 1000,
                page_token,
            })
            .await
        {
            Ok(page) => page.into_inner(),
            Err(status) => panic!("list changes: {status:?}"),
        };
        if page.changes.is_empty() && page.next_page_token.is_empty() {
            return page.next_since_revision;
        }
        since = page.next_since_revision;
        page_token = page.next_page_token;
    }
}

fn expect_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} ({needle}), got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} should contain {needle:?}",
                status.message()
            );
        }
    }
}

async fn users_crud_with_revisions_and_optimistic_concurrency(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let mut users = stack.users_client().await;
    let ada = create_user(&stack, "Ada", "ada@example.com").await;
    assert_eq!(ada.revision, 1);
    assert!(ada.create_time.is_some());
    let fetched = users
        .get_user(GetUserRequest {
            id: ada.id.clone(),
            include_contract: false,
            contract_read: 0,
        })
        .await
        .map(|r| r.into_inner().user);
    assert_eq!(fetched.ok().flatten(), Some(ada.clone()));

    // Update with a mask and the right expected revision.
    let update = |name: &str, expected: i64| UpdateUserRequest {
        user: Some(User {
            id: ada.id.clone(),
            display_name: name.into(),
            ..User::default()
        }),
        update_mask: Some(pbjson_types::FieldMask {
            paths: vec!["display_name".into()],
        }),
        expected_revision: expected,
    };
    let updated = users
        .update_user(update("Ada L.", 1))
        .await
        .map(|r| r.into_inner().user);
    let updated = updated.ok().flatten().unwrap_or_default();
    assert_eq!((updated.display_name.as_str(), updated.revision), ("Ada L.", 2));
    assert_eq!(updated.email, "ada@example.com", "fields outside the mask are kept");

    // A stale expected revision is refused; nothing changes.
    expect_status(
        users.update_user(update("Lost update", 1)).await,
        Code::Aborted,
        "not the expected revision 1",
    );
    let current = users
        .get_user(GetUserRequest {
            id: ada.id.clone(),
            include_contract: false,
            contract_read: 0,
        })
        .await
        .map(|r| r.into_inner().user);
    assert_eq!(
        current.ok().flatten().map(|u| (u.display_name, u.revision)),
        Some(("Ada L.".into(), 2))
    );

    // Delete answers its revision; the user is gone; the e-mail is free again.
    let deleted = users
        .delete_user(DeleteUserRequest {
            id: ada.id.clone(),
            expected_revision: 2,
        })
        .await
        .map(|r| r.into_inner().revision);
    assert_eq!(deleted.ok(), Some(3));
    expect_status(
        users
            .get_user(GetUserRequest {
                id: ada.id.clone(),
                include_contract: false,
                contract_read: 0,
            })
            .await,
        Code::NotFound,
        "not found",
    );
    assert_eq!(create_user(&stack, "Ada again", "ADA@example.com").await.revision, 4);
    stack.stop().await;
}

async fn listing_pages_with_opaque_tokens(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            create_user(&stack, &format!("User {i}"), &format!("u{i}@example.com"))
                .await
                .id,
        );
    }
    created.sort();
    let mut users = stack.users_client().await;
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = users
            .list_users(ListUsersRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .map(|r| r.into_inner());
        let page = page.unwrap_or_else(|status| panic!("list: {status:?}"));
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created, "every user once, in id order");

    // A token is good for its own listing only: another RPC's, or the same
    // RPC's with another filter, or a forged one, is refused, not answered
    // with a page of something else.
    let users_token = users
        .list_users(ListUsersRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner()
        .next_page_token;
    let (ada, bob) = (created[0].clone(), created[1].clone());
    for holder in [&ada, &ada] {
        create_contract(&stack, holder, "5").await;
    }
    let mut contracts = stack.contracts_client().await;
    let adas_token = contracts
        .list_contracts(ListContractsRequest {
            page_size: 1,
            page_token: String::new(),
            holder_user_id: ada.clone(),
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner()
        .next_page_token;
    assert!(!adas_token.is_empty());
    for (token, holder, what) in [
        (users_token.clone(), ada.clone(), "a ListUsers token"),
        (adas_token.clone(), bob.clone(), "Ada's token for Bob's contracts"),
        (adas_token.clone(), String::new(), "a holder's token for all contracts"),
        ("lb2.6869".to_owned(), ada.clone(), "a forged token"),
    ] {
        let refused = contracts
            .list_contracts(ListContractsRequest {
                page_size: 1,
                page_token: token,
                holder_user_id: holder,
            })
            .await;
        assert!(
            matches!(&refused, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("page_token")),
            "{what}: {refused:?}"
        );
    }
    let refused = users
        .list_users(ListUsersRequest {
            page_size: 1,
            page_token: adas_token,
        })
        .await;
    expect_status(refused, Code::InvalidArgument, "another listing");
    stack.stop().await;
}

async fn bad_input_gets_its_status_and_changes_nothing(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let ada = create_user(&stack, "Ada", "ada@example.com").await;
    let head = users_head(&stack).await;
    let mut users = stack.users_client().await;
    let get = |id: &str| GetUserRequest {
        id: id.into(),
        include_contract: false,
        contract_read: 0,
    };
    expect_status(users.get_user(get("")).await, Code::InvalidArgument, "id is required");
    expect_status(
        users.get_user(get("not-a-uuid")).await,
        Code::InvalidArgument,
        "not a valid id",
    );
    expect_status(
        users
            .list_users(ListUsersRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "page_size must not be negative",
    );
    expect_status(
        users
            .list_users(ListUsersRequest {
                page_size: 5,
                page_token: "forged".into(),
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    expect_status(
        users.create_user(new_user("Eve", "not an email", "")).await,
        Code::InvalidArgument,
        "user.email",
    );
    expect_status(
        users.create_user(new_user("Eve", "ada@example.com", "")).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_status(
        users
            .create_user(new_user("Eve", "eve@example.com", "bad-contract"))
            .await,
        Code::InvalidArgument,
        "user.contract_id",
    );
    let mut stale = User {
        id: ada.id.clone(),
        display_name: "Eve".into(),
        ..ada.clone()
    };
    expect_status(
        users
            .update_user(UpdateUserRequest {
                user: Some(stale.clone()),
                update_mask: Some(pbjson_types::FieldMask {
                    paths: vec!["revision".into()],
                }),
                expected_revision: 0,
            })
            .await,
        Code::InvalidArgument,
        "cannot be updated",
    );
    expect_status(
        users
            .update_user(UpdateUserRequest {
                user: Some(stale.clone()),
                update_mask: None,
                expected_revision: ada.revision + 7,
            })
            .await,
        Code::Aborted,
        "expected revision",
    );
    // Oversized: beyond the server's 1 MiB limit.
    stale.display_name = "x".repeat(2 * 1024 * 1024);
    expect_status(
        users
            .update_user(UpdateUserRequest {
                user: Some(stale),
                update_mask: None,
                expected_revision: 0,
            })
            .await,
        Code::OutOfRange,
        "too large",
    );
    expect_status(
        users
            .list_user_changes(ListUserChangesRequest {
                since_revision: -4,
                page_size: 0,
                page_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "since_revision",
    );
    // Nothing stored changed.
    assert_eq!(users_head(&stack).await, head);
    let current = users.get_user(get(&ada.id)).await.map(|r| r.into_inner().user);
    assert_eq!(current.ok().flatten(), Some(ada));
    stack.stop().await;
}

async fn user_with_contract(stack: &Stack) -> (User, Contract) {
    let holder = create_user(stack, "Grace", "grace@example.com").await;
    let contract = create_contract(stack, &holder.id, "10").await;
    let mut users = stack.users_client().await;
    let user = users
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: holder.id.clone(),
                contract_id: contract.id.clone(),
                ..User::default()
            }),
            update_mask: Some(pbjson_types::FieldMask {
                paths: vec!["contract_id".into()],
            }),
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().user);
    (user.ok().flatten().unwrap_or_default(), contract)
}

async fn get_user_with_contract_makes_the_synchronous_hop(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (user, contract) = user_with_contract(&stack).await;
    let mut users = stack.users_client().await;
    let answer = users
        .get_user(GetUserRequest {
            id: user.id.clone(),
            include_contract: true,
            contract_read: 0,
        })
        .await
        .map(|r| r.into_inner());
    let answer = answer.unwrap_or_else(|status| panic!("get user: {status:?}"));
    assert_eq!(answer.contract, Some(contract.clone()));
    let freshness = answer.contract_freshness.unwrap_or_default();
    assert_eq!(freshness.source, lightbox_api::feed::Source::Upstream as i32);
    assert_eq!(freshness.revision, contract.revision);
    stack.stop().await;
}

async fn the_hop_fails_clearly_when_contracts_is_down_or_slow(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let (user, _) = user_with_contract(&stack).await;
    let mut users = stack.users_client().await;
    // Only the synchronous hop: no falling back on the local copy.
    let request = || GetUserRequest {
        id: user.id.clone(),
        include_contract: true,
        contract_read: ContractRead::Upstream as i32,
    };
    let faults = stack.faults(Target::Contracts);
    let timeout = stack.settings.contract_timeout;

    faults
        .set(FaultSpec {
            down: true,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    expect_status(
        users.get_user(request()).await,
        Code::Unavailable,
        "contracts service is unavailable",
    );
    assert!(started.elapsed() < DEADLINE);

    faults
        .set(FaultSpec {
            latency: timeout * 4,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Contracts' health says SERVING again; Users' client re-admits it
    // when that news arrives, not at once.
    let (result, elapsed) = eventually("Users to re-admit Contracts", || {
        let mut users = users.clone();
        async move {
            let started = Instant::now();
            match users.get_user(request()).await {
                Err(status) if status.code() == Code::Unavailable => None,
                result => Some((result, started.elapsed())),
            }
        }
    })
    .await;
    expect_status(result, Code::DeadlineExceeded, "did not answer within");
    assert!(elapsed < timeout * 4, "the deadline, not the upstream, ends the call");

    // Really stopped, not just refusing.
    faults.clear();
    stack.stop_component(Target::Contracts).await;
    expect_status(
        users.get_user(request()).await,
        Code::Unavailable,
        "contracts service is unavailable",
    );
    // By default, Users answers from its own copy of contracts, and says so.
    let cached = users
        .get_user(GetUserRequest {
            contract_read: 0,
            ..request()
        })
        .await
        .map(|r| r.into_inner());
    let cached = cached.unwrap_or_else(|status| panic!("cached read: {status:?}"));
    assert_eq!(cached.contract.map(|c| c.id), Some(user.contract_id.clone()));
    let freshness = cached.contract_freshness.unwrap_or_default();
    assert_eq!(freshness.source, lightbox_api::feed::Source::Cache as i32);
    let stream = freshness.stream_state.unwrap_or_default();
    assert!(
        stream.state == lightbox_api::feed::StreamState::Disconnected as i32 && stream.since_time.is_some(),
        "{stream:?}"
    );
    // Without include_contract the user is still served.
    let plain = users
        .get_user(GetUserRequest {
            id: user.id.clone(),
            include_contract: false,
            contract_read: 0,
        })
        .await;
    assert!(plain.is_ok());
    stack.stop().await;
}

async fn watch_over_grpc_is_snapshot_then_live(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let holder = create_user(&stack, "Ada", "ada@example.com").await;
    let first = create_contract(&stack, &holder.id, "10").await;
    let mut contracts = stack.contracts_client().await;
    let mut stream = contracts
        .watch_contracts(WatchContractsRequest {
            since_revision: 0,
            ..WatchContractsRequest::default()
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner();
    let mut next = async || match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(Ok(frame))) => frame.event,
        other => panic!("expected a frame, got {other:?}"),
    };
    assert!(matches!(next().await, Some(ContractEvent::SnapshotBegin(b)) if b.revision == 1));
    assert!(matches!(next().await, Some(ContractEvent::Change(c)) if c.contract.as_ref() == Some(&first)));
    assert!(matches!(next().await, Some(ContractEvent::SnapshotEnd(e)) if e.revision == 1));
    let second = create_contract(&stack, &holder.id, "20").await;
    assert!(
        matches!(next().await, Some(ContractEvent::Change(c)) if c.revision == 2 && c.contract.as_ref() == Some(&second))
    );
    // Bad watch arguments are refused before streaming.
    let refused = contracts
        .watch_contracts(WatchContractsRequest {
            since_revision: 0,
            contract_ids: vec!["nope".into()],
            ..WatchContractsRequest::default()
        })
        .await;
    expect_status(refused.map(|_| ()), Code::InvalidArgument, "contract_ids");
    stack.stop().await;
}

/// The next change on a contracts watch, as (revision, contract id, the
/// contract or `None` for a deletion), past progress frames; anything else
/// fails the test.
async fn next_contract_change(
    stream: &mut tonic::Streaming<lightbox_api::contracts::WatchContractsResponse>,
) -> (i64, String, Option<Contract>) {
    loop {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(frame))) => match frame.event {
                Some(ContractEvent::Change(change)) => {
                    return (change.revision, change.contract_id, change.contract);
                }
                Some(ContractEvent::Progress(_)) => {}
                other => panic!("expected a change, got {other:?}"),
            },
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// A contracts watch from `since`, for `holder` and these contracts.
async fn watch_holder(
    contracts: &mut ContractsServiceClient<tonic::transport::Channel>,
    since: i64,
    holder: &str,
    ids: Vec<String>,
) -> tonic::Streaming<lightbox_api::contracts::WatchContractsResponse> {
    contracts
        .watch_contracts(WatchContractsRequest {
            since_revision: since,
            contract_ids: ids,
            holder_user_id: holder.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner()
}

/// A live change is encoded once for every stream that wants it, and what
/// each typed client reads is exactly the message the change makes, byte
/// for byte (the server writes pre-encoded frames; the client's API is the
/// generated one).
async fn a_change_is_encoded_once_and_read_as_its_typed_message(db: TestDb) {
    use lightbox_api::{
        contracts::{ContractChange, WatchContractsResponse},
        feed::ChangeKind,
    };
    let stack = Stack::start(db, feed_options()).await;
    let ada = create_user(&stack, "Ada", "ada@example.com").await;
    let mut contracts = stack.contracts_client().await;
    // Three streams from now: two of every contract, one of Ada's. Each is
    // live once its first frame (progress at the head) has arrived.
    let mut streams = vec![
        watch_holder(&mut contracts, -1, "", Vec::new()).await,
        watch_holder(&mut contracts, -1, "", Vec::new()).await,
        watch_holder(&mut contracts, -1, &ada.id, Vec::new()).await,
    ];
    for stream in &mut streams {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(frame))) => assert!(matches!(frame.event, Some(ContractEvent::Progress(_)))),
            other => panic!("expected progress first, got {other:?}"),
        }
    }
    let encoded_before = stack.feed_stats(Target::Contracts).changes_encoded;
    let created = create_contract(&stack, &ada.id, "10").await;
    let deleted = contracts
        .delete_contract(DeleteContractRequest {
            id: created.id.clone(),
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().revision)
        .unwrap_or_else(|status| panic!("delete: {status:?}"));
    let change = |revision, kind: ChangeKind, contract: Option<Contract>| WatchContractsResponse {
        event: Some(ContractEvent::Change(ContractChange {
            revision,
            kind: kind as i32,
            contract_id: created.id.clone(),
            contract,
            holder_user_id: ada.id.clone(),
        })),
    };
    let expected = [
        change(created.revision, ChangeKind::Upsert, Some(created.clone())),
        change(deleted, ChangeKind::Delete, None),
    ];
    for stream in &mut streams {
        for want in &expected {
            let got = loop {
                match tokio::time::timeout(DEADLINE, stream.next()).await {
                    Ok(Some(Ok(frame))) if matches!(frame.event, Some(ContractEvent::Progress(_))) => {}
                    Ok(Some(Ok(frame))) => break frame,
                    other => panic!("expected a change, got {other:?}"),
                }
            };
            assert_eq!(&got, want);
            assert_eq!(got.encode_to_vec(), want.encode_to_vec());
        }
    }
    assert_eq!(
        stack.feed_stats(Target::Contracts).changes_encoded - encoded_before,
        2,
        "each change encoded once for the three streams"
    );
    stack.stop().await;
}

async fn watch_contracts_follows_one_holder(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let ada = create_user(&stack, "Ada", "ada@example.com").await;
    let bob = create_user(&stack, "Bob", "bob@example.com").await;
    let adas = create_contract(&stack, &ada.id, "10").await;
    let bobs = create_contract(&stack, &bob.id, "10").await;
    let mut contracts = stack.contracts_client().await;
    // From 0: a snapshot of Ada's contracts only.
    let mut stream = watch_holder(&mut contracts, 0, &ada.id, Vec::new()).await;
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(frame))) => {
                let end = matches!(frame.event, Some(ContractEvent::SnapshotEnd(_)));
                frames.push(frame.event);
                if end {
                    break;
                }
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    assert_eq!(frames.len(), 3, "begin, Ada's contract, end: {frames:?}");
    assert!(matches!(&frames[1], Some(ContractEvent::Change(c)) if c.contract.as_ref() == Some(&adas)));
    // Live: Ada's changes only, her deletions included.
    let update = |contract: &Contract, holder: &str, quota: &str| UpdateContractRequest {
        contract: Some(Contract {
            holder_user_id: holder.into(),
            options: vec![ContractOption {
                code: "photo_quota".into(),
                value: quota.into(),
                enabled: true,
            }],
            ..contract.clone()
        }),
        update_mask: None,
        expected_revision: 0,
    };
    let updated = |answer: Result<tonic::Response<lightbox_api::contracts::UpdateContractResponse>, tonic::Status>| {
        answer
            .map(|r| r.into_inner().contract.unwrap_or_default())
            .unwrap_or_else(|status| panic!("update: {status:?}"))
    };
    let bobs = updated(contracts.update_contract(update(&bobs, &bob.id, "11")).await);
    let second = create_contract(&stack, &ada.id, "20").await;
    let adas = updated(contracts.update_contract(update(&adas, &ada.id, "12")).await);
    create_contract(&stack, &bob.id, "30").await;
    let deleted = contracts
        .delete_contract(DeleteContractRequest {
            id: second.id.clone(),
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().revision)
        .unwrap_or_else(|status| panic!("delete: {status:?}"));
    // A contract given to Ada arrives in her stream.
    let given = updated(contracts.update_contract(update(&bobs, &ada.id, "13")).await);
    assert!(
        bobs.revision < second.revision,
        "Bob's update came first, and was filtered out"
    );
    assert_eq!(
        next_contract_change(&mut stream).await,
        (second.revision, second.id.clone(), Some(second.clone()))
    );
    assert_eq!(
        next_contract_change(&mut stream).await,
        (adas.revision, adas.id.clone(), Some(adas.clone()))
    );
    assert_eq!(
        next_contract_change(&mut stream).await,
        (deleted, second.id.clone(), None)
    );
    assert_eq!(
        next_contract_change(&mut stream).await,
        (given.revision, given.id.clone(), Some(given.clone()))
    );
    // Resume from a revision: Ada's changes after it only.
    let mut resumed = watch_holder(&mut contracts, second.revision, &ada.id, Vec::new()).await;
    assert_eq!(next_contract_change(&mut resumed).await.0, adas.revision);
    assert_eq!(next_contract_change(&mut resumed).await.0, deleted);
    assert_eq!(next_contract_change(&mut resumed).await.0, given.revision);
    // With contract ids too, both filters apply: of the contract asked for,
    // only its change since Ada holds it (not Bob's update before); of Ada's
    // contracts, only the one asked for.
    let mut both = watch_holder(&mut contracts, bobs.revision - 1, &ada.id, vec![given.id.clone()]).await;
    assert_eq!(next_contract_change(&mut both).await.0, given.revision);
    // A holder id is checked like the other ids.
    let refused = contracts
        .watch_contracts(WatchContractsRequest {
            since_revision: 0,
            holder_user_id: "nope".into(),
            ..WatchContractsRequest::default()
        })
        .await;
    expect_status(refused.map(|_| ()), Code::InvalidArgument, "holder_user_id");
    stack.stop().await;
}

/// Contracts stored before scopes existed get their holder's scope from the
/// contracts service's migration: a watch of their holder finds them, in a
/// snapshot and in the changelog.
async fn link(stack: &Stack, user: &User, contract_id: &str) -> Result<User, tonic::Status> {
    let mut users = stack.users_client().await;
    users
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: user.id.clone(),
                contract_id: contract_id.into(),
                ..User::default()
            }),
            update_mask: Some(pbjson_types::FieldMask {
                paths: vec!["contract_id".into()],
            }),
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
}

/// A user's contract_id is checked when it is set: the contract exists and
/// is theirs — asked of Contracts, or of Users' copy when Contracts is down
/// — and a contract option Lightbox reads has a value of its type.
async fn a_users_contract_must_exist_and_be_theirs(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (ada, bob) = (
        create_user(&stack, "Ada", "ada@example.com").await,
        create_user(&stack, "Bob", "bob@example.com").await,
    );
    let adas = create_contract(&stack, &ada.id, "10").await;
    expect_status(
        link(&stack, &ada, "00000000-0000-7000-8000-0000000000ff").await,
        Code::InvalidArgument,
        "does not exist",
    );
    expect_status(
        link(&stack, &bob, &adas.id).await,
        Code::FailedPrecondition,
        "is held by user",
    );
    let linked = link(&stack, &ada, &adas.id).await.unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(linked.contract_id, adas.id);
    expect_status(
        stack
            .users_client()
            .await
            .create_user(new_user("Eve", "eve@example.com", &adas.id))
            .await,
        Code::InvalidArgument,
        "a new user holds no contract yet",
    );

    // Contracts down: Users' copy answers for a contract it has, and a
    // contract it cannot know about is refused as unknowable, not accepted.
    let bobs = create_contract(&stack, &bob.id, "10").await;
    link(&stack, &bob, &bobs.id).await.unwrap_or_else(|s| panic!("{s:?}"));
    eventually("Users' copy to have Bob's contract", || async {
        let mut users = stack.users_client().await;
        let request = GetUserRequest {
            id: bob.id.clone(),
            include_contract: true,
            contract_read: ContractRead::Cache as i32,
        };
        users.get_user(request).await.ok()
    })
    .await;
    stack
        .faults(Target::Contracts)
        .set(FaultSpec {
            down: true,
            ..FaultSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    expect_status(
        link(&stack, &ada, &bobs.id).await,
        Code::FailedPrecondition,
        "is held by user",
    );
    expect_status(
        link(&stack, &ada, "00000000-0000-7000-8000-0000000000fe").await,
        Code::Unavailable,
        "cannot check that contract",
    );
    stack.faults(Target::Contracts).clear();

    let mut contracts = stack.contracts_client().await;
    let refused = contracts
        .create_contract(CreateContractRequest {
            contract: Some(Contract {
                holder_user_id: ada.id.clone(),
                plan: Plan::Standard as i32,
                options: vec![ContractOption {
                    code: "photo_quota".into(),
                    value: "lots".into(),
                    enabled: true,
                }],
                ..Contract::default()
            }),
        })
        .await;
    expect_status(
        refused,
        Code::InvalidArgument,
        "\"photo_quota\" must be a non-negative whole number",
    );
    stack.stop().await;
}

/// Every page of a holder's contracts, in id order, `size` at a time.
async fn contracts_of(stack: &Stack, holder: &str, size: i32) -> Vec<String> {
    let mut contracts = stack.contracts_client().await;
    let (mut ids, mut token) = (Vec::new(), String::new());
    loop {
        let page = contracts
            .list_contracts(ListContractsRequest {
                page_size: size,
                page_token: token,
                holder_user_id: holder.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("list contracts: {status:?}"))
            .into_inner();
        assert!(page.contracts.len() <= size as usize);
        assert!(page.contracts.iter().all(|c| c.holder_user_id == holder));
        ids.extend(page.contracts.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

/// One query on the holder's scope: pages follow each other, a write is in
/// the very next listing, a contract given to another holder moves lists,
/// a deleted one leaves.
async fn contracts_are_listed_by_holder_in_pages_as_written(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (ada, bob) = (
        create_user(&stack, "Ada", "ada@example.com").await,
        create_user(&stack, "Bob", "bob@example.com").await,
    );
    let mut written = Vec::new();
    for n in 0..7 {
        written.push(create_contract(&stack, &ada.id, "5").await.id);
        let mut expected = written.clone();
        expected.sort();
        assert_eq!(contracts_of(&stack, &ada.id, 3).await, expected, "after contract {n}");
    }
    create_contract(&stack, &bob.id, "5").await;
    let mut contracts = stack.contracts_client().await;
    let moved = contracts
        .get_contract(lightbox_api::contracts::GetContractRequest { id: written[0].clone() })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner()
        .contract
        .unwrap_or_default();
    contracts
        .update_contract(UpdateContractRequest {
            contract: Some(Contract {
                holder_user_id: bob.id.clone(),
                ..moved
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"));
    contracts
        .delete_contract(DeleteContractRequest {
            id: written[1].clone(),
            expected_revision: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"));
    let mut left: Vec<String> = written[2..].to_vec();
    left.sort();
    assert_eq!(contracts_of(&stack, &ada.id, 2).await, left);
    let bobs = contracts_of(&stack, &bob.id, 10).await;
    assert_eq!(bobs.len(), 2);
    assert!(
        bobs.contains(&written[0]),
        "the moved contract is listed under its new holder"
    );
    stack.stop().await;
}

async fn contracts_stored_before_scopes_are_found_by_holder(db: TestDb) {
    const ADA: &str = "00000000-0000-7000-8000-00000000000a";
    const BOB: &str = "00000000-0000-7000-8000-00000000000b";
    let contract = |n: i64, holder: &str| Contract {
        id: format!("00000000-0000-7000-8000-0000000000c{n}"),
        holder_user_id: holder.into(),
        plan: Plan::Standard as i32,
        revision: n,
        ..Contract::default()
    };
    let (bobs, adas) = (contract(1, BOB), contract(2, ADA));
    {
        // The schema before scopes (changefeed 1, contracts 2000), and two
        // contracts in it, as the service wrote them then. (The contracts
        // service's migrations are read from its directory: this package
        // does not depend on the service crate.)
        let pool = db.connect().await;
        let backend = match db.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        let changefeed = match db.backend() {
            Backend::Sqlite => lightbox_changefeed::db::CHANGEFEED_MIGRATIONS.sqlite,
            Backend::Postgres => lightbox_changefeed::db::CHANGEFEED_MIGRATIONS.postgres,
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crates/contracts/migrations")
            .join(backend);
        let contracts = sqlx::migrate::Migrator::new(dir)
            .await
            .unwrap_or_else(|err| panic!("read the contracts migrations: {err}"));
        for (source, last) in [(changefeed, 1), (&contracts, 2000)] {
            let mut before = sqlx::migrate::Migrator::with_migrations(
                source.iter().filter(|m| m.version <= last).cloned().collect(),
            );
            before.set_ignore_missing(true);
            before
                .run(pool.pool())
                .await
                .unwrap_or_else(|err| panic!("migrate: {err}"));
        }
        for c in [&bobs, &adas] {
            for sql in [
                "INSERT INTO feed_changes (feed, revision, entity_id, deleted, payload, commit_time_us) \
                 VALUES ('contracts', $1, $2, 0, $3, 0)",
                "INSERT INTO feed_entities (feed, revision, entity_id, deleted, payload) \
                 VALUES ('contracts', $1, $2, 0, $3)",
            ] {
                sqlx::query(sql)
                    .bind(c.revision)
                    .bind(c.id.as_str())
                    .bind(c.encode_to_vec())
                    .execute(pool.pool())
                    .await
                    .unwrap_or_else(|err| panic!("insert: {err}"));
            }
            sqlx::query("INSERT INTO contract_holders (contract_id, holder_user_id) VALUES ($1, $2)")
                .bind(c.id.as_str())
                .bind(c.holder_user_id.as_str())
                .execute(pool.pool())
                .await
                .unwrap_or_else(|err| panic!("insert: {err}"));
        }
        sqlx::query("INSERT INTO feed_state (feed, revision) VALUES ('contracts', 2)")
            .execute(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("insert: {err}"));
        pool.close().await;
    }
    // The service migrates the database as it starts.
    let stack = Stack::start(db, feed_options()).await;
    let mut contracts = stack.contracts_client().await;
    for (holder, expected) in [(ADA, &adas), (BOB, &bobs)] {
        let mut stream = watch_holder(&mut contracts, 0, holder, Vec::new()).await;
        let mut snapshot = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, stream.next()).await {
                Ok(Some(Ok(frame))) => match frame.event {
                    Some(ContractEvent::SnapshotBegin(begin)) => assert_eq!(begin.revision, 2),
                    Some(ContractEvent::Change(change)) => snapshot.extend(change.contract),
                    Some(ContractEvent::SnapshotEnd(_)) => break,
                    other => panic!("expected a snapshot, got {other:?}"),
                },
                other => panic!("expected a frame, got {other:?}"),
            }
        }
        assert_eq!(snapshot, vec![expected.clone()], "the snapshot of {holder}'s contracts");
    }
    // Resuming from 1: Ada's change at 2 from the changelog, then live.
    let mut resumed = watch_holder(&mut contracts, 1, ADA, Vec::new()).await;
    assert_eq!(
        next_contract_change(&mut resumed).await,
        (2, adas.id.clone(), Some(adas.clone()))
    );
    let added = create_contract(&stack, ADA, "5").await;
    assert_eq!(next_contract_change(&mut resumed).await.0, added.revision);
    stack.stop().await;
}

async fn a_client_that_stops_reading_is_dropped_and_resumes_losslessly(db: TestDb) {
    let stack = Stack::start(
        db,
        FeedOptions {
            watcher_buffer: 32,
            ..feed_options()
        },
    )
    .await;
    let seed = create_user(&stack, "Seed", "seed@example.com").await;
    // A client that advertises small HTTP/2 windows, as a phone would: once
    // it stops reading, the server soon cannot send it anything more.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr(Target::Users)))
        .unwrap_or_else(|err| panic!("{err}"))
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535);
    let mut users = UsersServiceClient::new(endpoint.connect_lazy());
    let mut stalled = users
        .watch_users(WatchUsersRequest {
            since_revision: seed.revision,
            user_ids: Vec::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner();
    // Writers are not slowed by a watcher that reads nothing: enough users
    // to fill the HTTP/2 windows many times over and lap the ring.
    let writes = 1000;
    let big = "n".repeat(180);
    for i in 0..writes {
        create_user(&stack, &big, &format!("w{i}@example.com")).await;
    }
    let head = users_head(&stack).await;
    assert_eq!(head, seed.revision + writes);
    // Another client's watcher is served at once. (Not on the stalled
    // client's connection: HTTP/2 flow control is per connection too, and
    // that client is not reading.)
    let mut fresh = stack
        .users_client()
        .await
        .watch_users(WatchUsersRequest {
            since_revision: head - 1,
            user_ids: Vec::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner();
    let got = tokio::time::timeout(DEADLINE, fresh.next()).await;
    assert!(
        matches!(got, Ok(Some(Ok(frame))) if matches!(&frame.event, Some(UserEvent::Change(c)) if c.revision == head))
    );
    // The stalled one drains what the transport held, then ends clearly.
    let mut last = seed.revision;
    let give_up = Instant::now() + DEADLINE;
    let status = loop {
        assert!(
            Instant::now() < give_up,
            "the stalled stream never ended (at revision {last})"
        );
        match tokio::time::timeout(DEADLINE, stalled.next()).await {
            Ok(Some(Ok(frame))) => match frame.event {
                Some(UserEvent::Change(change)) => {
                    assert_eq!(change.revision, last + 1);
                    last = change.revision;
                }
                Some(UserEvent::Progress(_)) => {}
                other => panic!("unexpected {other:?}"),
            },
            Ok(Some(Err(status))) => break status,
            other => panic!("expected the stream to end with a status, got {other:?}"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&format!("since_revision={last}")));
    assert!(last < head);
    // Resuming loses nothing.
    let mut resumed = users
        .watch_users(WatchUsersRequest {
            since_revision: last,
            user_ids: Vec::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner();
    while last < head {
        match tokio::time::timeout(DEADLINE, resumed.next()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(UserEvent::Change(change)) = frame.event {
                    assert_eq!(change.revision, last + 1);
                    last = change.revision;
                }
            }
            other => panic!("resume failed: {other:?}"),
        }
    }
    stack.stop().await;
}
