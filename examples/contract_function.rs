//! A function that Lightbox's delivery component invokes: a small HTTP
//! handler, the way a Knative Service or an OpenFaaS function receives
//! CloudEvents.
//!
//! It checks the Standard Webhooks signature (401 if it does not match, so
//! the delivery component dead-letters forged or misconfigured calls),
//! drops duplicates by `webhook-id` (delivery is at least once: a retry or a
//! restart may bring an event again, always with the same id), and reacts to
//! contract changes by printing one line each. Any 2xx tells the sender it
//! is done; a 5xx (or no answer) would make it try again later.
//!
//! ```text
//! WEBHOOK_SECRET=whsec_… cargo run --example contract_function -- 127.0.0.1:8090
//! ```
//!
//! then subscribe it with the same secret (or leave `--secret` out, and start
//! the function with the one `create` prints; the delivery component must
//! allow 127.0.0.1, as `lightbox dev` does):
//!
//! ```text
//! lightbox subscriptions create --endpoint http://127.0.0.1:8090/ --types contracts --secret "$WEBHOOK_SECRET"
//! ```

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use lightbox_events::{CloudEvent, Secret, Verifier};

/// How many recent `webhook-id`s are remembered to drop duplicates. A real
/// function that must never act twice keeps them in its own database.
const REMEMBERED: usize = 10_000;

/// The function's state: who may call it, and what it has seen.
struct Function {
    verifier: Verifier,
    seen: Mutex<Seen>,
}

/// Recent ids, oldest first, with a set to look them up.
#[derive(Default)]
struct Seen {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Seen {
    /// Records `id`; false if it was seen already.
    fn first_time(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.order.push_back(id.to_owned());
        self.ids.insert(id.to_owned());
        true
    }
}

async fn receive(State(function): State<Arc<Function>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = match function.verifier.verify(&headers, &body, SystemTime::now()) {
        Ok(id) => id,
        Err(err) => {
            eprintln!("refused a call: {err}");
            return StatusCode::UNAUTHORIZED;
        }
    };
    let event = match CloudEvent::from_http(&headers, &body) {
        Ok(event) => event,
        Err(err) => {
            eprintln!("not a CloudEvent ({err}): dead-letter it");
            return StatusCode::BAD_REQUEST;
        }
    };
    let first = function
        .seen
        .lock()
        .map(|mut seen| seen.first_time(&id))
        .unwrap_or(true);
    if !first {
        println!("{id}: a duplicate, dropped");
        return StatusCode::OK;
    }
    let Some(verb) = event.event_type.strip_prefix("dev.lightbox.contract.") else {
        return StatusCode::NO_CONTENT; // users and photos: not this function's business
    };
    let data: serde_json::Value = event
        .data
        .as_deref()
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .unwrap_or_default();
    let contract = event.subject.as_deref().unwrap_or("?");
    let holder = data["holderUserId"].as_str().unwrap_or("?");
    match verb {
        "deleted" => println!("{id}: contract {contract} of user {holder} was deleted"),
        _ => {
            let plan = data["plan"].as_str().unwrap_or("?");
            let quota = data["options"]
                .as_array()
                .and_then(|options| options.iter().find(|o| o["code"] == "photo_quota"))
                .and_then(|o| o["value"].as_str())
                .unwrap_or("none");
            println!("{id}: contract {contract} of user {holder} {verb}: plan {plan}, photo quota {quota}");
        }
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".into());
    // One secret, or two separated by a comma while the subscription's is
    // being rotated.
    let secrets = std::env::var("WEBHOOK_SECRET")
        .map_err(|_| "set WEBHOOK_SECRET to the subscription's whsec_… secret")?
        .split(',')
        .map(|s| Secret::parse(s.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let function = Arc::new(Function {
        verifier: Verifier::new(secrets),
        seen: Mutex::new(Seen::default()),
    });
    let app = Router::new().route("/", post(receive)).with_state(function);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("contract function listening on http://{}/", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
