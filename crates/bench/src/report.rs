//! What `lightbox bench` measured, as one value: printed as markdown
//! tables, written as JSON (`--json`), drawn as charts (`--plot`).

use std::fmt::Write;

use serde::Serialize;

/// Latencies of one cell, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// The latencies of `samples` (milliseconds, any order; NaN if none).
    pub fn of(mut samples: Vec<f64>) -> Latency {
        samples.sort_by(f64::total_cmp);
        Latency {
            p50_ms: quantile(&samples, 0.50),
            p99_ms: quantile(&samples, 0.99),
            max_ms: samples.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The value at quantile `q` of sorted `samples` (NaN when empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// A fan-out row's runs: `3 runs: 60.1–92.0 ms / 3.1–12.6 ms` (the
/// last-watcher p99 and the writer p99, lowest to highest).
fn spread(row: &FanoutRow) -> String {
    let range = |values: &[f64]| {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{}–{}", ms(low), ms(high))
    };
    match row.runs_writer_p99_ms.len() {
        0 | 1 => "1 run".into(),
        n if row.watchers == 0 => format!("{n} runs: – / {}", range(&row.runs_writer_p99_ms)),
        n => format!(
            "{n} runs: {} / {}",
            range(&row.runs_last_p99_ms),
            range(&row.runs_writer_p99_ms)
        ),
    }
}

/// The machine and the settings, printed first.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Header {
    /// Cores, CPU model, load average.
    pub machine: String,
    /// The machine's cores.
    pub cores: usize,
    /// How the servers and the load generator are placed on the cores.
    pub pinning: String,
    /// Whether this is the short form (`--quick`).
    pub quick: bool,
    /// Every setting of the run, as (name, value).
    pub settings: Vec<(String, String)>,
}

/// `ListPhotos` with latency injected on each upstream.
#[derive(Debug, Clone, Serialize)]
pub struct SlownessRow {
    /// Latency injected on each of Users and Contracts.
    pub delay_ms: u64,
    /// `CACHED` or `FRESH`.
    pub mode: String,
    /// Requests measured.
    pub requests: usize,
    /// Latency.
    pub latency: Latency,
    /// Calls Users and Contracts received per request.
    pub upstream_calls_per_request: f64,
}

/// `ListPhotos` with upstreams down or failing.
#[derive(Debug, Clone, Serialize)]
pub struct OutageRow {
    /// What is wrong: `Users down`, `both at 30% errors`, …
    pub scenario: String,
    /// `CACHED` or `FRESH`.
    pub mode: String,
    /// Requests made.
    pub requests: usize,
    /// Share answered OK, 0 to 1.
    pub success_rate: f64,
    /// Latency of every request, failed ones included.
    pub latency: Latency,
}

/// Concurrent clients on `ListPhotos`, and the ceiling.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRow {
    /// Clients, each with one request in flight.
    pub clients: usize,
    /// `CACHED`, `FRESH`, or `minimal tonic server` (the ceiling).
    pub cell: String,
    /// Answers per second.
    pub requests_per_s: f64,
    /// Latency.
    pub latency: Latency,
    /// Calls per second that reached Users and Contracts.
    pub upstream_calls_per_s: f64,
    /// Requests that failed.
    pub errors: usize,
}

/// One watch fan-out cell: `watchers` streams, a writer.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutRow {
    /// `Lightbox` or `etcd`.
    pub system: String,
    /// Watch streams open (0: the writer alone).
    pub watchers: usize,
    /// Writes made.
    pub writes: usize,
    /// The writer's pace.
    pub writes_per_s: f64,
    /// Changes received, every stream counted.
    pub deliveries: usize,
    /// Write acknowledged → each delivery.
    pub each: Latency,
    /// Write acknowledged → its delivery to the last watcher.
    pub last: Latency,
    /// Write sent → its delivery to the last watcher: the writer's own
    /// latency included (a system that holds its writers back while it
    /// fans out looks faster from the acknowledgement).
    pub last_from_send: Latency,
    /// Deliveries per second while writing.
    pub events_per_s: f64,
    /// Server memory per idle stream, KiB.
    pub memory_per_stream_kib: Option<f64>,
    /// The writer's latency (request → acknowledgement).
    pub writer: Latency,
    /// Server CPU time per delivery, microseconds.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The writer's p99 over the same system's writer p99 alone at the
    /// same pace (`None` for the writer alone, or with no such row).
    pub writer_vs_alone: Option<f64>,
    /// Each run's last-watcher p99 (this row is the median run), in the
    /// order run.
    pub runs_last_p99_ms: Vec<f64>,
    /// Each run's writer p99, in the order run.
    pub runs_writer_p99_ms: Vec<f64>,
}

/// Unary reads of one key, Lightbox against a peer.
#[derive(Debug, Clone, Serialize)]
pub struct UnaryRow {
    /// `Lightbox` or `etcd`.
    pub system: String,
    /// The call: `GetUser`, `Range (serializable)`, …
    pub call: String,
    /// Clients, each with one request in flight.
    pub clients: usize,
    /// Answers per second.
    pub requests_per_s: f64,
    /// Latency.
    pub latency: Latency,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The machine and the settings.
    pub header: Header,
    /// Slowness: `ListPhotos` CACHED vs FRESH with latency injected.
    pub slowness: Vec<SlownessRow>,
    /// An upstream write → readable from Photos' copy.
    pub propagation: Option<Latency>,
    /// Down or overloaded upstreams.
    pub outage: Vec<OutageRow>,
    /// Many users.
    pub load: Vec<LoadRow>,
    /// Watch fan-out, Lightbox and the peer.
    pub fanout: Vec<FanoutRow>,
    /// Unary reads, Lightbox and the peer.
    pub unary: Vec<UnaryRow>,
    /// Parts not run, each with why (etcd not installed, …).
    pub skipped: Vec<String>,
}

/// A latency in milliseconds, to three significant digits or so: under
/// 0.1 ms in microseconds, where two decimals of a millisecond would show
/// 14 µs and 5 µs alike.
fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".into()
    } else if value > 0.0 && value < 0.1 {
        format!("{:.0} µs", value * 1e3)
    } else if value < 10.0 {
        format!("{value:.2} ms")
    } else {
        format!("{value:.1} ms")
    }
}

fn optional(value: Option<f64>, unit: &str) -> String {
    value.map_or("–".into(), |v| format!("{v:.1} {unit}"))
}

impl Report {
    /// The report as markdown: the header, then one table per part.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let header = &self.header;
        let _ = writeln!(out, "# lightbox bench{}\n", if header.quick { " --quick" } else { "" });
        let _ = writeln!(out, "- machine: {}", header.machine);
        let _ = writeln!(out, "- pinning: {}", header.pinning);
        for (name, value) in &header.settings {
            let _ = writeln!(out, "- {name}: {value}");
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "- skipped: {skipped}");
        }

        let _ = writeln!(
            out,
            "\n## Slowness: ListPhotos with latency injected on each upstream\n"
        );
        let _ = writeln!(
            out,
            "| injected per upstream | mode | requests | p50 | p99 | max | upstream calls per request |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|");
        for row in &self.slowness {
            let _ = writeln!(
                out,
                "| {} ms | {} | {} | {} | {} | {} | {:.2} |",
                row.delay_ms,
                row.mode,
                row.requests,
                ms(row.latency.p50_ms),
                ms(row.latency.p99_ms),
                ms(row.latency.max_ms),
                row.upstream_calls_per_request
            );
        }

        if let Some(latency) = &self.propagation {
            let _ = writeln!(
                out,
                "\nAn upstream write → readable from Photos' copy (`ListPhotos` with `min_users_revision`): p50 {}, p99 {}, max {}",
                ms(latency.p50_ms),
                ms(latency.p99_ms),
                ms(latency.max_ms)
            );
        }

        let _ = writeln!(out, "\n## Down or overloaded: ListPhotos while the upstreams fail\n");
        let _ = writeln!(out, "| upstreams | mode | requests | success | p99 |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        for row in &self.outage {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} % | {} |",
                row.scenario,
                row.mode,
                row.requests,
                row.success_rate * 100.0,
                ms(row.latency.p99_ms)
            );
        }

        let _ = writeln!(
            out,
            "\n## Many users: concurrent clients on ListPhotos, and the ceiling\n"
        );
        let _ = writeln!(
            out,
            "| clients | cell | requests/s | p50 | p99 | upstream calls/s | errors |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|");
        for row in &self.load {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {:.0} | {} |",
                row.clients,
                row.cell,
                row.requests_per_s,
                ms(row.latency.p50_ms),
                ms(row.latency.p99_ms),
                row.upstream_calls_per_s,
                row.errors
            );
        }

        let _ = writeln!(out, "\n## Watch fan-out: write acknowledged → watchers\n");
        let _ = writeln!(
            out,
            "| system | watchers | writes | writes/s | deliveries | each p50 / p99 / max | last watcher p50 / p99 / max | write sent → last watcher p99 | events/s | memory per stream | writer p50 / p99 | writer p99 ÷ alone | server CPU per delivery | runs: last watcher p99 / writer p99, min–max |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in &self.fanout {
            let triple = |l: &Latency| format!("{} / {} / {}", ms(l.p50_ms), ms(l.p99_ms), ms(l.max_ms));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} | {} | {} / {} | {} | {} | {} |",
                row.system,
                row.watchers,
                row.writes,
                row.writes_per_s,
                row.deliveries,
                triple(&row.each),
                triple(&row.last),
                ms(row.last_from_send.p99_ms),
                row.events_per_s,
                optional(row.memory_per_stream_kib, "KiB"),
                ms(row.writer.p50_ms),
                ms(row.writer.p99_ms),
                optional(row.writer_vs_alone, "×"),
                optional(row.server_cpu_us_per_delivery, "µs"),
                spread(row),
            );
        }

        let _ = writeln!(out, "\n## Unary reads: Lightbox and the peer, same generator\n");
        let _ = writeln!(out, "| system | call | clients | requests/s | p50 | p99 |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        for row in &self.unary {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} |",
                row.system,
                row.call,
                row.clients,
                row.requests_per_s,
                ms(row.latency.p50_ms),
                ms(row.latency.p99_ms)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let latency = Latency::of(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((latency.p50_ms, latency.max_ms), (3.0, 5.0));
        assert!(Latency::of(Vec::new()).p99_ms.is_nan());
    }

    #[test]
    fn latencies_keep_their_digits_from_microseconds_up() {
        let shown: Vec<String> = [f64::NAN, 0.0, 0.0142, 0.05, 0.1, 2.345, 44.64]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(
            shown,
            ["–", "0.00 ms", "14 µs", "50 µs", "0.10 ms", "2.35 ms", "44.6 ms"]
        );
    }

    #[test]
    fn every_part_has_its_table_even_when_empty() {
        let text = Report::default().markdown();
        for title in [
            "## Slowness",
            "## Down or overloaded",
            "## Many users",
            "## Watch fan-out",
            "## Unary reads",
        ] {
            assert!(text.contains(title), "{title} in {text}");
        }
    }
}
