//! The supervisor: the one task that decides which subscriptions this
//! process delivers for. Replicas of the delivery component on one database
//! share the work by a lease (`events:delivery`, from the changefeed's
//! leases): the holder runs a delivery task per active subscription, the
//! others stand by and take over when it stops renewing. Every write a
//! task makes to the queue is fenced by the lease's term, so a holder that
//! lost the lease without knowing it (a long pause) cannot move a cursor.
//!
//! It wakes every `scan_interval`, or at once when poked (an RPC changed a
//! subscription here, or a task stopped), renews the lease, and starts,
//! restarts (generation changed, task ended) or stops tasks to match the
//! table. Subscriptions changed through another replica are seen at the
//! next scan.

use std::{collections::HashMap, future::Future, sync::Arc};

use lightbox_changefeed::{Lease, Term};

use crate::{
    delivery::{Engine, Runner},
    queue::DELIVERY_LEASE,
    store,
};

/// Runs the delivery tasks until `shutdown`, then stops them (in-flight
/// deliveries get their timeout) and releases the lease.
pub(crate) async fn supervise(engine: Arc<Engine>, shutdown: impl Future<Output = ()>) {
    let holder = lightbox_changefeed::lease::holder_id();
    let ttl = engine.options.scan_interval.saturating_mul(3);
    let mut runners: HashMap<String, Runner> = HashMap::new();
    let mut held: Option<Term> = None;
    tokio::pin!(shutdown);
    loop {
        match Lease::try_acquire(&engine.db, DELIVERY_LEASE, &holder, ttl).await {
            Ok(Some(term)) => {
                if held != Some(term) {
                    if held.is_some() {
                        tracing::warn!(%term, "the delivery lease changed hands and came back; restarting deliveries");
                    }
                    stop_all(&mut runners).await;
                    held = Some(term);
                    tracing::info!(%term, "delivering events (this replica holds the delivery lease)");
                }
                if let Err(err) = reconcile(&engine, &mut runners, term).await {
                    tracing::warn!(%err, "cannot read the subscriptions; will retry");
                }
            }
            Ok(None) => {
                if held.take().is_some() {
                    tracing::info!("another replica holds the delivery lease; standing by");
                }
                stop_all(&mut runners).await;
            }
            // Keep going: the tasks' fenced writes notice a takeover.
            Err(err) => tracing::warn!(%err, "cannot renew the delivery lease; will retry"),
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = engine.poke.notified() => {}
            _ = tokio::time::sleep(engine.options.scan_interval) => {}
        }
    }
    stop_all(&mut runners).await;
    if held.is_some()
        && let Err(err) = Lease::release(&engine.db, DELIVERY_LEASE, &holder).await
    {
        tracing::warn!(%err, "cannot release the delivery lease; another replica takes it when it expires");
    }
}

/// Starts and stops tasks to match the active subscriptions.
async fn reconcile(
    engine: &Arc<Engine>,
    runners: &mut HashMap<String, Runner>,
    term: Term,
) -> Result<(), crate::EventsError> {
    let mut wanted = HashMap::new();
    let mut after = String::new();
    loop {
        let page = store::list(&engine.db, &after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        wanted.extend(
            page.into_iter()
                .filter(|sub| !sub.paused)
                .map(|sub| (sub.id.clone(), sub)),
        );
    }
    let obsolete: Vec<String> = runners
        .iter()
        .filter(|(id, runner)| {
            runner.is_finished() || wanted.get(*id).is_none_or(|sub| sub.generation != runner.generation)
        })
        .map(|(id, _)| id.clone())
        .collect();
    let mut stopping = Vec::new();
    for id in obsolete {
        if let Some(runner) = runners.remove(&id) {
            runner.signal();
            stopping.push(runner.join());
        }
    }
    futures_util::future::join_all(stopping).await;
    for (id, sub) in wanted {
        if let std::collections::hash_map::Entry::Vacant(slot) = runners.entry(id) {
            tracing::debug!(subscription = %slot.key(), generation = sub.generation, "starting its delivery task");
            slot.insert(Runner::start(Arc::clone(engine), sub, term));
        }
    }
    Ok(())
}

/// Stops every task at once.
async fn stop_all(runners: &mut HashMap<String, Runner>) {
    let all: Vec<Runner> = runners.drain().map(|(_, runner)| runner).collect();
    all.iter().for_each(Runner::signal);
    futures_util::future::join_all(all.into_iter().map(Runner::join)).await;
}
