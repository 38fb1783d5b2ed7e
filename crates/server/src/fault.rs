//! Fault injection: the fault in force, the admin service that changes it,
//! and the tower layer that applies it to every service call.
//!
//! - [`FaultSpec`] / [`Faults`] (here): the fault as a value, and the shared
//!   cell holding the one in force.
//! - [`FaultServiceImpl`] (`admin`): `lightbox.admin.v1.FaultService`, the
//!   gRPC API over a [`Faults`].
//! - [`FaultLayer`] (`layer`): applies the fault to calls, except health,
//!   reflection and the admin service, so a "down" server can still be
//!   inspected and brought back.
//! - `body`: the response body wrapper that ends running streams when the
//!   server goes down.

mod admin;
mod body;
mod layer;

use std::{sync::Arc, time::Duration};

use lightbox_api::{ApiError, admin::Fault};
use tokio::sync::watch;

pub use admin::FaultServiceImpl;
pub use layer::{FaultInjection, FaultLayer};

/// The longest latency that may be injected. Longer than any sensible client
/// deadline already; the bound stops a typo from parking calls for hours.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

/// A fault to inject, as a plain value. The default injects nothing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultSpec {
    /// Added before each call is handled.
    pub latency: Duration,
    /// The share of calls, from 0 to 1, refused with `UNAVAILABLE` (after the
    /// latency).
    pub error_rate: f64,
    /// Refuse every call with `UNAVAILABLE` and end the streams in progress,
    /// as if the server were down.
    pub down: bool,
}

impl FaultSpec {
    /// Checks the values are usable: `error_rate` finite and in `[0, 1]`,
    /// `latency` at most [`MAX_LATENCY`]. The error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.error_rate.is_finite() || !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be a number from 0 to 1, got {}",
                self.error_rate
            ));
        }
        if self.latency > MAX_LATENCY {
            return Err(format!(
                "latency must be at most {} s, got {:?}",
                MAX_LATENCY.as_secs(),
                self.latency
            ));
        }
        Ok(())
    }
}

/// In words, as the logs and `lightbox fault` say it: "no fault", or what is
/// in force ("down", "latency 200ms, error rate 0.3").
impl std::fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.down {
            parts.push("down".to_owned());
        }
        if !self.latency.is_zero() {
            parts.push(format!("latency {:?}", self.latency));
        }
        if self.error_rate > 0.0 {
            parts.push(format!("error rate {}", self.error_rate));
        }
        if parts.is_empty() {
            f.write_str("no fault")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl From<FaultSpec> for Fault {
    fn from(spec: FaultSpec) -> Fault {
        Fault {
            // Always present, even when zero, so readers need no special case.
            // Saturates only above i64::MAX seconds, far beyond MAX_LATENCY.
            latency: Some(pbjson_types::Duration {
                seconds: i64::try_from(spec.latency.as_secs()).unwrap_or(i64::MAX),
                // `subsec_nanos` is below 1e9, which fits an i32.
                nanos: i32::try_from(spec.latency.subsec_nanos()).unwrap_or(0),
            }),
            error_rate: spec.error_rate,
            down: spec.down,
        }
    }
}

impl TryFrom<Fault> for FaultSpec {
    type Error = ApiError;

    /// Converts a fault from a client. A missing latency means none; a
    /// negative or malformed one is `INVALID_ARGUMENT`. Does not check the
    /// ranges: [`Faults::set`] does.
    fn try_from(fault: Fault) -> Result<FaultSpec, ApiError> {
        let latency = match fault.latency {
            None => Duration::ZERO,
            Some(d) => duration_from_proto(d)?,
        };
        Ok(FaultSpec {
            latency,
            error_rate: fault.error_rate,
            down: fault.down,
        })
    }
}

/// A `google.protobuf.Duration` as a non-negative `std` duration.
fn duration_from_proto(d: pbjson_types::Duration) -> Result<Duration, ApiError> {
    let invalid =
        |why: &str| ApiError::InvalidArgument(format!("latency {why}: seconds={}, nanos={}", d.seconds, d.nanos));
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid("must not be negative"));
    }
    let seconds = u64::try_from(d.seconds).map_err(|_| invalid("is malformed"))?;
    let nanos = u32::try_from(d.nanos).map_err(|_| invalid("is malformed"))?;
    if nanos >= 1_000_000_000 {
        return Err(invalid("is malformed (nanos must be below 1e9)"));
    }
    Ok(Duration::new(seconds, nanos))
}

/// The fault in force in one server, shared by the admin service that
/// changes it and the layer that applies it. Clones share the same state.
///
/// Kept in a `watch` channel rather than a plain lock so that response
/// bodies of running streams are woken the moment the server goes down
/// (see [`FaultLayer`]), without polling. The sender lives in an `Arc` owned
/// by every clone; when the last clone drops, waiting bodies are released
/// and carry on unaffected.
#[derive(Debug, Clone)]
pub struct Faults {
    state: Arc<watch::Sender<FaultSpec>>,
    /// Calls that reached the fault layer (not health, reflection or admin):
    /// how benchmarks count the calls a downstream makes to this server.
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::new()
    }
}

impl Faults {
    /// No fault in force.
    pub fn new() -> Faults {
        Faults {
            state: Arc::new(watch::Sender::new(FaultSpec::default())),
            calls: Arc::default(),
        }
    }

    /// The fault in force.
    pub fn get(&self) -> FaultSpec {
        *self.state.borrow()
    }

    /// Replaces the fault in force, after checking it with
    /// [`FaultSpec::validate`]; on error nothing changes.
    pub fn set(&self, spec: FaultSpec) -> Result<(), String> {
        spec.validate()?;
        // `send_replace` stores the value even when no body is watching.
        self.state.send_replace(spec);
        Ok(())
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.state.send_replace(FaultSpec::default());
    }

    /// Service calls received so far (faults or not; health, reflection
    /// and admin excluded).
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_call(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A receiver notified of every change, for response bodies and health.
    pub(crate) fn subscribe(&self) -> watch::Receiver<FaultSpec> {
        self.state.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_validates_and_keeps_the_old_fault_on_error() {
        let faults = Faults::new();
        let good = FaultSpec {
            latency: Duration::from_millis(250),
            error_rate: 0.5,
            down: false,
        };
        assert_eq!(faults.set(good), Ok(()));
        assert_eq!(faults.get(), good);

        for error_rate in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let bad = FaultSpec {
                error_rate,
                ..FaultSpec::default()
            };
            let err = faults.set(bad).expect_err("error rate out of range");
            assert!(err.contains("error_rate"), "{err}");
            assert_eq!(faults.get(), good);
        }
        let too_slow = FaultSpec {
            latency: MAX_LATENCY + Duration::from_nanos(1),
            ..FaultSpec::default()
        };
        assert!(faults.set(too_slow).is_err());
        assert_eq!(faults.get(), good);

        faults.clear();
        assert_eq!(faults.get(), FaultSpec::default());
    }

    #[test]
    fn a_fault_says_itself_in_words() {
        assert_eq!(FaultSpec::default().to_string(), "no fault");
        let all = FaultSpec {
            latency: Duration::from_millis(200),
            error_rate: 0.3,
            down: true,
        };
        assert_eq!(all.to_string(), "down, latency 200ms, error rate 0.3");
        let slow = FaultSpec {
            latency: Duration::from_millis(1500),
            ..FaultSpec::default()
        };
        assert_eq!(slow.to_string(), "latency 1.5s");
    }

    #[test]
    fn clones_share_state() {
        let faults = Faults::new();
        let other = faults.clone();
        other
            .set(FaultSpec {
                down: true,
                ..FaultSpec::default()
            })
            .expect("valid");
        assert!(faults.get().down);
    }

    #[test]
    fn proto_round_trip() {
        let spec = FaultSpec {
            latency: Duration::new(2, 500_000_000),
            error_rate: 0.25,
            down: true,
        };
        let fault = Fault::from(spec);
        assert_eq!(
            fault.latency,
            Some(pbjson_types::Duration {
                seconds: 2,
                nanos: 500_000_000
            })
        );
        assert_eq!(FaultSpec::try_from(fault).expect("valid"), spec);
    }

    #[test]
    fn missing_latency_means_none() {
        let fault = Fault {
            latency: None,
            error_rate: 0.0,
            down: false,
        };
        assert_eq!(FaultSpec::try_from(fault).expect("valid"), FaultSpec::default());
    }

    #[test]
    fn negative_or_malformed_latency_is_invalid_argument() {
        for (seconds, nanos) in [(-1, 0), (0, -1), (1, 1_000_000_000), (-1, 5)] {
            let fault = Fault {
                latency: Some(pbjson_types::Duration { seconds, nanos }),
                error_rate: 0.0,
                down: false,
            };
            let err = FaultSpec::try_from(fault).expect_err("bad latency");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        }
    }
}
