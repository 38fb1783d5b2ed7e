//! Watch fan-out: one writer, N watch streams (one watch per gRPC stream,
//! [`PER_CONNECTION`] streams per HTTP/2 connection), the latency from each
//! write's acknowledgement to its arrival on each stream, for any system
//! that can watch ([`WatchSystem`]: Lightbox's `WatchContracts`, etcd's
//! `Watch`), measured by the same code.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use crate::{
    harness::{Res, cpu_seconds, rss_kib},
    report::{FanoutRow, Latency},
};

/// Watch streams per HTTP/2 connection, for every system.
pub const PER_CONNECTION: usize = 100;

/// What one watcher received, and its stream, still open.
pub struct Received {
    /// Each write's number, and when it arrived.
    pub arrivals: Vec<(u64, Instant)>,
    /// The watcher's stream, kept open until every watcher of the cell is
    /// done: a stream that ends is a cancellation to handle on both sides,
    /// and the first watchers to finish must not slow the last write's
    /// deliveries to the others.
    pub open: Box<dyn Send>,
}

/// A system under test that can be written to and watched.
pub trait WatchSystem {
    /// Its name in the tables: `Lightbox`, `etcd`.
    fn name(&self) -> &'static str;

    /// The server's process id (for its memory and CPU time).
    fn server_pid(&self) -> u32;

    /// Opens `watchers` watch streams, [`PER_CONNECTION`] per connection,
    /// and answers once every one is live (a write from now reaches it).
    /// Each task reads its stream until it has received `writes` writes
    /// (numbered `0..writes` by [`WatchSystem::write`]) and answers them
    /// with their arrival times, and the stream, still open.
    fn open_watchers(&self, watchers: usize, writes: u64) -> impl Future<Output = Res<Vec<JoinHandle<Res<Received>>>>>;

    /// Makes write number `seq` and answers once it is acknowledged.
    fn write(&self, seq: u64) -> impl Future<Output = Res<()>>;
}

/// How a cell runs.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// Watch streams.
    pub watchers: usize,
    /// Writes, one after the other.
    pub writes: u64,
    /// The time between two writes' starts.
    pub pace: Duration,
    /// How long the deliveries may take after the last write.
    pub deadline: Duration,
}

impl Cell {
    /// The cell for `watchers` streams: at least `min_deliveries` changes
    /// received in all (none without watchers), at least `min_writes`
    /// writes; 50 writes a second below 1,000 streams, 10 from there (the
    /// load generator is one core).
    pub fn new(watchers: usize, min_writes: u64, min_deliveries: u64) -> Cell {
        let writes = match watchers {
            0 => min_writes,
            n => min_writes.max(min_deliveries.div_ceil(n as u64)),
        };
        let pace = if watchers >= 1000 {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(20)
        };
        Cell {
            watchers,
            writes,
            pace,
            deadline: Duration::from_secs(60),
        }
    }

    /// Writes per second.
    pub fn writes_per_s(&self) -> f64 {
        1.0 / self.pace.as_secs_f64()
    }
}

/// The cells for `watchers` stream counts, in that order, except that 0
/// (the writer alone, the baseline of the writer's latency) becomes one
/// cell per pace the other cells write at, each just before the first cell
/// of its pace. A writer's latency depends on its pace as much as on the
/// watchers: a core idle for 100 ms between two writes answers the next
/// one about half a millisecond later than a core busy every 20 ms (its
/// caches are cold, a virtual CPU may have been descheduled), so a writer
/// among watchers is only compared with the writer alone at the same pace.
pub fn cells(watchers: &[usize], min_writes: u64, min_deliveries: u64) -> Vec<Cell> {
    let watched: Vec<Cell> = watchers
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| Cell::new(n, min_writes, min_deliveries))
        .collect();
    let alone = |pace: Duration| Cell {
        pace,
        ..Cell::new(0, min_writes, min_deliveries)
    };
    if !watchers.contains(&0) {
        return watched;
    }
    if watched.is_empty() {
        return vec![Cell::new(0, min_writes, min_deliveries)];
    }
    let mut cells = Vec::with_capacity(watched.len() * 2);
    for cell in watched {
        if !cells.iter().any(|c: &Cell| c.watchers == 0 && c.pace == cell.pace) {
            cells.push(alone(cell.pace));
        }
        cells.push(cell);
    }
    cells
}

/// Sets each watched row's [`FanoutRow::writer_vs_alone`]: its writer p99
/// over the writer p99 of the same system alone at the same pace.
pub fn compare_writers(rows: &mut [FanoutRow]) {
    let alone: Vec<(String, f64, f64)> = rows
        .iter()
        .filter(|row| row.watchers == 0)
        .map(|row| (row.system.clone(), row.writes_per_s, row.writer.p99_ms))
        .collect();
    for row in rows.iter_mut().filter(|row| row.watchers > 0) {
        row.writer_vs_alone = alone
            .iter()
            .find(|(system, pace, _)| *system == row.system && *pace == row.writes_per_s)
            .map(|(_, _, p99)| row.writer.p99_ms / p99);
    }
}

/// Runs `cell` against `system`.
pub async fn measure(system: &impl WatchSystem, cell: Cell) -> Res<FanoutRow> {
    let pid = system.server_pid();
    let before = rss_kib(pid)?;
    let tasks = system.open_watchers(cell.watchers, cell.writes).await?;
    // Idle streams settle (buffers, the first progress frames) before the weighing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid)?;
    let memory_per_stream_kib = (cell.watchers > 0).then(|| idle.saturating_sub(before) as f64 / cell.watchers as f64);

    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(cell.writes as usize);
    let mut sends = Vec::with_capacity(cell.writes as usize);
    let mut writer = Vec::with_capacity(cell.writes as usize);
    let mut next = tokio::time::interval(cell.pace);
    next.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0..cell.writes {
        next.tick().await;
        let sent = Instant::now();
        system.write(seq).await?;
        let ack = Instant::now();
        writer.push((ack - sent).as_secs_f64() * 1e3);
        acks.push(ack);
        sends.push(sent);
    }

    let mut each = Vec::with_capacity(cell.watchers * cell.writes as usize);
    let mut last = vec![0.0f64; cell.writes as usize];
    let mut last_from_send = vec![0.0f64; cell.writes as usize];
    let mut last_arrival = started;
    let mut deliveries = 0;
    let mut open = Vec::with_capacity(cell.watchers);
    for task in tasks {
        let remaining = cell.deadline.saturating_sub(started.elapsed());
        let received = tokio::time::timeout(remaining, task)
            .await
            .map_err(|_| {
                format!(
                    "{}: the watchers did not all receive every write in time",
                    system.name()
                )
            })?
            .map_err(|e| format!("{}: a watcher failed: {e}", system.name()))??;
        open.push(received.open);
        for (seq, arrived) in received.arrivals {
            let (Some(ack), Some(sent)) = (acks.get(seq as usize), sends.get(seq as usize)) else {
                return Err(format!("{}: a watcher received write {seq}, never made", system.name()).into());
            };
            // A watcher may be told before the writer: that counts as 0.
            let latency = arrived.saturating_duration_since(*ack).as_secs_f64() * 1e3;
            each.push(latency);
            last[seq as usize] = last[seq as usize].max(latency);
            let from_send = arrived.saturating_duration_since(*sent).as_secs_f64() * 1e3;
            last_from_send[seq as usize] = last_from_send[seq as usize].max(from_send);
            last_arrival = last_arrival.max(arrived);
            deliveries += 1;
        }
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    // Every delivery is in: the streams may end now.
    drop(open);
    let busy = last_arrival.saturating_duration_since(started).as_secs_f64();
    Ok(FanoutRow {
        system: system.name().into(),
        watchers: cell.watchers,
        writes: cell.writes as usize,
        writes_per_s: cell.writes_per_s(),
        deliveries,
        each: Latency::of(each),
        last: if cell.watchers > 0 {
            Latency::of(last)
        } else {
            Latency::of(Vec::new())
        },
        last_from_send: if cell.watchers > 0 {
            Latency::of(last_from_send)
        } else {
            Latency::of(Vec::new())
        },
        events_per_s: if busy > 0.0 { deliveries as f64 / busy } else { 0.0 },
        memory_per_stream_kib,
        writer: Latency::of(writer),
        server_cpu_us_per_delivery: (deliveries > 0).then(|| cpu * 1e6 / deliveries as f64),
        writer_vs_alone: None,
        runs_last_p99_ms: Vec::new(),
        runs_writer_p99_ms: Vec::new(),
    })
}

/// The median of several runs of one cell (by the last watcher's p99; by
/// the writer's p99 without watchers), carrying every run's p99s so that
/// the spread is shown next to it. `None` for no runs.
pub fn median_run(mut runs: Vec<FanoutRow>) -> Option<FanoutRow> {
    let runs_last_p99_ms: Vec<f64> = runs.iter().map(|row| row.last.p99_ms).collect();
    let runs_writer_p99_ms: Vec<f64> = runs.iter().map(|row| row.writer.p99_ms).collect();
    let key = |row: &FanoutRow| {
        if row.watchers == 0 {
            row.writer.p99_ms
        } else {
            row.last.p99_ms
        }
    };
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = runs.len() / 2;
    let mut median = runs.into_iter().nth(middle)?;
    median.runs_last_p99_ms = runs_last_p99_ms;
    median.runs_writer_p99_ms = runs_writer_p99_ms;
    Some(median)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(watchers: usize, last_p99_ms: f64, writer_p99_ms: f64) -> FanoutRow {
        FanoutRow {
            system: "Lightbox".into(),
            watchers,
            writes: 1,
            writes_per_s: 50.0,
            deliveries: watchers,
            each: Latency::of(vec![last_p99_ms]),
            last: Latency::of(vec![last_p99_ms]),
            last_from_send: Latency::of(vec![last_p99_ms]),
            events_per_s: 0.0,
            memory_per_stream_kib: None,
            writer: Latency::of(vec![writer_p99_ms]),
            server_cpu_us_per_delivery: None,
            writer_vs_alone: None,
            runs_last_p99_ms: Vec::new(),
            runs_writer_p99_ms: Vec::new(),
        }
    }

    #[test]
    fn the_median_run_is_shown_with_every_runs_p99() -> Res<()> {
        let median = median_run(vec![run(10, 5.0, 1.0), run(10, 1.0, 2.0), run(10, 3.0, 9.0)]).ok_or("no row")?;
        assert_eq!(median.last.p99_ms, 3.0);
        assert_eq!(median.runs_last_p99_ms, [5.0, 1.0, 3.0]);
        assert_eq!(median.runs_writer_p99_ms, [1.0, 2.0, 9.0]);
        // Without watchers, by the writer.
        let alone = median_run(vec![
            run(0, f64::NAN, 4.0),
            run(0, f64::NAN, 2.0),
            run(0, f64::NAN, 3.0),
        ])
        .ok_or("no row")?;
        assert_eq!(alone.writer.p99_ms, 3.0);
        assert!(median_run(Vec::new()).is_none());
        Ok(())
    }

    #[test]
    fn the_writer_alone_runs_at_every_pace_the_watched_cells_write_at() {
        let shape = |cells: Vec<Cell>| -> Vec<(usize, u64)> {
            cells.iter().map(|c| (c.watchers, c.pace.as_millis() as u64)).collect()
        };
        assert_eq!(
            shape(cells(&[0, 1, 100, 1000, 10_000], 300, 1000)),
            [(0, 20), (1, 20), (100, 20), (0, 100), (1000, 100), (10_000, 100)]
        );
        assert_eq!(shape(cells(&[1, 0, 100], 20, 100)), [(0, 20), (1, 20), (100, 20)]);
        assert_eq!(shape(cells(&[0], 20, 100)), [(0, 20)]);
        assert_eq!(shape(cells(&[10_000], 20, 100)), [(10_000, 100)]);
        let alone = cells(&[0, 10_000], 300, 1000);
        assert_eq!((alone[0].writes, alone[1].writes), (300, 300));
    }

    #[test]
    fn a_writer_among_watchers_is_compared_with_the_writer_alone_at_its_pace() {
        let at = |system: &str, watchers: usize, writes_per_s: f64, writer_p99_ms: f64| FanoutRow {
            system: system.into(),
            writes_per_s,
            ..run(watchers, 1.0, writer_p99_ms)
        };
        let mut rows = vec![
            at("Lightbox", 0, 50.0, 1.0),
            at("etcd", 0, 50.0, 4.0),
            at("Lightbox", 100, 50.0, 1.5),
            at("etcd", 100, 50.0, 2.0),
            at("Lightbox", 0, 10.0, 2.0),
            at("Lightbox", 10_000, 10.0, 3.0),
            at("etcd", 10_000, 10.0, 3.0),
        ];
        compare_writers(&mut rows);
        let ratios: Vec<Option<f64>> = rows.iter().map(|r| r.writer_vs_alone).collect();
        assert_eq!(ratios, [None, None, Some(1.5), Some(0.5), None, Some(1.5), None]);
    }
}
