//! The mobile gateway end to end, with a real HTTP client against the whole
//! stack: sign in with a token, list, create and delete photos, follow them
//! and contract changes on the SSE stream (resuming after a dropped
//! connection), keep answering with the upstreams stopped; and every way a
//! request can be wrong or not allowed gets its status and leaks nothing;
//! uploads have their own size and concurrency limits.

#[path = "support/images.rs"]
mod images;

use std::time::Duration;

use base64::Engine as _;

use jsonwebtoken::{EncodingKey, Header};
use lightbox_api::{contracts::Contract, users::User};
use lightbox_app::Target;
use lightbox_changefeed::{FeedOptions, Retention};
use lightbox_gateway::auth::{self, Claims};
use lightbox_testkit::{
    Stack, TEST_JWT_SECRET, TestDb, conformance, customer, eventually,
    sse::{Event, EventStream as Events},
};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

conformance!(a_phone_signs_in_lists_creates_and_follows_its_photos);

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// A signed-in phone: the gateway's URL and a token.
struct Phone {
    http: Client,
    base: String,
    token: String,
}

/// A customer whose user and contract Photos' copies already hold (as a
/// phone signing up would wait for before its first upload).
async fn signed_up(stack: &Stack, email: &str) -> (User, Contract) {
    let (user, contract) = customer(stack, email, "10").await;
    let mut photos = stack.photos_client().await;
    photos
        .get_profile(lightbox_api::photos::GetProfileRequest {
            user_id: user.id.clone(),
            min_users_revision: user.revision,
            min_contracts_revision: contract.revision,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("Photos' copies do not catch up: {status:?}"));
    (user, contract)
}

impl Phone {
    fn new(stack: &Stack, user_id: &str) -> Phone {
        Phone {
            http: Client::new(),
            base: stack.gateway_url(),
            token: stack.token(user_id),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request.send().await).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// Opens the events stream, resuming after `last_id` if given.
    async fn events(&self, last_id: Option<&str>) -> Events {
        let url = format!("{}/v1/users/me/events", self.base);
        Events::open(&self.http, &url, &self.token, last_id).await
    }
}

/// A connection that starts a `CreatePhoto` upload of `length` bytes,
/// sends its first few, and stops there.
async fn slow_upload(stack: &Stack, phone: &Phone, length: usize) -> tokio::net::TcpStream {
    let mut slow = tokio::net::TcpStream::connect(stack.addr(Target::Gateway))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = format!(
        "POST /v1/users/me/photos HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n{{\"title\": \"",
        phone.token
    );
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slow
}

/// Status and JSON body of an answer.
async fn answer(result: reqwest::Result<reqwest::Response>) -> (StatusCode, Value) {
    let response = result.unwrap_or_else(|err| panic!("the gateway did not answer: {err}"));
    let status = response.status();
    let text = response
        .text()
        .await
        .unwrap_or_else(|err| panic!("unreadable body: {err}"));
    let json = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{status}: body is not JSON ({err}): {text}"));
    (status, json)
}

fn is_photo(event: &Event, id: &str, kind: &str) -> bool {
    event.name == "photo" && event.data["photoId"] == id && event.data["kind"] == kind
}

async fn a_phone_signs_in_lists_creates_and_follows_its_photos(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let (user, contract) = signed_up(&stack, "ada@example.com").await;
    let phone = Phone::new(&stack, &user.id);

    // The profile, in one hop, with its contract and freshness; reading
    // its own writes (the revisions the services answered).
    let (status, profile) = phone
        .get(&format!(
            "/v1/users/me?minUsersRevision={}&minContractsRevision={}",
            user.revision, contract.revision
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["user"]["id"], user.id.as_str());
    assert_eq!(
        profile["user"]["revision"],
        user.revision.to_string(),
        "int64 is a string"
    );
    assert_eq!(profile["contract"]["id"], contract.id.as_str());
    assert!(profile["userFreshness"]["source"].is_string(), "{profile}");

    let mut events = phone.events(None).await;
    let snapshot = events.synced().await;
    assert!(
        snapshot
            .iter()
            .any(|e| e.name == "user" && e.data["userId"] == user.id.as_str()),
        "the snapshot has the user: {snapshot:#?}"
    );
    assert!(
        snapshot
            .iter()
            .any(|e| e.name == "contract" && e.data["contractId"] == contract.id.as_str()),
        "the snapshot has the contract: {snapshot:#?}"
    );

    let (status, list) = phone.get("/v1/users/me/photos").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["photos"], json!([]), "no photos yet, written as an empty list");

    let (status, created) = phone
        .post(
            "/v1/users/me/photos",
            json!({ "title": "Harbour", "contentType": "image/jpeg", "sizeBytes": "2048" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let photo_id = created["photo"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["photo"]["userId"], user.id.as_str(), "`me` became the user");
    events
        .until("the new photo arrives", |e| {
            is_photo(e, &photo_id, "CHANGE_KIND_UPSERT")
        })
        .await;

    let (status, got) = phone.get(&format!("/v1/users/me/photos/{photo_id}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["photo"]["title"], "Harbour");

    // The support app changes the contract with the CLI; the phone sees it.
    let contracts_addr = stack.addr(Target::Contracts).to_string();
    let updated = tokio::process::Command::new(BIN)
        .args([
            "contracts",
            "--addr",
            &contracts_addr,
            "update",
            &contract.id,
            "--plan",
            "premium",
        ])
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run the CLI: {err}"));
    assert!(updated.status.success(), "{}", String::from_utf8_lossy(&updated.stderr));
    events
        .until("the contract change arrives", |e| {
            e.name == "contract" && e.data["contract"]["plan"] == "PLAN_PREMIUM"
        })
        .await;

    // Users and Contracts stop: the list still answers, and says so.
    stack.stop_component(Target::Users).await;
    stack.stop_component(Target::Contracts).await;
    events
        .until("the stream says the upstreams are gone", |e| {
            e.name == "upstream" && e.data["source"] == "contracts" && e.data["connected"] == false
        })
        .await;
    let list = eventually("the list reports its copies as disconnected", || async {
        let (status, list) = phone.get("/v1/users/me/photos").await;
        assert_eq!(status, StatusCode::OK, "{list}");
        // `streamState` is `{"state": "STREAM_STATE_…", "sinceTime": …}`.
        (list["contractFreshness"]["streamState"]["state"] == "STREAM_STATE_DISCONNECTED").then_some(list)
    })
    .await;
    assert_eq!(list["photos"][0]["id"], photo_id.as_str());
    assert_eq!(
        list["contract"]["plan"], "PLAN_PREMIUM",
        "the copy has the last contract"
    );
    assert_eq!(list["userFreshness"]["source"], "SOURCE_CACHE");
    assert_eq!(list["contractFreshness"]["source"], "SOURCE_CACHE");

    // A fresh read cannot be served: 503, as grpc-gateway maps UNAVAILABLE.
    let (status, error) = phone.get("/v1/users/me/photos?consistency=CONSISTENCY_FRESH").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["code"], 14);
    assert!(error["details"].is_array(), "{error}");
    // In the gateway's words: Photos' own names the replicas it tried.
    let message = error["message"].as_str().unwrap_or_default();
    assert_eq!(message, lightbox_gateway::error::UPSTREAM_UNAVAILABLE, "{error}");
    assert!(
        !message.contains("127.0.0.1"),
        "an internal address reached the phone: {error}"
    );
    drop(events);
    stack.stop().await;
}

fn sign(claims: &Claims, secret: &[u8]) -> String {
    auth::sign(claims, &Header::default(), &EncodingKey::from_secret(secret)).unwrap_or_else(|e| panic!("{e}"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_another_users_data_never_leaks() {
    let stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    let (bob, _) = signed_up(&stack, "bob@example.com").await;
    let bobs_phone = Phone::new(&stack, &bob.id);
    let (status, bobs) = bobs_phone
        .post(
            "/v1/users/me/photos",
            json!({ "title": "Bob's secret", "contentType": "image/png", "sizeBytes": "1" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{bobs}");
    let bobs_photo = bobs["photo"]["id"].as_str().unwrap_or_default().to_owned();

    let http = Client::new();
    let base = stack.gateway_url();
    let claims = |sub: &str, aud: &str, exp: u64| Claims {
        sub: sub.into(),
        iss: auth::DEFAULT_ISSUER.into(),
        aud: aud.into(),
        exp,
        iat: now(),
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing bearer token"),
        (
            "an expired token",
            Some(sign(
                &claims(&ada.id, auth::DEFAULT_AUDIENCE, now() - 3600),
                TEST_JWT_SECRET,
            )),
            "expired",
        ),
        (
            "a wrong audience",
            Some(sign(&claims(&ada.id, "someone-else", now() + 3600), TEST_JWT_SECRET)),
            "audience",
        ),
        (
            "a wrong signature",
            Some(sign(
                &claims(&ada.id, auth::DEFAULT_AUDIENCE, now() + 3600),
                b"not-the-key",
            )),
            "signature",
        ),
        ("a malformed token", Some("abc.def".into()), "not a JWT"),
    ];
    for path in ["/v1/users/me/photos", "/v1/users/me/events"] {
        for (what, token, reason) in &cases {
            let mut request = http.get(format!("{base}{path}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
            assert!(
                response.headers().contains_key("www-authenticate"),
                "{what}: a 401 carries its challenge"
            );
            let (status, error) = answer(Ok(response)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what} on {path}: {error}");
            assert_eq!(error["code"], 16, "{what}: UNAUTHENTICATED");
            assert!(
                error["message"].as_str().is_some_and(|m| m.contains(reason)),
                "{what}: {error}"
            );
        }
    }

    let adas_phone = Phone::new(&stack, &ada.id);
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/users/{}", bob.id)),
        (reqwest::Method::GET, format!("/v1/users/{}/photos", bob.id)),
        (
            reqwest::Method::GET,
            format!("/v1/users/{}/photos/{bobs_photo}", bob.id),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/users/{}/photos/{bobs_photo}", bob.id),
        ),
        (reqwest::Method::GET, format!("/v1/users/{}/events", bob.id)),
    ] {
        let (status, error) = adas_phone.send(method.clone(), &path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {error}");
        assert_eq!(error["code"], 7, "PERMISSION_DENIED");
        assert!(!error.to_string().contains("secret"), "{error}");
    }
    let (status, error) = adas_phone
        .post(&format!("/v1/users/{}/photos", bob.id), json!({ "title": "planted" }))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "writing into another's album: {error}");

    // Bob's photo through Ada's own path: not found, and not deleted.
    let (status, error) = adas_phone.get(&format!("/v1/users/me/photos/{bobs_photo}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    assert!(!error.to_string().contains("secret"), "{error}");
    let (status, _) = adas_phone.delete(&format!("/v1/users/me/photos/{bobs_photo}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, still) = bobs_phone.get(&format!("/v1/users/me/photos/{bobs_photo}")).await;
    assert_eq!(status, StatusCode::OK, "Bob's photo is still there: {still}");
    assert_eq!(still["photo"]["title"], "Bob's secret");
    let (_, adas) = adas_phone.get("/v1/users/me/photos").await;
    assert_eq!(adas["photos"], json!([]), "Ada's list holds none of Bob's photos");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field_and_change_nothing() {
    let stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    let phone = Phone::new(&stack, &ada.id);
    let raw = |body: &'static str| {
        phone
            .http
            .post(format!("{}/v1/users/me/photos", phone.base))
            .bearer_auth(&phone.token)
            .header("content-type", "application/json")
            .body(body)
    };
    for (what, body, expected) in [
        ("an unknown field", r#"{"title": "a", "colour": "red"}"#, "colour"),
        (
            "a wrong type",
            r#"{"title": "a", "sizeBytes": "lots"}"#,
            "photo.sizeBytes",
        ),
        ("malformed JSON", r#"{"title": "a""#, "invalid JSON"),
        ("a wrong enum-free type", r#"{"title": ["a"]}"#, "photo.title"),
        (
            "another owner in the body",
            r#"{"title": "a", "userId": "someone"}"#,
            "photo.userId",
        ),
        (
            "one key twice",
            r#"{"title": "a", "title": "b", "contentType": "image/png"}"#,
            "`photo.title` is given twice",
        ),
        (
            "one field under both its names",
            r#"{"title": "a", "contentType": "image/png", "content_type": "image/jpeg"}"#,
            "`photo.contentType` is given twice",
        ),
    ] {
        let (status, error) = answer(raw(body).send().await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {error}");
        assert_eq!(error["code"], 3, "{what}: INVALID_ARGUMENT");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(expected)),
            "{what}: {error}"
        );
    }
    // Over even the upload limit (14 MiB).
    let huge = format!(r#"{{"title": "{}"}}"#, "x".repeat(15 * 1024 * 1024));
    let response = phone
        .http
        .post(format!("{}/v1/users/me/photos", phone.base))
        .bearer_auth(&phone.token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await;
    let closes = response
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get("connection"))
        .is_some_and(|v| v == "close");
    let (status, error) = answer(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "an oversized body: {error}");
    assert!(
        closes,
        "the body left unread closes the connection, so the client does not reuse it"
    );
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("bytes")),
        "{error}"
    );
    let (status, error) = phone.get("/v1/users/me/photos?pageSize=lots").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("pageSize")),
        "{error}"
    );
    let (status, error) = phone.get("/v1/users/me/photos?colour=red").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    // A domain error from the service keeps its code and message.
    let (status, error) = phone.post("/v1/users/me/photos", json!({ "title": "" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    let (status, list) = phone.get("/v1/users/me/photos").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["photos"], json!([]), "no bad request stored anything");

    let (status, error) = phone.get("/v1/nothing/here").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    let response = phone
        .http
        .put(format!("{}/v1/users/me/photos", phone.base))
        .bearer_auth(&phone.token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let allow = response
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (status, _) = answer(Ok(response)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(allow.contains("GET") && allow.contains("POST"), "Allow: {allow}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_from_last_event_id_and_lose_nothing() {
    let stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    let phone = Phone::new(&stack, &ada.id);
    let (_, first) = phone
        .post(
            "/v1/users/me/photos",
            json!({ "title": "one", "contentType": "image/png", "sizeBytes": "1" }),
        )
        .await;
    let first_id = first["photo"]["id"].as_str().unwrap_or_default().to_owned();

    let mut events = phone.events(None).await;
    let seen = events.synced().await;
    let last_id = seen.last().map(|e| e.id.clone()).unwrap_or_default();
    // An idle stream carries heartbeats (every 500 ms in the test stack).
    while events.heartbeats == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(100), events.event()).await;
    }
    drop(events);

    // While the phone is away: two new photos, one deleted, a new name.
    let mut created = Vec::new();
    for title in ["two", "three"] {
        let (status, photo) = phone
            .post(
                "/v1/users/me/photos",
                json!({ "title": title, "contentType": "image/png", "sizeBytes": "1" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{photo}");
        created.push(photo["photo"]["id"].as_str().unwrap_or_default().to_owned());
    }
    let (status, _) = phone.delete(&format!("/v1/users/me/photos/{first_id}")).await;
    assert_eq!(status, StatusCode::OK);
    let mut users = stack.users_client().await;
    users
        .update_user(lightbox_api::users::UpdateUserRequest {
            user: Some(lightbox_api::users::User {
                display_name: "Ada L.".into(),
                ..ada.clone()
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("update user: {status:?}"));

    let mut resumed = phone.events(Some(&last_id)).await;
    let mut missing: Vec<String> = created.clone();
    let (mut deleted, mut renamed) = (false, false);
    let seen = resumed
        .until("every change made while away", |e| {
            missing.retain(|id| !is_photo(e, id, "CHANGE_KIND_UPSERT"));
            deleted |= is_photo(e, &first_id, "CHANGE_KIND_DELETE");
            renamed |= e.name == "user" && e.data["user"]["displayName"] == "Ada L.";
            missing.is_empty() && deleted && renamed
        })
        .await;
    assert!(
        seen.iter().all(|e| e.name != "synced" && e.name != "reset"),
        "a resume replays no snapshot: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|e| is_photo(e, &first_id, "CHANGE_KIND_UPSERT")),
        "nothing from before the cursor is sent again: {seen:#?}"
    );
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.iter().all(|id| !id.is_empty()), "every event has an id: {ids:?}");

    let (status, error) = answer(
        phone
            .http
            .get(format!("{}/v1/users/me/events", phone.base))
            .bearer_auth(&phone.token)
            .header("Last-Event-ID", "not-a-cursor")
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_checked_in_one() {
    let stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let response = Client::new()
        .get(format!("{}/openapi.json", stack.gateway_url()))
        .send()
        .await;
    let (status, served) = answer(response).await;
    assert_eq!(status, StatusCode::OK);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/lightbox.json");
    let checked_in: Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| panic!("cannot read {path}"));
    assert!(
        served == checked_in,
        "openapi/lightbox.json is stale: regenerate it with `cargo run -- openapi > openapi/lightbox.json`"
    );
    for route in [
        "/v1/users/{user_id}",
        "/v1/users/{user_id}/photos",
        "/v1/users/{user_id}/events",
    ] {
        assert!(served["paths"][route].is_object(), "{route} is documented");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_kept_history_gets_a_reset_event_then_the_state() {
    let options = FeedOptions {
        retention: Retention {
            keep_changes: 1,
            keep_tombstones: 1,
            interval: Some(Duration::from_millis(50)),
        },
        ..feed_options()
    };
    let stack = Stack::start(TestDb::sqlite(), options).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    let phone = Phone::new(&stack, &ada.id);
    let photo = json!({ "title": "a", "contentType": "image/png", "sizeBytes": "1" });
    let (status, first) = phone.post("/v1/users/me/photos", photo.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let first_id = first["photo"]["id"].as_str().unwrap_or_default().to_owned();

    let mut events = phone.events(None).await;
    let last_id = events.synced().await.last().map(|e| e.id.clone()).unwrap_or_default();
    drop(events);

    // While away: the first photo is deleted and its tombstone purged.
    let (status, deleted) = phone.delete(&format!("/v1/users/me/photos/{first_id}")).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (_, photo) = phone.post("/v1/users/me/photos", photo.clone()).await;
        kept.push(photo["photo"]["id"].as_str().unwrap_or_default().to_owned());
    }
    let since: i64 = last_id
        .rsplit('.')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_default();
    let photos = stack.photos_client().await;
    eventually("the photos history before the cursor is compacted", || {
        let mut photos = photos.clone();
        let request = lightbox_api::photos::ListPhotoChangesRequest {
            since_revision: since,
            ..Default::default()
        };
        async move {
            let answer = photos.list_photo_changes(request).await.ok()?;
            answer.into_inner().reset
        }
    })
    .await;

    let mut resumed = phone.events(Some(&last_id)).await;
    let seen = resumed
        .until("a reset of photos, then its snapshot", |e| {
            e.name == "synced" && e.data["source"] == "photos"
        })
        .await;
    let reset_at = seen
        .iter()
        .position(|e| e.name == "reset" && e.data["source"] == "photos")
        .unwrap_or_else(|| panic!("no photos reset: {seen:#?}"));
    let after: Vec<&Event> = seen[reset_at..].iter().filter(|e| e.name == "photo").collect();
    for id in &kept {
        assert!(
            after.iter().any(|e| e.data["photoId"] == id.as_str()),
            "{id} is in the snapshot: {seen:#?}"
        );
    }
    assert!(
        after.iter().all(|e| e.data["photoId"] != first_id.as_str()),
        "the deleted photo is not in the snapshot: {seen:#?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_504_503_and_408_and_every_answer_carries_its_request_id() {
    let mut stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    // A gateway with tight limits, in front of a slow Photos.
    stack.stop_component(Target::Gateway).await;
    stack.settings.gateway.request_timeout = Duration::from_millis(300);
    stack.settings.gateway.max_concurrent_requests = 1;
    stack.settings.gateway.max_event_streams = 2;
    stack.settings.gateway.max_event_streams_per_user = 1;
    stack.start_component(Target::Gateway).await;
    let phone = Phone::new(&stack, &ada.id);

    // Request ids: the client's is kept, one is made when it sent none.
    let response = phone
        .http
        .get(format!("{}/v1/users/me/photos", phone.base))
        .bearer_auth(&phone.token)
        .header("x-request-id", "phone-42")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        response.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("phone-42")
    );
    let response = phone
        .http
        .get(format!("{}/v1/users/me/nothing", phone.base))
        .bearer_auth(&phone.token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        response.headers().get("x-request-id").is_some_and(|v| !v.is_empty()),
        "errors carry a request id too"
    );

    // One event stream per user: Ada's second is refused at once (429)...
    let events = phone.events(None).await;
    let (status, error) = phone.get("/v1/users/me/events").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("the most per user")),
        "{error}"
    );
    // ... another user's is not; and two streams are the gateway's limit:
    // a third user's is refused (503).
    let (bob, _) = signed_up(&stack, "bob@example.com").await;
    let bobs = Phone::new(&stack, &bob.id).events(None).await;
    let (cy, _) = signed_up(&stack, "cy@example.com").await;
    let (status, error) = Phone::new(&stack, &cy.id).get("/v1/users/me/events").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("limit of 2 event streams")),
        "{error}"
    );
    // A closed stream gives its user's slot back.
    drop(events);
    drop(bobs);
    let again = eventually("Ada's slot to be free again", || async {
        let response = phone
            .http
            .get(format!("{}/v1/users/me/events", phone.base))
            .bearer_auth(&phone.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await;
    drop(again);

    // Photos answers after a second: the 300 ms deadline answers 504.
    let photos = stack.faults(Target::Photos);
    photos
        .set(lightbox_server::FaultSpec {
            latency: Duration::from_secs(1),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, error) = phone.get("/v1/users/me/photos").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{error}");
    assert_eq!(error["code"], 4, "DEADLINE_EXCEEDED");

    // One request at a time: while one waits on Photos, the next is shed.
    let calls = photos.calls();
    let slow = tokio::spawn({
        let (http, url, token) = (
            phone.http.clone(),
            format!("{}/v1/users/me/photos", phone.base),
            phone.token.clone(),
        );
        async move { http.get(url).bearer_auth(token).send().await.map(|r| r.status()) }
    });
    eventually("the first request reaches Photos", || async {
        (photos.calls() > calls).then_some(())
    })
    .await;
    let response = phone
        .http
        .get(format!("{}/v1/users/me/photos", phone.base))
        .bearer_auth(&phone.token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        response.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (status, error) = answer(Ok(response)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("limit")),
        "{error}"
    );
    let first = slow
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        first,
        StatusCode::GATEWAY_TIMEOUT,
        "the first one still ran to its deadline"
    );
    photos.clear();

    // A body that stops coming (below the minimum rate once the deadline
    // has passed): 408, and the connection closed, so the trickling phone
    // holds no slot.
    let mut slow = slow_upload(&stack, &phone, 1000).await;
    let mut answer = String::new();
    tokio::time::timeout(
        lightbox_testkit::DEADLINE,
        tokio::io::AsyncReadExt::read_to_string(&mut slow, &mut answer),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer to a stalled body, nor a closed connection"))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(
        answer.contains("did not start within 300ms, or then came slower than 32 KiB/s"),
        "{answer}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_have_their_own_body_limit_and_concurrency() {
    let mut stack = Stack::start(TestDb::sqlite(), feed_options()).await;
    let (ada, _) = signed_up(&stack, "ada@example.com").await;
    stack.stop_component(Target::Gateway).await;
    stack.settings.gateway.max_body_bytes = 8 * 1024;
    stack.settings.gateway.max_upload_bytes = 256 * 1024;
    stack.settings.gateway.max_concurrent_uploads = 1;
    stack.start_component(Target::Gateway).await;
    let phone = Phone::new(&stack, &ada.id);
    let upload = |bytes: usize| {
        let image = images::padded(&images::jpeg(64, 48), bytes);
        json!({ "title": "Harbour", "image": base64::engine::general_purpose::STANDARD.encode(image) })
    };

    // Any other body stays within the small limit: 413, naming it.
    let response = phone
        .http
        .get(format!("{}/v1/users/me/photos", phone.base))
        .bearer_auth(&phone.token)
        .json(&json!({ "padding": "x".repeat(16 * 1024) }))
        .send()
        .await;
    let (status, error) = answer(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("8192 bytes")),
        "{error}"
    );

    // An image of 64 KiB (85 KiB in base64) is over that limit, within the
    // upload's: taken, to be processed after the answer.
    let image = images::padded(&images::jpeg(64, 48), 64 * 1024);
    let body = json!({ "image": base64::engine::general_purpose::STANDARD.encode(&image) });
    let (status, created) = phone.post("/v1/users/me/photos", body).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["photo"]["sizeBytes"], image.len().to_string(), "{created}");
    assert_eq!(
        created["photo"]["processing"]["state"], "PROCESSING_STATE_PENDING",
        "{created}"
    );

    // 300 KiB (400 KiB in base64) is over the upload's limit.
    let (status, error) = phone.post("/v1/users/me/photos", upload(300 * 1024)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("262144 bytes")),
        "{error}"
    );

    // One upload read at a time: a phone sending its body slowly holds the
    // only slot, and the next upload is refused at once with Retry-After.
    let slow = slow_upload(&stack, &phone, 100_000).await;
    let refused = eventually("the slow upload to hold the only slot", || async {
        let response = phone
            .http
            .post(format!("{}/v1/users/me/photos", phone.base))
            .bearer_auth(&phone.token)
            .json(&upload(1024))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(response)
    })
    .await;
    assert_eq!(
        refused.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (_, error) = answer(Ok(refused)).await;
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("limit of 1 uploads")),
        "{error}"
    );
    // The slot is freed when that phone goes away.
    drop(slow);
    let created = eventually("the slot to be free again", || async {
        let (status, created) = phone.post("/v1/users/me/photos", upload(1024)).await;
        (status == StatusCode::OK).then_some(created)
    })
    .await;
    assert_eq!(
        created["photo"]["processing"]["state"], "PROCESSING_STATE_PENDING",
        "{created}"
    );
    stack.stop().await;
}
