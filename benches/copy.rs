//! The in-memory copy's structure, chosen by measurement: an atomically
//! swapped persistent map (what `lightbox_changefeed::memory` uses) against
//! a `RwLock<HashMap>` updated in place, both read by one thread while
//! another applies batches, side by side in one run; and the memory one
//! entity costs in the copy.
//!
//! `cargo bench --bench copy [-- --entities 200000 --seconds 2]`
//!
//! Reads are `get` by a random id of the copy, the way Photos reads a user;
//! the writer applies batches of 16 upserts as fast as it can (far more
//! than any upstream writes), so the readers meet it as often as possible.
//! Memory is the process's RSS growth while loading the copy, divided by
//! its entities.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lightbox_api::users::User;
use lightbox_changefeed::{Change, Published, Snapshot};

const BATCH: usize = 16;

fn user(n: usize, revision: i64) -> Arc<Change<User>> {
    let id = format!("0190a3c2-7b1e-7000-8000-{n:012}");
    Arc::new(Change::new(
        revision,
        id.clone(),
        String::new(),
        Some(User {
            id,
            display_name: format!("User number {n}"),
            email: format!("user{n}@example.com"),
            status: 1,
            contract_id: format!("0190a3c2-7b1e-7000-9000-{n:012}"),
            revision,
            create_time: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            update_time: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }),
    ))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// One structure under test: how it reads, and how it applies a batch.
trait Store: Send + Sync + 'static {
    fn read(&self, id: &str) -> bool;
    fn apply(&self, batch: &[Arc<Change<User>>]);
}

struct Swapped(Published<User>);

impl Store for Swapped {
    fn read(&self, id: &str) -> bool {
        self.0.load().get(id).is_some()
    }

    fn apply(&self, batch: &[Arc<Change<User>>]) {
        let mut next = (*self.0.load()).clone();
        batch.iter().for_each(|change| next.apply(Arc::clone(change)));
        self.0.publish(next);
    }
}

struct Locked(RwLock<HashMap<String, Arc<Change<User>>>>);

impl Store for Locked {
    fn read(&self, id: &str) -> bool {
        self.0.read().map(|map| map.contains_key(id)).unwrap_or(false)
    }

    fn apply(&self, batch: &[Arc<Change<User>>]) {
        if let Ok(mut map) = self.0.write() {
            for change in batch {
                map.insert(change.entity_id.clone(), Arc::clone(change));
            }
        }
    }
}

/// Reads per second (one reader), the slowest 1,000 reads in a row, and
/// batches applied per second meanwhile (one writer).
fn measure(store: Arc<dyn Store>, ids: &[String], seconds: Duration) -> (f64, Duration, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, stop, batches) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&batches));
        let total = ids.len();
        std::thread::spawn(move || {
            let mut revision = 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..BATCH)
                    .map(|_| {
                        revision += 1;
                        user(fastrand::usize(..total), revision)
                    })
                    .collect();
                store.apply(&batch);
                batches.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let start = Instant::now();
    let (mut reads, mut slowest) = (0u64, Duration::ZERO);
    // Timed per 1,000 reads: a clock read per read would cost more than the
    // read itself on these machines.
    while start.elapsed() < seconds {
        let began = Instant::now();
        for _ in 0..1000 {
            let id = &ids[fastrand::usize(..ids.len())];
            assert!(store.read(id), "every id is in the copy");
        }
        slowest = slowest.max(began.elapsed());
        reads += 1000;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    (
        reads as f64 / elapsed,
        slowest,
        batches.load(Ordering::Relaxed) as f64 / elapsed,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let entities = flag("--entities", 200_000);
    let seconds = Duration::from_secs(flag("--seconds", 2) as u64);
    println!(
        "# The copy in memory: {entities} users, {} cores, {BATCH} changes per batch\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let changes: Vec<_> = (0..entities).map(|n| user(n, n as i64 + 1)).collect();
    let ids: Vec<String> = changes.iter().map(|c| c.entity_id.clone()).collect();
    let encoded: usize = changes
        .iter()
        .map(|c| c.entity.as_ref().map_or(0, prost::Message::encoded_len))
        .sum();
    let before = rss_kib();
    let mut snapshot = Snapshot::new(0, false);
    for change in &changes {
        snapshot.apply(Arc::clone(change));
    }
    let after = rss_kib();
    let per_entity = (after.saturating_sub(before) * 1024) as f64 / entities as f64;
    println!("| memory | bytes per entity |");
    println!("|---|---:|");
    println!(
        "| encoded protobuf (average) | {:.0} |",
        encoded as f64 / entities as f64
    );
    println!("| measured: RSS growth / entities | {per_entity:.0} |");
    println!(
        "| estimated by the copy (`approx_bytes`) | {:.0} |",
        snapshot.approx_bytes() as f64 / entities as f64
    );
    println!(
        "\nAt {per_entity:.0} B per entity, a copy of 1 million users takes about {:.0} MiB.\n",
        per_entity * 1e6 / 1024.0 / 1024.0
    );

    let swapped: Arc<dyn Store> = Arc::new(Swapped(Published::new(snapshot)));
    let locked: Arc<dyn Store> = Arc::new(Locked(RwLock::new(
        changes.iter().map(|c| (c.entity_id.clone(), Arc::clone(c))).collect(),
    )));
    println!("| structure | round | reads/s (1 reader) | slowest 1,000 reads | batches/s (1 writer) |");
    println!("|---|---:|---:|---:|---:|");
    for round in 1..=2 {
        for (name, store) in [
            ("ArcSwap + imbl (swapped)", &swapped),
            ("RwLock<HashMap> (in place)", &locked),
        ] {
            let (reads, slowest, batches) = measure(Arc::clone(store), &ids, seconds);
            println!(
                "| {name} | {round} | {:.2} M | {:.2} ms | {:.0} k |",
                reads / 1e6,
                slowest.as_secs_f64() * 1e3,
                batches / 1e3
            );
        }
    }
    println!(
        "\nOnly the swapped snapshot shows a batch whole: in place, a read can land between two changes of one batch."
    );
}
