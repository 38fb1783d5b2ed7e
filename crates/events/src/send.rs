//! One delivery attempt: the event built from its queue row, laid out per
//! the subscription's content mode, signed, sent with a timeout, and the
//! answer read as [`crate::policy`] says.
//!
//! The client follows no redirect (a 3xx is an answer, dead-lettered: a
//! redirect could lead past the address policy), uses no proxy from the
//! environment (the policy checks the address connected to), and resolves
//! names through [`GuardedResolver`]. It speaks plain HTTP: the workspace's
//! reqwest is built without TLS (see the crate docs).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderValue, header::RETRY_AFTER};
use sha2::Digest as _;
use tracing::Instrument as _;

use crate::{
    EventsError,
    cloudevent::CloudEvent,
    policy::{Verdict, parse_retry_after, verdict},
    queue::Queued,
    signing::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, signature_header, unix_seconds},
    source::Occurrence,
    ssrf::{AddressPolicy, GuardedResolver, Refused},
    store::Subscription,
};

/// The most of an error answer's body kept with the attempt.
const ERROR_BODY_BYTES: usize = 256;

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// What it means.
    pub verdict: Verdict,
    /// The HTTP status (0: no answer).
    pub status: u16,
    /// What went wrong (empty when delivered).
    pub error: String,
}

/// Sends events; one per process, shared by every subscription (one pool
/// of connections).
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    source_prefix: String,
}

/// The CloudEvent of a queued change: `id` `<feed>:<revision>`, `source`
/// `<prefix>/<feed>`, `subject` the entity id, `sequence` the revision
/// (zero-padded to 19 digits, so that the sequence extension's
/// lexicographic order is the revisions' order), and `traceparent`.
pub fn cloud_event(source_prefix: &str, event: &Occurrence, traceparent: String) -> CloudEvent {
    let feed = event.kind.feed();
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(event.time_ms).unwrap_or(0));
    let mut extensions = std::collections::BTreeMap::new();
    extensions.insert("sequence".to_owned(), format!("{:019}", event.revision.max(0)));
    extensions.insert("traceparent".to_owned(), traceparent);
    CloudEvent {
        id: format!("{feed}:{}", event.revision),
        source: format!("{}/{feed}", source_prefix.trim_end_matches('/')),
        event_type: event.event_type.clone(),
        subject: Some(event.entity_id.clone()),
        time: Some(humantime::format_rfc3339_millis(time).to_string()),
        datacontenttype: Some("application/json".to_owned()),
        extensions,
        data: Some(event.data.clone().into_bytes()),
    }
}

/// A W3C `traceparent` for an event when no tracer gives one: the trace id
/// and parent id derived from the event's source and id (stable across
/// redeliveries: a function's traces of one event line up), not sampled.
pub fn derived_traceparent(source: &str, id: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{source} {id}").as_bytes());
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&digest[..16]), hex(&digest[16..24]))
}

impl Sender {
    /// A sender whose connections obey `policy`, naming its events' sources
    /// under `source_prefix`.
    pub fn new(policy: AddressPolicy, source_prefix: &str, connect_timeout: Duration) -> Result<Sender, EventsError> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(connect_timeout)
            .dns_resolver(GuardedResolver(Arc::clone(&policy)))
            .user_agent(concat!("lightbox-events/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EventsError::Invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Sender {
            client,
            policy,
            source_prefix: source_prefix.to_owned(),
        })
    }

    /// The address policy.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// Makes one attempt to deliver `queued` to `sub`.
    pub async fn send(&self, sub: &Subscription, queued: &Queued) -> Sent {
        let span = tracing::info_span!(
            "events.deliver",
            otel.name = "events.deliver",
            otel.kind = "producer",
            subscription = %sub.id,
            event = %format!("{}:{}", queued.event.kind.feed(), queued.event.revision),
            attempt = queued.attempts + 1,
        );
        self.attempt(sub, queued, &span).instrument(span.clone()).await
    }

    async fn attempt(&self, sub: &Subscription, queued: &Queued, span: &tracing::Span) -> Sent {
        let mut trace = HeaderMap::new();
        lightbox_metrics::inject(span, &mut trace);
        let traceparent = trace
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let source = format!("{}/{}", self.source_prefix, queued.event.kind.feed());
                derived_traceparent(
                    &source,
                    &format!("{}:{}", queued.event.kind.feed(), queued.event.revision),
                )
            });
        let event = cloud_event(&self.source_prefix, &queued.event, traceparent.clone());
        let (mut headers, body) = match event.to_http(sub.mode) {
            Ok(message) => message,
            Err(err) => return dead(0, format!("the event does not encode: {err}")),
        };
        if let Ok(url) = reqwest::Url::parse(&sub.endpoint)
            && let Some(Err(Refused(why))) = url.host_str().and_then(|host| self.policy.check_literal(host))
        {
            return dead(0, why);
        }
        let timestamp = unix_seconds(SystemTime::now());
        let signature = signature_header(&sub.secrets, &event.id, timestamp, &body);
        for (name, value) in [
            (WEBHOOK_ID, event.id.clone()),
            (WEBHOOK_TIMESTAMP, timestamp.to_string()),
            (WEBHOOK_SIGNATURE, signature),
            ("traceparent", traceparent),
        ] {
            // Ids, digits, base64 and hex: always valid header values.
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
        let response = self
            .client
            .post(&sub.endpoint)
            .headers(headers)
            .body(body)
            .timeout(sub.timeout)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => return failed(&err, sub.timeout),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let verdict = verdict(status, retry_after);
        if verdict == Verdict::Delivered {
            return Sent {
                verdict,
                status,
                error: String::new(),
            };
        }
        let mut error = format!("the endpoint answered {status}");
        if let Some(location) = location.filter(|_| (300..400).contains(&status)) {
            error.push_str(&format!(" (a redirect to {location}, not followed)"));
        }
        let excerpt = excerpt(response).await;
        if !excerpt.is_empty() {
            error.push_str(": ");
            error.push_str(&excerpt);
        }
        Sent { verdict, status, error }
    }
}

fn dead(status: u16, error: String) -> Sent {
    Sent {
        verdict: Verdict::Dead,
        status,
        error,
    }
}

/// A request that got no answer: refused by the address policy (dead),
/// timed out or failed to connect (retried).
fn failed(err: &reqwest::Error, timeout: Duration) -> Sent {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(Refused(why)) = cause.downcast_ref::<Refused>() {
            return dead(0, why.clone());
        }
        source = cause.source();
    }
    let error = if err.is_timeout() {
        format!("no answer within {} ms", timeout.as_millis())
    } else {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(inner) = cause {
            text.push_str(&format!(": {inner}"));
            cause = inner.source();
        }
        text
    };
    Sent {
        verdict: Verdict::Retry { retry_after: None },
        status: 0,
        error,
    }
}

/// The start of an answer's body, as text, for the attempt's error.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}
