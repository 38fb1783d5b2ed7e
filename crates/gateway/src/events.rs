//! Live updates for the signed-in user as Server-Sent Events: the HTTP side
//! of the events stream (its route, auth, cursor and events). The updates
//! come from the fan-out (`fanout`): the gateway follows each
//! upstream (users, contracts, photos) once, and each phone gets the
//! changes of its user through one bounded queue. Events:
//!
//! - `user`, `contract`, `photo`: a change, as the proto3 JSON of the
//!   upstream's `UserChange` / `ContractChange` / `PhotoChange`;
//! - `synced`: the snapshot of one source is complete
//!   (`{"source": "users", "revision": "42"}`);
//! - `reset`: a source could not resume from the cursor; a fresh snapshot of
//!   it follows, and anything of that source not in it no longer exists;
//! - `upstream`: a source's watch was lost or is back
//!   (`{"source": "users", "connected": false, "message": "..."}`); the
//!   gateway reconnects by itself, with backoff, from where it was;
//! - `end`: the gateway ends the stream (the phone fell a whole queue
//!   behind, or the gateway lost its place in a source), after every event
//!   already queued: `{"reason": "...", "resume": true}`; the client
//!   reconnects with its `Last-Event-ID` and loses nothing.
//!
//! Every event's `id` is a cursor `U.C.P`: the users, contracts and photos
//! revisions the client has everything up to (0 for a source still in its
//! snapshot). A client that reconnects with `Last-Event-ID` resumes each
//! source after its revision and loses nothing; with no `Last-Event-ID` it
//! gets a snapshot of each source first. Idle streams carry a heartbeat
//! comment, so proxies and phones keep the connection open.
//!
//! # Layout
//!
//! - here: the handler, [`Cursor`], and the stream that turns the phone's
//!   queue into events;
//! - `join`: a phone's catch-up per source, until it joins;
//! - `fanout`: the shared streams and the index by user;
//! - `phone`: a phone's queue, and how its stream is ended;
//! - `upstream`: the three sources and their watch calls.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    sync::{Arc, Mutex, atomic::Ordering},
};

use axum::{
    extract::{Path, State},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    Gateway,
    error::HttpError,
    fanout::{Fan, Positions},
    join::CatchUp,
    phone::{Inbox, Next, Phone, lock},
    upstream::Source,
};

/// Where a client is in each source: the `id` of every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor([i64; 3]);

impl Cursor {
    /// Parses a `Last-Event-ID` (`U.C.P`, three non-negative revisions).
    pub fn parse(text: &str) -> Result<Cursor, String> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let bad = || format!("Last-Event-ID {text:?} is not a cursor of this stream (U.C.P, three revisions)");
        let [u, c, p] = parts.as_slice() else { return Err(bad()) };
        let mut revisions = [0; 3];
        for (slot, part) in revisions.iter_mut().zip([u, c, p]) {
            *slot = part.parse::<i64>().ok().filter(|r| *r >= 0).ok_or_else(bad)?;
        }
        Ok(Cursor(revisions))
    }

    fn get(self, source: Source) -> i64 {
        self.0[source.index()]
    }

    fn set(&mut self, source: Source, revision: i64) {
        self.0[source.index()] = revision;
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0[0], self.0[1], self.0[2])
    }
}

/// A phone's place in the fan-out, for the life of its events stream: on
/// drop (the client went away, or the stream ended), it leaves every index,
/// and its queue closes, which stops its catch-up tasks (see
/// [`catch_up`]).
struct Membership {
    fans: [Arc<Fan>; 3],
    phone: Arc<Phone>,
    _permit: OwnedSemaphorePermit,
    _user_slot: UserSlot,
}

impl Drop for Membership {
    fn drop(&mut self) {
        for fan in &self.fans {
            fan.leave(&self.phone);
        }
    }
}

/// The events stream's state: the phone's queue and its cursor.
struct Reader {
    inbox: Inbox,
    cursor: Cursor,
    positions: Arc<Positions>,
    membership: Membership,
}

impl Reader {
    /// Moves the cursor, in each source the phone has joined, to where that
    /// source's fan-out is — unless one of its updates is still queued for
    /// this stream. Safe because a fan publishes its position only after it
    /// has queued every change up to it (the position is read first, then
    /// the count of queued updates): with none queued, this phone has had
    /// every change of its own up to that position. So the fan-out need not
    /// tell every phone of every change that is not theirs: a phone learns
    /// where each source is when it next sends an event.
    fn catch_up_positions(&mut self) {
        let phone = &self.membership.phone;
        for source in Source::ALL {
            let position = self.positions[source.index()].load(Ordering::SeqCst);
            if position > self.cursor.get(source) && phone.is_joined(source) && phone.pending(source) == 0 {
                self.cursor.set(source, position);
            }
        }
    }

    /// The next event to send; `None` once the stream is over.
    async fn next(&mut self) -> Option<Event> {
        loop {
            match self.inbox.next().await? {
                Next::Update(update) => {
                    self.cursor.set(update.source, update.position);
                    if let Some((name, data)) = update.event {
                        self.catch_up_positions();
                        return Some(Event::default().event(name).id(self.cursor.to_string()).data(&*data));
                    }
                }
                Next::End(reason) => {
                    self.catch_up_positions();
                    tracing::info!(%reason, cursor = %self.cursor, "events stream ended by the gateway");
                    let data = json!({ "reason": reason, "resume": true });
                    return Some(
                        Event::default()
                            .event("end")
                            .id(self.cursor.to_string())
                            .data(data.to_string()),
                    );
                }
            }
        }
    }
}

mod catch_up {
    use std::sync::Arc;

    use crate::{join::CatchUp, phone::Phone};

    /// Runs `catch_up` on its own task until it is done or `phone`'s queue
    /// closes (its events stream is over), whichever comes first. No handle
    /// is kept: a tokio task's memory (its future, a few KiB with the
    /// watch it holds) is freed only once it has finished *and* its
    /// `JoinHandle` is dropped, so a handle held for the life of the stream
    /// would keep every finished catch-up in memory as long as the phone.
    pub(super) fn spawn(catch_up: CatchUp, phone: Arc<Phone>) {
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = phone.closed() => {}
                () = catch_up.run() => {}
            }
        });
    }
}

/// The events streams open per user, to cap each user's. Holds a user
/// only while one of their streams is open: at most one entry per open
/// stream, which the global limit bounds.
pub(crate) struct PerUser {
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl PerUser {
    pub(crate) fn new(limit: usize) -> PerUser {
        PerUser {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }
}

/// One of a user's streams, counted until dropped.
struct UserSlot {
    per_user: Arc<PerUser>,
    user_id: String,
}

impl UserSlot {
    /// A slot for `user_id`, unless they hold the most already.
    fn take(per_user: &Arc<PerUser>, user_id: &str) -> Option<UserSlot> {
        let mut open = lock(&per_user.open);
        let count = open.entry(user_id.to_owned()).or_insert(0);
        if *count >= per_user.limit {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            per_user: Arc::clone(per_user),
            user_id: user_id.to_owned(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.per_user.open);
        if let Some(count) = open.get_mut(&self.user_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// The route of the events stream.
pub const PATH: &str = "/v1/users/{user_id}/events";

/// `GET /v1/users/{user_id}/events`.
pub(crate) async fn handler(
    State(gateway): State<Arc<Gateway>>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let subject = gateway.options.auth.authenticate(&headers)?;
    let user_id = crate::authorize(&subject, &user_id)?;
    let cursor = match headers.get("last-event-id") {
        Some(value) => Cursor::parse(
            value
                .to_str()
                .map_err(|_| HttpError::invalid("Last-Event-ID is not text"))?,
        )
        .map_err(HttpError::invalid)?,
        None => Cursor::default(),
    };
    let permit = Arc::clone(&gateway.streams).try_acquire_owned().map_err(|_| {
        HttpError::new(
            tonic::Code::Unavailable,
            format!(
                "the gateway is serving its limit of {} event streams; retry later",
                gateway.options.max_event_streams
            ),
        )
    })?;
    // One user cannot take every stream (nor open upstream catch-ups
    // without end): a few devices each.
    // A vanished device's stream ends within `UNACKED_TIMEOUT` and a
    // heartbeat: Retry-After says when its slot will be back.
    let user_slot = UserSlot::take(&gateway.streams_per_user, &user_id).ok_or_else(|| {
        HttpError::new(
            tonic::Code::ResourceExhausted,
            format!(
                "this user has {} event streams open, the most per user; close one (each device needs one)",
                gateway.streams_per_user.limit
            ),
        )
        .with_header(http::header::RETRY_AFTER, http::HeaderValue::from_static("45"))
    })?;

    let fanout = &gateway.fanout;
    fanout.start();
    let (phone, inbox) = Phone::new(user_id.clone(), gateway.options.phone_queue);
    let fans = Source::ALL.map(|source| Arc::clone(fanout.fan(source)));
    for (source, fan) in Source::ALL.into_iter().zip(&fans) {
        let catch_up = CatchUp::new(
            Arc::clone(fan),
            fanout.upstream(source).clone(),
            Arc::clone(&phone),
            cursor.get(source),
        );
        catch_up::spawn(catch_up, Arc::clone(&phone));
    }
    tracing::info!(user_id, %cursor, "events stream opened");

    let reader = Reader {
        inbox,
        cursor,
        positions: Arc::clone(fanout.positions()),
        membership: Membership {
            fans,
            phone,
            _permit: permit,
            _user_slot: user_slot,
        },
    };
    let shutdown = gateway.shutdown.clone();
    let stream = futures_util::stream::unfold(reader, |mut reader| async move {
        let event = reader.next().await?;
        Some((Ok(event), reader))
    })
    .take_until(async move { shutdown.wait().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(gateway.options.heartbeat).text("heartbeat")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let cursor = Cursor::parse("12.0.7").expect("valid");
        assert_eq!(cursor.to_string(), "12.0.7");
        assert_eq!(cursor.get(Source::Photos), 7);
        for bad in ["", "1.2", "1.2.3.4", "a.b.c", "1.-2.3"] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
    }
}
