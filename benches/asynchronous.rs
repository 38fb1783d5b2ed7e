//! Asynchronous work: photo processing jobs (upload answered → processing
//! `DONE`) and events to functions (commit → function received), on
//! `lightbox dev` pinned to one core.
//!
//! `cargo bench --bench asynchronous [-- --rounds 2 --images 200 --photo-workers 1 --upload-rate R --image-size 1600x1200 --job-lease 2s --job-poll 500ms --subscriptions 1,100 --event-writes 200 --event-rate 5 --saturate-seconds 3 --idle-wait 30 --only jobs|events --json FILE]`
//! (`-- --quick`: one round, 24 images per jobs cell, 10 writes per events
//! cell, 0.25 s of saturating writes, 2 s of idle wait at most; well under a
//! minute once built, for CI. `--json FILE` also writes every row and the
//! medians as JSON, `-` for standard output)
//!
//! Photo jobs. The images are real JPEGs made here with the `image` crate
//! (`--image-size`, 1600×1200 by default: photo-like content, a sky with a
//! sun's glow over textured hills plus sensor-like noise, quality 85,
//! 8 distinct images used in turn, no EXIF; the header prints their size).
//! Each cell runs on a fresh `lightbox dev` (its own data directory) with
//! `--photo-workers` workers (1 by default), `--photo-job-lease 2s` (the
//! default is 15 s: a short lease makes the rescue after a kill quick) and
//! `--photo-job-poll 500ms`. A customer is created over gRPC first (a
//! user, a contract whose `photo_quota` covers the cell, the link); a
//! `WatchPhotos` stream on that user (from now) is open before the first
//! upload; one photo is uploaded and must reach `DONE` with the image's
//! width and height and a thumbnail (the check before timing). Then:
//!
//! 1. reference: `lightbox_photos::decode::process` (what a worker does
//!    with the bytes: header checks, decode, EXIF, thumbnail) called in
//!    this process on core 1 over the same images, no service around it:
//!    the ceiling of images/s per core;
//! 2. burst: `--images` uploads as fast as the server takes them (4
//!    uploaders, closed loop); images/s is the `DONE`s over the time from
//!    the first upload sent to the last `DONE` seen; answered → `DONE`
//!    here is mostly queueing;
//! 3. paced: `--images` uploads at `--upload-rate` per second (default:
//!    half the burst's images/s of the same round), open loop;
//! 4. restart: the same, paced, and the moment half the uploads were
//!    answered (none in flight) the `lightbox dev` process is killed with
//!    SIGKILL with its queue as it is (the job of the last answer, and any
//!    still queued: "in the queue at the kill" counts the answered photos
//!    the watch had not yet shown `DONE`) and started again on the same
//!    `--data-dir` and the same ports; the watch resumes from the last
//!    revision it saw, the rest is uploaded at the same pace. A job the
//!    dead process had claimed is rescued once its lease lapses (the
//!    cell's max is then about the lease); one it had not claimed yet is
//!    simply taken by the new process. Every answered photo must reach
//!    `DONE`: the count lost (answered, never `DONE`) is checked, and the
//!    cell says FAILED unless it is 0. It reports kill → serving (banner
//!    printed) and serving → last `DONE` (which includes uploading the
//!    second half at the pace).
//!
//! Every cell times each photo from its `CreatePhoto` answer (on this
//! side) to the `WatchPhotos` frame showing it `DONE` (p50, p99, max), and
//! reports images/s, the server's CPU (utime + stime from `/proc/PID/stat`
//! over the cell, both processes of the restart cell) as a share of one
//! core and per image, and images/s per core (1 / CPU seconds per image).
//! A photo `FAILED`, an upload refused, a `DONE` with the wrong size or no
//! thumbnail, or a watch stream broken (but by the kill) fails the cell.
//!
//! Events. Each `--subscriptions` count N (1 and 100 by default) runs on a
//! fresh `lightbox dev`: this process serves an HTTP receiver (axum, on
//! 127.0.0.1:0, core 1); N subscriptions are created on the admin
//! listener's `lightbox.events.v1.SubscriptionsService` (no credential on
//! loopback in dev), each to its own path, `entity_types: [USER]`, binary
//! content mode, from now, `rate_limit` 100000/s (the component's default
//! is 50/s), the rest default; the bench waits until every subscription's
//! user cursor has connected, then three warm-up writes must reach every
//! subscription (the check before timing). 64 users are renamed over gRPC
//! (`UpdateUser`, the display name carrying the write's sequence number,
//! parsed back from the CloudEvent's body, the user's proto3 JSON):
//!
//! 1. fixed rate: `--event-writes` writes at `--event-rate` writes/s (5
//!    by default: 500 deliveries/s at 100 subscriptions, well below what
//!    one core delivers, so the latency is not queueing; a cell whose
//!    server CPU reached 90 % says so), users in turn, every delivery (N
//!    per write) timed from the write's
//!    acknowledgement to its arrival at the receiver: p50, p99 and max over
//!    all deliveries, and p99 over the writes of the last subscription to
//!    receive each;
//! 2. saturating: 8 writers (closed loop, users split between them) write
//!    for `--saturate-seconds`; the deliveries are counted until all have
//!    arrived (or none came for 15 s): events/s is the deliveries over the
//!    time from the first write sent to the last arrival; it also says the
//!    writes/s the server took and how long the queue took to drain after
//!    the last write.
//!
//! Every expected delivery (acknowledged writes × N) must arrive: a cell
//! missing some says FAILED with how many; duplicates (at least once) are
//! counted, not failed. Both cells report the server's CPU per delivery:
//! all of the server's CPU over the cell (the write itself, Photos' and
//! the gateway's copies following it, idle timers) over the deliveries, so
//! at one subscription it is mostly the write's cost.
//! A component that answers `UNIMPLEMENTED` is not wired into `lightbox
//! dev`: the cells say so.
//!
//! The server under test is `lightbox dev` (the release binary, SQLite
//! under a temporary directory, every port 127.0.0.1:0, addresses read from
//! its banner) with `TOKIO_WORKER_THREADS=1`, pinned to core 0 with
//! `taskset -c 0`; this process re-runs itself under `taskset -c 1`
//! (`ASYNCHRONOUS_PINNED=1`) and runs the load, the watch and the receiver
//! from one thread on core 1. On a machine with one core, or without
//! `taskset`, nothing is pinned, and the header says so. Before each cell
//! the bench waits (up to `--idle-wait` seconds) for the rest of the
//! machine to go idle, and each cell reports what the rest of the machine
//! used meanwhile. Each round runs every cell; the summary tables give the
//! median over `--rounds` (2 by default).

#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/customer.rs"]
mod customer;
#[path = "support/duration.rs"]
mod duration;
#[path = "support/harness.rs"]
mod harness;

use std::{
    collections::HashMap,
    io::Cursor,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    http::StatusCode,
    routing::post,
};
use cpu::cpu_seconds;
use customer::create_customer;
use duration::parse_duration;
use harness::{
    Args, Dev, IDLE, NOT_PINNED, Res, connect, cpus_allowed, create_user, machine_busy_seconds, machine_cores,
    machine_line, median, pin_self, quantile, rename, status_text, tokio_workers, wait_for_idle,
};
use image::{Rgb, RgbImage, codecs::jpeg::JpegEncoder};
use lightbox_api::{
    events::{
        CreateSubscriptionRequest, EntityType, ListSubscriptionsRequest, Subscription,
        subscriptions_service_client::SubscriptionsServiceClient,
    },
    photos::{
        CreatePhotoRequest, Photo, ProcessingState, WatchPhotosRequest, WatchPhotosResponse,
        photos_service_client::PhotosServiceClient, watch_photos_response,
    },
    users::{User, users_service_client::UsersServiceClient},
};
use lightbox_photos::ImageLimits;
use serde_json::{Value, json};
use tokio::{
    sync::{Notify, mpsc},
    task::{JoinHandle, JoinSet},
};
use tonic::{Code, Streaming, transport::Channel};

/// Set once this process runs under `taskset -c 1`.
const PINNED: &str = "ASYNCHRONOUS_PINNED";
/// The listeners of the `lightbox dev` under test.
const LISTENERS: [&str; 5] = ["users", "contracts", "photos", "gateway", "admin"];
/// Distinct images uploaded in turn.
const DISTINCT_IMAGES: usize = 8;
/// JPEG quality of the generated images.
const JPEG_QUALITY: u8 = 85;
/// Uploaders of the burst cell.
const UPLOADERS: usize = 4;
/// Users the events writers rename in turn.
const EVENT_USERS: usize = 64;
/// Writers of the saturating events cell.
const WRITERS: usize = 8;
/// Warm-up writes of an events cell.
const WARM_WRITES: usize = 3;
/// Deliveries per second a subscription may make: high enough not to
/// throttle.
const RATE_LIMIT: f64 = 100_000.0;
/// The display names of the events writes: a prefix, then the sequence.
const WARM_PREFIX: &str = "bench warm-up ";
const FIXED_PREFIX: &str = "bench fixed ";
const BURST_PREFIX: &str = "bench burst ";

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let settings = Settings::parse(&args)?;
    let cores = machine_cores();
    let pinned = pin_self("asynchronous", PINNED, cores, &args);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(settings, cores, pinned))
}

// ---------------------------------------------------------------------------
// The command line

#[derive(Clone, Copy, PartialEq, Eq)]
enum Only {
    All,
    Jobs,
    Events,
}

struct Settings {
    quick: bool,
    rounds: usize,
    idle_wait: Duration,
    only: Only,
    json: Option<String>,
    // Jobs.
    images: usize,
    photo_workers: usize,
    upload_rate: Option<f64>,
    width: u32,
    height: u32,
    job_lease: String,
    job_poll: String,
    // Events.
    subscriptions: Vec<usize>,
    event_writes: usize,
    event_rate: f64,
    saturate: Duration,
}

impl Settings {
    fn parse(args: &[String]) -> Res<Settings> {
        let args = Args(args);
        let value = |name: &str| args.value(name);
        let quick = args.flag("--quick");
        let subscriptions = args.counts("--subscriptions", vec![1, 100])?;
        if subscriptions.contains(&0) {
            return Err("--subscriptions: every count must be at least 1".into());
        }
        let (width, height) = match value("--image-size") {
            Some(size) => {
                let (w, h) = size
                    .split_once('x')
                    .ok_or_else(|| format!("--image-size {size:?}: expected WIDTHxHEIGHT"))?;
                (
                    w.parse().map_err(|e| format!("--image-size {size:?}: {e}"))?,
                    h.parse().map_err(|e| format!("--image-size {size:?}: {e}"))?,
                )
            }
            None => (1600, 1200),
        };
        let only = match value("--only").as_deref() {
            None | Some("all") => Only::All,
            Some("jobs") => Only::Jobs,
            Some("events") => Only::Events,
            Some(other) => return Err(format!("--only {other:?}: expected jobs, events or all").into()),
        };
        let duration = |name: &str, default: &str| -> Res<String> {
            let text = value(name).unwrap_or_else(|| default.to_owned());
            // With its unit, as `lightbox dev` reads it.
            let with_unit = text.trim_end().ends_with(char::is_alphabetic);
            parse_duration(&text)
                .ok()
                .filter(|_| with_unit)
                .ok_or_else(|| format!("{name} {text:?}: expected a duration such as 2s or 500ms"))?;
            Ok(text)
        };
        let upload_rate = match value("--upload-rate") {
            Some(text) => Some(
                text.parse::<f64>()
                    .map_err(|e| format!("--upload-rate {text:?}: {e}"))?,
            ),
            None => None,
        };
        let settings = Settings {
            quick,
            rounds: args.number("--rounds", if quick { 1.0 } else { 2.0 })? as usize,
            idle_wait: args.seconds("--idle-wait", if quick { 2.0 } else { 30.0 })?,
            only,
            json: value("--json"),
            images: args.number("--images", if quick { 24.0 } else { 200.0 })? as usize,
            photo_workers: args.number("--photo-workers", 1.0)? as usize,
            upload_rate,
            width,
            height,
            job_lease: duration("--job-lease", "2s")?,
            job_poll: duration("--job-poll", "500ms")?,
            subscriptions,
            event_writes: args.number("--event-writes", if quick { 10.0 } else { 200.0 })? as usize,
            event_rate: args.number("--event-rate", 5.0)?,
            saturate: args.seconds("--saturate-seconds", if quick { 0.25 } else { 3.0 })?,
        };
        if settings.rounds == 0 || settings.event_writes == 0 || settings.event_rate <= 0.0 {
            return Err("--rounds, --event-writes and --event-rate must be positive".into());
        }
        if settings.images < 2 || settings.photo_workers == 0 || settings.width == 0 || settings.height == 0 {
            return Err("--images must be at least 2; --photo-workers and --image-size positive".into());
        }
        if settings.upload_rate.is_some_and(|r| r <= 0.0) {
            return Err("--upload-rate must be positive".into());
        }
        Ok(settings)
    }

    /// The flags of `lightbox dev` for the jobs cells (durations as given:
    /// `lightbox dev` reads the same forms).
    fn job_flags(&self) -> Vec<String> {
        vec![
            "--photo-workers".into(),
            self.photo_workers.to_string(),
            "--photo-job-lease".into(),
            self.job_lease.clone(),
            "--photo-job-poll".into(),
            self.job_poll.clone(),
        ]
    }
}

// ---------------------------------------------------------------------------
// The run

async fn run(settings: Settings, cores: usize, pinned: bool) -> Res<()> {
    println!("\n## Asynchronous work: photo jobs and events to functions\n");
    println!("{}", machine_line(cores));
    // A first server, only to report its pinning and threads.
    let probe = Dev::start_fresh(pinned, &LISTENERS, &[]).await?;
    println!(
        "- pinning: {}; lightbox dev CPUs {} ({} tokio worker(s), TOKIO_WORKER_THREADS=1); bench CPUs {} (one thread: load, watch, receiver)",
        if pinned {
            "lightbox dev on core 0, the bench on core 1"
        } else {
            NOT_PINNED
        },
        cpus_allowed(probe.pid),
        tokio_workers(probe.pid),
        cpus_allowed(std::process::id()),
    );
    probe.stop().await;
    println!(
        "- {} round(s){}, each cell on a fresh lightbox dev; before each cell, up to {:?} waiting for the rest of the machine to use < {:.0} % of a core",
        settings.rounds,
        if settings.quick { " (--quick)" } else { "" },
        settings.idle_wait,
        IDLE * 100.0
    );

    let mut report = json!({
        "machine": { "cores": cores, "cpu": harness::cpu_model(), "pinned": pinned },
        "rounds": settings.rounds,
        "quick": settings.quick,
    });
    if settings.only != Only::Events {
        report["jobs"] = jobs_part(&settings, pinned).await?;
    }
    if settings.only != Only::Jobs {
        report["events"] = events_part(&settings, pinned).await?;
    }
    match settings.json.as_deref() {
        None => {}
        Some("-") => println!("\n{}", serde_json::to_string_pretty(&report)?),
        Some(path) => {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .map_err(|e| format!("cannot write --json {path}: {e}"))?;
            println!("\n(JSON written to {path})");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Photo jobs

#[derive(Clone, Copy, PartialEq, Eq)]
enum JobsCell {
    Burst,
    Paced,
    Restart,
}

impl JobsCell {
    const ALL: [JobsCell; 3] = [JobsCell::Burst, JobsCell::Paced, JobsCell::Restart];

    fn name(self) -> &'static str {
        match self {
            JobsCell::Burst => "burst (as fast as taken)",
            JobsCell::Paced => "paced",
            JobsCell::Restart => "paced, killed + restarted mid-run",
        }
    }

    fn key(self) -> &'static str {
        match self {
            JobsCell::Burst => "burst",
            JobsCell::Paced => "paced",
            JobsCell::Restart => "restart",
        }
    }
}

/// One jobs cell's outcome.
#[derive(Clone, Default)]
struct JobsRow {
    /// Uploads per second asked for (NaN: as fast as taken).
    rate: f64,
    uploads: usize,
    answered: usize,
    done: usize,
    failed: usize,
    lost: usize,
    p50: f64,
    p99: f64,
    max: f64,
    images_per_s: f64,
    server_cpu: f64,
    cpu_per_image_ms: f64,
    per_core: f64,
    other_cpu: f64,
    restart: Option<RestartInfo>,
    failure: Option<String>,
}

#[derive(Clone, Copy, Default)]
struct RestartInfo {
    /// Answered photos not yet `DONE` when the process was killed.
    queued_at_kill: usize,
    /// Kill → the new process's banner.
    kill_to_serving: f64,
    /// The new process's banner → the last `DONE`.
    serving_to_last_done: f64,
}

impl JobsRow {
    fn json(&self) -> Value {
        json!({
            "upload_rate": if self.rate.is_finite() { json!(self.rate) } else { Value::Null },
            "uploads": self.uploads, "answered": self.answered, "done": self.done,
            "failed": self.failed, "lost": self.lost,
            "p50_ms": self.p50, "p99_ms": self.p99, "max_ms": self.max,
            "images_per_s": self.images_per_s, "server_cpu_share": self.server_cpu,
            "cpu_ms_per_image": self.cpu_per_image_ms, "images_per_s_per_core": self.per_core,
            "other_cpu_share": self.other_cpu,
            "restart": self.restart.map(|r| json!({
                "queued_at_kill": r.queued_at_kill,
                "kill_to_serving_s": r.kill_to_serving,
                "serving_to_last_done_s": r.serving_to_last_done,
            })),
            "failure": self.failure,
        })
    }
}

async fn jobs_part(settings: &Settings, pinned: bool) -> Res<Value> {
    let made = Instant::now();
    let images = Arc::new(
        (0..DISTINCT_IMAGES)
            .map(|seed| photo_jpeg(settings.width, settings.height, seed as u64))
            .collect::<Res<Vec<_>>>()?,
    );
    let mean_kib = images.iter().map(Vec::len).sum::<usize>() as f64 / images.len() as f64 / 1024.0;
    println!(
        "- photo jobs: {} uploads per cell of {}×{} JPEGs (photo-like, quality {JPEG_QUALITY}, {} distinct, mean {:.0} KiB, made in {:.1} s); \
         lightbox dev {} (lease 2 s by default instead of 15 s: quick rescue after the kill); paced rate {}",
        settings.images,
        settings.width,
        settings.height,
        images.len(),
        mean_kib,
        made.elapsed().as_secs_f64(),
        settings.job_flags().join(" "),
        settings
            .upload_rate
            .map_or("half the burst's images/s of the same round".to_owned(), |r| format!(
                "{r}/s"
            )),
    );

    // The reference: the processing alone, in this process on core 1.
    wait_for_idle(settings.idle_wait).await?;
    let reference = reference_processing(&images, if settings.quick { 8 } else { 40 })?;
    println!(
        "- reference: lightbox_photos::decode::process alone, in the bench on core 1, same images: {:.1} ms per image = {:.1} images/s per core (thumbnail {}×{})",
        reference.ms_per_image, reference.per_core, reference.thumb_width, reference.thumb_height
    );

    println!("\n### Photo jobs, each round: `CreatePhoto` answered → `WatchPhotos` shows `DONE`\n");
    println!(
        "| round | cell | uploads/s | answered | DONE | lost | p50 | p99 | max | images/s | server CPU | CPU per image | images/s per core | × reference | other CPU | status |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut results: Vec<Vec<JobsRow>> = vec![Vec::new(); JobsCell::ALL.len()];
    for round in 1..=settings.rounds {
        let mut burst_rate = f64::NAN;
        for (index, cell) in JobsCell::ALL.into_iter().enumerate() {
            wait_for_idle(settings.idle_wait).await?;
            let rate = match cell {
                JobsCell::Burst => f64::NAN,
                _ => settings.upload_rate.unwrap_or_else(|| {
                    if burst_rate.is_finite() && burst_rate > 0.0 {
                        ((burst_rate / 2.0) * 10.0).round().max(1.0) / 10.0
                    } else {
                        5.0
                    }
                }),
            };
            let row = match jobs_cell(cell, rate, settings, pinned, &images).await {
                Ok(row) => row,
                Err(err) => JobsRow {
                    rate,
                    failure: Some(err.to_string()),
                    p50: f64::NAN,
                    p99: f64::NAN,
                    max: f64::NAN,
                    images_per_s: f64::NAN,
                    server_cpu: f64::NAN,
                    cpu_per_image_ms: f64::NAN,
                    per_core: f64::NAN,
                    other_cpu: f64::NAN,
                    ..JobsRow::default()
                },
            };
            if cell == JobsCell::Burst && row.failure.is_none() {
                burst_rate = row.images_per_s;
            }
            println!(
                "| {round} | {} | {} | {} / {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} | {:.0} % | {:.1} ms | {:.1} | {:.2} | {:.0} % | {} |",
                cell.name(),
                if rate.is_finite() {
                    format!("{rate}")
                } else {
                    "max".into()
                },
                row.answered,
                row.uploads,
                row.done,
                row.lost,
                row.p50,
                row.p99,
                row.max,
                row.images_per_s,
                row.server_cpu * 100.0,
                row.cpu_per_image_ms,
                row.per_core,
                row.per_core / reference.per_core,
                row.other_cpu * 100.0,
                status(row.failure.as_deref()),
            );
            results[index].push(row);
        }
    }

    println!("\n### Worker killed (SIGKILL) and restarted mid-run, each round\n");
    println!(
        "| round | answered | in the queue at the kill | DONE | lost | p99 | max | kill → serving again | serving → last DONE (second half uploaded meanwhile) | status |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (round, row) in results[2].iter().enumerate() {
        let info = row.restart.unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.2} s | {:.2} s | {} |",
            round + 1,
            row.answered,
            info.queued_at_kill,
            row.done,
            row.lost,
            row.p99,
            row.max,
            info.kill_to_serving,
            info.serving_to_last_done,
            status(row.failure.as_deref()),
        );
    }

    println!(
        "\n### Photo jobs, median of {} round(s) ({} photo worker(s), server on one core)\n",
        settings.rounds, settings.photo_workers
    );
    println!(
        "| cell | answered → DONE p50 | p99 | images/s | CPU per image | images/s per core | × reference | lost (all rounds) | status |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut medians = serde_json::Map::new();
    for (cell, rows) in JobsCell::ALL.into_iter().zip(&results) {
        let ok: Vec<&JobsRow> = rows.iter().filter(|r| r.failure.is_none()).collect();
        let pick = |f: fn(&JobsRow) -> f64| median(ok.iter().map(|r| f(r)).collect());
        let lost: usize = rows.iter().map(|r| r.lost).sum();
        let failed = rows.len() - ok.len();
        let verdict = if failed > 0 {
            format!("FAILED ({failed} of {} rounds)", rows.len())
        } else {
            "ok".to_owned()
        };
        println!(
            "| {} | {:.0} ms | {:.0} ms | {:.1} | {:.1} ms | {:.1} | {:.2} | {lost} | {verdict} |",
            cell.name(),
            pick(|r| r.p50),
            pick(|r| r.p99),
            pick(|r| r.images_per_s),
            pick(|r| r.cpu_per_image_ms),
            pick(|r| r.per_core),
            pick(|r| r.per_core) / reference.per_core,
        );
        medians.insert(
            cell.key().into(),
            json!({
                "p50_ms": pick(|r| r.p50), "p99_ms": pick(|r| r.p99),
                "images_per_s": pick(|r| r.images_per_s), "cpu_ms_per_image": pick(|r| r.cpu_per_image_ms),
                "images_per_s_per_core": pick(|r| r.per_core), "lost": lost, "failed_rounds": failed,
            }),
        );
    }
    println!(
        "\n(images/s per core = 1 / the server's CPU seconds per image, over the whole cell: uploads, jobs, watch; \
         × reference = that over decode::process alone; in the burst cell answered → DONE is mostly queueing)"
    );
    let busiest = results.iter().flatten().map(|r| r.other_cpu).fold(0.0, f64::max);
    if busiest > 0.25 {
        println!(
            "\nWARNING: other processes used up to {:.0} % of a core during a jobs cell: the machine was not idle, numbers (and the reference, on the bench's core) are contended",
            busiest * 100.0
        );
    }
    let rows: serde_json::Map<String, Value> = JobsCell::ALL
        .into_iter()
        .zip(&results)
        .map(|(cell, rows)| (cell.key().to_owned(), rows.iter().map(JobsRow::json).collect()))
        .collect();
    Ok(json!({
        "image": { "width": settings.width, "height": settings.height, "quality": JPEG_QUALITY,
                   "mean_bytes": mean_kib * 1024.0, "distinct": images.len() },
        "photo_workers": settings.photo_workers,
        "job_lease": settings.job_lease, "job_poll": settings.job_poll,
        "images_per_cell": settings.images,
        "reference": { "ms_per_image": reference.ms_per_image, "images_per_s_per_core": reference.per_core },
        "rounds": rows,
        "median": medians,
    }))
}

fn status(failure: Option<&str>) -> String {
    failure.map_or("ok".to_owned(), |f| format!("FAILED: {f}"))
}

/// A photo-like `width`×`height` JPEG: a sky darkening upwards with a
/// sun's glow, hills with textured fields, sensor-like noise.
fn photo_jpeg(width: u32, height: u32, seed: u64) -> Res<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(0x5EED_0000 + seed);
    let (w, h) = (width as f32, height as f32);
    let (sun_x, sun_y) = (rng.f32() * w, rng.f32() * h * 0.35);
    let horizon = h * (0.45 + 0.15 * rng.f32());
    let phase = rng.f32() * std::f32::consts::TAU;
    let image = RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32 / w, y as f32 / h);
        let hill = horizon + h * 0.06 * (fx * 9.0 + phase).sin() + h * 0.03 * (fx * 23.0 + 2.0 * phase).sin();
        let (r, g, b) = if (y as f32) < hill {
            let t = y as f32 / hill;
            let d = ((x as f32 - sun_x).powi(2) + (y as f32 - sun_y).powi(2)).sqrt() / w;
            let glow = (1.0 - d * 4.0).max(0.0).powi(2) * 140.0;
            (
                60.0 + 120.0 * t + glow,
                110.0 + 90.0 * t + 0.8 * glow,
                200.0 + 40.0 * t + 0.3 * glow,
            )
        } else {
            let t = (y as f32 - hill) / (h - hill).max(1.0);
            let texture = (fx * 140.0 + fy * 35.0 + phase).sin() * 18.0 + (fx * 37.0 * fy * 11.0).sin() * 12.0;
            (
                70.0 + 60.0 * t + texture,
                100.0 + 40.0 * t + 0.7 * texture,
                40.0 + 20.0 * t + 0.3 * texture,
            )
        };
        let mut noisy = |v: f32| (v + (rng.f32() - 0.5) * 16.0).clamp(0.0, 255.0) as u8;
        Rgb([noisy(r), noisy(g), noisy(b)])
    });
    let mut out = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode_image(&image)
        .map_err(|e| format!("cannot encode a JPEG: {e}"))?;
    Ok(out.into_inner())
}

struct Reference {
    ms_per_image: f64,
    per_core: f64,
    thumb_width: u32,
    thumb_height: u32,
}

/// `decode::process` over the images, `count` times in turn, here.
fn reference_processing(images: &[Vec<u8>], count: usize) -> Res<Reference> {
    let limits = ImageLimits::default();
    // One untimed, to check it works and warm the allocator.
    let first = lightbox_photos::decode::process(&images[0], &limits).map_err(|e| format!("decode::process: {e}"))?;
    let cpu_before = cpu_seconds(std::process::id())?;
    let start = Instant::now();
    for i in 0..count {
        lightbox_photos::decode::process(&images[i % images.len()], &limits)
            .map_err(|e| format!("decode::process: {e}"))?;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(std::process::id())? - cpu_before).max(wall);
    // Single-threaded: the wall time is the CPU time (the larger of the two
    // absorbs the 10 ms ticks).
    Ok(Reference {
        ms_per_image: cpu * 1e3 / count as f64,
        per_core: count as f64 / cpu,
        thumb_width: first.thumbnail_width,
        thumb_height: first.thumbnail_height,
    })
}

/// What the `WatchPhotos` stream has shown.
#[derive(Default)]
struct Tracker {
    done: HashMap<String, Instant>,
    /// Photos `DONE` with the wrong size or no thumbnail.
    wrong: Vec<String>,
    failed: HashMap<String, String>,
    revision: i64,
    resets: usize,
    ended: Option<String>,
}

type Shared = Arc<(Mutex<Tracker>, Notify)>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Tracker> {
    shared.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens `WatchPhotos` for `user_id` from `since` and reads it into
/// `shared` until it ends; with `since` -1, answers once the stream is
/// current (its first frame, a progress frame, arrived).
async fn open_watch(
    photos: &mut PhotosServiceClient<Channel>,
    user_id: &str,
    since: i64,
    shared: &Shared,
    size: (u32, u32),
) -> Res<JoinHandle<()>> {
    let request = WatchPhotosRequest {
        since_revision: since,
        user_id: user_id.to_owned(),
        ..WatchPhotosRequest::default()
    };
    let mut stream = tokio::time::timeout(Duration::from_secs(10), photos.watch_photos(request))
        .await
        .map_err(|_| "WatchPhotos did not answer within 10 s")?
        .map_err(|s| format!("WatchPhotos: {}", status_text(&s)))?
        .into_inner();
    if since < 0 {
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| "WatchPhotos sent no first frame within 10 s")?
            .map_err(|s| format!("WatchPhotos: {}", status_text(&s)))?
            .ok_or("WatchPhotos ended at once")?;
        on_frame(first, shared, size);
    }
    let shared = Arc::clone(shared);
    Ok(tokio::spawn(read_watch(stream, shared, size)))
}

async fn read_watch(mut stream: Streaming<WatchPhotosResponse>, shared: Shared, size: (u32, u32)) {
    let ended = loop {
        match stream.message().await {
            Ok(Some(frame)) => on_frame(frame, &shared, size),
            Ok(None) => break "the stream ended".to_owned(),
            Err(status) => break format!("the stream broke: {}", status_text(&status)),
        }
    };
    lock(&shared).ended = Some(ended);
    shared.1.notify_one();
}

fn on_frame(frame: WatchPhotosResponse, shared: &Shared, (width, height): (u32, u32)) {
    let at = Instant::now();
    let mut tracker = lock(shared);
    match frame.event {
        Some(watch_photos_response::Event::Change(change)) => {
            tracker.revision = tracker.revision.max(change.revision);
            let Some(photo) = change.photo else { return };
            let Some(processing) = photo.processing else { return };
            match processing.state() {
                ProcessingState::Done => {
                    if tracker.done.contains_key(&photo.id) {
                        return;
                    }
                    let right = u32::try_from(processing.width).ok() == Some(width)
                        && u32::try_from(processing.height).ok() == Some(height)
                        && !processing.thumbnail_uri.is_empty();
                    if !right {
                        tracker.wrong.push(format!(
                            "{} is {}×{} with thumbnail {:?}",
                            photo.id, processing.width, processing.height, processing.thumbnail_uri
                        ));
                    }
                    tracker.done.insert(photo.id, at);
                }
                ProcessingState::Failed => {
                    tracker.failed.insert(photo.id, processing.failure_reason);
                }
                _ => return,
            }
        }
        Some(watch_photos_response::Event::Progress(progress)) => {
            tracker.revision = tracker.revision.max(progress.revision);
            return;
        }
        Some(watch_photos_response::Event::Reset(_)) => {
            tracker.resets += 1;
            return;
        }
        _ => return,
    }
    drop(tracker);
    shared.1.notify_one();
}

/// Uploads image `i` as a photo of `user_id`: its id and when the answer
/// came.
async fn upload(
    mut photos: PhotosServiceClient<Channel>,
    user_id: String,
    i: usize,
    images: Arc<Vec<Vec<u8>>>,
) -> Result<(String, Instant), String> {
    let request = CreatePhotoRequest {
        photo: Some(Photo {
            user_id,
            title: format!("Bench photo {i}"),
            image: Some(images[i % images.len()].clone()),
            ..Photo::default()
        }),
    };
    let answer = photos
        .create_photo(request)
        .await
        .map_err(|s| format!("CreatePhoto {i}: {}", status_text(&s)))?;
    let at = Instant::now();
    let photo = answer
        .into_inner()
        .photo
        .ok_or_else(|| format!("CreatePhoto {i} answered no photo"))?;
    let state = photo.processing.as_ref().map(|p| p.state());
    if state != Some(ProcessingState::Pending) && state != Some(ProcessingState::Done) {
        return Err(format!("CreatePhoto {i} answered processing {state:?}"));
    }
    Ok((photo.id, at))
}

/// Waits until every photo of `ids` is `DONE` or `FAILED`, or no photo
/// became so for `stall`; answers when the last one did.
async fn wait_processed(shared: &Shared, ids: &[String], stall: Duration) -> Instant {
    loop {
        {
            let tracker = lock(shared);
            let finished = ids
                .iter()
                .filter(|id| tracker.done.contains_key(*id) || tracker.failed.contains_key(*id))
                .count();
            if finished == ids.len() {
                return Instant::now();
            }
        }
        if tokio::time::timeout(stall, shared.1.notified()).await.is_err() {
            return Instant::now();
        }
    }
}

async fn jobs_cell(
    cell: JobsCell,
    rate: f64,
    settings: &Settings,
    pinned: bool,
    images: &Arc<Vec<Vec<u8>>>,
) -> Res<JobsRow> {
    let dir = tempfile::tempdir()?;
    let flags = settings.job_flags();
    let mut server = Dev::start(pinned, dir.path(), &LISTENERS, None, &flags).await?;
    let size = (settings.width, settings.height);
    let (user, _) = create_customer(
        &server,
        "Bench Photographer",
        "photographer@asynchronous.example.com",
        settings.images + 10,
    )
    .await?;
    let user_id = user.id;
    let mut photos = PhotosServiceClient::new(connect(&server.url("photos")).await?);
    let shared: Shared = Arc::default();
    let mut watch = open_watch(&mut photos, &user_id, -1, &shared, size).await?;

    // The check before timing: one photo through, the right size.
    let mut tries = 1;
    let (check_id, _) = loop {
        match upload(photos.clone(), user_id.clone(), 0, Arc::clone(images)).await {
            Ok(answer) => break answer,
            // The owner may not have reached Photos' copies yet.
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(format!("the check upload, {tries} tries: {err}").into()),
        }
    };
    wait_processed(&shared, std::slice::from_ref(&check_id), Duration::from_secs(30)).await;
    {
        let tracker = lock(&shared);
        if let Some(reason) = tracker.failed.get(&check_id) {
            return Err(format!("the check photo FAILED: {reason}").into());
        }
        if !tracker.done.contains_key(&check_id) {
            return Err("the check photo did not reach DONE within 30 s".into());
        }
        if let Some(wrong) = tracker.wrong.first() {
            return Err(format!("the check photo: {wrong}").into());
        }
    }

    // The timed run.
    let count = settings.images;
    let lease = parse_duration(&settings.job_lease)?;
    let poll = parse_duration(&settings.job_poll)?;
    let stall = (3 * lease + 3 * poll).max(Duration::from_secs(15));
    let machine_before = machine_busy_seconds()?;
    let client_before = cpu_seconds(std::process::id())?;
    let mut cpu_done = 0.0; // CPU of processes already killed.
    let mut cpu_before = cpu_seconds(server.pid)?;
    let start = Instant::now();
    let mut answers: Vec<(String, Instant)> = Vec::with_capacity(count);
    let mut errors: Vec<String> = Vec::new();
    let mut restart: Option<(RestartInfo, Instant)> = None;
    match cell {
        JobsCell::Burst => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = JoinSet::new();
            for _ in 0..UPLOADERS {
                let (photos, user_id, images, next) =
                    (photos.clone(), user_id.clone(), Arc::clone(images), Arc::clone(&next));
                tasks.spawn(async move {
                    let mut results = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return results;
                        }
                        results.push(upload(photos.clone(), user_id.clone(), i, Arc::clone(&images)).await);
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                for result in done? {
                    match result {
                        Ok(answer) => answers.push(answer),
                        Err(err) => errors.push(err),
                    }
                }
            }
        }
        JobsCell::Paced | JobsCell::Restart => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut tasks = JoinSet::new();
            for i in 0..count {
                if cell == JobsCell::Restart && i == count / 2 {
                    // The moment the last in-flight upload is answered (half
                    // answered, its job just claimed): kill, restart, resume.
                    while let Some(done) = tasks.join_next().await {
                        match done? {
                            Ok(answer) => answers.push(answer),
                            Err(err) => errors.push(err),
                        }
                    }
                    let queued_at_kill = {
                        let tracker = lock(&shared);
                        answers.iter().filter(|(id, _)| !tracker.done.contains_key(id)).count()
                    };
                    cpu_done += cpu_seconds(server.pid)? - cpu_before;
                    server.kill().await?;
                    let killed = Instant::now();
                    watch.abort();
                    server = Dev::start(pinned, dir.path(), &LISTENERS, Some(&server), &flags).await?;
                    let serving = Instant::now();
                    cpu_before = 0.0; // The new process's CPU counts from its start.
                    photos = PhotosServiceClient::new(connect(&server.url("photos")).await?);
                    let since = lock(&shared).revision;
                    lock(&shared).ended = None;
                    watch = open_watch(&mut photos, &user_id, since, &shared, size).await?;
                    restart = Some((
                        RestartInfo {
                            queued_at_kill,
                            kill_to_serving: (serving - killed).as_secs_f64(),
                            serving_to_last_done: f64::NAN,
                        },
                        serving,
                    ));
                    // The uploads go on at the same pace from here.
                    tick.reset();
                }
                tick.tick().await;
                tasks.spawn(upload(photos.clone(), user_id.clone(), i, Arc::clone(images)));
            }
            while let Some(done) = tasks.join_next().await {
                match done? {
                    Ok(answer) => answers.push(answer),
                    Err(err) => errors.push(err),
                }
            }
        }
    }
    let ids: Vec<String> = answers.iter().map(|(id, _)| id.clone()).collect();
    wait_processed(&shared, &ids, stall).await;
    let server_cpu_s = cpu_done + cpu_seconds(server.pid)? - cpu_before;
    let client_cpu_s = cpu_seconds(std::process::id())? - client_before;
    let machine_s = machine_busy_seconds()? - machine_before;
    watch.abort();
    server.stop().await;
    drop(dir);

    let tracker = lock(&shared);
    let mut latencies = Vec::new();
    let (mut lost, mut failed, mut last_done) = (0, 0, None::<Instant>);
    for (id, answered) in &answers {
        match tracker.done.get(id) {
            Some(done) => {
                latencies.push(done.saturating_duration_since(*answered).as_secs_f64() * 1e3);
                last_done = Some(last_done.map_or(*done, |last| last.max(*done)));
            }
            None if tracker.failed.contains_key(id) => failed += 1,
            None => lost += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let done = latencies.len();
    let end = last_done.unwrap_or_else(Instant::now);
    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let mut problems = Vec::new();
    if !errors.is_empty() {
        problems.push(format!("{} uploads refused (first: {})", errors.len(), errors[0]));
    }
    if lost > 0 {
        problems.push(format!("{lost} answered photos LOST (never DONE)"));
    }
    if failed > 0 {
        let first = answers
            .iter()
            .find_map(|(id, _)| tracker.failed.get(id))
            .cloned()
            .unwrap_or_default();
        problems.push(format!("{failed} photos FAILED (first: {first})"));
    }
    if let Some(wrong) = tracker.wrong.first() {
        problems.push(format!("{} photos DONE wrong (first: {wrong})", tracker.wrong.len()));
    }
    if let Some(ended) = &tracker.ended
        && lost > 0
    {
        problems.push(format!("the watch: {ended}"));
    }
    if tracker.resets > 0 {
        problems.push(format!("the watch was reset {} times", tracker.resets));
    }
    let restart_info = restart.map(|(mut info, serving)| {
        info.serving_to_last_done = end.saturating_duration_since(serving).as_secs_f64();
        info
    });
    let cpu_per_image = server_cpu_s / done.max(1) as f64;
    Ok(JobsRow {
        rate,
        uploads: count,
        answered: answers.len(),
        done,
        failed,
        lost,
        p50: quantile(&latencies, 0.5),
        p99: quantile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or(f64::NAN),
        images_per_s: done as f64 / elapsed,
        server_cpu: server_cpu_s / elapsed,
        cpu_per_image_ms: cpu_per_image * 1e3,
        per_core: 1.0 / cpu_per_image,
        other_cpu: ((machine_s - server_cpu_s - client_cpu_s) / elapsed).max(0.0),
        restart: restart_info,
        failure: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

// ---------------------------------------------------------------------------
// Events

/// A delivery, as the receiver saw it.
struct Arrival {
    cell: usize,
    sub: usize,
    at: Instant,
    write: Option<(Phase, usize)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Warm,
    Fixed,
    Burst,
}

/// The write a delivery's body (the user's proto3 JSON) carries.
fn parse_write(body: &[u8]) -> Option<(Phase, usize)> {
    let user: Value = serde_json::from_slice(body).ok()?;
    // The entity itself; a wrapper `{"user": …}` is read too.
    let name = user
        .get("displayName")
        .or_else(|| user.get("user").and_then(|u| u.get("displayName")))?
        .as_str()?;
    for (prefix, phase) in [
        (WARM_PREFIX, Phase::Warm),
        (FIXED_PREFIX, Phase::Fixed),
        (BURST_PREFIX, Phase::Burst),
    ] {
        if let Some(seq) = name.strip_prefix(prefix) {
            return seq.parse().ok().map(|seq| (phase, seq));
        }
    }
    None
}

async fn receive(
    State(tx): State<mpsc::UnboundedSender<Arrival>>,
    UrlPath((cell, sub)): UrlPath<(usize, usize)>,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let _ = tx.send(Arrival {
        cell,
        sub,
        at,
        write: parse_write(&body),
    });
    StatusCode::OK
}

/// The receiver of every events cell: `POST /c/{cell}/s/{subscription}`.
async fn start_receiver() -> Res<(SocketAddr, mpsc::UnboundedReceiver<Arrival>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route("/c/{cell}/s/{sub}", post(receive)).with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("asynchronous: the receiver stopped: {err}");
        }
    });
    Ok((addr, rx))
}

#[derive(Clone, Default)]
struct FixedRow {
    writes: usize,
    expected: usize,
    delivered: usize,
    duplicates: usize,
    p50: f64,
    p99: f64,
    max: f64,
    last_p99: f64,
    server_cpu: f64,
    cpu_per_delivery_us: f64,
    client_cpu: f64,
    other_cpu: f64,
    failure: Option<String>,
}

#[derive(Clone, Default)]
struct BurstRow {
    writes: usize,
    writes_per_s: f64,
    expected: usize,
    delivered: usize,
    duplicates: usize,
    events_per_s: f64,
    drain_s: f64,
    p50: f64,
    p99: f64,
    server_cpu: f64,
    cpu_per_delivery_us: f64,
    client_cpu: f64,
    failure: Option<String>,
}

impl FixedRow {
    fn failed(why: &str) -> FixedRow {
        FixedRow {
            p50: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            last_p99: f64::NAN,
            server_cpu: f64::NAN,
            cpu_per_delivery_us: f64::NAN,
            client_cpu: f64::NAN,
            other_cpu: f64::NAN,
            failure: Some(why.to_owned()),
            ..FixedRow::default()
        }
    }

    fn json(&self) -> Value {
        json!({
            "writes": self.writes, "expected": self.expected, "delivered": self.delivered,
            "duplicates": self.duplicates, "p50_ms": self.p50, "p99_ms": self.p99, "max_ms": self.max,
            "last_subscription_p99_ms": self.last_p99, "server_cpu_share": self.server_cpu,
            "cpu_us_per_delivery": self.cpu_per_delivery_us, "bench_cpu_share": self.client_cpu,
            "other_cpu_share": self.other_cpu, "failure": self.failure,
        })
    }
}

impl BurstRow {
    fn failed(why: &str) -> BurstRow {
        BurstRow {
            writes_per_s: f64::NAN,
            events_per_s: f64::NAN,
            drain_s: f64::NAN,
            p50: f64::NAN,
            p99: f64::NAN,
            server_cpu: f64::NAN,
            cpu_per_delivery_us: f64::NAN,
            client_cpu: f64::NAN,
            failure: Some(why.to_owned()),
            ..BurstRow::default()
        }
    }

    fn json(&self) -> Value {
        json!({
            "writes": self.writes, "writes_per_s": self.writes_per_s, "expected": self.expected,
            "delivered": self.delivered, "duplicates": self.duplicates, "events_per_s": self.events_per_s,
            "drain_s": self.drain_s, "p50_ms": self.p50, "p99_ms": self.p99,
            "server_cpu_share": self.server_cpu, "cpu_us_per_delivery": self.cpu_per_delivery_us,
            "bench_cpu_share": self.client_cpu, "failure": self.failure,
        })
    }
}

async fn events_part(settings: &Settings, pinned: bool) -> Res<Value> {
    let (receiver, mut arrivals) = start_receiver().await?;
    println!(
        "- events: subscriptions {:?} (each its own path of the bench's receiver at http://{receiver}, users, binary mode, from now, rate_limit {RATE_LIMIT}/s); \
         fixed rate: {} writes at {}/s over {EVENT_USERS} users; saturating: {WRITERS} writers for {:?}",
        settings.subscriptions, settings.event_writes, settings.event_rate, settings.saturate
    );
    let mut fixed: Vec<Vec<FixedRow>> = vec![Vec::new(); settings.subscriptions.len()];
    let mut burst: Vec<Vec<BurstRow>> = vec![Vec::new(); settings.subscriptions.len()];
    let mut cell_id = 0;
    let mut printed_fixed = Vec::new();
    let mut printed_burst = Vec::new();
    for round in 1..=settings.rounds {
        for (index, &subs) in settings.subscriptions.iter().enumerate() {
            wait_for_idle(settings.idle_wait).await?;
            cell_id += 1;
            let (f, b) = match events_cell(subs, cell_id, settings, pinned, receiver, &mut arrivals).await {
                Ok(rows) => rows,
                Err(err) => {
                    let why = err.to_string();
                    (FixedRow::failed(&why), BurstRow::failed(&why))
                }
            };
            printed_fixed.push(format!(
                "| {round} | {subs} | {} | {} / {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} % | {:.0} µs | {:.0} % | {:.0} % | {} |",
                f.writes,
                f.delivered,
                f.expected,
                f.duplicates,
                f.p50,
                f.p99,
                f.max,
                f.last_p99,
                f.server_cpu * 100.0,
                f.cpu_per_delivery_us,
                f.client_cpu * 100.0,
                f.other_cpu * 100.0,
                status(f.failure.as_deref()),
            ));
            printed_burst.push(format!(
                "| {round} | {subs} | {} | {:.0} | {} / {} | {} | {:.0} | {:.2} s | {:.0} ms | {:.0} ms | {:.0} % | {:.0} µs | {:.0} % | {} |",
                b.writes,
                b.writes_per_s,
                b.delivered,
                b.expected,
                b.duplicates,
                b.events_per_s,
                b.drain_s,
                b.p50,
                b.p99,
                b.server_cpu * 100.0,
                b.cpu_per_delivery_us,
                b.client_cpu * 100.0,
                status(b.failure.as_deref()),
            ));
            fixed[index].push(f);
            burst[index].push(b);
        }
    }
    println!(
        "\n### Events, fixed rate ({} writes/s), each round: write acknowledged → function received\n",
        settings.event_rate
    );
    println!(
        "| round | subscriptions | writes | delivered | duplicates | p50 | p99 | max | last subscription p99 | server CPU | CPU per delivery | bench CPU | other CPU | status |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for line in &printed_fixed {
        println!("{line}");
    }
    if fixed.iter().flatten().any(|r| r.server_cpu >= 0.9) {
        println!(
            "\nWARNING: the server used 90 % of its core or more in a fixed-rate cell: it was saturated, that latency is queueing; lower --event-rate"
        );
    }
    println!(
        "\n### Events, saturating writes ({:?}), each round\n",
        settings.saturate
    );
    println!(
        "| round | subscriptions | writes | writes/s | delivered | duplicates | events/s delivered | drain after the last write | p50 (queueing) | p99 (queueing) | server CPU | CPU per delivery | bench CPU | status |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for line in &printed_burst {
        println!("{line}");
    }

    println!("\n### Events, median of {} round(s)\n", settings.rounds);
    println!(
        "| subscriptions | ack → received p50 | p99 | last subscription p99 | CPU per delivery | events/s (saturating) | missing (all rounds) | status |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut medians = Vec::new();
    for (index, &subs) in settings.subscriptions.iter().enumerate() {
        let (fs, bs) = (&fixed[index], &burst[index]);
        let f_ok: Vec<&FixedRow> = fs.iter().filter(|r| r.failure.is_none()).collect();
        let b_ok: Vec<&BurstRow> = bs.iter().filter(|r| r.failure.is_none()).collect();
        let pick_f = |f: fn(&FixedRow) -> f64| median(f_ok.iter().map(|r| f(r)).collect());
        let pick_b = |f: fn(&BurstRow) -> f64| median(b_ok.iter().map(|r| f(r)).collect());
        let missing: usize = fs
            .iter()
            .map(|r| r.expected.saturating_sub(r.delivered))
            .chain(bs.iter().map(|r| r.expected.saturating_sub(r.delivered)))
            .sum();
        let failed = (fs.len() - f_ok.len()) + (bs.len() - b_ok.len());
        let verdict = match fs
            .iter()
            .find_map(|r| r.failure.as_ref())
            .or(bs.iter().find_map(|r| r.failure.as_ref()))
        {
            Some(first) => format!("FAILED ({failed} cells; first: {first})"),
            None => "ok".to_owned(),
        };
        println!(
            "| {subs} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} µs | {:.0} | {missing} | {verdict} |",
            pick_f(|r| r.p50),
            pick_f(|r| r.p99),
            pick_f(|r| r.last_p99),
            pick_f(|r| r.cpu_per_delivery_us),
            pick_b(|r| r.events_per_s),
        );
        medians.push(json!({
            "subscriptions": subs,
            "p50_ms": pick_f(|r| r.p50), "p99_ms": pick_f(|r| r.p99),
            "last_subscription_p99_ms": pick_f(|r| r.last_p99),
            "cpu_us_per_delivery": pick_f(|r| r.cpu_per_delivery_us),
            "events_per_s": pick_b(|r| r.events_per_s),
            "missing": missing, "failed_cells": failed,
            "fixed_rounds": fs.iter().map(FixedRow::json).collect::<Vec<_>>(),
            "saturating_rounds": bs.iter().map(BurstRow::json).collect::<Vec<_>>(),
        }));
    }
    println!(
        "\n(bench CPU near 100 % in the saturating cell: this process, not the server, was the limit; \
         last subscription p99: per write, the latest of its N deliveries, then the p99 over the writes; \
         a saturating cell that drained in about 0 s kept up with the writes: its events/s is the write rate, not a delivery ceiling)"
    );
    let busiest = fixed.iter().flatten().map(|r| r.other_cpu).fold(0.0, f64::max);
    if busiest > 0.25 {
        println!(
            "\nWARNING: other processes used up to {:.0} % of a core during a fixed-rate cell: the machine was not idle, numbers are contended",
            busiest * 100.0
        );
    }
    Ok(json!({
        "event_rate": settings.event_rate, "event_writes": settings.event_writes,
        "saturate_s": settings.saturate.as_secs_f64(), "users": EVENT_USERS, "writers": WRITERS,
        "rate_limit": RATE_LIMIT,
        "cells": medians,
    }))
}

/// What arrived for one phase: `received[sub][seq]`.
struct Collected {
    received: Vec<Vec<Option<Instant>>>,
    delivered: usize,
    duplicates: usize,
    last: Option<Instant>,
}

/// Reads arrivals for `phase` of cell `cell` until every acknowledged
/// write (`acked[seq]`) reached each of `subs` subscriptions, or none came
/// for `stall`. Arrivals of other phases and cells are dropped.
async fn collect(
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    cell: usize,
    phase: Phase,
    subs: usize,
    acked: &[bool],
    stall: Duration,
) -> Collected {
    let expected = acked.iter().filter(|a| **a).count() * subs;
    let mut collected = Collected {
        received: vec![vec![None; acked.len()]; subs],
        delivered: 0,
        duplicates: 0,
        last: None,
    };
    while collected.delivered < expected {
        let Ok(Some(arrival)) = tokio::time::timeout(stall, arrivals.recv()).await else {
            break;
        };
        let Some((got, seq)) = arrival.write else { continue };
        if arrival.cell != cell || got != phase || arrival.sub >= subs {
            continue;
        }
        let Some(slot) = collected.received[arrival.sub].get_mut(seq) else {
            continue;
        };
        if slot.is_some() {
            collected.duplicates += 1;
            continue;
        }
        *slot = Some(arrival.at);
        collected.last = Some(collected.last.map_or(arrival.at, |l| l.max(arrival.at)));
        if acked[seq] {
            collected.delivered += 1;
        }
    }
    // Duplicates already queued.
    while let Ok(arrival) = arrivals.try_recv() {
        if arrival.cell == cell && arrival.write.is_some_and(|(got, _)| got == phase) && arrival.sub < subs {
            collected.duplicates += 1;
        }
    }
    collected
}

/// One write: when sent and acknowledged (None: refused).
type Written = Option<(Instant, Instant)>;

/// Renames `user` to `prefix` and `seq`: when sent and acknowledged.
async fn write(
    users: &mut UsersServiceClient<Channel>,
    user: &User,
    prefix: &str,
    seq: usize,
) -> Result<(Instant, Instant), String> {
    let (sent, acked, _) = rename(users, user, format!("{prefix}{seq}"))
        .await
        .map_err(|s| format!("UpdateUser {seq}: {}", status_text(&s)))?;
    Ok((sent, acked))
}

async fn events_cell(
    subs: usize,
    cell: usize,
    settings: &Settings,
    pinned: bool,
    receiver: SocketAddr,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> Res<(FixedRow, BurstRow)> {
    let server = Dev::start_fresh(pinned, &LISTENERS, &[]).await?;
    let result = events_cell_on(&server, subs, cell, settings, receiver, arrivals).await;
    server.stop().await;
    result
}

async fn events_cell_on(
    server: &Dev,
    subs: usize,
    cell: usize,
    settings: &Settings,
    receiver: SocketAddr,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> Res<(FixedRow, BurstRow)> {
    let users_channel = connect(&server.url("users")).await?;
    let mut users = UsersServiceClient::new(users_channel.clone());
    let mut people = Vec::with_capacity(EVENT_USERS);
    for i in 0..EVENT_USERS {
        let display_name = format!("Bench user {i}");
        let user = create_user(
            &mut users,
            i,
            display_name,
            format!("events{i}@asynchronous.example.com"),
        )
        .await?;
        people.push(user);
    }

    // The subscriptions, on the admin listener.
    let mut admin = SubscriptionsServiceClient::new(connect(&server.url("admin")).await?);
    for i in 0..subs {
        let request = CreateSubscriptionRequest {
            subscription: Some(Subscription {
                endpoint: format!("http://{receiver}/c/{cell}/s/{i}"),
                entity_types: vec![EntityType::User as i32],
                rate_limit: RATE_LIMIT,
                ..Subscription::default()
            }),
            subscription_id: format!("bench-{i}"),
            secrets: Vec::new(),
            start_revision: None,
        };
        if let Err(status) = admin.create_subscription(request).await {
            return Err(if status.code() == Code::Unimplemented {
                format!(
                    "UNIMPLEMENTED: the admin listener has no SubscriptionsService (the delivery component is not wired into `lightbox dev` yet): {}",
                    status.message()
                )
            } else {
                format!("CreateSubscription {i}: {}", status_text(&status))
            }
            .into());
        }
    }
    wait_connected(&mut admin, subs).await?;

    // The check before timing: warm-up writes reach every subscription.
    while arrivals.try_recv().is_ok() {}
    let mut warm = Vec::new();
    for seq in 0..WARM_WRITES {
        write(&mut users, &people[seq % people.len()], WARM_PREFIX, seq).await?;
        warm.push(true);
    }
    let got = collect(arrivals, cell, Phase::Warm, subs, &warm, Duration::from_secs(30)).await;
    if got.delivered < WARM_WRITES * subs {
        return Err(format!(
            "warm-up: {} of {} deliveries arrived (none for 30 s)",
            got.delivered,
            WARM_WRITES * subs
        )
        .into());
    }

    let fixed = fixed_phase(server, &mut users, &people, subs, cell, settings, arrivals).await?;
    wait_for_idle(Duration::from_secs(2)).await?;
    let burst = burst_phase(server, &users_channel, &people, subs, cell, settings, arrivals).await?;
    Ok((fixed, burst))
}

/// Waits until every subscription's user cursor has connected (its read
/// revision is no longer -1).
async fn wait_connected(admin: &mut SubscriptionsServiceClient<Channel>, subs: usize) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut connected = 0;
        let mut token = String::new();
        loop {
            let page = admin
                .list_subscriptions(ListSubscriptionsRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                })
                .await
                .map_err(|s| format!("ListSubscriptions: {}", status_text(&s)))?
                .into_inner();
            connected += page
                .subscriptions
                .iter()
                .filter(|s| {
                    s.cursors
                        .iter()
                        .any(|c| c.entity_type == EntityType::User as i32 && c.read_revision >= 0)
                })
                .count();
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if connected >= subs {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{connected} of {subs} subscriptions connected to the users feed after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per subscription and write, arrival − acknowledgement in ms; and per
/// write, the latest subscription's.
fn delays(written: &[Written], collected: &Collected) -> (Vec<f64>, Vec<f64>) {
    let (mut all, mut last) = (Vec::new(), Vec::new());
    for (seq, write) in written.iter().enumerate() {
        let Some((_, acked)) = write else { continue };
        let mut latest: Option<f64> = Some(0.0);
        for sub in &collected.received {
            match sub[seq] {
                Some(at) => {
                    let ms = at.saturating_duration_since(*acked).as_secs_f64() * 1e3;
                    all.push(ms);
                    latest = latest.map(|l| l.max(ms));
                }
                None => latest = None,
            }
        }
        if let Some(latest) = latest {
            last.push(latest);
        }
    }
    all.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    (all, last)
}

async fn fixed_phase(
    server: &Dev,
    users: &mut UsersServiceClient<Channel>,
    people: &[User],
    subs: usize,
    cell: usize,
    settings: &Settings,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> Res<FixedRow> {
    let mut written: Vec<Written> = Vec::with_capacity(settings.event_writes);
    let mut first_error = None;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.event_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let machine_before = machine_busy_seconds()?;
    let (server_before, client_before) = (cpu_seconds(server.pid)?, cpu_seconds(std::process::id())?);
    let start = Instant::now();
    for seq in 0..settings.event_writes {
        tick.tick().await;
        match write(users, &people[seq % people.len()], FIXED_PREFIX, seq).await {
            Ok(times) => written.push(Some(times)),
            Err(err) => {
                first_error.get_or_insert(err);
                written.push(None);
            }
        }
    }
    let acked: Vec<bool> = written.iter().map(Option::is_some).collect();
    let collected = collect(arrivals, cell, Phase::Fixed, subs, &acked, Duration::from_secs(10)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(server.pid)? - server_before;
    let client_cpu = cpu_seconds(std::process::id())? - client_before;
    let machine = machine_busy_seconds()? - machine_before;
    let (all, last) = delays(&written, &collected);
    let expected = acked.iter().filter(|a| **a).count() * subs;
    let mut problems = Vec::new();
    if let Some(err) = first_error {
        problems.push(format!(
            "{} writes failed (first: {err})",
            acked.iter().filter(|a| !**a).count()
        ));
    }
    if collected.delivered < expected {
        problems.push(format!(
            "{} of {expected} deliveries MISSING (none for 10 s)",
            expected - collected.delivered
        ));
    }
    Ok(FixedRow {
        writes: written.len(),
        expected,
        delivered: collected.delivered,
        duplicates: collected.duplicates,
        p50: quantile(&all, 0.5),
        p99: quantile(&all, 0.99),
        max: all.last().copied().unwrap_or(f64::NAN),
        last_p99: quantile(&last, 0.99),
        server_cpu: server_cpu / elapsed,
        cpu_per_delivery_us: server_cpu * 1e6 / collected.delivered.max(1) as f64,
        client_cpu: client_cpu / elapsed,
        other_cpu: ((machine - server_cpu - client_cpu) / elapsed).max(0.0),
        failure: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

async fn burst_phase(
    server: &Dev,
    channel: &Channel,
    people: &[User],
    subs: usize,
    cell: usize,
    settings: &Settings,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> Res<BurstRow> {
    let (server_before, client_before) = (cpu_seconds(server.pid)?, cpu_seconds(std::process::id())?);
    let next = Arc::new(AtomicUsize::new(0));
    let length = settings.saturate;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for writer in 0..WRITERS {
        let mine: Vec<User> = people.iter().skip(writer).step_by(WRITERS).cloned().collect();
        let mut users = UsersServiceClient::new(channel.clone());
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut turn = 0;
            while start.elapsed() < length {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let result = write(&mut users, &mine[turn % mine.len()], BURST_PREFIX, seq).await;
                turn += 1;
                done.push((seq, result));
            }
            done
        });
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        results.extend(done?);
    }
    let writing = start.elapsed();
    let end_of_writes = Instant::now();
    let mut written: Vec<Written> = vec![None; results.len()];
    let mut first_error = None;
    let mut errors = 0;
    for (seq, result) in results {
        match result {
            Ok(times) => {
                if let Some(slot) = written.get_mut(seq) {
                    *slot = Some(times);
                }
            }
            Err(err) => {
                errors += 1;
                first_error.get_or_insert(err);
            }
        }
    }
    let acked: Vec<bool> = written.iter().map(Option::is_some).collect();
    let collected = collect(arrivals, cell, Phase::Burst, subs, &acked, Duration::from_secs(15)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(server.pid)? - server_before;
    let client_cpu = cpu_seconds(std::process::id())? - client_before;
    let (all, _) = delays(&written, &collected);
    let expected = acked.iter().filter(|a| **a).count() * subs;
    let mut problems = Vec::new();
    if let Some(err) = first_error {
        problems.push(format!("{errors} writes failed (first: {err})"));
    }
    if collected.delivered < expected {
        problems.push(format!(
            "{} of {expected} deliveries MISSING (none for 15 s)",
            expected - collected.delivered
        ));
    }
    let last = collected.last.unwrap_or(end_of_writes);
    let window = last.saturating_duration_since(start).as_secs_f64();
    Ok(BurstRow {
        writes: written.len(),
        writes_per_s: acked.iter().filter(|a| **a).count() as f64 / writing.as_secs_f64(),
        expected,
        delivered: collected.delivered,
        duplicates: collected.duplicates,
        events_per_s: collected.delivered as f64 / window,
        drain_s: last.saturating_duration_since(end_of_writes).as_secs_f64(),
        p50: quantile(&all, 0.5),
        p99: quantile(&all, 0.99),
        server_cpu: server_cpu / elapsed,
        cpu_per_delivery_us: server_cpu * 1e6 / collected.delivered.max(1) as f64,
        client_cpu: client_cpu / elapsed,
        failure: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}
