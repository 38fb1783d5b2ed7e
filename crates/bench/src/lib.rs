//! `lightbox bench`: the seed's questions answered in one command. It
//! starts what it needs on loopback by itself (this binary as `lightbox
//! dev`, a minimal tonic server, etcd when installed), servers on core 0
//! and the load generator on core 1 where the machine allows, and prints
//! markdown tables (or `--json`), with the machine and the settings first:
//!
//! - slowness: `ListPhotos` `CACHED` vs `FRESH` with latency injected on
//!   each upstream ([`photos`]);
//! - down or overloaded: upstreams down or failing, success rate and p99;
//! - many users: 1 → 256 concurrent clients, requests/s, p99, and the
//!   load that reaches the upstreams, with a minimal tonic server as the
//!   ceiling;
//! - watch fan-out: 1 → 10,000 streams, write acknowledged → each watcher
//!   and → the last one, memory per stream, the writer's latency
//!   ([`fanout`], Lightbox in [`contracts`], etcd in [`etcd`]);
//! - unary reads against etcd's serializable `Range`, same generator
//!   ([`load`]).
//!
//! `--quick` is the short form CI runs; `--plot DIR` draws the charts
//! ([`plot`]).

pub mod contracts;
pub mod etcd;
pub mod fanout;
pub mod harness;
pub mod load;
pub mod photos;
pub mod plot;
pub mod report;

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    fanout::measure,
    harness::{machine_cores, machine_line, pin_self},
    report::{Header, Report},
};

/// `lightbox bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The short form (well under a minute in a release build): fewer
    /// cells, fewer requests. CI runs it so that the command cannot rot;
    /// its numbers are not for comparing.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON instead of markdown tables.
    #[arg(long)]
    pub json: bool,
    /// Also write SVG charts into DIR (created if missing).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Leave etcd out even where it is installed.
    #[arg(long)]
    pub no_etcd: bool,
    /// The parts to run, comma-separated: photos (slowness, propagation,
    /// outages, many users), unary, fanout. Default: all.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
    /// The fan-out cells' stream counts, comma-separated (default 0, 1,
    /// 100, 1000, 10000; with --quick 0, 1, 100).
    #[arg(long, value_delimiter = ',', value_name = "N")]
    pub watchers: Vec<usize>,
    /// How many times each fan-out cell runs, Lightbox and etcd in turn
    /// (A B A B): the table shows the median run and the spread (default
    /// 3; with --quick 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: Option<u32>,
    /// Serve the minimal tonic server the many-users cells compare with
    /// (started by the bench itself).
    #[arg(long, hide = true)]
    pub serve_minimal: bool,
}

/// A part of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Slowness, propagation, outages and many users, on `ListPhotos`.
    Photos,
    /// Unary reads, Lightbox and the peer.
    Unary,
    /// Watch fan-out, Lightbox and the peer.
    Fanout,
}

/// How big the run is.
struct Plan {
    delays_ms: Vec<u64>,
    requests: usize,
    clients: Vec<usize>,
    load_time: Duration,
    watchers: Vec<usize>,
    min_writes: u64,
    min_deliveries: u64,
    unary_clients: Vec<usize>,
    repeat: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                delays_ms: vec![0, 20],
                requests: 20,
                clients: vec![1, 16],
                load_time: Duration::from_millis(500),
                watchers: vec![0, 1, 100],
                min_writes: 20,
                min_deliveries: 100,
                unary_clients: vec![1, 16],
                repeat: 1,
            }
        } else {
            Plan {
                delays_ms: vec![0, 5, 20, 100],
                requests: 100,
                clients: vec![1, 4, 16, 64, 256],
                load_time: Duration::from_secs(3),
                watchers: vec![0, 1, 100, 1000, 10_000],
                min_writes: 300,
                min_deliveries: 1000,
                unary_clients: vec![1, 16, 64],
                repeat: 3,
            }
        }
    }

    fn settings(&self, pinned: bool) -> Vec<(String, String)> {
        let list = |values: &[usize]| values.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        vec![
            (
                "servers".into(),
                if pinned {
                    "this binary as `lightbox dev` (SQLite, one tokio worker), the minimal tonic server and etcd, each on core 0 in turn".into()
                } else {
                    "this binary as `lightbox dev` (SQLite, one tokio worker), the minimal tonic server and etcd, sharing the cores with the load".into()
                },
            ),
            (
                "slowness and outages".into(),
                format!(
                    "one client, {} sequential requests per cell, latency injected per upstream: {} ms",
                    self.requests,
                    self.delays_ms
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "many users".into(),
                format!(
                    "closed loop, {} clients over 4 HTTP/2 connections, {} s per cell",
                    list(&self.clients),
                    self.load_time.as_secs_f64()
                ),
            ),
            (
                "watch fan-out".into(),
                format!(
                    "{} streams ({} per HTTP/2 connection), one watch per stream, at least {} writes and {} deliveries per cell, 50 writes/s below 1,000 streams and 10/s from there (the writer alone at each pace: its baseline), latency from the write's acknowledgement; each cell run {} time(s), Lightbox and etcd in turn, the median run shown",
                    list(&self.watchers),
                    fanout::PER_CONNECTION,
                    self.min_writes,
                    self.min_deliveries,
                    self.repeat
                ),
            ),
            (
                "unary peer cells".into(),
                format!(
                    "Lightbox GetUser and etcd Range (serializable), {} clients, {} s each",
                    list(&self.unary_clients),
                    self.load_time.as_secs_f64()
                ),
            ),
        ]
    }
}

/// Runs `lightbox bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.serve_minimal {
        return photos::serve_minimal()
            .await
            .map_err(|e| anyhow::anyhow!("the minimal server: {e}"));
    }
    let report = measure_all(&args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = &args.plot {
        let written = plot::write_charts(&report, dir).map_err(|e| anyhow::anyhow!("the charts: {e}"))?;
        for path in written {
            eprintln!("wrote {}", path.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}

async fn measure_all(args: &BenchArgs) -> harness::Res<Report> {
    let cores = machine_cores();
    let pinned = pin_self(cores);
    let mut plan = Plan::new(args.quick);
    if !args.watchers.is_empty() {
        plan.watchers.clone_from(&args.watchers);
    }
    if let Some(repeat) = args.repeat {
        plan.repeat = repeat;
    }
    let runs = |part: Part| args.only.is_empty() || args.only.contains(&part);
    let mut report = Report {
        header: Header {
            machine: machine_line(cores),
            cores,
            pinning: if pinned {
                "servers on core 0, the load generator (this process) on core 1".into()
            } else {
                "none: servers and load share the cores".into()
            },
            quick: args.quick,
            settings: plan.settings(pinned),
        },
        ..Report::default()
    };
    // A part left out still has its (empty) table: say why it is empty.
    for (part, what) in [
        (Part::Photos, "slowness, outages, many users"),
        (Part::Unary, "unary reads"),
        (Part::Fanout, "watch fan-out"),
    ] {
        if !runs(part) {
            report.skipped.push(format!("{what}: not run (--only)"));
        }
    }

    let mut photos = photos::Photos::start(pinned).await?;
    if runs(Part::Photos) {
        eprintln!("lightbox bench: slowness, outages, many users");
        report.slowness = photos.slowness(&plan.delays_ms, plan.requests).await?;
        report.propagation = Some(photos.propagation(plan.requests).await?);
        report.outage = photos.outage(plan.requests).await?;
        let minimal = photos::Minimal::start(pinned).await?;
        report.load = photos.load(&plan.clients, plan.load_time, &minimal).await?;
        minimal.stop().await;
    }

    // etcd, started afresh for each part and each fan-out cell.
    let etcd = if args.no_etcd {
        report.skipped.push("etcd: left out (--no-etcd)".into());
        None
    } else {
        match etcd::Etcd::start(pinned).await? {
            Ok(etcd) => Some(etcd),
            Err(why) => {
                report.skipped.push(format!("etcd: {why}"));
                None
            }
        }
    };
    let with_etcd = etcd.is_some();
    if runs(Part::Unary) {
        eprintln!("lightbox bench: unary reads");
    }
    for &clients in plan.unary_clients.iter().filter(|_| runs(Part::Unary)) {
        report.unary.push(photos.unary(clients, plan.load_time).await?);
        if let Some(etcd) = &etcd {
            report.unary.push(etcd::unary(etcd, clients, plan.load_time).await?);
        }
    }
    photos.stop().await;
    if let Some(etcd) = etcd {
        etcd.stop().await;
    }

    if runs(Part::Fanout) {
        eprintln!("lightbox bench: watch fan-out");
    }
    let cells = fanout::cells(&plan.watchers, plan.min_writes, plan.min_deliveries);
    for &cell in cells.iter().filter(|_| runs(Part::Fanout)) {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..plan.repeat {
            // A fresh server per run: the memory weighed is this run's.
            let lightbox = contracts::Contracts::start(pinned).await?;
            ours.push(measure(&lightbox, cell).await?);
            lightbox.stop().await;
            if with_etcd {
                let etcd = etcd::Etcd::start(pinned)
                    .await?
                    .map_err(|why| format!("etcd, again: {why}"))?;
                theirs.push(measure(&etcd, cell).await?);
                etcd.stop().await;
            }
        }
        report.fanout.extend(fanout::median_run(ours));
        report.fanout.extend(fanout::median_run(theirs));
    }
    fanout::compare_writers(&mut report.fanout);
    Ok(report)
}
