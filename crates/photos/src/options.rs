//! How photo jobs run ([`JobOptions`]), and what an attempt does with an
//! image ([`Processor`], by default [`decode::process`]).

use std::{sync::Arc, time::Duration};

use crate::decode::{self, ImageLimits, Processed};

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// What went wrong, for people.
    pub message: String,
    /// Retrying cannot help (the image itself is invalid).
    pub permanent: bool,
}

/// What an attempt does with an image (blocking; run off the runtime).
pub type ProcessFn = dyn Fn(&[u8], &ImageLimits) -> Result<Processed, JobFailure> + Send + Sync;

/// The processing a worker applies: [`decode::process`] unless a test
/// substitutes its own (to fail on purpose, say).
#[derive(Clone)]
pub struct Processor(pub Arc<ProcessFn>);

impl Default for Processor {
    fn default() -> Self {
        Processor(Arc::new(|bytes, limits| {
            decode::process(bytes, limits).map_err(|message| JobFailure {
                message,
                permanent: true,
            })
        }))
    }
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Processor(..)")
    }
}

/// How photo jobs run.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Attempts run at once in this process (the pool's size); 0: none
    /// here (other replicas process the jobs).
    pub workers: usize,
    /// Images decoded at once (at most the cores: decoding is CPU-bound).
    pub decoders: usize,
    /// How long a claim holds a job without renewal; renewed every third
    /// of it. A worker that dies loses its job this long after its last
    /// renewal, then it is rescued at the next poll.
    pub lease: Duration,
    /// How often the pool looks for due jobs and lapsed leases without a
    /// wake-up.
    pub poll_interval: Duration,
    /// Attempts allowed before a job is discarded.
    pub max_attempts: u32,
    /// The backoff after the first transient failure; doubled on each next
    /// one, up to `backoff_max`, with jitter (half of it random).
    pub backoff_min: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// What an image must fit.
    pub limits: ImageLimits,
    /// Test knob: an attempt lasts at least this long (holding its lease),
    /// so a test can kill a worker in the middle of one. Zero in
    /// production.
    pub min_duration: Duration,
    /// What an attempt does.
    pub processor: Processor,
}

impl Default for JobOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        JobOptions {
            workers: cores,
            decoders: cores,
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(2),
            max_attempts: 5,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            limits: ImageLimits::default(),
            min_duration: Duration::ZERO,
            processor: Processor::default(),
        }
    }
}

impl JobOptions {
    /// The backoff before the attempt after `attempt` (1 for the first):
    /// exponential, capped, with "equal jitter" (half fixed, half random),
    /// so that jobs failing together do not retry together.
    pub fn backoff(&self, attempt: i64) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        let base = self.backoff_min.saturating_mul(1 << exponent).min(self.backoff_max);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn lease_ms(&self) -> i64 {
        millis(self.lease).max(1)
    }
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}
