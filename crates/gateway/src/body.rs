//! Reading a request body whole: within a size limit, and at a minimum
//! rate, so that a client trickling its body cannot hold the slot it was
//! given (a request's, an upload's) for as long as it likes, while a phone
//! uploading a large image over a slow link still gets through.

use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

/// The slowest a body may arrive once started, in bytes per second (256
/// kbit/s: a poor mobile uplink). Each chunk buys the time its size takes at
/// this rate; the next must come within what is left.
pub(crate) const MIN_RATE: f64 = 32.0 * 1024.0;

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// More than the limit.
    TooLarge,
    /// It did not start within the grace period, or fell below
    /// [`MIN_RATE`] after it.
    TooSlow,
    /// The connection broke off before its end.
    BrokeOff,
}

/// Reads `body` whole, refusing it past `limit` bytes; its first bytes (or
/// its end) must come within `grace`, and the rest at [`MIN_RATE`] on
/// average. Memory: at most `limit`.
pub(crate) async fn read(body: Body, limit: usize, grace: Duration) -> Result<Bytes, BodyError> {
    let mut body = Limited::new(body, limit);
    let mut deadline = Instant::now() + grace;
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::TooSlow),
            Ok(None) => return Ok(Bytes::from(bytes)),
            Ok(Some(Err(err))) if err.is::<LengthLimitError>() => return Err(BodyError::TooLarge),
            Ok(Some(Err(_))) => return Err(BodyError::BrokeOff),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry no data and buy no time.
        if let Ok(data) = frame.into_data() {
            deadline += Duration::from_secs_f64(data.len() as f64 / MIN_RATE);
            bytes.extend_from_slice(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    /// A body of `chunks` chunks of `size` bytes, one every `every`.
    fn paced(chunks: usize, size: usize, every: Duration) -> Body {
        let stream = futures_util::stream::iter(0..chunks).then(move |_| async move {
            tokio::time::sleep(every).await;
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))
        });
        Body::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_steady_body_arrives_and_a_trickle_does_not() {
        let grace = Duration::from_secs(1);
        // 64 KiB/s for 20 s: twenty times the grace, twice the minimum rate.
        let steady = read(paced(40, 32 * 1024, Duration::from_millis(500)), 4 << 20, grace).await;
        assert_eq!(steady.map(|b| b.len()), Ok(40 * 32 * 1024));
        // 1 KiB/s: within the grace at first, then behind the minimum rate.
        let trickle = read(paced(40, 1024, Duration::from_secs(1) / 2), 4 << 20, grace).await;
        assert_eq!(trickle, Err(BodyError::TooSlow));
        // Nothing at all within the grace.
        let stalled = read(paced(1, 10, Duration::from_secs(2)), 4 << 20, grace).await;
        assert_eq!(stalled, Err(BodyError::TooSlow));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_the_limit_is_refused() {
        let large = read(paced(4, 1024, Duration::from_millis(1)), 3000, Duration::from_secs(1)).await;
        assert_eq!(large, Err(BodyError::TooLarge));
        let within = read(paced(2, 1024, Duration::from_millis(1)), 3000, Duration::from_secs(1)).await;
        assert_eq!(within.map(|b| b.len()), Ok(2048));
    }
}
