//! What a delivery's answer means, and when to try again: Knative Eventing's
//! delivery rules (its data-plane contract and `SelectiveRetry`), and the
//! per-subscription rate limit.
//!
//! - 2xx: delivered.
//! - 404, 408, 409, 429 and 5xx, timeouts and connection failures: tried
//!   again after a capped exponential backoff, or after `Retry-After` (on
//!   429 and 503, as Knative honours it) when that is longer, capped too.
//! - Any other status (400, 401, 403, 410, 413, redirects, which are not
//!   followed): straight to the dead letters, as is an endpoint refused by
//!   the address policy. So is an event out of attempts.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// What one attempt's result means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: drop it from the queue.
    Delivered,
    /// Try again, not before `retry_after` if the endpoint said so.
    Retry {
        /// The endpoint's `Retry-After`, already capped.
        retry_after: Option<Duration>,
    },
    /// Give up: to the dead letters.
    Dead,
}

/// Knative's reading of an HTTP status.
pub fn verdict(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        404 | 408 | 409 | 429 | 500..=599 => Verdict::Retry {
            retry_after: if matches!(status, 429 | 503) { retry_after } else { None },
        },
        _ => Verdict::Dead,
    }
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110),
/// relative to `now`; a date in the past is no delay.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Backoff between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The pause after the first failure; doubled after each further one.
    pub base: Duration,
    /// The longest pause the doubling reaches.
    pub max: Duration,
    /// The longest `Retry-After` honoured (longer ones are cut to it).
    pub retry_after_max: Duration,
}

impl Backoff {
    /// The pause after the `failures`-th failure (from 1), with jitter (a
    /// share drawn between 75 % and 100 %: endpoints recovering from an
    /// outage are not hit in step), or the endpoint's `Retry-After` when
    /// longer, capped at `retry_after_max`.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let doubled = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let jittered = doubled.mul_f64(0.75 + fastrand::f64() * 0.25);
        match retry_after {
            Some(asked) => asked.min(self.retry_after_max).max(jittered),
            None => jittered,
        }
    }
}

/// The lowest rate limit a subscription may set, deliveries per second
/// (one every 1,000 s); 0 means the component's default.
pub const MIN_RATE: f64 = 0.001;

/// The longest a rate limiter asks a delivery to wait.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A token bucket: `rate` deliveries per second, bursts of up to `rate`
/// (at least one). Owned by one subscription's delivery task.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// A full bucket; `rate` 0 or less means no limit.
    pub fn new(rate: f64) -> RateLimiter {
        let burst = rate.max(1.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            updated: Instant::now(),
        }
    }

    /// Takes a token at `now`, or says when one will be there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // Finite and at most a day for any rate: the API takes no rate
        // below MIN_RATE, and this never panics on one that got here anyway.
        let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT);
        Err(now.checked_add(wait).unwrap_or(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_knative() {
        assert_eq!(verdict(200, None), Verdict::Delivered);
        assert_eq!(verdict(202, None), Verdict::Delivered);
        for retried in [404, 408, 409, 429, 500, 502, 503, 504] {
            assert!(matches!(verdict(retried, None), Verdict::Retry { .. }), "{retried}");
        }
        for dead in [301, 302, 400, 401, 403, 410, 413, 415, 422] {
            assert_eq!(verdict(dead, None), Verdict::Dead, "{dead}");
        }
        let asked = Some(Duration::from_secs(3));
        assert_eq!(verdict(503, asked), Verdict::Retry { retry_after: asked });
        assert_eq!(verdict(500, asked), Verdict::Retry { retry_after: None });
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        // RFC 9110's example date is 784111777.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:30 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_honours_retry_after_to_its_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            retry_after_max: Duration::from_secs(5),
        };
        let first = backoff.delay(1, None);
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(100));
        let fourth = backoff.delay(4, None);
        assert!(fourth >= Duration::from_millis(600) && fourth <= Duration::from_millis(800));
        assert!(backoff.delay(40, None) <= Duration::from_secs(1));
        assert_eq!(backoff.delay(1, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(
            backoff.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn the_rate_limiter_spaces_deliveries() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2.0);
        assert!(limiter.try_take(start).is_ok());
        assert!(limiter.try_take(start).is_ok());
        let next = limiter.try_take(start).expect_err("the burst is spent");
        assert_eq!(next - start, Duration::from_millis(500));
        assert!(limiter.try_take(start + Duration::from_millis(500)).is_ok());
        let mut free = RateLimiter::new(0.0);
        assert!((0..1000).all(|_| free.try_take(start).is_ok()));
        // A rate so small that its wait overflows a Duration: capped, no panic.
        let mut tiny = RateLimiter::new(1e-300);
        assert!(tiny.try_take(start).is_ok());
        let next = tiny.try_take(start).expect_err("the burst is spent");
        assert_eq!(next - start, MAX_WAIT);
    }
}
