//! PostgreSQL restarted under load: every call that fails meanwhile answers
//! `UNAVAILABLE` saying the database is unreachable (503 at the gateway, in its words),
//! never `INTERNAL`; Photos' cached reads, from memory, never fail; the
//! pools reconnect and the watches resume by themselves (no component is
//! restarted); and nothing acknowledged is lost.
//!
//! What fails is what is in flight: the server's shutdown ends every
//! session, and a call cut in the middle fails. A call that asks for a
//! connection while the server is down waits for it (the pool retries a
//! refused connection until its acquire timeout, 10 s, far longer than a
//! restart) and then succeeds. So that the cut writes are not left to
//! chance, a write of each service is parked on a lock the test holds, and
//! its session ended mid-transaction just before the restart.
//!
//! It restarts the local PostgreSQL cluster (Debian's `pg_ctlcluster`, as
//! root, as `.ci/run` starts it), which ends every session of everyone using
//! that server: it runs only with `LIGHTBOX_TEST_POSTGRES_RESTART=1` (set by
//! CI), and is skipped with a notice otherwise. It is a test binary of its
//! own, with one test, so no other test of this repository shares the
//! restart (cargo runs test binaries one after another).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lightbox_api::{
    contracts::{
        Contract, CreateContractRequest, GetContractRequest, ListContractChangesRequest, Plan, UpdateContractRequest,
        contracts_service_client::ContractsServiceClient,
    },
    feed::{Source, StreamState},
    photos::{
        Consistency, CreatePhotoRequest, GetPhotoRequest, GetProfileRequest, GetProfileResponse,
        ListPhotoChangesRequest, ListPhotosRequest, Photo, photos_service_client::PhotosServiceClient,
    },
    users::{
        ContractRead, CreateUserRequest, GetUserRequest, ListUserChangesRequest, ListUsersRequest, UpdateUserRequest,
        User, users_service_client::UsersServiceClient,
    },
};
use lightbox_app::Target;
use lightbox_changefeed::FeedOptions;
use lightbox_testkit::{DEADLINE, Stack, TestDb, customer, eventually, photo_quota};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use tonic::{Code, Status, transport::Channel};

/// The variable that allows this test to restart the PostgreSQL server.
const RESTART_VAR: &str = "LIGHTBOX_TEST_POSTGRES_RESTART";

/// What every failure during the outage must say (the changefeed's
/// `From<FeedError> for ApiError`, passed on by the services that call
/// another one).
const UNREACHABLE: &str = "the database is unreachable";

/// Writer tasks.
const WRITERS: usize = 4;

/// The gateway's upload route, as a surface.
const UPLOAD: &str = "gateway POST /v1/users/me/photos";

/// The writes parked inside their transactions whose sessions are ended
/// (see [`park_writes`]): each must fail, and say why.
const PARKED: [&str; 3] = [
    "users.CreateUser (parked)",
    "contracts.CreateContract (parked)",
    "gateway POST /v1/users/me/photos (parked)",
];

/// The e-mail address the parked `CreateUser` claims.
const PARKED_EMAIL: &str = "parked@example.com";

/// Surfaces served from memory: they must never fail.
const FROM_MEMORY: [&str; 3] = [
    "photos.ListPhotos CACHED",
    "photos.GetProfile CACHED",
    "gateway GET /v1/users/me",
];

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// Every answer seen, by surface: how many were OK, and each failure (its
/// code and its message, ids masked) with how many times.
#[derive(Default)]
struct Outcomes {
    ok: BTreeMap<&'static str, u64>,
    failed: BTreeMap<(&'static str, String, String), u64>,
}

impl std::fmt::Display for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let surfaces: BTreeSet<&str> = self
            .ok
            .keys()
            .chain(self.failed.keys().map(|k| &k.0))
            .copied()
            .collect();
        for surface in surfaces {
            writeln!(f, "  {surface}: {} OK", self.ok.get(surface).copied().unwrap_or(0))?;
            for ((_, code, message), count) in self.failed.iter().filter(|(k, _)| k.0 == surface) {
                writeln!(f, "    {count} x {code}: {message}")?;
            }
        }
        Ok(())
    }
}

/// What the load acknowledged: the last state of each entity that answered
/// OK, each acknowledged revision, and the failed writes (which may have
/// committed all the same: the answer to a commit can be lost with the
/// connection).
#[derive(Default)]
struct Ledger {
    users: BTreeMap<String, User>,
    contracts: BTreeMap<String, Contract>,
    photos: BTreeMap<String, (String, i64)>,
    user_revisions: BTreeMap<i64, String>,
    contract_revisions: BTreeMap<i64, String>,
    photo_revisions: BTreeMap<i64, String>,
    failed_user_writes: usize,
    failed_contract_writes: usize,
    failed_photo_writes: usize,
}

impl Ledger {
    fn acked(&self) -> usize {
        self.user_revisions.len() + self.contract_revisions.len() + self.photo_revisions.len()
    }
}

/// Shared by the load tasks and the test.
#[derive(Default)]
struct Probe {
    outcomes: Mutex<Outcomes>,
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
}

impl Probe {
    fn outcomes(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        self.outcomes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ok(&self, surface: &'static str) {
        *self.outcomes().ok.entry(surface).or_default() += 1;
    }

    fn failed(&self, surface: &'static str, code: String, message: &str) {
        *self
            .outcomes()
            .failed
            .entry((surface, code, mask_ids(message)))
            .or_default() += 1;
    }

    /// Records a gRPC answer; the value if OK.
    fn grpc<T>(&self, surface: &'static str, result: Result<T, Status>) -> Option<T> {
        match result {
            Ok(value) => {
                self.ok(surface);
                Some(value)
            }
            Err(status) => {
                self.failed(surface, format!("{:?}", status.code()), status.message());
                None
            }
        }
    }

    /// Records a gateway answer; the body if 200.
    fn http(&self, surface: &'static str, answer: reqwest::Result<(StatusCode, String)>) -> Option<Value> {
        let (status, text) = match answer {
            Ok(answer) => answer,
            Err(err) => {
                self.failed(surface, "no HTTP answer".into(), &err.to_string());
                return None;
            }
        };
        let body: Value = match serde_json::from_str(&text) {
            Ok(body) => body,
            Err(_) => {
                self.failed(surface, format!("HTTP {} (body not JSON)", status.as_u16()), &text);
                return None;
            }
        };
        if status == StatusCode::OK {
            self.ok(surface);
            return Some(body);
        }
        // The gateway's error body: {"code": <gRPC code>, "message": "…"}.
        let code = format!("HTTP {} (gRPC code {})", status.as_u16(), body["code"]);
        self.failed(surface, code, body["message"].as_str().unwrap_or_default());
        None
    }

    fn user_write(&self, surface: &'static str, result: Result<User, Status>) -> Option<User> {
        let user = self.grpc(surface, result);
        let mut ledger = self.ledger();
        match &user {
            Some(user) => {
                ledger.user_revisions.insert(user.revision, user.id.clone());
                ledger.users.insert(user.id.clone(), user.clone());
            }
            None => ledger.failed_user_writes += 1,
        }
        user
    }

    fn contract_write(&self, surface: &'static str, result: Result<Contract, Status>) -> Option<Contract> {
        let contract = self.grpc(surface, result);
        let mut ledger = self.ledger();
        match &contract {
            Some(contract) => {
                ledger.contract_revisions.insert(contract.revision, contract.id.clone());
                ledger.contracts.insert(contract.id.clone(), contract.clone());
            }
            None => ledger.failed_contract_writes += 1,
        }
        contract
    }

    /// Records an upload through the gateway; the photo's id if OK.
    fn photo_write(&self, surface: &'static str, answer: reqwest::Result<(StatusCode, String)>) -> Option<String> {
        let body = self.http(surface, answer);
        let mut ledger = self.ledger();
        let Some(body) = body else {
            ledger.failed_photo_writes += 1;
            return None;
        };
        let photo = &body["photo"];
        let id = photo["id"].as_str().unwrap_or_default().to_owned();
        let owner = photo["userId"].as_str().unwrap_or_default().to_owned();
        let revision: i64 = photo["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_default();
        assert!(
            !id.is_empty() && revision > 0,
            "an upload answered 200 without its photo: {body}"
        );
        ledger.photo_revisions.insert(revision, id.clone());
        ledger.photos.insert(id.clone(), (owner, revision));
        Some(id)
    }
}

/// `message` with every UUID replaced by `<id>`, so that the same failure
/// about different entities is counted once.
fn mask_ids(message: &str) -> String {
    let bytes = message.as_bytes();
    let is_id = |at: usize| {
        bytes.get(at..at + 36).is_some_and(|candidate| {
            candidate.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
        })
    };
    let (mut out, mut at, mut copied) = (String::new(), 0, 0);
    while at < bytes.len() {
        if is_id(at) {
            out.push_str(&message[copied..at]);
            out.push_str("<id>");
            at += 36;
            copied = at;
        } else {
            at += 1;
        }
    }
    out.push_str(&message[copied..]);
    out
}

/// A signed-in phone of the stack's gateway.
#[derive(Clone)]
struct Phone {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Phone {
    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<(StatusCode, String)> {
        let response = request.bearer_auth(&self.token).send().await?;
        let status = response.status();
        Ok((status, response.text().await?))
    }

    async fn get(&self, path: &str) -> reqwest::Result<(StatusCode, String)> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Result<(StatusCode, String)> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn upload(&self, probe: &Probe, surface: &'static str, title: &str) -> Option<String> {
        let photo = json!({ "title": title, "contentType": "image/jpeg", "sizeBytes": "2048" });
        probe.photo_write(surface, self.post("/v1/users/me/photos", photo).await)
    }
}

fn new_user(email: &str) -> CreateUserRequest {
    CreateUserRequest {
        user: Some(User {
            display_name: "Writer".into(),
            email: email.into(),
            ..User::default()
        }),
    }
}

fn new_contract(holder: &str) -> CreateContractRequest {
    CreateContractRequest {
        contract: Some(Contract {
            holder_user_id: holder.into(),
            plan: Plan::Standard as i32,
            options: vec![photo_quota("10")],
            ..Contract::default()
        }),
    }
}

/// `user`, now holding `contract_id` (every updatable field sent, no
/// expected revision: a retry after an answer lost with the connection
/// must not be refused as stale).
fn link(user: &User, contract_id: &str) -> UpdateUserRequest {
    UpdateUserRequest {
        user: Some(User {
            contract_id: contract_id.into(),
            ..user.clone()
        }),
        update_mask: None,
        expected_revision: 0,
    }
}

fn requota(contract: &Contract, quota: usize) -> UpdateContractRequest {
    UpdateContractRequest {
        contract: Some(Contract {
            options: vec![photo_quota(&quota.to_string())],
            ..contract.clone()
        }),
        update_mask: None,
        expected_revision: 0,
    }
}

fn cached_profile(user_id: &str, min_users_revision: i64, min_contracts_revision: i64) -> GetProfileRequest {
    GetProfileRequest {
        user_id: user_id.into(),
        consistency: Consistency::Cached as i32,
        min_users_revision,
        min_contracts_revision,
        max_staleness: None,
    }
}

/// Between two calls of a load loop.
async fn pace() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Creates a user, their contract, links them and changes the contract,
/// over and over, each step only after the one before it answered OK.
async fn writer(
    probe: Arc<Probe>,
    n: usize,
    mut users: UsersServiceClient<Channel>,
    mut contracts: ContractsServiceClient<Channel>,
) {
    let mut round = 0;
    while !probe.stop.load(Ordering::SeqCst) {
        round += 1;
        pace().await;
        let created = users
            .create_user(new_user(&format!("writer{n}-{round}@example.com")))
            .await;
        let Some(user) = probe.user_write(
            "users.CreateUser",
            created.map(|r| r.into_inner().user.unwrap_or_default()),
        ) else {
            continue;
        };
        let created = contracts.create_contract(new_contract(&user.id)).await;
        let Some(contract) = probe.contract_write(
            "contracts.CreateContract",
            created.map(|r| r.into_inner().contract.unwrap_or_default()),
        ) else {
            continue;
        };
        let linked = users.update_user(link(&user, &contract.id)).await;
        if probe
            .user_write(
                "users.UpdateUser",
                linked.map(|r| r.into_inner().user.unwrap_or_default()),
            )
            .is_none()
        {
            continue;
        }
        let updated = contracts.update_contract(requota(&contract, round)).await;
        probe.contract_write(
            "contracts.UpdateContract",
            updated.map(|r| r.into_inner().contract.unwrap_or_default()),
        );
    }
}

/// Reads of Users: `GetUser` (with the hop to Contracts) and `ListUsers`.
async fn users_reader(probe: Arc<Probe>, user_id: String, mut users: UsersServiceClient<Channel>) {
    while !probe.stop.load(Ordering::SeqCst) {
        pace().await;
        let got = users
            .get_user(GetUserRequest {
                id: user_id.clone(),
                include_contract: true,
                contract_read: ContractRead::UpstreamOrCache as i32,
            })
            .await;
        probe.grpc("users.GetUser", got);
        let listed = users
            .list_users(ListUsersRequest {
                page_size: 20,
                page_token: String::new(),
            })
            .await;
        probe.grpc("users.ListUsers", listed);
    }
}

/// Photos' cached reads of one customer, which must always come from the
/// copies.
async fn photos_reader(probe: Arc<Probe>, user_id: String, mut photos: PhotosServiceClient<Channel>) {
    let from_cache = |source: Option<i32>| source == Some(Source::Cache as i32);
    while !probe.stop.load(Ordering::SeqCst) {
        pace().await;
        let listed = photos
            .list_photos(ListPhotosRequest {
                user_id: user_id.clone(),
                consistency: Consistency::Cached as i32,
                ..ListPhotosRequest::default()
            })
            .await
            .map(|r| r.into_inner());
        if let Some(answer) = probe.grpc("photos.ListPhotos CACHED", listed) {
            assert!(
                from_cache(answer.user_freshness.as_ref().map(|f| f.source))
                    && from_cache(answer.contract_freshness.as_ref().map(|f| f.source))
                    && !answer.photos.is_empty(),
                "a cached list not from the copies: {answer:?}"
            );
        }
        let profile = photos
            .get_profile(cached_profile(&user_id, 0, 0))
            .await
            .map(|r| r.into_inner());
        if let Some(answer) = probe.grpc("photos.GetProfile CACHED", profile) {
            assert!(
                from_cache(answer.user_freshness.as_ref().map(|f| f.source)),
                "a cached profile not from the copy: {answer:?}"
            );
        }
    }
}

/// A phone: its profile (from Photos' copies) and uploads (Photos' database).
async fn phone(probe: Arc<Probe>, phone: Phone) {
    let mut round = 0;
    while !probe.stop.load(Ordering::SeqCst) {
        round += 1;
        pace().await;
        probe.http("gateway GET /v1/users/me", phone.get("/v1/users/me").await);
        phone.upload(&probe, UPLOAD, &format!("load {round}")).await;
    }
}

/// A connection to the database at `url` that has run `statement` (binding
/// `value`) in a transaction it keeps open: its locks are held until the
/// connection goes.
async fn hold(url: &str, statement: &'static str, value: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"));
    sqlx::raw_sql("BEGIN")
        .execute(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("BEGIN on {url}: {err}"));
    sqlx::query(statement)
        .bind(value)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("{statement} on {url}: {err}"));
    conn
}

/// Parks a write of each service inside its transaction, so that the
/// restart cuts writes in flight every time, not only when the load happens
/// to be mid-transaction: the test holds, uncommitted, the e-mail address a
/// `CreateUser` then claims (it waits in the `user_emails` insert, holding
/// Users' write lock: the path that answered `INTERNAL` before), and the
/// write locks of Contracts and Photos (their feeds' counter rows, taken by
/// `Feed::begin`) that a `CreateContract` and an upload through the gateway
/// then wait for. Answers once all three wait; the held connections and the
/// parked calls (each answering whether it failed, as it must).
///
/// The waiters then lose their connections with [`terminate_waiters`]:
/// left to the restart, whose shutdown signals every session at once, a
/// waiter whose lock holder happens to go first would finish the statement
/// it waited in, and fail only in the next one.
async fn park_writes(
    stack: &Stack,
    probe: &Arc<Probe>,
    phone: &Phone,
    holder: &str,
) -> (Vec<sqlx::PgConnection>, Vec<tokio::task::JoinHandle<bool>>) {
    let held = vec![
        hold(
            stack.db(Target::Users).url(),
            "INSERT INTO user_emails (email, user_id) VALUES ($1, 'held by the test')",
            PARKED_EMAIL,
        )
        .await,
        hold(
            stack.db(Target::Contracts).url(),
            "UPDATE feed_state SET revision = revision WHERE feed = $1",
            "contracts", // lightbox_contracts::FEED
        )
        .await,
        hold(
            stack.db(Target::Photos).url(),
            "UPDATE feed_state SET revision = revision WHERE feed = $1",
            lightbox_photos::FEED,
        )
        .await,
    ];
    let mut users = stack.users_client().await;
    let mut contracts = stack.contracts_client().await;
    let (p, phone, holder) = (Arc::clone(probe), phone.clone(), holder.to_owned());
    let parked = vec![
        tokio::spawn({
            let probe = Arc::clone(&p);
            async move {
                let created = users.create_user(new_user(PARKED_EMAIL)).await;
                let created = created.map(|r| r.into_inner().user.unwrap_or_default());
                probe.user_write(PARKED[0], created).is_none()
            }
        }),
        tokio::spawn({
            let probe = Arc::clone(&p);
            async move {
                let created = contracts.create_contract(new_contract(&holder)).await;
                let created = created.map(|r| r.into_inner().contract.unwrap_or_default());
                probe.contract_write(PARKED[1], created).is_none()
            }
        }),
        tokio::spawn(async move { phone.upload(&p, PARKED[2], "parked").await.is_none() }),
    ];
    let databases: Vec<String> = [Target::Users, Target::Contracts, Target::Photos]
        .into_iter()
        .map(|target| database_name(stack, target))
        .collect();
    let server = postgres_server();
    eventually("a write to wait for the test's locks in each database", || async {
        let mut conn = sqlx::PgConnection::connect(&server).await.ok()?;
        let waiting: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT datname::text FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                .fetch_all(&mut conn)
                .await
                .ok()?;
        databases.iter().all(|db| waiting.contains(db)).then_some(())
    })
    .await;
    (held, parked)
}

/// Ends, as the server's shutdown does (`pg_terminate_backend`: "terminating
/// connection due to administrator command"), the connection of every
/// session of the stack's databases that waits for a lock: the parked writes
/// and the load's writes queued behind the test's locks. Answers how many.
async fn terminate_waiters(stack: &Stack) -> i64 {
    let databases: Vec<String> = [Target::Users, Target::Contracts, Target::Photos]
        .into_iter()
        .map(|target| database_name(stack, target))
        .collect();
    let server = postgres_server();
    let mut conn = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {server}: {err}"));
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = ANY($1)",
    )
    .bind(databases)
    .fetch_one(&mut conn)
    .await
    .unwrap_or_else(|err| panic!("cannot terminate the waiting sessions: {err}"))
}

/// The name of `target`'s database.
fn database_name(stack: &Stack, target: Target) -> String {
    let url = stack.db(target).url();
    url.rsplit('/').next().unwrap_or(url).to_owned()
}

/// The PostgreSQL server the tests use (as the testkit reads it).
fn postgres_server() -> String {
    std::env::var("LIGHTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Restarts the local PostgreSQL cluster (`pg_ctlcluster VERSION main
/// restart`, VERSION the one directory of /etc/postgresql) and waits for the
/// server to accept connections again. Fails the test with the command's
/// output if it fails.
async fn restart_postgres() {
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .unwrap_or_else(|err| panic!("cannot list /etc/postgresql (is PostgreSQL installed here?): {err}"))
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let [version] = versions.as_slice() else {
        panic!("expected exactly one PostgreSQL version in /etc/postgresql, found {versions:?}");
    };
    let restart = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", "restart"])
        .output();
    let output = match tokio::time::timeout(DEADLINE, restart).await {
        Err(_) => panic!("pg_ctlcluster {version} main restart did not finish within {DEADLINE:?}"),
        Ok(Err(err)) => panic!("cannot run pg_ctlcluster: {err}"),
        Ok(Ok(output)) => output,
    };
    assert!(
        output.status.success(),
        "pg_ctlcluster {version} main restart failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout),
    );
    let server = postgres_server();
    eventually("PostgreSQL to accept connections again (pg_isready)", || async {
        let ready = tokio::process::Command::new("pg_isready")
            .args(["-q", "-d", &server])
            .status()
            .await
            .unwrap_or_else(|err| panic!("cannot run pg_isready: {err}"));
        ready.success().then_some(())
    })
    .await;
}

/// Every change in a changelog after `since` (> 0): (revision, id) pairs, and
/// the head.
async fn changelog<F, Fut>(what: &str, mut since: i64, mut page: F) -> (BTreeMap<i64, String>, i64)
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<(Vec<(i64, String)>, i64, bool), Status>>,
{
    assert!(since > 0, "{what}: listing from 0 lists the state, not the changes");
    let mut changes = BTreeMap::new();
    loop {
        let (page, next, reset) = page(since)
            .await
            .unwrap_or_else(|status| panic!("listing the {what} changes: {status:?}"));
        assert!(!reset, "the {what} changelog was reset under the test");
        if page.is_empty() {
            return (changes, since.max(next));
        }
        changes.extend(page);
        since = next;
    }
}

async fn users_changelog(stack: &Stack, since: i64) -> (BTreeMap<i64, String>, i64) {
    let client = stack.users_client().await;
    changelog("users", since, |since| {
        let mut client = client.clone();
        async move {
            let request = ListUserChangesRequest {
                since_revision: since,
                page_size: 1000,
                page_token: String::new(),
            };
            let page = client.list_user_changes(request).await?.into_inner();
            let changes = page.changes.into_iter().map(|c| (c.revision, c.user_id)).collect();
            Ok((changes, page.next_since_revision, page.reset.is_some()))
        }
    })
    .await
}

async fn contracts_changelog(stack: &Stack, since: i64) -> (BTreeMap<i64, String>, i64) {
    let client = stack.contracts_client().await;
    changelog("contracts", since, |since| {
        let mut client = client.clone();
        async move {
            let request = ListContractChangesRequest {
                since_revision: since,
                page_size: 1000,
                page_token: String::new(),
            };
            let page = client.list_contract_changes(request).await?.into_inner();
            let changes = page.changes.into_iter().map(|c| (c.revision, c.contract_id)).collect();
            Ok((changes, page.next_since_revision, page.reset.is_some()))
        }
    })
    .await
}

async fn photos_changelog(stack: &Stack, since: i64) -> (BTreeMap<i64, String>, i64) {
    let client = stack.photos_client().await;
    changelog("photos", since, |since| {
        let mut client = client.clone();
        async move {
            let request = ListPhotoChangesRequest {
                since_revision: since,
                page_size: 1000,
                page_token: String::new(),
            };
            let page = client.list_photo_changes(request).await?.into_inner();
            let changes = page.changes.into_iter().map(|c| (c.revision, c.photo_id)).collect();
            Ok((changes, page.next_since_revision, page.reset.is_some()))
        }
    })
    .await
}

/// Every acknowledged revision is in the changelog, for the entity it was
/// acknowledged for; the changelog holds no more than the acknowledged
/// writes and the failed ones (whose commit may have gone through with its
/// answer lost).
fn check_changelog(what: &str, logged: &BTreeMap<i64, String>, acked: &BTreeMap<i64, String>, failed: usize) {
    for (revision, id) in acked {
        assert_eq!(
            logged.get(revision),
            Some(id),
            "{what}: revision {revision} was acknowledged for {id}, the changelog says otherwise"
        );
    }
    assert!(
        logged.len() >= acked.len() && logged.len() <= acked.len() + failed,
        "{what}: {} changes in the changelog for {} acknowledged writes and {failed} failed ones",
        logged.len(),
        acked.len()
    );
}

async fn get_user(stack: &Stack, id: &str, contract_read: ContractRead) -> Result<(User, Option<Contract>), Status> {
    let answer = stack
        .users_client()
        .await
        .get_user(GetUserRequest {
            id: id.into(),
            include_contract: contract_read != ContractRead::Unspecified,
            contract_read: contract_read as i32,
        })
        .await?
        .into_inner();
    Ok((answer.user.unwrap_or_default(), answer.contract))
}

async fn get_contract(stack: &Stack, id: &str) -> Contract {
    stack
        .contracts_client()
        .await
        .get_contract(GetContractRequest { id: id.into() })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default())
        .unwrap_or_else(|status| panic!("get contract {id} after the outage: {status:?}"))
}

async fn get_profile(stack: &Stack, request: GetProfileRequest) -> Result<GetProfileResponse, Status> {
    stack
        .photos_client()
        .await
        .get_profile(request)
        .await
        .map(|r| r.into_inner())
}

/// `profile` is served from Photos' copies, connected, and holds `user` and
/// `contract` exactly.
fn served_from_the_copies(profile: &GetProfileResponse, user: &User, contract: Option<&Contract>) -> bool {
    let cached_and_connected = |freshness: Option<&lightbox_api::feed::Freshness>| {
        freshness.is_some_and(|f| {
            f.source == Source::Cache as i32
                && f.stream_state
                    .as_ref()
                    .is_some_and(|s| s.state == StreamState::Connected as i32)
        })
    };
    profile.user.as_ref() == Some(user)
        && profile.contract.as_ref() == contract
        && cached_and_connected(profile.user_freshness.as_ref())
        && (contract.is_none() || cached_and_connected(profile.contract_freshness.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_is_unavailable_then_recovers_losing_nothing() {
    if !std::env::var(RESTART_VAR).is_ok_and(|v| v == "1") {
        // Straight to stderr, past the test harness's capture.
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: the PostgreSQL restart test SKIPPED: it restarts the local PostgreSQL server, ending \
             everyone's sessions on it. Set {RESTART_VAR}=1 to run it (CI does)."
        );
        return;
    }
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let started = Instant::now();
    let stack = Stack::start(db, feed_options()).await;
    let probe = Arc::new(Probe::default());

    // A customer with a photo, in Photos' copies: what the readers read.
    let (reader, reader_contract) = customer(&stack, "reader@example.com", "100000").await;
    eventually("Photos' copies to hold the reader", || async {
        get_profile(
            &stack,
            cached_profile(&reader.id, reader.revision, reader_contract.revision),
        )
        .await
        .ok()
    })
    .await;
    let photo = stack
        .photos_client()
        .await
        .create_photo(CreatePhotoRequest {
            photo: Some(Photo {
                user_id: reader.id.clone(),
                title: "before".into(),
                content_type: "image/jpeg".into(),
                size_bytes: 2048,
                ..Photo::default()
            }),
        })
        .await
        .map(|r| r.into_inner().photo.unwrap_or_default())
        .unwrap_or_else(|status| panic!("upload before the load: {status:?}"));
    let (users_start, contracts_start, photos_start) = (reader.revision, reader_contract.revision, photo.revision);

    // The load.
    let the_phone = Phone {
        http: reqwest::Client::builder()
            .timeout(DEADLINE)
            .build()
            .unwrap_or_else(|err| panic!("HTTP client: {err}")),
        base: stack.gateway_url(),
        token: stack.token(&reader.id),
    };
    let mut load = Vec::new();
    for n in 0..WRITERS {
        let (users, contracts) = (stack.users_client().await, stack.contracts_client().await);
        load.push(tokio::spawn(writer(Arc::clone(&probe), n, users, contracts)));
    }
    load.push(tokio::spawn(users_reader(
        Arc::clone(&probe),
        reader.id.clone(),
        stack.users_client().await,
    )));
    load.push(tokio::spawn(photos_reader(
        Arc::clone(&probe),
        reader.id.clone(),
        stack.photos_client().await,
    )));
    load.push(tokio::spawn(phone(Arc::clone(&probe), the_phone.clone())));
    eventually("the load to be under way (20 writes acknowledged)", || async {
        (probe.ledger().acked() >= 20).then_some(())
    })
    .await;

    // The outage, mid-run: writes of each service lose their connections in
    // the middle of their transactions, then the server restarts.
    let (held, parked) = park_writes(&stack, &probe, &the_phone, &reader.id).await;
    let terminated = terminate_waiters(&stack).await;
    assert!(terminated >= 3, "only {terminated} waiting sessions terminated");
    for call in parked {
        let failed = call.await.unwrap_or_else(|err| panic!("a parked write failed: {err}"));
        assert!(failed, "a write whose connection was terminated answered OK");
    }
    let restart_began = Instant::now();
    restart_postgres().await;
    let back = Instant::now();
    drop(held);
    let acked_at_restart = probe.ledger().acked();
    eprintln!(
        "PostgreSQL restarted in {:?} ({acked_at_restart} writes acknowledged before it was back)",
        back - restart_began
    );

    // Recovery, with no component restarted: writes go through again (the
    // pools reconnect), and the watches resume (the copies follow).
    let (users, contracts) = (stack.users_client().await, stack.contracts_client().await);
    let newcomer = eventually("Users to accept a write again", || {
        let mut users = users.clone();
        let probe = &probe;
        async move {
            let created = users.create_user(new_user("newcomer@example.com")).await;
            probe.user_write(
                "users.CreateUser",
                created.map(|r| r.into_inner().user.unwrap_or_default()),
            )
        }
    })
    .await;
    let users_back = back.elapsed();
    let contract = eventually("Contracts to accept a write again", || {
        let mut contracts = contracts.clone();
        let (probe, holder) = (&probe, &newcomer.id);
        async move {
            let created = contracts.create_contract(new_contract(holder)).await;
            probe.contract_write(
                "contracts.CreateContract",
                created.map(|r| r.into_inner().contract.unwrap_or_default()),
            )
        }
    })
    .await;
    let contracts_back = back.elapsed();
    let newcomer = eventually("Users to link the new contract", || {
        let mut users = users.clone();
        let (probe, newcomer, contract) = (&probe, &newcomer, &contract);
        async move {
            let linked = users.update_user(link(newcomer, &contract.id)).await;
            probe.user_write(
                "users.UpdateUser",
                linked.map(|r| r.into_inner().user.unwrap_or_default()),
            )
        }
    })
    .await;
    eventually("Photos to accept an upload again", || async {
        the_phone.upload(&probe, UPLOAD, "after the restart").await
    })
    .await;
    let photos_back = back.elapsed();
    eventually("Photos' copies to serve the newcomer, cached", || async {
        let profile = get_profile(
            &stack,
            cached_profile(&newcomer.id, newcomer.revision, contract.revision),
        )
        .await
        .ok()?;
        served_from_the_copies(&profile, &newcomer, Some(&contract)).then_some(())
    })
    .await;
    let photos_copies_back = back.elapsed();
    eventually("Users' copy of contracts to hold the newcomer's contract", || async {
        let (_, cached) = get_user(&stack, &newcomer.id, ContractRead::Cache).await.ok()?;
        (cached.as_ref() == Some(&contract)).then_some(())
    })
    .await;
    let users_copy_back = back.elapsed();
    eprintln!(
        "after PostgreSQL was back: users wrote after {users_back:?}, contracts after {contracts_back:?}, \
         photos after {photos_back:?}; Photos' copies served the newcomer after {photos_copies_back:?}, \
         Users' copy of contracts after {users_copy_back:?}"
    );

    // More load on the recovered stack, then stop it.
    eventually("20 more writes acknowledged after the restart", || async {
        (probe.ledger().acked() >= acked_at_restart + 20).then_some(())
    })
    .await;
    probe.stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap_or_else(|err| panic!("a load task failed: {err}"));
    }

    // Every failure said UNAVAILABLE, the database is unreachable (503 at
    // the gateway, in its own words: the cause stays in its log); what is
    // served from memory never failed.
    let outcomes = std::mem::take(&mut *probe.outcomes());
    eprintln!("answers seen (surface: OK count; failures by code and message):\n{outcomes}");
    let unexpected: Vec<_> = outcomes
        .failed
        .keys()
        .filter(|(surface, code, message)| {
            let expected = if surface.starts_with("gateway") {
                code == "HTTP 503 (gRPC code 14)" && message == lightbox_gateway::error::UPSTREAM_UNAVAILABLE
            } else {
                code == &format!("{:?}", Code::Unavailable) && message.contains(UNREACHABLE)
            };
            FROM_MEMORY.contains(surface) || !expected
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "failures other than UNAVAILABLE \"{UNREACHABLE}\", or on reads served from memory: {unexpected:#?}\n\
         every answer seen:\n{outcomes}"
    );
    for surface in PARKED {
        assert!(
            outcomes.failed.keys().any(|(failed, _, _)| *failed == surface),
            "{surface} did not fail\n{outcomes}"
        );
    }

    // Nothing acknowledged is lost: each entity is there at its acknowledged
    // revision (or later, if a write whose answer was lost went through),
    // and the changelogs hold every acknowledged revision.
    let ledger = std::mem::take(&mut *probe.ledger());
    for (id, acked) in &ledger.users {
        let (user, _) = get_user(&stack, id, ContractRead::Unspecified)
            .await
            .unwrap_or_else(|status| panic!("get user {id} after the outage: {status:?}"));
        assert!(
            user.revision > acked.revision || user == *acked,
            "user {id}: acknowledged {acked:?}, now {user:?}"
        );
    }
    for (id, acked) in &ledger.contracts {
        let contract = get_contract(&stack, id).await;
        assert!(
            contract.revision > acked.revision || contract == *acked,
            "contract {id}: acknowledged {acked:?}, now {contract:?}"
        );
    }
    let mut photos = stack.photos_client().await;
    for (id, (owner, revision)) in &ledger.photos {
        let photo = photos
            .get_photo(GetPhotoRequest {
                id: id.clone(),
                user_id: owner.clone(),
            })
            .await
            .map(|r| r.into_inner().photo.unwrap_or_default())
            .unwrap_or_else(|status| panic!("get photo {id} after the outage: {status:?}"));
        assert_eq!(photo.revision, *revision, "photo {id}");
    }
    let (users_logged, users_head) = users_changelog(&stack, users_start).await;
    let (contracts_logged, contracts_head) = contracts_changelog(&stack, contracts_start).await;
    let (photos_logged, _) = photos_changelog(&stack, photos_start).await;
    check_changelog(
        "users",
        &users_logged,
        &ledger.user_revisions,
        ledger.failed_user_writes,
    );
    check_changelog(
        "contracts",
        &contracts_logged,
        &ledger.contract_revisions,
        ledger.failed_contract_writes,
    );
    check_changelog(
        "photos",
        &photos_logged,
        &ledger.photo_revisions,
        ledger.failed_photo_writes,
    );

    // The copies converged: Photos' copies and Users' copy of contracts
    // hold every user and contract as the upstreams do now.
    eventually("Photos' copies to reach the upstreams' heads", || async {
        get_profile(&stack, cached_profile(&reader.id, users_head, contracts_head))
            .await
            .ok()
    })
    .await;
    let last_contract = contracts_logged.values().next_back().cloned().unwrap_or_default();
    let holder = get_contract(&stack, &last_contract).await.holder_user_id;
    eventually("Users' copy of contracts to reach Contracts' head", || async {
        let (_, cached) = get_user(&stack, &holder, ContractRead::Cache).await.ok()?;
        cached.is_some_and(|c| c.revision >= contracts_head).then_some(())
    })
    .await;
    for id in ledger.users.keys() {
        let (user, _) = get_user(&stack, id, ContractRead::Unspecified)
            .await
            .unwrap_or_else(|status| panic!("get user {id}: {status:?}"));
        let contract = match user.contract_id.as_str() {
            "" => None,
            contract_id => Some(get_contract(&stack, contract_id).await),
        };
        let profile = get_profile(&stack, cached_profile(id, users_head, contracts_head))
            .await
            .unwrap_or_else(|status| panic!("cached profile of {id}: {status:?}"));
        assert!(
            served_from_the_copies(&profile, &user, contract.as_ref()),
            "Photos' copies differ from the upstreams for user {id}: {profile:?}, upstream {user:?} and {contract:?}"
        );
        if let Some(contract) = contract {
            let (_, cached) = get_user(&stack, id, ContractRead::Cache)
                .await
                .unwrap_or_else(|status| panic!("user {id} with the cached contract: {status:?}"));
            assert_eq!(cached, Some(contract), "Users' copy of contract of user {id}");
        }
    }
    eprintln!(
        "{} users, {} contracts, {} photos acknowledged ({} changes in all) and found again; whole test {:?}",
        ledger.users.len(),
        ledger.contracts.len(),
        ledger.photos.len(),
        ledger.acked(),
        started.elapsed()
    );
    stack.stop().await;
}
