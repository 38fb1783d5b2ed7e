//! The process's one registry, and the gauges computed when scraped.

use std::{
    fmt,
    marker::PhantomData,
    ops::DerefMut,
    sync::{Arc, OnceLock, PoisonError, RwLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Metric, Registry},
};

use crate::families::{Families, Side};

/// The content type to serve [`Metrics::encode`]'s text with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics of one process: one registry, rendered as OpenMetrics text.
///
/// Cheap to clone: clones share the registry. Make one at start-up and hand
/// clones to every server, client and component that registers metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Written while metrics are registered (start-up), read per scrape.
    /// The hot path never takes it: families hold their own (per-family)
    /// locks, and the layers keep handles to the series they update.
    registry: RwLock<Registry>,
    /// The gRPC families, registered by the first layer of each side that
    /// asks, so that every server (or client) layer in the process shares
    /// one family per name instead of registering it twice (which would
    /// render a duplicate, invalid, exposition).
    server: OnceLock<Arc<Families>>,
    client: OnceLock<Arc<Families>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every registered metric as OpenMetrics text, ending in `# EOF`;
    /// serve it with [`CONTENT_TYPE`].
    ///
    /// Encoding into a `String` fails only if a registered [`Collector`]
    /// returns an error itself; the text is then cut where it failed and
    /// lacks `# EOF`, so that a scraper rejects the scrape (and `up` shows
    /// it) instead of storing half of one.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.inner.registry.read().unwrap_or_else(PoisonError::into_inner);
        // See above for why an error leaves the text as it is.
        let _cut_short = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    /// Registers `metric` as `name` with `help` (a full stop is added).
    ///
    /// Do not end a counter's name in `_total`: the encoder adds it (and
    /// prometheus-client panics in debug builds if the name has it).
    #[track_caller]
    pub fn register(&self, name: impl Into<String>, help: impl Into<String>, metric: impl Metric) {
        self.registry_mut().register(name, help, metric);
    }

    /// Registers a collector, asked for its samples at each scrape (see
    /// [`GaugeFn`] for gauges computed from a closure).
    pub fn register_collector(&self, collector: impl Collector) {
        self.registry_mut().register_collector(Box::new(collector));
    }

    /// The registry itself, for what [`register`](Self::register) does not
    /// cover (units, sub-registries with a prefix or constant labels).
    ///
    /// This holds the registry's lock: drop it before calling
    /// [`encode`](Self::encode) on the same thread, or it deadlocks.
    pub fn registry_mut(&self) -> impl DerefMut<Target = Registry> + '_ {
        self.inner.registry.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The gRPC families of one side, registered on first use.
    pub(crate) fn grpc_families(&self, side: Side) -> Arc<Families> {
        let cell = match side {
            Side::Server => &self.inner.server,
            Side::Client => &self.inner.client,
        };
        cell.get_or_init(|| Arc::new(Families::register(&mut self.registry_mut(), side)))
            .clone()
    }
}

/// A gauge computed at each scrape by a closure returning one value per
/// label set: for values that live elsewhere, such as a copy's age read from
/// its state, where keeping a gauge up to date would mean touching it on
/// every change.
///
/// ```
/// use lightbox_metrics::{GaugeFn, Metrics};
///
/// let metrics = Metrics::new();
/// metrics.register_collector(GaugeFn::new(
///     "lightbox_copy_age_seconds",
///     "How long ago each copy last applied a change",
///     || vec![([("copy", "users")], 1.5), ([("copy", "photos")], 0.25)],
/// ));
/// assert!(metrics.encode().contains(r#"lightbox_copy_age_seconds{copy="users"} 1.5"#));
/// ```
///
/// The closure runs on the scraping task with the registry's read lock
/// held: keep it quick, and never register metrics from it.
pub struct GaugeFn<L, F>(ReadAtScrape<L, F>);

/// A counter computed at each scrape by a closure, like [`GaugeFn`]: for
/// counts kept elsewhere (an atomic in a component's stats). Name it
/// without `_total`: the encoder adds it.
///
/// ```
/// use lightbox_metrics::{CounterFn, Metrics};
///
/// let metrics = Metrics::new();
/// metrics.register_collector(CounterFn::new(
///     "lightbox_watch_events_sent",
///     "Changes sent on watch streams",
///     || vec![([("feed", "users")], 42)],
/// ));
/// assert!(metrics.encode().contains(r#"lightbox_watch_events_sent_total{feed="users"} 42"#));
/// ```
pub struct CounterFn<L, F>(ReadAtScrape<L, F>);

/// What [`GaugeFn`] and [`CounterFn`] share: a name, a help, a closure.
struct ReadAtScrape<L, F> {
    name: String,
    help: String,
    read: F,
    labels: PhantomData<fn() -> L>,
}

impl<L, F> ReadAtScrape<L, F> {
    fn new(name: String, help: String, read: F) -> Self {
        let mut help = help;
        // As `Metrics::register` does.
        help.push('.');
        ReadAtScrape {
            name,
            help,
            read,
            labels: PhantomData,
        }
    }
}

impl<L, F> GaugeFn<L, F>
where
    L: EncodeLabelSet + 'static,
    F: Fn() -> Vec<(L, f64)> + Send + Sync + 'static,
{
    /// A gauge named `name` with `help` (a full stop is added, as
    /// [`Metrics::register`] does), whose samples `read` returns.
    pub fn new(name: impl Into<String>, help: impl Into<String>, read: F) -> Self {
        GaugeFn(ReadAtScrape::new(name.into(), help.into(), read))
    }
}

impl<L, F> CounterFn<L, F>
where
    L: EncodeLabelSet + 'static,
    F: Fn() -> Vec<(L, u64)> + Send + Sync + 'static,
{
    /// A counter named `name` (rendered `name_total`) with `help` (a full
    /// stop is added), whose samples `read` returns.
    pub fn new(name: impl Into<String>, help: impl Into<String>, read: F) -> Self {
        CounterFn(ReadAtScrape::new(name.into(), help.into(), read))
    }
}

impl<L, F> fmt::Debug for GaugeFn<L, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GaugeFn")
            .field("name", &self.0.name)
            .finish_non_exhaustive()
    }
}

impl<L, F> fmt::Debug for CounterFn<L, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CounterFn")
            .field("name", &self.0.name)
            .finish_non_exhaustive()
    }
}

impl<L, F> Collector for GaugeFn<L, F>
where
    L: EncodeLabelSet + 'static,
    F: Fn() -> Vec<(L, f64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let this = &self.0;
        let mut family = encoder.encode_descriptor(&this.name, &this.help, None, MetricType::Gauge)?;
        for (labels, value) in (this.read)() {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl<L, F> Collector for CounterFn<L, F>
where
    L: EncodeLabelSet + 'static,
    F: Fn() -> Vec<(L, u64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let this = &self.0;
        let mut family = encoder.encode_descriptor(&this.name, &this.help, None, MetricType::Counter)?;
        for (labels, value) in (this.read)() {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
