//! The ring a feed's watchers read in this process, and how the tail
//! publishes into it without making everyone else wait.
//!
//! The ring is bounded (`capacity` changes) and shared: a change is stored
//! once, as an `Arc`, whatever the number of watchers. Its watchers are
//! split into groups of at most [`GROUP`], each group a tokio broadcast
//! channel of its own, and the tail publishes a batch of changes into one
//! group after the other, yielding to the scheduler in between.
//!
//! Why groups: one broadcast channel wakes all of its waiters in one send.
//! With 10,000 watch streams on one worker thread that is 10,000 tasks
//! queued at once, tens of milliseconds of work, and a writer's next
//! request, acknowledgement or any unary call that becomes ready meanwhile
//! waits behind all of it. Woken a group at a time, with a yield in
//! between, what became ready runs after at most one group's work
//! (hundreds of microseconds), and the fan-out as a whole costs the same.
//! A group is 256 watchers: tokio's per-worker run queue holds 256 tasks,
//! so one group's wake-ups never spill into the shared queue.
//!
//! The ring also carries the progress ticks: once per progress interval
//! the feed's ticker sends a numbered [`Item::Tick`] into every group
//! (paced the same way), and a watcher that sent nothing since the previous
//! one answers it with a progress frame; a tick with a newer one already
//! sent behind it is stale and skipped (the newer one answers). A tick
//! takes a place in the ring like a change: a change left unread for a
//! whole ring of changes and ticks is overwritten, and its watcher is ended
//! (when it next reads) for it to resume. One timer per feed, not one per stream: an idle stream
//! costs no timer entry, and a busy one no timer to re-arm on every wait.
//!
//! Each group has its own head (the last revision sent into it), read with
//! the subscription in one step, so a new watcher's receiver holds exactly
//! the changes after the head it was given; the feed's head moves once a
//! batch is in every group, under the group list's lock, so that a group
//! created meanwhile starts from a head its own ring will continue.

use std::sync::{
    Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use tokio::sync::broadcast;

use crate::change::Change;

/// The most watchers woken by one send (see the module docs).
pub(crate) const GROUP: usize = 256;

/// What the ring carries to each watcher.
pub(crate) enum Item<T> {
    /// The next change.
    Change(Arc<Change<T>>),
    /// A progress interval has passed: the tick's number (see the module
    /// docs).
    Tick(u64),
}

// Not derived: cloning an item clones an `Arc`, whatever `T` is.
impl<T> Clone for Item<T> {
    fn clone(&self) -> Item<T> {
        match self {
            Item::Change(change) => Item::Change(Arc::clone(change)),
            Item::Tick(number) => Item::Tick(*number),
        }
    }
}

/// The ring of one feed in this process.
pub(crate) struct Ring<T> {
    /// The groups, in the order the tail publishes to them. Only grows (to
    /// the peak number of watchers / [`GROUP`]): a group left empty is
    /// filled again by later watchers.
    groups: RwLock<Vec<Arc<Group<T>>>>,
    capacity: usize,
    /// The last revision in every group.
    head: AtomicI64,
    /// The last revision sent into any group, moved before the first send:
    /// a change a watcher has seen is at most this (`head` moves only once
    /// every group has it, and the tail may be descheduled in between).
    sent: AtomicI64,
    /// Bumped each time the ring is replaced: a watcher whose ring was
    /// replaced must not claim progress from the new head.
    generation: AtomicU64,
    /// The number of the last tick sent.
    ticks: AtomicU64,
}

/// One group of watchers: a broadcast channel, and the last revision sent
/// into it.
pub(crate) struct Group<T> {
    /// Replaced (closing every receiver) when the ring restarts.
    sender: RwLock<broadcast::Sender<Item<T>>>,
    /// Stored after the send, under the sender's read lock: a watcher that
    /// reads it and then finds its receiver empty has every change up to it
    /// (unless its receiver lagged: then some may have been overwritten).
    head: AtomicI64,
    /// The number of the last tick sent into this group.
    tick: AtomicU64,
}

/// A watcher's place in the ring.
pub(crate) struct Subscription<T> {
    /// Receives exactly the changes after `head`.
    pub(crate) receiver: broadcast::Receiver<Item<T>>,
    /// The group `receiver` belongs to.
    pub(crate) group: Arc<Group<T>>,
    /// The ring's generation when subscribing.
    pub(crate) generation: u64,
    /// The last revision sent into the group before the subscription.
    pub(crate) head: i64,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T> Group<T> {
    fn new(capacity: usize, head: i64) -> Group<T> {
        Group {
            sender: RwLock::new(broadcast::channel(capacity).0),
            head: AtomicI64::new(head),
            tick: AtomicU64::new(0),
        }
    }

    /// The number of the last tick sent into this group.
    pub(crate) fn last_tick(&self) -> u64 {
        self.tick.load(Ordering::SeqCst)
    }

    /// The last revision sent into this group.
    pub(crate) fn head(&self) -> i64 {
        self.head.load(Ordering::SeqCst)
    }

    /// Sends the changes of `batch` this group does not have yet; answers
    /// whether anyone was listening (someone was woken).
    fn send(&self, batch: &[Arc<Change<T>>]) -> bool {
        let sender = read(&self.sender);
        for change in batch {
            if change.revision > self.head() {
                // An error only means nobody in this group is watching.
                let _ = sender.send(Item::Change(Arc::clone(change)));
                self.head.store(change.revision, Ordering::SeqCst);
            }
        }
        sender.receiver_count() > 0
    }

    /// Sends tick `number`; answers whether anyone was listening.
    fn tick(&self, number: u64) -> bool {
        let sender = read(&self.sender);
        // An error only means nobody in this group is watching.
        let listened = sender.send(Item::Tick(number)).is_ok();
        self.tick.store(number, Ordering::SeqCst);
        listened
    }
}

impl<T> Ring<T> {
    /// An empty ring at `head` holding up to `capacity` changes per watcher.
    pub(crate) fn new(capacity: usize, head: i64) -> Ring<T> {
        Ring {
            groups: RwLock::new(Vec::new()),
            capacity,
            head: AtomicI64::new(head),
            sent: AtomicI64::new(head),
            generation: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        }
    }

    /// The last revision in every group.
    pub(crate) fn head(&self) -> i64 {
        self.head.load(Ordering::SeqCst)
    }

    /// The last revision sent into any group: at or ahead of
    /// [`Ring::head`] while a publish is under way.
    pub(crate) fn sent(&self) -> i64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// How many changes a watcher may fall behind.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The ring's generation now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A place in the first group with room (a new group if none has).
    pub(crate) fn subscribe(&self) -> Subscription<T> {
        // The list's read lock keeps `restart` (write lock) out, so the
        // generation read here is the one of the sender subscribed to.
        {
            let groups = read(&self.groups);
            if let Some(subscription) = self.join_one_with_room(&groups) {
                return subscription;
            }
        }
        let mut groups = write(&self.groups);
        // Another subscriber may have made a group meanwhile.
        if let Some(subscription) = self.join_one_with_room(&groups) {
            return subscription;
        }
        // Under the list's write lock the feed's head does not move: the new
        // group's ring continues from it (see `publish`).
        let group = Arc::new(Group::new(self.capacity, self.head()));
        groups.push(Arc::clone(&group));
        let sender = write(&group.sender);
        self.join(&group, &sender)
    }

    /// Subscribes to the first of `groups` with room, if any. A full group
    /// is passed over under its read lock, so a new watch does not wait
    /// for the sends into every full group.
    fn join_one_with_room(&self, groups: &[Arc<Group<T>>]) -> Option<Subscription<T>> {
        let room = |sender: &broadcast::Sender<Item<T>>| sender.receiver_count() < GROUP;
        groups.iter().find_map(|group| {
            if !room(&read(&group.sender)) {
                return None;
            }
            let sender = write(&group.sender);
            room(&sender).then(|| self.join(group, &sender))
        })
    }

    /// Subscribes to `group`, whose `sender` is held write-locked: `send`
    /// moves the group's head under its read lock, so no send is half done
    /// (sent, head not yet moved) here.
    fn join(&self, group: &Arc<Group<T>>, sender: &broadcast::Sender<Item<T>>) -> Subscription<T> {
        Subscription {
            receiver: sender.subscribe(),
            group: Arc::clone(group),
            generation: self.generation(),
            head: group.head(),
        }
    }

    /// Publishes `batch` (consecutive changes, in revision order) into every
    /// group, one group after the other, yielding between two groups that
    /// woke someone (see the module docs).
    pub(crate) async fn publish(&self, batch: &[Arc<Change<T>>]) {
        let Some(last) = batch.last().map(|change| change.revision) else {
            return;
        };
        // Before any watcher can see it: see `sent`.
        self.sent.fetch_max(last, Ordering::SeqCst);
        loop {
            let groups: Vec<Arc<Group<T>>> = read(&self.groups).clone();
            paced(groups, |group| group.head() < last, |group| group.send(batch)).await;
            // Every group has the batch, including any created meanwhile
            // (from the head before it): the feed's head moves, under the
            // list's lock so that no group is created in between.
            let groups = read(&self.groups);
            if groups.iter().all(|group| group.head() >= last) {
                self.head.store(last, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Sends a progress tick into every group, one group after the other,
    /// yielding between two groups that woke someone (as `publish` does).
    pub(crate) async fn tick(&self) {
        let number = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
        let groups: Vec<Arc<Group<T>>> = read(&self.groups).clone();
        paced(groups, |_| true, |group| group.tick(number)).await;
    }

    /// Closes every group's ring for every current watcher (they end and
    /// resume from the database) and opens new ones.
    pub(crate) fn restart(&self) {
        let groups = write(&self.groups);
        self.generation.fetch_add(1, Ordering::SeqCst);
        for group in groups.iter() {
            *write(&group.sender) = broadcast::channel(self.capacity).0;
        }
    }
}

/// Sends with `send` into each of `groups` that `wants` it, one after the
/// other, yielding to the scheduler before the next group whenever a send
/// woke someone (`send` answers whether it did; see the module docs).
async fn paced<T>(
    groups: Vec<Arc<Group<T>>>,
    wants: impl Fn(&Group<T>) -> bool,
    mut send: impl FnMut(&Group<T>) -> bool,
) {
    let mut woke = false;
    for group in groups {
        if !wants(&group) {
            continue;
        }
        if woke {
            tokio::task::yield_now().await;
        }
        woke = send(&group);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::pin,
        task::{Context, Waker},
    };

    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;

    fn change(revision: i64) -> Arc<Change<()>> {
        Arc::new(Change::new(revision, format!("e{revision}"), String::new(), None))
    }

    /// The revision of a change received (`None`: nothing, or a tick).
    fn revision(received: Result<Item<()>, TryRecvError>) -> Option<i64> {
        match received {
            Ok(Item::Change(change)) => Some(change.revision),
            _ => None,
        }
    }

    #[test]
    fn watchers_fill_groups_of_at_most_group() {
        let ring = Ring::<()>::new(16, 0);
        let subscriptions: Vec<_> = (0..2 * GROUP + 1).map(|_| ring.subscribe()).collect();
        let first = Arc::clone(&subscriptions[0].group);
        let second = Arc::clone(&subscriptions[GROUP].group);
        let third = Arc::clone(&subscriptions[2 * GROUP].group);
        assert!(subscriptions[..GROUP].iter().all(|s| Arc::ptr_eq(&s.group, &first)));
        assert!(
            subscriptions[GROUP..2 * GROUP]
                .iter()
                .all(|s| Arc::ptr_eq(&s.group, &second))
        );
        assert!(!Arc::ptr_eq(&first, &second) && !Arc::ptr_eq(&second, &third));
        // A place freed is taken again before a new group is made.
        drop(subscriptions);
        let again = ring.subscribe();
        assert!(Arc::ptr_eq(&again.group, &first));
        assert_eq!(read(&ring.groups).len(), 3);
    }

    #[test]
    fn publishing_wakes_one_group_then_yields_and_reaches_a_group_made_meanwhile() {
        let ring = Ring::<()>::new(16, 0);
        let mut early: Vec<_> = (0..2 * GROUP).map(|_| ring.subscribe()).collect();
        let batch = [change(1), change(2)];
        let mut publish = pin!(ring.publish(&batch));
        let mut cx = Context::from_waker(Waker::noop());
        // The first group has the batch; the tail yields before the second.
        assert!(publish.as_mut().poll(&mut cx).is_pending());
        assert_eq!(revision(early[0].receiver.try_recv()), Some(1));
        assert_eq!(early[GROUP].receiver.try_recv().err(), Some(TryRecvError::Empty));
        assert_eq!(ring.head(), 0, "the feed's head moves once every group has the batch");
        assert_eq!(
            ring.sent(),
            2,
            "what a watcher may have seen is known before any has it"
        );
        // A watcher arriving now fills a new group, from the head before
        // the batch: the batch must reach it too.
        let mut late = ring.subscribe();
        assert_eq!(late.head, 0);
        while publish.as_mut().poll(&mut cx).is_pending() {}
        assert_eq!((ring.head(), ring.sent()), (2, 2));
        assert_eq!(revision(early[GROUP].receiver.try_recv()), Some(1));
        assert_eq!(revision(late.receiver.try_recv()), Some(1));
        assert_eq!(revision(late.receiver.try_recv()), Some(2));
        assert_eq!(late.receiver.try_recv().err(), Some(TryRecvError::Empty));
    }

    #[test]
    fn a_change_is_let_go_once_every_watcher_of_its_groups_has_it_or_is_gone() {
        let ring = Ring::<()>::new(16, 0);
        let mut subscriptions: Vec<_> = (0..GROUP + 1).map(|_| ring.subscribe()).collect();
        let first = change(1);
        let batch = [Arc::clone(&first)];
        let mut cx = Context::from_waker(Waker::noop());
        let mut publish = pin!(ring.publish(&batch));
        while publish.as_mut().poll(&mut cx).is_pending() {}
        // Both groups' rings hold it (besides `first` and `batch`).
        assert_eq!(Arc::strong_count(&first), 4);
        for subscription in &mut subscriptions[..GROUP] {
            assert_eq!(revision(subscription.receiver.try_recv()), Some(1));
        }
        assert_eq!(Arc::strong_count(&first), 3, "read by every watcher of its group");
        drop(subscriptions);
        assert_eq!(Arc::strong_count(&first), 2, "its last watcher gone");
    }

    #[test]
    fn a_tick_reaches_every_group_after_the_changes_before_it_paced_like_a_publish() {
        let ring = Ring::<()>::new(16, 0);
        let mut subscriptions: Vec<_> = (0..GROUP + 1).map(|_| ring.subscribe()).collect();
        let batch = [change(1)];
        let mut cx = Context::from_waker(Waker::noop());
        let mut publish = pin!(ring.publish(&batch));
        while publish.as_mut().poll(&mut cx).is_pending() {}
        let mut tick = pin!(ring.tick());
        assert!(tick.as_mut().poll(&mut cx).is_pending(), "yields after the first group");
        assert!(
            subscriptions[GROUP].receiver.len() == 1,
            "the second group has no tick yet"
        );
        while tick.as_mut().poll(&mut cx).is_pending() {}
        let mut second = pin!(ring.tick());
        while second.as_mut().poll(&mut cx).is_pending() {}
        for subscription in &mut subscriptions {
            assert_eq!(revision(subscription.receiver.try_recv()), Some(1));
            // Numbered, and each group knows the last: a watcher reading
            // tick 1 sees that tick 2 is behind it (stale, skipped).
            assert!(matches!(subscription.receiver.try_recv(), Ok(Item::Tick(1))));
            assert_eq!(subscription.group.last_tick(), 2);
            assert!(matches!(subscription.receiver.try_recv(), Ok(Item::Tick(2))));
            assert_eq!(subscription.receiver.try_recv().err(), Some(TryRecvError::Empty));
        }
    }

    #[test]
    fn a_restart_closes_every_group_and_moves_the_generation() {
        let ring = Ring::<()>::new(16, 0);
        let mut subscriptions: Vec<_> = (0..GROUP + 1).map(|_| ring.subscribe()).collect();
        ring.restart();
        assert_eq!(ring.generation(), 1);
        for subscription in &mut subscriptions {
            assert_eq!(subscription.receiver.try_recv().err(), Some(TryRecvError::Closed));
        }
        assert_eq!(ring.subscribe().generation, 1);
    }
}
