//! The gRPC metric families, each method's handles into them, and one
//! call's record.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, PoisonError, RwLock},
    time::{Duration, Instant},
};

use http::HeaderMap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};
use tonic::Code;

use crate::types::{GrpcType, GrpcTypes};

/// `grpc_*_handling_seconds`' buckets: go-grpc-middleware's defaults
/// (`.005` … `10`) with five finer ones below, from 100 µs: most Lightbox
/// calls answer from memory in well under 5 ms (a cached `ListPhotos` in a
/// few hundred µs), and a histogram that puts them all in its first bucket
/// cannot tell a fast cache from a slowing one.
const HANDLING_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How many distinct paths missing from the [`GrpcTypes`] table get series
/// of their own. The path comes from the peer: without a bound, a client
/// calling made-up methods would grow the exposition without end. Past it,
/// calls count under `grpc_service="unknown", grpc_method="unknown"`.
const MAX_UNLISTED_METHODS: usize = 64;

/// Which end of the call a layer measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Server,
    Client,
}

impl Side {
    /// The code of a call whose service returned an error instead of a
    /// response (or whose body failed) with no `Status` in it: on a client
    /// that is the transport failing (go's clients see `Unavailable`); on a
    /// server, an error that is no status (go's `status.Code` says
    /// `Unknown`).
    pub(crate) fn error_code(self) -> Code {
        match self {
            Side::Server => Code::Unknown,
            Side::Client => Code::Unavailable,
        }
    }
}

/// `grpc_type`, `grpc_service`, `grpc_method`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    grpc_type: GrpcType,
    grpc_service: Arc<str>,
    grpc_method: Arc<str>,
}

/// [`MethodLabels`] and `grpc_code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: GrpcType,
    grpc_service: Arc<str>,
    grpc_method: Arc<str>,
    grpc_code: &'static str,
}

fn handling_histogram() -> Histogram {
    Histogram::new(HANDLING_BUCKETS)
}

/// The five families of one side, registered once per [`Metrics`](crate::Metrics).
pub(crate) struct Families {
    side: Side,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
    received: Family<MethodLabels, Counter>,
    sent: Family<MethodLabels, Counter>,
}

impl Families {
    /// Registers one side's families under go-grpc-middleware's names (the
    /// counters without `_total`, which the encoder appends) and help.
    pub(crate) fn register(registry: &mut Registry, side: Side) -> Self {
        let families = Families {
            side,
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(handling_histogram as fn() -> Histogram),
            received: Family::default(),
            sent: Family::default(),
        };
        let f = &families;
        match side {
            Side::Server => {
                registry.register(
                    "grpc_server_started",
                    "Total number of RPCs started on the server",
                    f.started.clone(),
                );
                registry.register(
                    "grpc_server_handled",
                    "Total number of RPCs completed on the server, regardless of success or failure",
                    f.handled.clone(),
                );
                registry.register_with_unit(
                    "grpc_server_handling",
                    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
                    Unit::Seconds,
                    f.handling.clone(),
                );
                registry.register(
                    "grpc_server_msg_received",
                    "Total number of RPC stream messages received on the server",
                    f.received.clone(),
                );
                registry.register(
                    "grpc_server_msg_sent",
                    "Total number of gRPC stream messages sent by the server",
                    f.sent.clone(),
                );
            }
            Side::Client => {
                registry.register(
                    "grpc_client_started",
                    "Total number of RPCs started on the client",
                    f.started.clone(),
                );
                registry.register(
                    "grpc_client_handled",
                    "Total number of RPCs completed by the client, regardless of success or failure",
                    f.handled.clone(),
                );
                registry.register_with_unit(
                    "grpc_client_handling",
                    "Histogram of response latency (seconds) of the gRPC until it is finished by the application",
                    Unit::Seconds,
                    f.handling.clone(),
                );
                registry.register(
                    "grpc_client_msg_received",
                    "Total number of RPC stream messages received by the client",
                    f.received.clone(),
                );
                registry.register(
                    "grpc_client_msg_sent",
                    "Total number of gRPC stream messages sent by the client",
                    f.sent.clone(),
                );
            }
        }
        families
    }
}

/// One method's series, looked up in the families on first use and kept:
/// after that, a call touches only atomics (and the histogram's own lock),
/// and builds no label set. Series appear when first used, as in go when
/// metrics are not pre-initialised.
pub(crate) struct MethodMetrics {
    families: Arc<Families>,
    labels: MethodLabels,
    started: OnceLock<Counter>,
    /// Indexed by the code's number (0 to 16).
    handled: [OnceLock<Counter>; 17],
    handling: OnceLock<Histogram>,
    received: OnceLock<Counter>,
    sent: OnceLock<Counter>,
}

impl MethodMetrics {
    fn new(families: Arc<Families>, kind: GrpcType, service: &str, method: &str) -> Self {
        MethodMetrics {
            families,
            labels: MethodLabels {
                grpc_type: kind,
                grpc_service: service.into(),
                grpc_method: method.into(),
            },
            started: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
            handling: OnceLock::new(),
            received: OnceLock::new(),
            sent: OnceLock::new(),
        }
    }

    pub(crate) fn side(&self) -> Side {
        self.families.side
    }

    pub(crate) fn started(&self) -> &Counter {
        self.started
            .get_or_init(|| self.families.started.get_or_create_owned(&self.labels))
    }

    /// Messages the measured side received: the request's on a server, the
    /// response's on a client.
    fn received(&self) -> &Counter {
        self.received
            .get_or_init(|| self.families.received.get_or_create_owned(&self.labels))
    }

    /// Messages the measured side sent.
    fn sent(&self) -> &Counter {
        self.sent
            .get_or_init(|| self.families.sent.get_or_create_owned(&self.labels))
    }

    /// The counter of the request body's messages.
    pub(crate) fn request_messages(&self) -> Counter {
        match self.side() {
            Side::Server => self.received().clone(),
            Side::Client => self.sent().clone(),
        }
    }

    /// The counter of the response body's messages.
    pub(crate) fn response_messages(&self) -> Counter {
        match self.side() {
            Side::Server => self.sent().clone(),
            Side::Client => self.received().clone(),
        }
    }

    fn handled(&self, code: Code) -> &Counter {
        // `Code` is 0 to 16; `get` keeps a future code from panicking.
        let index = code as usize;
        let cell = self.handled.get(index).unwrap_or(&self.handled[Code::Unknown as usize]);
        cell.get_or_init(|| {
            let labels = HandledLabels {
                grpc_type: self.labels.grpc_type,
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code_name(code),
            };
            self.families.handled.get_or_create_owned(&labels)
        })
    }

    fn handling(&self) -> &Histogram {
        self.handling
            .get_or_init(|| self.families.handling.get_or_create_owned(&self.labels))
    }
}

/// A code as go's `codes.Code.String()` prints it (`Canceled`, one l).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Every method a layer may see, by path: those of its [`GrpcTypes`] table
/// resolved up front (read without a lock), others as they come, up to
/// [`MAX_UNLISTED_METHODS`].
pub(crate) struct Methods {
    families: Arc<Families>,
    listed: HashMap<Box<str>, Arc<MethodMetrics>>,
    /// Written once per new unlisted path, read per call of one.
    unlisted: RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>,
    /// Where unlisted calls count once the map above is full.
    overflow: Arc<MethodMetrics>,
}

impl Methods {
    pub(crate) fn new(families: Arc<Families>, types: &GrpcTypes) -> Self {
        let listed = types
            .iter()
            .map(|(path, kind)| {
                let (service, method) = split_path(path);
                let metrics = MethodMetrics::new(families.clone(), kind, service, method);
                (Box::from(path), Arc::new(metrics))
            })
            .collect();
        let overflow = Arc::new(MethodMetrics::new(
            families.clone(),
            GrpcType::Unary,
            "unknown",
            "unknown",
        ));
        Methods {
            families,
            listed,
            unlisted: RwLock::default(),
            overflow,
        }
    }

    /// The series of the method at `path`.
    pub(crate) fn get(&self, path: &str) -> Arc<MethodMetrics> {
        if let Some(metrics) = self.listed.get(path) {
            return metrics.clone();
        }
        if let Some(metrics) = self.unlisted.read().unwrap_or_else(PoisonError::into_inner).get(path) {
            return metrics.clone();
        }
        let mut unlisted = self.unlisted.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(metrics) = unlisted.get(path) {
            return metrics.clone();
        }
        if unlisted.len() >= MAX_UNLISTED_METHODS {
            return self.overflow.clone();
        }
        let (service, method) = split_path(path);
        let metrics = Arc::new(MethodMetrics::new(
            self.families.clone(),
            GrpcType::Unary,
            service,
            method,
        ));
        unlisted.insert(Box::from(path), metrics.clone());
        metrics
    }
}

/// `/package.Service/Method` → (`package.Service`, `Method`), or `unknown`
/// twice for a path of another shape (as go's `splitMethodName` does).
fn split_path(path: &str) -> (&str, &str) {
    path.strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .filter(|(service, method)| !service.is_empty() && !method.is_empty() && !method.contains('/'))
        .unwrap_or(("unknown", "unknown"))
}

/// One call in progress: counts as handled exactly once, with the code it
/// is finished with, or, if dropped unfinished (the response future or body
/// went away before the status was seen: the client left, or the caller
/// stopped reading), as `Canceled` — or `DeadlineExceeded` if the call's
/// `grpc-timeout` had passed by then, since that is most likely why (tonic's
/// server drops a late response future; a client gives up at its deadline).
///
/// Owned by the response future until the response arrives, then by the
/// response body until its trailers (or its end, or its drop).
pub(crate) struct Call {
    method: Arc<MethodMetrics>,
    start: Instant,
    /// From the request's `grpc-timeout`, if it has a valid one.
    deadline: Option<Instant>,
    finished: bool,
}

impl Call {
    /// Counts the call as started, and starts its clock.
    pub(crate) fn start(method: Arc<MethodMetrics>, headers: &HeaderMap) -> Self {
        method.started().inc();
        let start = Instant::now();
        let deadline = headers
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .and_then(|timeout| start.checked_add(timeout));
        Call {
            method,
            start,
            deadline,
            finished: false,
        }
    }

    pub(crate) fn method(&self) -> &MethodMetrics {
        &self.method
    }

    /// Counts the call as handled with `code`.
    pub(crate) fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.method.handled(code).inc();
        self.method.handling().observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let late = self.deadline.is_some_and(|deadline| Instant::now() >= deadline);
        self.record(if late { Code::DeadlineExceeded } else { Code::Cancelled });
    }
}

/// A `grpc-timeout` value: at most 8 ASCII digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), as the gRPC HTTP/2 protocol defines it.
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_like_go() {
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(split_path("/Svc/M"), ("Svc", "M"));
        assert_eq!(split_path("/metrics"), ("unknown", "unknown"));
        assert_eq!(split_path("/a/b/c"), ("unknown", "unknown"));
        assert_eq!(split_path("//m"), ("unknown", "unknown"));
        assert_eq!(split_path("a/b"), ("unknown", "unknown"));
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse_grpc_timeout(b"123456789S"), None);
        assert_eq!(parse_grpc_timeout(b"10"), None);
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b"1x"), None);
        assert_eq!(parse_grpc_timeout(b"-1S"), None);
    }

    #[test]
    fn unlisted_methods_are_bounded() {
        let mut registry = Registry::default();
        let families = Arc::new(Families::register(&mut registry, Side::Server));
        let methods = Methods::new(families, &GrpcTypes::default());
        for i in 0..MAX_UNLISTED_METHODS {
            let m = methods.get(&format!("/s/m{i}"));
            assert_eq!(&*m.labels.grpc_method, format!("m{i}").as_str());
        }
        let past = methods.get("/s/one-too-many");
        assert_eq!(&*past.labels.grpc_method, "unknown");
        // A path seen before the map filled keeps its own series.
        assert_eq!(&*methods.get("/s/m0").labels.grpc_method, "m0");
    }
}
