//! The endpoint set of one channel: every endpoint DNS (or the list) gave,
//! each probing, healthy or ejected; and the snapshot of the healthy ones
//! that calls pick from.
//!
//! Writers (the discovery task, the health watchers, a call that saw its
//! connection break) change the state under one mutex and publish a new
//! [`Snapshot`] on a `watch` channel; calls only read the latest snapshot.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{Notify, watch};
use tonic::{Status, transport::Channel};

/// Whether the endpoint itself said it is out (its health check), or
/// something failed.
#[derive(Debug, Clone, Copy)]
enum Announced {
    Yes,
    No,
}

/// The error behind an ejection, kept as the source of the `UNAVAILABLE`
/// of calls that find no replica (so `tonic::ConnectError` can be found).
pub(crate) type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// One endpoint: the position of its address in the target (two items of
/// a list may resolve to one IP; each keeps its own host name) and the
/// socket address it resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) index: usize,
    pub(crate) addr: SocketAddr,
}

/// A healthy endpoint as calls see it. A new one (with a fresh channel,
/// so a fresh connection) each time the endpoint is admitted; calls in
/// flight on an old one keep it, and its connection, until they end.
pub(crate) struct Member {
    pub(crate) key: Key,
    pub(crate) label: Arc<str>,
    pub(crate) channel: Channel,
    /// Calls and open streams on this member: the load two-choice picking
    /// compares.
    in_flight: AtomicUsize,
    /// Wakes the endpoint's health watcher when a call saw the connection
    /// fail (passive ejection); shared by all members of the endpoint.
    suspect: Arc<Notify>,
}

impl Member {
    pub(crate) fn new(key: Key, label: Arc<str>, channel: Channel, suspect: Arc<Notify>) -> Arc<Member> {
        Arc::new(Member {
            key,
            label,
            channel,
            in_flight: AtomicUsize::new(0),
            suspect,
        })
    }

    /// Calls and streams in flight.
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call until the returned guard drops.
    pub(crate) fn enter(self: &Arc<Member>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Tells the health watcher to look again, now.
    pub(crate) fn suspect(&self) {
        // A stored permit: the watcher may be between two awaits.
        self.suspect.notify_one();
    }
}

/// One call (or stream) on a member, counted until dropped.
pub(crate) struct InFlight(Arc<Member>);

impl InFlight {
    pub(crate) fn member(&self) -> &Arc<Member> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What calls pick from.
#[derive(Clone)]
pub(crate) struct Snapshot {
    /// The healthy members, in target order.
    pub(crate) ready: Arc<[Arc<Member>]>,
    /// Every endpoint has had a first verdict and every name a first
    /// lookup: an empty `ready` now means none is healthy (fail fast),
    /// not "not known yet" (wait).
    pub(crate) settled: bool,
    /// Why the others are out, for the `UNAVAILABLE` message.
    why: Arc<str>,
    /// The error behind the first ejection that has one.
    cause: Option<Cause>,
}

impl Snapshot {
    /// No endpoint at all.
    pub(crate) fn empty() -> Snapshot {
        Snapshot {
            ready: Arc::from([]),
            settled: true,
            why: Arc::from(""),
            cause: None,
        }
    }
}

/// One endpoint as [`crate::Balanced::replicas`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The endpoint: `10.0.0.3:50051`, or `users:50051 (10.0.0.3:50051)`
    /// for one resolved from a name.
    pub endpoint: String,
    /// Whether calls go there.
    pub state: ReplicaState,
}

/// Whether calls go to a [`Replica`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// Not judged yet: its first health answer is awaited.
    Probing,
    /// In the balancer.
    Healthy,
    /// Out of the balancer until its health check passes again.
    Ejected {
        /// Why, in words.
        reason: String,
    },
}

enum Health {
    Probing,
    Ready(Arc<Member>),
    Ejected(String, Option<Cause>),
}

struct Entry {
    label: Arc<str>,
    health: Health,
}

#[derive(Default)]
struct State {
    endpoints: BTreeMap<Key, Entry>,
    /// Every name has been looked up once.
    resolved: bool,
    /// The last failed lookup of each address (by position), until one
    /// succeeds.
    dns_errors: BTreeMap<usize, String>,
}

/// The endpoint set of one channel; shared by its tasks and calls.
pub(crate) struct Registry {
    label: Arc<str>,
    state: Mutex<State>,
    snapshot: watch::Sender<Snapshot>,
}

impl Registry {
    pub(crate) fn new(label: &str) -> (Arc<Registry>, watch::Receiver<Snapshot>) {
        let (snapshot, receiver) = watch::channel(Snapshot {
            settled: false,
            ..Snapshot::empty()
        });
        let registry = Registry {
            label: Arc::from(label),
            state: Mutex::new(State::default()),
            snapshot,
        };
        (Arc::new(registry), receiver)
    }

    /// What the channel reaches, for messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic elsewhere
        // leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new endpoint, probing until its first health verdict.
    pub(crate) fn insert(&self, key: Key, label: Arc<str>) {
        let mut state = self.lock();
        let health = Health::Probing;
        state.endpoints.insert(key, Entry { label, health });
        self.publish(&state);
    }

    /// An endpoint DNS no longer gives.
    pub(crate) fn remove(&self, key: Key) {
        let mut state = self.lock();
        if let Some(entry) = state.endpoints.remove(&key) {
            tracing::info!(target = %self.label, endpoint = %entry.label, "replica left DNS; removed");
            self.publish(&state);
        }
    }

    /// Puts `member` in the balancer (replacing an older member).
    pub(crate) fn admit(&self, member: Arc<Member>) {
        let mut state = self.lock();
        let Some(entry) = state.endpoints.get_mut(&member.key) else {
            return;
        };
        match &entry.health {
            Health::Ejected(reason, _) => {
                tracing::info!(target = %self.label, endpoint = %entry.label, was = %reason, "replica healthy again; admitted");
            }
            _ => tracing::debug!(target = %self.label, endpoint = %entry.label, "replica healthy; admitted"),
        }
        entry.health = Health::Ready(member);
        self.publish(&state);
    }

    /// Takes the endpoint out of the balancer (a first verdict, too), or
    /// says the newest reason it is still out: something failed (a
    /// warning).
    pub(crate) fn eject(&self, key: Key, reason: &str, cause: Option<Cause>) {
        self.take_out(key, reason, cause, Announced::No);
    }

    /// Takes the endpoint out because its own health says it does not
    /// serve: a replica draining for a restart says so on purpose, which is
    /// news (info), not a failure.
    pub(crate) fn step_out(&self, key: Key, reason: &str) {
        self.take_out(key, reason, None, Announced::Yes);
    }

    fn take_out(&self, key: Key, reason: &str, cause: Option<Cause>, announced: Announced) {
        let mut state = self.lock();
        let Some(entry) = state.endpoints.get_mut(&key) else {
            return;
        };
        match (&entry.health, announced) {
            (Health::Ejected(old, _), _) if old == reason => return,
            (Health::Ejected(..), _) => {
                tracing::debug!(target = %self.label, endpoint = %entry.label, %reason, "replica still out")
            }
            (_, Announced::Yes) => {
                tracing::info!(target = %self.label, endpoint = %entry.label, %reason, "replica stepped out")
            }
            (_, Announced::No) => {
                tracing::warn!(target = %self.label, endpoint = %entry.label, %reason, "replica ejected")
            }
        }
        entry.health = Health::Ejected(reason.to_owned(), cause);
        self.publish(&state);
    }

    /// Whether `member` is the one in the balancer for its endpoint.
    pub(crate) fn is_current(&self, member: &Arc<Member>) -> bool {
        matches!(
            self.lock().endpoints.get(&member.key).map(|e| &e.health),
            Some(Health::Ready(m)) if Arc::ptr_eq(m, member)
        )
    }

    /// Ejects `member`'s endpoint if `member` is still the one in the
    /// balancer (not if it was re-admitted since with a new connection,
    /// nor if it is out already); `true` if it did.
    pub(crate) fn eject_member(&self, member: &Arc<Member>, reason: &str, cause: &Cause) -> bool {
        // Checked and ejected under one lock: of two calls failing at
        // once, one ejects (and wakes the watcher).
        let mut state = self.lock();
        let Some(entry) = state.endpoints.get_mut(&member.key) else {
            return false;
        };
        if !matches!(&entry.health, Health::Ready(m) if Arc::ptr_eq(m, member)) {
            return false;
        }
        tracing::warn!(target = %self.label, endpoint = %entry.label, %reason, "replica ejected");
        entry.health = Health::Ejected(reason.to_owned(), Some(cause.clone()));
        self.publish(&state);
        true
    }

    /// Every name has been looked up once.
    pub(crate) fn resolved(&self) {
        let mut state = self.lock();
        if !state.resolved {
            state.resolved = true;
            self.publish(&state);
        }
    }

    /// The outcome of looking up address `index`.
    pub(crate) fn dns_result(&self, index: usize, error: Option<String>) {
        let mut state = self.lock();
        let changed = match error {
            Some(error) => state.dns_errors.insert(index, error.clone()) != Some(error),
            None => state.dns_errors.remove(&index).is_some(),
        };
        if changed {
            self.publish(&state);
        }
    }

    /// Every endpoint and its state.
    pub(crate) fn replicas(&self) -> Vec<Replica> {
        let state = self.lock();
        let replica = |entry: &Entry| Replica {
            endpoint: entry.label.to_string(),
            state: match &entry.health {
                Health::Probing => ReplicaState::Probing,
                Health::Ready(_) => ReplicaState::Healthy,
                Health::Ejected(reason, _) => ReplicaState::Ejected { reason: reason.clone() },
            },
        };
        state.endpoints.values().map(replica).collect()
    }

    fn publish(&self, state: &State) {
        let ready: Vec<Arc<Member>> = state
            .endpoints
            .values()
            .filter_map(|entry| match &entry.health {
                Health::Ready(member) => Some(member.clone()),
                _ => None,
            })
            .collect();
        let probing = state.endpoints.values().any(|e| matches!(e.health, Health::Probing));
        let cause = state.endpoints.values().find_map(|entry| match &entry.health {
            Health::Ejected(_, cause) => cause.clone(),
            _ => None,
        });
        self.snapshot.send_replace(Snapshot {
            ready: ready.into(),
            settled: state.resolved && !probing,
            why: why(state).into(),
            cause,
        });
    }

    /// The `UNAVAILABLE` of a call that found no healthy replica; its
    /// source is the error behind an ejection, if one had an error.
    pub(crate) fn no_replica(&self, snapshot: &Snapshot) -> Status {
        let mut status = match snapshot.why.is_empty() {
            true => Status::unavailable(format!("no replica of {} is known; retry with backoff", self.label)),
            false => Status::unavailable(format!(
                "no replica of {} is healthy ({}); retry with backoff",
                self.label, snapshot.why
            )),
        };
        if let Some(cause) = &snapshot.cause {
            status.set_source(cause.clone());
        }
        status
    }
}

/// Why the endpoints that are out are out, in a line: at most a few, and
/// how many more.
fn why(state: &State) -> String {
    const SHOWN: usize = 4;
    let mut reasons = state.dns_errors.values().cloned().collect::<Vec<_>>();
    reasons.extend(state.endpoints.values().filter_map(|entry| match &entry.health {
        Health::Ejected(reason, _) => Some(format!("{}: {reason}", entry.label)),
        Health::Probing => Some(format!("{}: no health answer yet", entry.label)),
        Health::Ready(_) => None,
    }));
    let mut line = reasons.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if reasons.len() > SHOWN {
        let _ = write!(line, "; and {} more", reasons.len() - SHOWN);
    }
    line
}
