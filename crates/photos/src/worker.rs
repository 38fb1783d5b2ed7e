//! The worker pool: processes the photo jobs after `CreatePhoto` has
//! answered.
//!
//! One dispatcher per process claims jobs while one of its `workers` slots
//! is free, and runs each claimed attempt in a task of its own:
//!
//! - **Wake-ups**: `CreatePhoto` notifies the dispatcher after its commit
//!   (in-process, a [`Notify`]: no NOTIFY per row); it also polls every
//!   `poll_interval`, the safety net for jobs written by other replicas and
//!   for backed-off retries coming due, and rescues lapsed leases then.
//! - **Work**: the image is decoded in `spawn_blocking` (CPU-bound work off
//!   the async runtime's threads) under a semaphore of the cores, while the
//!   attempt renews its lease every third of it; a lease found lost ends the
//!   attempt at once (its result would be refused anyway).
//! - **Completion**: the thumbnail, the photo's new state (through its feed)
//!   and the job's end are written in one transaction, fenced by the
//!   attempt: done once in effect, however many workers tried.
//! - **Failure**: a permanent error (the image) discards the job at once; a
//!   transient one queues it again after an exponential backoff with
//!   jitter, until the last attempt allowed, then discards it. A discarded
//!   job's photo is `FAILED`, with the reason; every attempt's error is kept.
//!
//! Dropping the pool's future (the component stopping) aborts the attempts
//! in flight: their leases lapse and they are rescued, here after a restart
//! or on another replica.

use std::{sync::Arc, time::Duration};

use lightbox_api::photos::Photo;
use lightbox_changefeed::{FeedError, WriteTx};
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
    time::Instant,
};

use crate::{
    PhotoJobsAdmin, PhotosService,
    decode::Processed,
    jobs::{self, Claim},
    options::{JobFailure, JobOptions, millis},
    processing,
};

/// What the service and its pool share.
#[derive(Clone)]
pub(crate) struct Jobs {
    pub(crate) options: JobOptions,
    /// Notified after a commit that queued a job: the dispatcher looks at once.
    pub(crate) wake: Arc<Notify>,
    /// One permit per decode at a time.
    decoders: Arc<Semaphore>,
    /// This process's name in the jobs it claims.
    worker: Arc<str>,
}

impl Jobs {
    pub(crate) fn new(options: JobOptions) -> Jobs {
        Jobs {
            decoders: Arc::new(Semaphore::new(options.decoders.max(1))),
            options,
            wake: Arc::new(Notify::new()),
            worker: Arc::from(lightbox_changefeed::lease::holder_id()),
        }
    }
}

/// Runs the pool until dropped.
pub(crate) async fn run(service: PhotosService) {
    let jobs = service.jobs.clone();
    if jobs.options.workers == 0 {
        return;
    }
    let slots = Arc::new(Semaphore::new(jobs.options.workers));
    // The attempts in flight: aborted when the pool is dropped.
    let mut running = JoinSet::new();
    let mut next_poll = Instant::now();
    loop {
        while running.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + jobs.options.poll_interval;
            if let Err(err) = rescue(&service).await {
                tracing::warn!(error = %err, "cannot look for photo jobs whose worker was lost; next poll retries");
            }
        }
        match jobs::claim(service.feed.db(), &jobs.worker, jobs.options.lease_ms()).await {
            Ok(Some(claim)) => {
                tracing::debug!(photo_id = %claim.photo_id, attempt = claim.attempt, "photo job claimed");
                let service = service.clone();
                running.spawn(async move {
                    attempt(&service, claim).await;
                    drop(slot);
                });
                // Maybe more are due: claim again at once.
                continue;
            }
            Ok(None) => drop(slot),
            Err(err) => {
                drop(slot);
                tracing::warn!(error = %err, "cannot claim photo jobs; next poll retries");
            }
        }
        tokio::select! {
            _ = jobs.wake.notified() => {}
            _ = tokio::time::sleep_until(next_poll) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
}

/// One attempt of `claim`, from the image to its recorded outcome.
async fn attempt(service: &PhotosService, claim: Claim) {
    let jobs = &service.jobs;
    let started = Instant::now();
    let work = async {
        let image = match jobs::upload(service.feed.db(), &claim.photo_id).await {
            Ok(Some(image)) => image,
            Ok(None) => return Err(failure("the uploaded image is gone", true)),
            Err(err) => return Err(failure(format!("cannot read the uploaded image: {err}"), false)),
        };
        let Ok(permit) = Arc::clone(&jobs.decoders).acquire_owned().await else {
            return Err(failure("the decoders are closed", false));
        };
        let (processor, limits) = (jobs.options.processor.clone(), jobs.options.limits);
        // CPU-bound: off the runtime's threads, one per core at most (the
        // permit is held until the decode ends, even if this attempt is
        // abandoned meanwhile).
        let decoded = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            (processor.0)(&image, &limits)
        })
        .await
        .unwrap_or_else(|err| Err(failure(format!("the image processing crashed: {err}"), false)));
        tokio::time::sleep_until(started + jobs.options.min_duration).await;
        decoded
    };
    let outcome = tokio::select! {
        outcome = work => outcome,
        () = keep_lease(service, &claim) => {
            tracing::warn!(photo_id = %claim.photo_id, attempt = claim.attempt,
                "photo job lease lost (rescued or discarded meanwhile); abandoning this attempt");
            return;
        }
    };
    let recorded = match &outcome {
        Ok(processed) => complete(service, &claim, processed).await,
        Err(failed) => fail(service, &claim, &failed.message, failed.permanent).await,
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => tracing::warn!(photo_id = %claim.photo_id, attempt = claim.attempt,
            "a late photo job outcome was refused: a newer attempt owns the job"),
        // The lease will lapse and the job be rescued and run again.
        Err(err) => tracing::warn!(photo_id = %claim.photo_id, attempt = claim.attempt, error = %err,
            "cannot record a photo job's outcome; it will run again"),
    }
}

fn failure(message: impl Into<String>, permanent: bool) -> JobFailure {
    JobFailure {
        message: message.into(),
        permanent,
    }
}

/// Renews the lease of `claim` every third of it; returns when it is lost.
async fn keep_lease(service: &PhotosService, claim: &Claim) {
    let options = &service.jobs.options;
    loop {
        tokio::time::sleep(options.lease / 3).await;
        match jobs::renew(service.feed.db(), claim, options.lease_ms()).await {
            Ok(true) => {}
            Ok(false) => return,
            // A failed renewal is retried; if the lease lapses meanwhile,
            // the outcome is refused by the fence.
            Err(err) => tracing::warn!(photo_id = %claim.photo_id, error = %err, "cannot renew a photo job's lease"),
        }
    }
}

/// Records a successful attempt: thumbnail, photo `DONE`, job `done`, in
/// one transaction, fenced. False (nothing written) if the attempt is stale.
pub(crate) async fn complete(service: &PhotosService, claim: &Claim, processed: &Processed) -> Result<bool, FeedError> {
    let mut tx = service.feed.begin().await?;
    let backend = service.feed.db().backend();
    // Lock: the job's row, at this attempt; the feed's counter row is held
    // already (begin), so the photo cannot change meanwhile either.
    if !jobs::end_attempt(tx.conn(), backend, claim, jobs::DONE, 0, false).await? {
        return Ok(false);
    }
    processing::store_thumbnail(&mut tx, &claim.photo_id, &processed.thumbnail).await?;
    let attempts = claim.attempt;
    if !processing::rewrite(&mut tx, &claim.photo_id, |photo| {
        processing::done(photo, processed, attempts)
    })
    .await?
    {
        return Ok(false);
    }
    commit(service, tx).await
}

/// Records a failed attempt: queued again after a backoff, or discarded
/// (permanent, or the last attempt) with the photo `FAILED`. Fenced.
pub(crate) async fn fail(
    service: &PhotosService,
    claim: &Claim,
    message: &str,
    permanent: bool,
) -> Result<bool, FeedError> {
    end_failed(service, claim, message, permanent, false).await
}

/// [`fail`]; `lapsed`: the attempt is taken back from a worker whose lease
/// lapsed (only if it still has, and then due at once: a lost worker says
/// nothing of the job).
async fn end_failed(
    service: &PhotosService,
    claim: &Claim,
    message: &str,
    permanent: bool,
    lapsed: bool,
) -> Result<bool, FeedError> {
    let backend = service.feed.db().backend();
    let last = permanent || claim.attempt >= claim.max_attempt;
    if !last {
        // No change to the photo (still PENDING): a plain transaction.
        let mut tx = service.feed.db().begin_write().await?;
        let delay = match lapsed {
            true => 0,
            false => millis(service.jobs.options.backoff(claim.attempt)),
        };
        if !jobs::end_attempt(&mut tx, backend, claim, jobs::QUEUED, delay, lapsed).await? {
            return Ok(false);
        }
        jobs::record_error(&mut tx, backend, &claim.photo_id, claim.attempt, message, false).await?;
        tx.commit().await?;
        tracing::info!(photo_id = %claim.photo_id, attempt = claim.attempt, delay_ms = delay, error = message,
            "photo job attempt failed; queued again");
        if lapsed {
            service.jobs.wake.notify_one();
        }
        return Ok(true);
    }
    let mut tx = service.feed.begin().await?;
    if !jobs::end_attempt(tx.conn(), backend, claim, jobs::DISCARDED, 0, lapsed).await? {
        return Ok(false);
    }
    jobs::record_error(tx.conn(), backend, &claim.photo_id, claim.attempt, message, permanent).await?;
    let reason = match permanent {
        true => message.to_owned(),
        false => format!("gave up after {} attempts; the last one: {message}", claim.attempt),
    };
    let attempts = claim.attempt;
    if !processing::rewrite(&mut tx, &claim.photo_id, |photo| {
        processing::failed(photo, &reason, attempts)
    })
    .await?
    {
        return Ok(false);
    }
    tracing::info!(photo_id = %claim.photo_id, attempt = claim.attempt, reason, "photo job discarded");
    commit(service, tx).await
}

async fn commit(service: &PhotosService, tx: WriteTx<Photo>) -> Result<bool, FeedError> {
    let revision = tx.commit().await?;
    service.settle(revision).await;
    Ok(true)
}

/// Takes back the attempts whose lease lapsed: each counts as a failed
/// attempt (transient: its worker died or stalled), retried at once or
/// discarded at the limit.
async fn rescue(service: &PhotosService) -> Result<usize, FeedError> {
    let mut rescued = 0;
    for claim in jobs::expired(service.feed.db(), 100).await? {
        let message = format!(
            "attempt {} was lost: its worker's lease lapsed (the worker died or stalled)",
            claim.attempt
        );
        if end_failed(service, &claim, &message, false, true).await? {
            tracing::warn!(photo_id = %claim.photo_id, attempt = claim.attempt, "rescued a photo job whose lease lapsed");
            rescued += 1;
        }
    }
    Ok(rescued)
}

impl PhotosService {
    /// Processes the photo jobs (see `worker`) until dropped; run it beside
    /// the server, as [`PhotosService::follow`].
    pub async fn process_jobs(&self) {
        run(self.clone()).await
    }

    /// The operators' service of the photo jobs, for the admin listener.
    pub fn jobs_admin(&self) -> PhotoJobsAdmin {
        PhotoJobsAdmin::new(self.clone())
    }

    /// A worker's first step, public for tests that play a worker: claims
    /// the oldest due job for `worker`, for `lease`.
    pub async fn claim_photo_job(&self, worker: &str, lease: Duration) -> Result<Option<Claim>, FeedError> {
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        Ok(jobs::claim(self.feed.db(), worker, lease).await?)
    }

    /// The pool's rescue, public for tests: takes back the attempts whose
    /// lease lapsed (retried at once, or discarded at the limit); how many.
    pub async fn rescue_photo_jobs(&self) -> Result<usize, FeedError> {
        rescue(self).await
    }

    /// A worker's last step, public for tests that play a (stale) worker:
    /// records `claim`'s success; false, with nothing written, when a newer
    /// attempt owns the job.
    pub async fn complete_photo_job(&self, claim: &Claim, processed: &Processed) -> Result<bool, FeedError> {
        complete(self, claim, processed).await
    }
}

/// Records the job of `photo` (its processing `PENDING`) and its image in
/// `tx`, the transaction writing the photo: the outbox.
pub(crate) async fn enqueue(
    service: &PhotosService,
    tx: &mut WriteTx<Photo>,
    photo: &mut Photo,
    image: &[u8],
) -> Result<(), FeedError> {
    photo.processing = Some(processing::pending());
    let job = Claim {
        photo_id: photo.id.clone(),
        user_id: photo.user_id.clone(),
        attempt: 0,
        max_attempt: i64::from(service.jobs.options.max_attempts.max(1)),
    };
    let backend = service.feed.db().backend();
    Ok(jobs::enqueue(tx.conn(), backend, &job, image).await?)
}
