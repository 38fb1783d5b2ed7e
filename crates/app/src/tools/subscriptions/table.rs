//! How `lightbox subscriptions` prints: the table of subscriptions, the
//! details of one, its dead letters.

use std::time::Duration;

use lightbox_api::events::{ContentMode, Cursor, DeadLetter, EntityType, Subscription, SubscriptionState};

use crate::tools::output::{Json, Proto, emit, enum_word, print_table};

/// An entity type as its feed's name (`users`), as the flags take it.
pub(super) fn feed_word(value: i32) -> &'static str {
    match EntityType::try_from(value) {
        Ok(EntityType::User) => "users",
        Ok(EntityType::Contract) => "contracts",
        Ok(EntityType::Photo) => "photos",
        Ok(EntityType::Unspecified) | Err(_) => "?",
    }
}

/// A revision in a cursor: `-` for none yet (-1).
pub(super) fn revision_word(revision: i64) -> String {
    match revision {
        r if r < 0 => "-".to_owned(),
        r => r.to_string(),
    }
}

/// `users:12/10 contracts:-/-`: per feed, read / delivered.
pub(super) fn cursors_word(cursors: &[Cursor]) -> String {
    cursors
        .iter()
        .map(|c| {
            format!(
                "{}:{}/{}",
                feed_word(c.entity_type),
                revision_word(c.read_revision),
                revision_word(c.delivered_revision)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) const HEADER: &[&str] = &["NAME", "STATE", "ENDPOINT", "TYPES", "PENDING", "DEAD", "CURSORS"];

pub(super) fn row(sub: &Subscription) -> Vec<String> {
    let state = SubscriptionState::try_from(sub.state).ok().map(|s| s.as_str_name());
    let types: Vec<&str> = sub.entity_types.iter().map(|t| feed_word(*t)).collect();
    vec![
        sub.name.clone(),
        enum_word(state, "SUBSCRIPTION_STATE_"),
        sub.endpoint.clone(),
        types.join(","),
        sub.pending_count.to_string(),
        sub.dead_letter_count.to_string(),
        cursors_word(&sub.cursors),
    ]
}

/// What the table leaves out of one subscription, a line each.
pub(super) fn details(sub: &Subscription) -> Vec<String> {
    let mode = enum_word(
        ContentMode::try_from(sub.content_mode).ok().map(|m| m.as_str_name()),
        "CONTENT_MODE_",
    );
    let timeout = sub.timeout.as_ref().map_or_else(
        || "the default".to_owned(),
        |d| {
            let d = Duration::new(d.seconds.max(0).unsigned_abs(), d.nanos.max(0).unsigned_abs());
            humantime::format_duration(d).to_string()
        },
    );
    let entities = match sub.entity_ids.is_empty() {
        true => "all".to_owned(),
        false => sub.entity_ids.join(", "),
    };
    let secrets = match sub.secret_hints.is_empty() {
        true => "-".to_owned(),
        false => sub.secret_hints.join(", "),
    };
    vec![
        format!(
            "delivery: {mode} mode, at most {}/s, {} per event, each within {timeout}",
            sub.rate_limit,
            count(sub.max_attempts.into(), "attempt"),
        ),
        format!("entities: {entities}"),
        format!("secrets (newest first): {secrets}"),
    ]
}

/// `1 attempt`, `3 attempts`.
pub(super) fn count(n: i64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// One subscription: the response as JSON, or its row and details; then
/// the secret that was made, if one was, said to be shown only once.
pub(super) fn show<M: Proto>(
    json: Option<&Json>,
    response: &M,
    sub: Option<&Subscription>,
    secret: &str,
) -> anyhow::Result<()> {
    if let Some(json) = json {
        json.print(response)?;
    } else {
        let sub = sub.cloned().unwrap_or_default();
        print_table(HEADER, &[row(&sub)])?;
        for line in details(&sub) {
            emit(&line)?;
        }
        if !secret.is_empty() {
            emit(&format!("secret: {secret}"))?;
        }
    }
    if !secret.is_empty() {
        // On stderr, so that `--json` stays one line of JSON on stdout.
        eprintln!(
            "note: the signing secret is shown only once (here): keep it where the function can read it, to \
             verify the `webhook-signature` of every delivery"
        );
    }
    Ok(())
}

pub(super) const DEAD_HEADER: &[&str] = &["DEAD LETTER", "EVENT TYPE", "ENTITY", "ATTEMPTS", "LAST ERROR"];

pub(super) fn dead_row(parent: &str, dead: &DeadLetter) -> Vec<String> {
    let short = dead
        .name
        .strip_prefix(&format!("{parent}/deadLetters/"))
        .unwrap_or(&dead.name);
    let last = dead.attempts.last().map_or_else(String::new, |a| match a.http_status {
        0 => a.error.clone(),
        status => format!("HTTP {status}: {}", a.error),
    });
    vec![
        short.to_owned(),
        dead.event_type.clone(),
        dead.entity_id.clone(),
        dead.attempts.len().to_string(),
        last,
    ]
}
