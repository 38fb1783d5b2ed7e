//! The load generator every unary cell uses, whatever the system: closed
//! loop, each client one request in flight, for a fixed time.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::report::Latency;

/// What a closed loop measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// Every request's latency (ms), failed ones included.
    pub latency: Latency,
    /// Requests answered OK.
    pub ok: usize,
    /// Requests that failed.
    pub errors: usize,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Run {
    /// Answers per second.
    pub fn requests_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Every request made.
    pub fn requests(&self) -> usize {
        self.ok + self.errors
    }

    /// The share answered OK, 0 to 1.
    pub fn success_rate(&self) -> f64 {
        self.ok as f64 / self.requests().max(1) as f64
    }
}

/// Runs `clients` loops for `duration`, each calling `call(client)` again
/// as soon as the last call answered (`Ok` counts as answered, `Err` as
/// failed).
pub async fn closed_loop<F, Fut, E>(clients: usize, duration: Duration, call: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let end = started + duration;
    let mut loops = Vec::with_capacity(clients);
    for client in 0..clients {
        let call = Arc::clone(&call);
        loops.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < end {
                let sent = Instant::now();
                let result = call(client).await;
                latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                if result.is_err() {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in loops {
        if let Ok((mine, failed)) = task.await {
            latencies.extend(mine);
            errors += failed;
        }
    }
    let elapsed = started.elapsed();
    let requests = latencies.len();
    Run {
        latency: Latency::of(latencies),
        ok: requests - errors,
        errors,
        elapsed,
    }
}

/// Runs `requests` calls one after the other (for latency, not rate).
pub async fn sequential<F, Fut, E>(requests: usize, call: F) -> Run
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let started = Instant::now();
    let (mut latencies, mut errors) = (Vec::with_capacity(requests), 0);
    for i in 0..requests {
        let sent = Instant::now();
        if call(i).await.is_err() {
            errors += 1;
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    Run {
        latency: Latency::of(latencies),
        ok: requests - errors,
        errors,
        elapsed: started.elapsed(),
    }
}
