//! The operations behind the RPCs: what an operator sends is checked
//! here (ids, endpoints, secrets, limits), and the store's subscriptions
//! and dead letters become the API's messages.

use std::time::Duration;

use lightbox_api::{
    ApiError,
    events::{
        ContentMode, CreateSubscriptionRequest, CreateSubscriptionResponse, Cursor, Subscription as ApiSubscription,
        SubscriptionState,
    },
    request,
};

use crate::{
    EventsService,
    cloudevent::Mode,
    policy::MIN_RATE,
    queue::Key,
    signing::Secret,
    source::{EntityKind, millis},
    store::{self, Subscription},
};

impl EventsService {
    pub(crate) fn poke(&self) {
        self.engine.poke.notify_one();
    }

    pub(crate) async fn find(&self, name: &str) -> Result<Subscription, ApiError> {
        let id = parse_name(name)?;
        store::get(&self.engine.db, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("there is no subscription {name}")))
    }

    /// The API's view of `sub`, with its progress read now.
    pub(crate) async fn view(&self, sub: &Subscription) -> Result<ApiSubscription, ApiError> {
        let (cursors, pending, dead) = store::progress(&self.engine.db, sub).await?;
        Ok(ApiSubscription {
            name: format!("subscriptions/{}", sub.id),
            endpoint: sub.endpoint.clone(),
            entity_types: sub.kinds.iter().map(|k| k.to_api() as i32).collect(),
            entity_ids: sub.ids.clone(),
            content_mode: match sub.mode {
                Mode::Binary => ContentMode::Binary,
                Mode::Structured => ContentMode::Structured,
            } as i32,
            state: if sub.paused {
                SubscriptionState::Paused
            } else {
                SubscriptionState::Active
            } as i32,
            rate_limit: sub.rate_limit,
            max_attempts: i32::try_from(sub.max_attempts).unwrap_or(i32::MAX),
            timeout: Some(duration(sub.timeout)),
            secret_hints: sub.secrets.iter().map(Secret::hint).collect(),
            cursors: cursors
                .into_iter()
                .map(|c| Cursor {
                    entity_type: c.kind.to_api() as i32,
                    read_revision: c.read_revision,
                    delivered_revision: c.delivered_revision,
                })
                .collect(),
            pending_count: pending,
            dead_letter_count: dead,
            create_time: Some(timestamp(sub.create_time_ms)),
            update_time: Some(timestamp(sub.update_time_ms)),
        })
    }

    pub(crate) async fn create(
        &self,
        request: CreateSubscriptionRequest,
    ) -> Result<CreateSubscriptionResponse, ApiError> {
        let options = &self.engine.options;
        let given = request.subscription.unwrap_or_default();
        let id = match request.subscription_id.as_str() {
            "" => format!("sub-{}", uuid::Uuid::now_v7().simple()),
            id => check_id(id)?.to_owned(),
        };
        let endpoint = self.check_endpoint(&given.endpoint).await?;
        let mut kinds = Vec::new();
        for value in &given.entity_types {
            let kind = EntityKind::from_api(*value).ok_or_else(|| {
                ApiError::InvalidArgument(format!("subscription.entity_types: {value} is not an entity type"))
            })?;
            if !self.engine.sources.kinds().contains(&kind) {
                return Err(ApiError::FailedPrecondition(format!(
                    "this delivery component reads no {} changes (it has sources for: {:?})",
                    kind.name(),
                    self.engine.sources.kinds()
                )));
            }
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err(ApiError::InvalidArgument(
                "subscription.entity_types: name at least one entity type".into(),
            ));
        }
        kinds.sort();
        if given.entity_ids.len() > lightbox_changefeed::watch::MAX_WATCH_IDS {
            return Err(ApiError::InvalidArgument(format!(
                "subscription.entity_ids: at most {} ids",
                lightbox_changefeed::watch::MAX_WATCH_IDS
            )));
        }
        let ids = given
            .entity_ids
            .iter()
            .map(|id| request::parse_id("subscription.entity_ids", id).map(|id| id.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mode = match ContentMode::try_from(given.content_mode) {
            Ok(ContentMode::Structured) => Mode::Structured,
            Ok(_) => Mode::Binary,
            Err(_) => return Err(ApiError::InvalidArgument("subscription.content_mode is unknown".into())),
        };
        if !given.rate_limit.is_finite()
            || given.rate_limit < 0.0
            || (given.rate_limit > 0.0 && given.rate_limit < MIN_RATE)
        {
            return Err(ApiError::InvalidArgument(format!(
                "subscription.rate_limit must be 0 (the default) or at least {MIN_RATE} deliveries per second"
            )));
        }
        let max_attempts = match given.max_attempts {
            0 => options.max_attempts,
            n @ 1..=100 => n.unsigned_abs(),
            _ => {
                return Err(ApiError::InvalidArgument(
                    "subscription.max_attempts must be from 1 to 100".into(),
                ));
            }
        };
        let timeout = match given.timeout {
            None => options.timeout,
            Some(d) => {
                let ms = d
                    .seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(d.nanos) / 1_000_000);
                if !(1..=300_000).contains(&ms) {
                    return Err(ApiError::InvalidArgument(
                        "subscription.timeout must be from 1 ms to 5 minutes".into(),
                    ));
                }
                Duration::from_millis(ms.unsigned_abs())
            }
        };
        let (secrets, made) = secrets(&request.secrets)?;
        let start = match request.start_revision {
            None => -1,
            Some(n) if n >= 0 => n,
            Some(n) => {
                return Err(ApiError::InvalidArgument(format!(
                    "start_revision {n}: give 0 or more, or leave it unset"
                )));
            }
        };
        let existing = store::list(&self.engine.db, "", options.max_subscriptions).await?;
        if i64::try_from(existing.len()).unwrap_or(i64::MAX) >= options.max_subscriptions {
            return Err(ApiError::ResourceExhausted(format!(
                "there are {} subscriptions already, the most",
                existing.len()
            )));
        }
        let now = millis(std::time::SystemTime::now());
        let sub = Subscription {
            id,
            endpoint,
            kinds,
            ids,
            mode,
            secrets,
            paused: false,
            rate_limit: if given.rate_limit > 0.0 {
                given.rate_limit
            } else {
                options.rate_limit
            },
            max_attempts,
            timeout,
            generation: 1,
            create_time_ms: now,
            update_time_ms: now,
        };
        if !store::insert(&self.engine.db, &sub, start).await? {
            return Err(ApiError::AlreadyExists(format!(
                "subscription {} exists already",
                sub.id
            )));
        }
        self.poke();
        let view = self.view(&sub).await?;
        Ok(CreateSubscriptionResponse {
            subscription: Some(view),
            secret: made.map(|s| s.expose().to_owned()).unwrap_or_default(),
        })
    }

    /// Checks an endpoint: an `http://` URL with a host whose every address
    /// the address policy permits.
    async fn check_endpoint(&self, endpoint: &str) -> Result<String, ApiError> {
        let bad = |why: String| ApiError::InvalidArgument(format!("subscription.endpoint {endpoint:?}: {why}"));
        let url = reqwest::Url::parse(endpoint).map_err(|e| bad(e.to_string()))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(bad(
                    "https is not available: this delivery component's HTTP client is built without TLS".into(),
                ));
            }
            other => return Err(bad(format!("the scheme {other} is not http"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials in the URL are refused: requests are signed instead".into()
            ));
        }
        let host = url.host_str().ok_or_else(|| bad("no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        self.engine
            .sender
            .policy()
            .resolve(host, port)
            .await
            .map_err(|refused| bad(refused.0))?;
        Ok(url.to_string())
    }
}

/// The secrets of a new subscription: those given (at most two), or one
/// made (returned too, to show once).
pub(crate) fn secrets(given: &[String]) -> Result<(Vec<Secret>, Option<Secret>), ApiError> {
    if given.len() > 2 {
        return Err(ApiError::InvalidArgument(
            "secrets: at most two (during a rotation)".into(),
        ));
    }
    if given.is_empty() {
        let made = Secret::generate().map_err(ApiError::internal)?;
        return Ok((vec![made.clone()], Some(made)));
    }
    let parsed = given
        .iter()
        .map(|s| Secret::parse(s).map_err(|e| ApiError::InvalidArgument(format!("secrets: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((parsed, None))
}

pub(crate) fn check_id(id: &str) -> Result<&str, ApiError> {
    let ok = (1..=63).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(id)
    } else {
        Err(ApiError::InvalidArgument(format!(
            "subscription id {id:?}: 1 to 63 lowercase letters, digits and hyphens, starting with a letter"
        )))
    }
}

pub(crate) fn parse_name(name: &str) -> Result<&str, ApiError> {
    let id = name
        .strip_prefix("subscriptions/")
        .ok_or_else(|| ApiError::InvalidArgument(format!("name {name:?} is not subscriptions/{{id}}")))?;
    check_id(id)
}

pub(crate) fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn timestamp(ms: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A dead letter's name: `subscriptions/{id}/deadLetters/{entity}-{revision}`.
pub(crate) fn dead_letter_name(sub: &str, (kind, revision): Key) -> String {
    format!("subscriptions/{sub}/deadLetters/{}-{revision}", kind.name())
}

pub(crate) fn parse_dead_letter(sub: &str, name: &str) -> Result<Key, ApiError> {
    let bad = || ApiError::InvalidArgument(format!("{name:?} is not a dead letter of subscriptions/{sub}"));
    let rest = name
        .strip_prefix(&format!("subscriptions/{sub}/deadLetters/"))
        .ok_or_else(bad)?;
    let (kind, revision) = rest.rsplit_once('-').ok_or_else(bad)?;
    Ok((
        EntityKind::from_name(kind).ok_or_else(bad)?,
        revision.parse().map_err(|_| bad())?,
    ))
}
