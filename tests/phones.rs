//! The gateway's fan-out with many phones: one upstream watch per source
//! for the whole gateway, each phone getting exactly its own changes; a
//! phone that stops reading is ended clearly and resumes without loss; a
//! gateway restart loses nothing; a deletion reaches its owner only.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lightbox_api::{
    contracts::{Contract, ContractOption, UpdateContractRequest},
    photos::{CreatePhotoRequest, Photo},
    users::{CreateUserRequest, UpdateUserRequest, User},
};
use lightbox_app::Target;
use lightbox_changefeed::FeedOptions;
use lightbox_testkit::{
    Stack, TestDb, customer, eventually,
    sse::{Event, EventStream},
};
use reqwest::Client;

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// What the tests read of an event.
trait Change {
    /// For a change: (source event, revision, the user it concerns).
    fn change(&self) -> Option<(&str, i64, &str)>;
}

impl Change for Event {
    fn change(&self) -> Option<(&str, i64, &str)> {
        let owner = match self.name.as_str() {
            "user" | "photo" => "userId",
            "contract" => "holderUserId",
            _ => return None,
        };
        let revision = self.data["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(-1);
        Some((
            self.name.as_str(),
            revision,
            self.data[owner].as_str().unwrap_or_default(),
        ))
    }
}

/// Opens `user_id`'s events stream, resuming after `last_id` if given.
async fn open(http: &Client, stack: &Stack, user_id: &str, last_id: Option<&str>) -> EventStream {
    let url = format!("{}/v1/users/me/events", stack.gateway_url());
    EventStream::open(http, &url, &stack.token(user_id), last_id).await
}

/// Watch streams each upstream serves now (users, contracts, photos).
fn watchers(stack: &Stack) -> [i64; 3] {
    [Target::Users, Target::Contracts, Target::Photos].map(|target| stack.feed_stats(target).watchers)
}

/// Waits until each upstream serves exactly one watch stream more than
/// `baseline`: the gateway's shared one; every phone has joined it and
/// dropped its own catch-up watches.
async fn one_gateway_watch_per_upstream(stack: &Stack, baseline: [i64; 3]) {
    eventually(
        "one gateway watch per upstream, whatever the number of phones",
        || async {
            let now = watchers(stack);
            (now.iter().zip(baseline).all(|(now, before)| now - before == 1)).then_some(())
        },
    )
    .await;
}

/// Restarts the gateway with `change` applied to its settings.
async fn gateway_with(stack: &mut Stack, change: impl FnOnce(&mut lightbox_gateway::GatewayOptions)) {
    stack.stop_component(Target::Gateway).await;
    change(&mut stack.settings.gateway);
    stack.start_component(Target::Gateway).await;
}

async fn create_user(stack: &Stack, name: &str) -> User {
    stack
        .users_client()
        .await
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: name.into(),
                email: format!("{}@example.com", name.to_lowercase()),
                ..User::default()
            }),
        })
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
        .unwrap_or_else(|status| panic!("create user: {status:?}"))
}

async fn rename(stack: &Stack, user: &User, name: &str) -> i64 {
    stack
        .users_client()
        .await
        .update_user(UpdateUserRequest {
            user: Some(User {
                display_name: name.into(),
                ..user.clone()
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().user.unwrap_or_default().revision)
        .unwrap_or_else(|status| panic!("rename: {status:?}"))
}

async fn set_options(stack: &Stack, contract: &Contract, options: Vec<ContractOption>) -> i64 {
    stack
        .contracts_client()
        .await
        .update_contract(UpdateContractRequest {
            contract: Some(Contract {
                options,
                ..contract.clone()
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default().revision)
        .unwrap_or_else(|status| panic!("update contract: {status:?}"))
}

async fn create_photo(stack: &Stack, user_id: &str, title: &str) -> Photo {
    stack
        .photos_client()
        .await
        .create_photo(CreatePhotoRequest {
            photo: Some(Photo {
                user_id: user_id.into(),
                title: title.into(),
                content_type: "image/jpeg".into(),
                size_bytes: 1,
                ..Photo::default()
            }),
        })
        .await
        .map(|r| r.into_inner().photo.unwrap_or_default())
        .unwrap_or_else(|status| panic!("create photo: {status:?}"))
}

/// Waits until Photos' copies hold `user` and `contract` (uploads need both).
async fn photos_know(stack: &Stack, user: &User, contract: &Contract) {
    stack
        .photos_client()
        .await
        .get_profile(lightbox_api::photos::GetProfileRequest {
            user_id: user.id.clone(),
            min_users_revision: user.revision,
            min_contracts_revision: contract.revision,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("Photos' copies do not catch up: {status:?}"));
}

/// Changes each user should see: (event, revision), in the order made.
type Expected = HashMap<String, Vec<(String, i64)>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_phones_share_one_watch_per_upstream_and_each_gets_exactly_its_own_changes() {
    const PHONES: usize = 1000;
    const CUSTOMERS: usize = 30;
    let mut stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    // Heartbeats at the default pace: a thousand phones idle most of the time.
    gateway_with(&mut stack, |options| options.heartbeat = Duration::from_secs(15)).await;
    let stack = Arc::new(stack);

    // Users, a few of them customers (a contract: they may upload photos).
    let mut customers = Vec::new();
    for i in 0..CUSTOMERS {
        customers.push(customer(&stack, &format!("c{i}@example.com"), "100").await);
    }
    let mut users: Vec<User> = customers.iter().map(|(user, _)| user.clone()).collect();
    let creators: Vec<_> = (0..4)
        .map(|worker| {
            let stack = Arc::clone(&stack);
            tokio::spawn(async move {
                let mut made = Vec::new();
                for i in (CUSTOMERS + worker..PHONES).step_by(4) {
                    made.push(create_user(&stack, &format!("U{i}")).await);
                }
                made
            })
        })
        .collect();
    for creator in creators {
        users.extend(creator.await.unwrap_or_else(|err| panic!("{err}")));
    }
    let (last_user, last_contract) = &customers[CUSTOMERS - 1];
    photos_know(&stack, last_user, last_contract).await;
    let baseline = watchers(&stack);

    // A thousand phones, each its own user, on a few HTTP clients.
    let clients: Vec<Client> = (0..4).map(|_| Client::new()).collect();
    let synced = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<HashMap<String, Vec<Event>>>> = Arc::default();
    let mut phones = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (stack, http, synced, seen) = (
            Arc::clone(&stack),
            clients[i % 4].clone(),
            Arc::clone(&synced),
            Arc::clone(&seen),
        );
        let user_id = user.id.clone();
        phones.push(tokio::spawn(async move {
            let mut events = open(&http, &stack, &user_id, None).await;
            events.synced().await;
            synced.fetch_add(1, Ordering::SeqCst);
            while let Some(event) = events.next().await {
                if event.change().is_some() || event.name == "end" {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(user_id.clone())
                        .or_default()
                        .push(event);
                }
            }
        }));
    }
    eventually("every phone has its snapshot", || async {
        (synced.load(Ordering::SeqCst) == PHONES).then_some(())
    })
    .await;
    one_gateway_watch_per_upstream(&stack, baseline).await;

    // A writer renames random users, uploads for some customers, changes
    // some contracts.
    let mut expected: Expected = HashMap::new();
    for i in 0..300 {
        let user = &users[fastrand::usize(..PHONES)];
        let revision = rename(&stack, user, &format!("renamed {i}")).await;
        expected
            .entry(user.id.clone())
            .or_default()
            .push(("user".into(), revision));
    }
    for (i, (user, contract)) in customers.iter().enumerate() {
        let photo = create_photo(&stack, &user.id, &format!("p{i}")).await;
        expected
            .entry(user.id.clone())
            .or_default()
            .push(("photo".into(), photo.revision));
        if i % 2 == 0 {
            let revision = set_options(&stack, contract, vec![lightbox_testkit::photo_quota("200")]).await;
            expected
                .entry(user.id.clone())
                .or_default()
                .push(("contract".into(), revision));
        }
    }
    let total: usize = expected.values().map(Vec::len).sum();
    eventually("every change reaches its phone", || async {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        (seen.values().map(Vec::len).sum::<usize>() >= total).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for user in &users {
        let got: Vec<(String, i64)> = seen
            .get(&user.id)
            .into_iter()
            .flatten()
            .map(|event| match event.change() {
                Some((name, revision, owner)) => {
                    assert_eq!(owner, user.id, "{} got another user's change: {event:?}", user.id);
                    (name.to_owned(), revision)
                }
                None => panic!("{}'s stream ended: {event:?}", user.id),
            })
            .collect();
        let mut want = expected.get(&user.id).cloned().unwrap_or_default();
        let mut got_sorted = got.clone();
        want.sort();
        got_sorted.sort();
        assert_eq!(got_sorted, want, "{}: exactly its own changes, once each", user.id);
    }
    assert_eq!(
        watchers(&stack)
            .iter()
            .zip(baseline)
            .map(|(n, b)| n - b)
            .collect::<Vec<_>>(),
        [1, 1, 1]
    );
    for phone in phones {
        phone.abort();
        let _ = phone.await;
    }
    drop(clients);
    match Arc::try_unwrap(stack) {
        Ok(stack) => stack.stop().await,
        Err(_) => panic!("the stack is still shared"),
    }
}

/// Contract options as large as they may be (64 values of 256 four-byte
/// characters): each change is a ~70 KB event, so a phone that stops
/// reading fills the socket buffers and then its queue with few writes.
fn big_options(i: usize) -> Vec<ContractOption> {
    (0..64)
        .map(|n| ContractOption {
            code: format!("o{n}"),
            value: if n == 0 { i.to_string() } else { "𝄞".repeat(256) },
            enabled: true,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_that_stops_reading_is_ended_clearly_and_resumes_without_loss() {
    let mut stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    gateway_with(&mut stack, |options| options.phone_queue = 8).await;
    let (slow, contract) = customer(&stack, "slow@example.com", "10").await;
    // A photo, so that every source of the phone's cursor is past 0 (a
    // cursor at 0 resumes with a snapshot, empty or not).
    photos_know(&stack, &slow, &contract).await;
    create_photo(&stack, &slow.id, "first").await;
    let brisk = create_user(&stack, "Brisk").await;
    let baseline = watchers(&stack);
    let (slow_http, brisk_http) = (Client::new(), Client::new());
    let mut stalled = open(&slow_http, &stack, &slow.id, None).await;
    stalled.synced().await;
    let mut reading = open(&brisk_http, &stack, &brisk.id, None).await;
    reading.synced().await;
    one_gateway_watch_per_upstream(&stack, baseline).await;

    // The slow phone reads nothing more: far more than the socket buffers
    // and its queue hold. The other phone keeps getting its changes.
    let mut updates = Vec::new();
    for round in 0..8 {
        for i in 0..50 {
            updates.push(set_options(&stack, &contract, big_options(round * 50 + i)).await);
        }
        let revision = rename(&stack, &brisk, &format!("brisk {round}")).await;
        let got = reading.event().await;
        assert_eq!(got.change(), Some(("user", revision, brisk.id.as_str())), "{got:?}");
    }

    // It drains what was sent and queued, then gets the end event, then
    // the stream closes.
    let mut before = Vec::new();
    let end = loop {
        match stalled.next().await {
            Some(event) if event.name == "end" => break event,
            Some(event) => before.extend(event.change().map(|(_, revision, _)| revision)),
            None => panic!("the stream closed without an end event"),
        }
    };
    assert_eq!(end.data["resume"], true, "{end:?}");
    assert!(
        end.data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("behind") && r.contains("Last-Event-ID")),
        "{end:?}"
    );
    assert!(stalled.next().await.is_none(), "the stream closes after the end event");
    assert!(before.len() < updates.len(), "it was ended before it got everything");
    assert_eq!(
        before,
        updates[..before.len()],
        "what it got came in order, nothing skipped"
    );

    // Resuming from the end event's id: the rest, nothing repeated.
    let mut resumed = open(&slow_http, &stack, &slow.id, Some(&end.id)).await;
    let mut after = Vec::new();
    while after.len() < updates.len() - before.len() {
        let event = resumed.event().await;
        assert!(!["synced", "reset", "end"].contains(&event.name.as_str()), "{event:?}");
        after.extend(event.change().map(|(_, revision, _)| revision));
    }
    assert_eq!(after, updates[before.len()..], "the rest, in order, once each");
    drop((stalled, reading, resumed));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_a_gateway_restart_loses_nothing() {
    let mut stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let mut people = Vec::new();
    for i in 0..10 {
        people.push(customer(&stack, &format!("p{i}@example.com"), "100").await);
    }
    let (last_user, last_contract) = &people[people.len() - 1];
    photos_know(&stack, last_user, last_contract).await;
    let baseline = watchers(&stack);
    let http = Client::new();
    let mut streams = Vec::new();
    for (user, _) in &people {
        let mut events = open(&http, &stack, &user.id, None).await;
        let last = events.synced().await.last().map(|e| e.id.clone()).unwrap_or_default();
        streams.push((events, last));
    }
    one_gateway_watch_per_upstream(&stack, baseline).await;

    // Changes just before the restart (some arrive, some may not), and
    // while the gateway is away.
    let mut expected: Expected = HashMap::new();
    let mut write = async |stack: &Stack, round: usize| {
        for (i, (user, contract)) in people.iter().enumerate() {
            let changes = expected.entry(user.id.clone()).or_default();
            changes.push(("user".into(), rename(stack, user, &format!("r{round}.{i}")).await));
            changes.push((
                "photo".into(),
                create_photo(stack, &user.id, &format!("t{round}")).await.revision,
            ));
            let quota = lightbox_testkit::photo_quota(&format!("{}", 100 + round));
            changes.push(("contract".into(), set_options(stack, contract, vec![quota]).await));
        }
    };
    write(&stack, 0).await;
    stack.stop_component(Target::Gateway).await;
    let mut seen: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for ((events, last), (user, _)) in streams.iter_mut().zip(&people) {
        // Each stream ends with the gateway; it keeps what it got.
        while let Some(event) = events.next().await {
            if let Some((name, revision, _)) = event.change() {
                seen.entry(user.id.clone())
                    .or_default()
                    .push((name.to_owned(), revision));
            }
            *last = event.id;
        }
    }
    write(&stack, 1).await;
    stack.start_component(Target::Gateway).await;

    for ((_, last), (user, _)) in streams.iter().zip(&people) {
        let mut resumed = open(&http, &stack, &user.id, Some(last)).await;
        let want = expected.get(&user.id).map(Vec::len).unwrap_or_default();
        let got = seen.entry(user.id.clone()).or_default();
        while got.len() < want {
            let event = resumed.event().await;
            assert!(!["synced", "reset", "end"].contains(&event.name.as_str()), "{event:?}");
            if let Some((name, revision, owner)) = event.change() {
                assert_eq!(owner, user.id);
                got.push((name.to_owned(), revision));
            }
        }
        let (mut got, mut want) = (got.clone(), expected.get(&user.id).cloned().unwrap_or_default());
        got.sort();
        want.sort();
        assert_eq!(got, want, "{}: every change once, across the restart", user.id);
    }
    drop(streams);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_deletion_reaches_its_owner_only() {
    let stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, ada_contract) = customer(&stack, "ada@example.com", "10").await;
    let (bob, bob_contract) = customer(&stack, "bob@example.com", "10").await;
    photos_know(&stack, &ada, &ada_contract).await;
    photos_know(&stack, &bob, &bob_contract).await;
    let baseline = watchers(&stack);
    let http = Client::new();
    let mut adas = open(&http, &stack, &ada.id, None).await;
    adas.synced().await;
    let mut bobs = open(&http, &stack, &bob.id, None).await;
    bobs.synced().await;
    // Both are served by the fan-out now, not by watches of their own.
    one_gateway_watch_per_upstream(&stack, baseline).await;

    let photo = create_photo(&stack, &ada.id, "Harbour").await;
    let deleted = stack
        .photos_client()
        .await
        .delete_photo(lightbox_api::photos::DeletePhotoRequest {
            user_id: ada.id.clone(),
            id: photo.id.clone(),
        })
        .await
        .map(|r| r.into_inner().revision)
        .unwrap_or_else(|status| panic!("delete: {status:?}"));
    let bobs_photo = create_photo(&stack, &bob.id, "Later").await;

    let upsert = adas.event().await;
    assert_eq!(
        upsert.change(),
        Some(("photo", photo.revision, ada.id.as_str())),
        "{upsert:?}"
    );
    let delete = adas.event().await;
    assert_eq!(delete.change(), Some(("photo", deleted, ada.id.as_str())), "{delete:?}");
    assert_eq!(delete.data["kind"], "CHANGE_KIND_DELETE");
    assert_eq!(delete.data["photoId"], photo.id.as_str());
    assert!(
        delete.data["photo"].is_null(),
        "a deletion carries no photo, only its owner: {delete:?}"
    );
    // Bob's next photo event is his own, made after Ada's deletion: the
    // fan-out delivered hers to no one else.
    let his = bobs.event().await;
    assert_eq!(
        his.change(),
        Some(("photo", bobs_photo.revision, bob.id.as_str())),
        "{his:?}"
    );
    drop((adas, bobs));
    stack.stop().await;
}
