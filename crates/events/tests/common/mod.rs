//! Test support: a function on 127.0.0.1:0 that records what it receives
//! and answers as told, fast delivery options, contract writes, and the
//! cross-check of signatures with Standard Webhooks' own Python verifier.

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use lightbox_api::contracts::{Contract, Plan as ContractPlan};
use lightbox_changefeed::{Db, Feed, FeedOptions};
use lightbox_events::{CloudEvent, EventsOptions, Secret, Verifier, policy::Backoff};
use tokio::time::Instant;

/// One request the function received, and what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub status: u16,
}

impl Received {
    pub fn event(&self) -> CloudEvent {
        CloudEvent::from_http(&self.headers, &self.body).unwrap_or_else(|e| panic!("not a CloudEvent: {e}"))
    }

    pub fn webhook_id(&self) -> String {
        header(&self.headers, "webhook-id")
    }
}

pub fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_owned()
}

/// How the function answers.
#[derive(Debug, Default)]
pub struct Plan {
    /// Answer `503` with `Retry-After: 1` while set.
    pub outage: bool,
    /// Answer `400` to events of these subjects (while in the set).
    pub reject: HashSet<String>,
    /// Answer `307` to everything.
    pub redirect: bool,
    /// Wait this long before answering.
    pub stall: Option<Duration>,
}

/// The test function.
#[derive(Clone, Default)]
pub struct Function {
    pub received: Arc<Mutex<Vec<Received>>>,
    pub plan: Arc<Mutex<Plan>>,
}

impl Function {
    /// Serves the function on 127.0.0.1:0; its URL.
    pub async fn start(&self) -> String {
        let listener = lightbox_testkit::bind_any().await;
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("no address: {e}"));
        let app = axum::Router::new()
            .route("/", axum::routing::post(handle))
            .route("/elsewhere", axum::routing::post(|| async { "should never be called" }))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/")
    }

    pub fn plan(&self, change: impl FnOnce(&mut Plan)) {
        change(&mut self.plan.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The requests answered 2xx.
    pub fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }
}

async fn handle(State(function): State<Function>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let (status, stall) = {
        let plan = function.plan.lock().unwrap_or_else(|e| e.into_inner());
        let subject = CloudEvent::from_http(&headers, &body).ok().and_then(|e| e.subject);
        let status = if plan.outage {
            503
        } else if plan.redirect {
            307
        } else if subject.is_some_and(|s| plan.reject.contains(&s)) {
            400
        } else {
            204
        };
        (status, plan.stall)
    };
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    function
        .received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Received {
            at: Instant::now(),
            headers,
            body: body.to_vec(),
            status,
        });
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
    let mut answer = HeaderMap::new();
    if status == 503 {
        answer.insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    if status == 307 {
        answer.insert("location", axum::http::HeaderValue::from_static("/elsewhere"));
    }
    (status, answer, "answer from the test function")
}

/// Delivery options for tests: fast, with 127.0.0.1 allowed.
pub fn options() -> EventsOptions {
    EventsOptions {
        allowed_networks: vec!["127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))],
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
            retry_after_max: Duration::from_secs(3),
        },
        timeout: Duration::from_secs(2),
        rate_limit: 0.0,
        idle_timeout: Duration::from_secs(3),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        scan_interval: Duration::from_millis(200),
        ..EventsOptions::default()
    }
}

pub fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        ..FeedOptions::default()
    }
}

/// The events tables and a contracts feed on `db`.
pub async fn contracts_feed(db: &Db) -> Feed<Contract> {
    db.migrate(&[&lightbox_events::MIGRATIONS])
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    Feed::open(db.clone(), "contracts", feed_options())
        .await
        .unwrap_or_else(|e| panic!("open the contracts feed: {e}"))
}

/// Writes contract `id` (created the first time, updated after); its revision.
pub async fn write(feed: &Feed<Contract>, id: &str, holder: &str, version: u32) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|e| panic!("begin: {e}"));
    let created = pbjson_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    };
    let updated = pbjson_types::Timestamp {
        seconds: 1_700_000_000 + i64::from(version) - 1,
        nanos: 0,
    };
    let contract = Contract {
        id: id.to_owned(),
        holder_user_id: holder.to_owned(),
        plan: ContractPlan::Standard as i32,
        revision: tx.next_revision(),
        create_time: Some(created),
        update_time: Some(updated),
        ..Contract::default()
    };
    tx.put_scoped(id, holder, &contract)
        .await
        .unwrap_or_else(|e| panic!("put: {e}"));
    tx.commit().await.unwrap_or_else(|e| panic!("commit: {e}"))
}

/// Deletes contract `id`; its revision.
pub async fn delete(feed: &Feed<Contract>, id: &str) -> i64 {
    let mut tx = feed.begin().await.unwrap_or_else(|e| panic!("begin: {e}"));
    tx.delete(id).await.unwrap_or_else(|e| panic!("delete: {e}"));
    tx.commit().await.unwrap_or_else(|e| panic!("commit: {e}"))
}

/// A new entity id.
pub fn new_id() -> String {
    lightbox_api::request::new_id()
}

/// Per subject, the revisions delivered (2xx) in the order they arrived,
/// repeats of the one just before dropped (a redelivery after a restart).
pub fn delivered_by_entity(function: &Function) -> BTreeMap<String, Vec<i64>> {
    let mut by_entity: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for received in function.delivered() {
        let event = received.event();
        let subject = event.subject.clone().unwrap_or_default();
        let sequence: i64 = event
            .extensions
            .get("sequence")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no sequence on {event:?}"));
        let seen = by_entity.entry(subject).or_default();
        if seen.last() != Some(&sequence) {
            seen.push(sequence);
        }
    }
    by_entity
}

/// Checks every request's signature with the Rust verifier, and (when
/// python3 has the `standardwebhooks` package) with Standard Webhooks' own.
pub fn verify_signatures(received: &[Received], secrets: &[Secret]) {
    let verifier = Verifier::new(secrets.to_vec());
    for request in received {
        verifier
            .verify(&request.headers, &request.body, std::time::SystemTime::now())
            .unwrap_or_else(|e| panic!("the Rust verifier refuses {}: {e}", request.webhook_id()));
    }
    python_verify(received, secrets);
}

/// Runs Standard Webhooks' Python verifier over the requests, with the
/// first secret; skipped with a notice when python3 or the package is
/// missing, unless `LIGHTBOX_REQUIRE_STANDARDWEBHOOKS=1`.
fn python_verify(received: &[Received], secrets: &[Secret]) {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !probe {
        if std::env::var("LIGHTBOX_REQUIRE_STANDARDWEBHOOKS").is_ok_and(|v| v == "1") {
            panic!(
                "python3 with standardwebhooks is required (LIGHTBOX_REQUIRE_STANDARDWEBHOOKS=1): pip install -r .ci/requirements.txt"
            );
        }
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: Standard Webhooks cross-check SKIPPED: python3 -m pip install standardwebhooks"
        );
        return;
    }
    let requests: Vec<serde_json::Value> = received
        .iter()
        .map(|r| {
            let headers: HashMap<String, String> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
                .iter()
                .map(|name| ((*name).to_owned(), header(&r.headers, name)))
                .collect();
            serde_json::json!({ "headers": headers, "body": String::from_utf8_lossy(&r.body) })
        })
        .collect();
    let secret = secrets.first().map(|s| s.expose().to_owned()).unwrap_or_default();
    let input = serde_json::json!({ "secret": secret, "requests": requests }).to_string();
    let dir = tempfile_dir();
    let path = dir.join("requests.json");
    std::fs::write(&path, input).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let script = "import json, sys\n\
                  from standardwebhooks import Webhook\n\
                  data = json.load(open(sys.argv[1]))\n\
                  hook = Webhook(data['secret'])\n\
                  for r in data['requests']:\n    hook.verify(r['body'].encode(), r['headers'], json_parse=False)\n\
                  print('verified', len(data['requests']))\n";
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "Standard Webhooks' verifier refuses a signature: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed.trim(), format!("verified {}", received.len()));
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lightbox-events-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}
