//! Lightbox's own metrics, one set per process whatever the components it
//! runs: each metric is registered once, and reads at every scrape the
//! feeds, copies, fault switches and counters the components add here as
//! they start ([`ProcessMetrics`]).
//!
//! The gRPC metrics (`grpc_server_*`, `grpc_client_*`) are counted by the
//! layers of [`lightbox_metrics`]; the gateway counts its HTTP requests
//! itself. The README's metrics table lists them all.

use std::sync::{Arc, PoisonError, RwLock};

use lightbox_cache::CacheState;
use lightbox_changefeed::FeedStats;
use lightbox_metrics::{CounterFn, GaugeFn, Metrics};
use lightbox_server::Faults;

/// One label: its name and value.
type Label = [(&'static str, String); 1];

/// A closure reading something a component owns, at scrape time.
type Read<T> = Arc<dyn Fn() -> T + Send + Sync>;

/// What the scrapes read: added to as components start.
#[derive(Default)]
struct Sources {
    feeds: Vec<(&'static str, Read<FeedStats>)>,
    copies: Vec<(String, Read<CacheState>)>,
    faults: Vec<(&'static str, Faults)>,
    /// The photos service's counters: (fallbacks, upstream calls).
    photos: Vec<(&'static str, Read<(u64, u64)>)>,
}

/// The process's registry and what its Lightbox metrics read. Cheap to
/// clone; clones share both.
#[derive(Clone)]
pub struct ProcessMetrics {
    metrics: Metrics,
    sources: Arc<RwLock<Sources>>,
}

impl std::fmt::Debug for ProcessMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessMetrics").finish_non_exhaustive()
    }
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        ProcessMetrics::new()
    }
}

impl ProcessMetrics {
    /// A registry with every Lightbox metric registered, reading nothing
    /// yet.
    pub fn new() -> ProcessMetrics {
        let this = ProcessMetrics {
            metrics: Metrics::new(),
            sources: Arc::default(),
        };
        this.register();
        this
    }

    /// The registry (give it to the servers, clients and the gateway).
    pub fn registry(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        self.metrics.encode()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sources> {
        self.sources.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports the feed `name` (its watch streams and head).
    ///
    /// Each `add_*` replaces what an earlier one added under the same name
    /// (a component started again in the same process).
    pub fn add_feed(&self, name: &'static str, stats: Read<FeedStats>) {
        let mut sources = self.write();
        sources.feeds.retain(|(n, _)| *n != name);
        sources.feeds.push((name, stats));
    }

    /// Reports the copy `name` ("photos.users": the photos service's copy of
    /// users).
    pub fn add_copy(&self, name: String, state: Read<CacheState>) {
        let mut sources = self.write();
        sources.copies.retain(|(n, _)| *n != name);
        sources.copies.push((name, state));
    }

    /// Reports the fault switches of `component`.
    pub fn add_faults(&self, component: &'static str, faults: Faults) {
        let mut sources = self.write();
        sources.faults.retain(|(n, _)| *n != component);
        sources.faults.push((component, faults));
    }

    /// Reports the photos service's fallbacks to the synchronous path and
    /// its upstream calls.
    pub fn add_photos(&self, counts: Read<(u64, u64)>) {
        let mut sources = self.write();
        sources.photos.clear();
        sources.photos.push(("photos", counts));
    }

    /// Registers every metric once; each reads the sources at scrape time.
    fn register(&self) {
        let gauge = |name: &'static str, help: &'static str, read: fn(&Sources) -> Vec<(Label, f64)>| {
            let sources = Arc::clone(&self.sources);
            self.metrics.register_collector(GaugeFn::new(name, help, move || {
                read(&sources.read().unwrap_or_else(PoisonError::into_inner))
            }));
        };
        let counter = |name: &'static str, help: &'static str, read: fn(&Sources) -> Vec<(Label, u64)>| {
            let sources = Arc::clone(&self.sources);
            self.metrics.register_collector(CounterFn::new(name, help, move || {
                read(&sources.read().unwrap_or_else(PoisonError::into_inner))
            }));
        };
        fn feeds<V>(sources: &Sources, value: impl Fn(&FeedStats) -> V) -> Vec<(Label, V)> {
            let read =
                |(name, stats): &(&'static str, Read<FeedStats>)| ([("feed", (*name).to_owned())], value(&stats()));
            sources.feeds.iter().map(read).collect()
        }
        fn copies<V>(sources: &Sources, value: impl Fn(&CacheState) -> V) -> Vec<(Label, V)> {
            let read = |(name, state): &(String, Read<CacheState>)| ([("copy", name.clone())], value(&state()));
            sources.copies.iter().map(read).collect()
        }
        fn faults(sources: &Sources, value: impl Fn(&Faults) -> f64) -> Vec<(Label, f64)> {
            let read = |(name, faults): &(&'static str, Faults)| ([("component", (*name).to_owned())], value(faults));
            sources.faults.iter().map(read).collect()
        }
        fn photos(sources: &Sources, value: impl Fn((u64, u64)) -> u64) -> Vec<(Label, u64)> {
            let read = |(name, counts): &(&'static str, Read<(u64, u64)>)| {
                ([("service", (*name).to_owned())], value(counts()))
            };
            sources.photos.iter().map(read).collect()
        }

        gauge("lightbox_watch_streams", "Watch streams open, by feed", |s| {
            feeds(s, |f| f.watchers as f64)
        });
        counter(
            "lightbox_watch_events_sent",
            "Changes sent on watch streams, every stream counted, by feed",
            |s| feeds(s, |f| f.events_sent),
        );
        counter(
            "lightbox_watch_slow_watchers_ended",
            "Watch streams ended for falling a whole ring behind (they resume from their cursor), by feed",
            |s| feeds(s, |f| f.slow_watchers_ended),
        );
        gauge(
            "lightbox_watch_snapshots_in_progress",
            "Snapshots being read for watch streams now, by feed",
            |s| feeds(s, |f| f.snapshots as f64),
        );
        gauge("lightbox_feed_head_revision", "The latest revision of each feed", |s| {
            feeds(s, |f| f.head as f64)
        });
        gauge(
            "lightbox_copy_age_seconds",
            "How long ago each local copy last heard from its upstream (a change or a progress frame)",
            |s| copies(s, |c| c.age().as_secs_f64()),
        );
        gauge(
            "lightbox_copy_applied_revision",
            "Every upstream change up to this revision is in the copy",
            |s| copies(s, |c| c.applied_revision as f64),
        );
        gauge(
            "lightbox_copy_upstream_revision",
            "The latest upstream revision the copy has heard of",
            |s| copies(s, |c| c.upstream_revision as f64),
        );
        gauge(
            "lightbox_copy_connected",
            "Whether the copy's watch stream is connected (1) or not (0)",
            |s| copies(s, |c| f64::from(u8::from(c.connected))),
        );
        gauge(
            "lightbox_copy_held",
            "Whether the guard rail holds a snapshot or batch back from the copy (1) or not (0)",
            |s| copies(s, |c| f64::from(u8::from(c.held.is_some()))),
        );
        gauge("lightbox_copy_entities", "Entities in the copy", |s| {
            copies(s, |c| c.entities as f64)
        });
        counter(
            "lightbox_copy_reconnects",
            "Times the copy's watch was opened again after its stream ended or failed to open",
            |s| copies(s, |c| c.reconnects),
        );
        counter(
            "lightbox_copy_guard_rail_holds",
            "Times the guard rail held a snapshot or batch back from the copy",
            |s| copies(s, |c| c.holds),
        );
        counter(
            "lightbox_sync_fallbacks",
            "Cached reads that fell back to the synchronous path (the entity was not in the copies yet)",
            |s| photos(s, |(fallbacks, _)| fallbacks),
        );
        counter(
            "lightbox_upstream_calls",
            "Synchronous calls made to the upstreams (FRESH reads and fallbacks)",
            |s| photos(s, |(_, calls)| calls),
        );
        gauge(
            "lightbox_fault_down",
            "Whether fault injection has the component down (1) or not (0)",
            |s| faults(s, |f| f64::from(u8::from(f.get().down))),
        );
        gauge(
            "lightbox_fault_error_rate",
            "The share of calls fault injection fails, by component",
            |s| faults(s, |f| f.get().error_rate),
        );
        gauge(
            "lightbox_fault_latency_seconds",
            "The latency fault injection adds to each call, by component",
            |s| faults(s, |f| f.get().latency.as_secs_f64()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_metric_reads_every_source_added() {
        let metrics = ProcessMetrics::new();
        let stats = |head| {
            Arc::new(move || FeedStats {
                head,
                watchers: 2,
                tail_reads: 0,
                events_sent: 7,
                slow_watchers_ended: 1,
                snapshots: 0,
                changes_encoded: 4,
            }) as Read<FeedStats>
        };
        metrics.add_feed("users", stats(5));
        metrics.add_feed("contracts", stats(9));
        let faults = Faults::new();
        metrics.add_faults("users", faults.clone());
        let text = metrics.encode();
        for line in [
            r#"lightbox_watch_streams{feed="users"} 2"#,
            r#"lightbox_feed_head_revision{feed="contracts"} 9"#,
            r#"lightbox_watch_events_sent_total{feed="users"} 7"#,
            r#"lightbox_fault_down{component="users"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // One family per name, whatever the number of feeds.
        assert_eq!(text.matches("# TYPE lightbox_watch_streams gauge").count(), 1, "{text}");
        faults
            .set(lightbox_server::FaultSpec {
                down: true,
                ..Default::default()
            })
            .expect("valid");
        assert!(metrics.encode().contains(r#"lightbox_fault_down{component="users"} 1"#));
    }
}
