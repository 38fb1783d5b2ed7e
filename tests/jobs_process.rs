//! The photo worker as a process (`lightbox serve --target photos`), on
//! SQLite and PostgreSQL: killed with SIGKILL in the middle of a job and
//! started again, the job is finished once in effect (one `DONE` change,
//! one thumbnail), seconds after the dead worker's lease lapsed; and a
//! decompression bomb and a truncated file fail fast while the process's
//! peak memory stays bounded.
//!
//! To catch the worker mid-job, the first process runs with the test knob
//! `--photo-job-min-duration 30s` (every attempt lasts at least that long,
//! holding and renewing its lease); the second runs without it.
//!
//! Memory: the process's peak resident set (`VmHWM` in `/proc/PID/status`)
//! is reset (`5` written to `/proc/PID/clear_refs`) before the bad uploads
//! and read after they failed. The bomb's header claims 60000×60000 RGBA
//! pixels, 14.4 GB decoded: a limit checked after allocating would show
//! gigabytes, or kill the process; checked from the header, the peak grows
//! by a few MiB at most (the bound asserted is 64 MiB).

#[path = "support/images.rs"]
mod images;
#[path = "support/processing.rs"]
mod processing;

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use lightbox_api::photos::{
    GetPhotoRequest, ListPhotoChangesRequest, PhotoJobState, ProcessingState,
    photo_jobs_service_client::PhotoJobsServiceClient, photos_service_client::PhotosServiceClient,
};
use lightbox_app::Target;
use lightbox_changefeed::{Backend, FeedOptions};
use lightbox_testkit::{Stack, TestDb, channel, conformance, customer, eventually};
use processing::{ADMIN_TOKEN, Bearer, JobsClient, job_in, processed, state, upload};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

conformance!(a_killed_worker_finishes_its_job_once_after_a_restart_in_bounded_memory);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|err| panic!("no free port: {err}"))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `lightbox serve --target photos` on `ports` (photos, admin), over
/// `database`, reaching the stack's users and contracts; killed (SIGKILL)
/// when dropped.
fn photos_process(stack: &Stack, ports: (u16, u16), database: &str, min_duration: &str) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(["--target", "photos", "--database-url", database])
        .args(["--photos-addr", &local(ports.0).to_string()])
        .args([
            "--admin-addr",
            &local(ports.1).to_string(),
            "--admin-token",
            ADMIN_TOKEN,
        ])
        .args(["--users-url", &format!("http://{}", stack.addr(Target::Users))])
        .args(["--contracts-url", &format!("http://{}", stack.addr(Target::Contracts))])
        .args([
            "--progress-interval",
            "200ms",
            "--photo-job-lease",
            "1s",
            "--photo-job-poll",
            "200ms",
        ])
        .args(["--photo-job-min-duration", min_duration])
        .env("RUST_LOG", "warn")
        .env_remove("LIGHTBOX_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"))
}

/// Waits until the photos process answers on `port`; a client.
async fn serving(port: u16) -> PhotosServiceClient<tonic::transport::Channel> {
    let photos = PhotosServiceClient::new(channel(local(port)).await);
    eventually("the photos process to serve", || {
        let mut photos = photos.clone();
        async move {
            let request = GetPhotoRequest {
                id: lightbox_api::request::new_id(),
                ..GetPhotoRequest::default()
            };
            match photos.get_photo(request).await {
                Err(status) if status.code() == tonic::Code::NotFound => Some(()),
                _ => None,
            }
        }
    })
    .await;
    photos
}

/// A line of `/proc/PID/status`, in KiB (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

async fn a_killed_worker_finishes_its_job_once_after_a_restart_in_bounded_memory(db: TestDb) {
    let backend = db.backend();
    let stack = Stack::start(
        db,
        FeedOptions {
            progress_interval: Duration::from_millis(200),
            ..FeedOptions::default()
        },
    )
    .await;
    let (ada, _) = customer(&stack, "ada@example.com", "10").await;
    let photos_db = match backend {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => TestDb::postgres()
            .await
            .unwrap_or_else(|| panic!("PostgreSQL went away")),
    };
    let ports = (free_port(), free_port());
    let mut first = photos_process(&stack, ports, photos_db.url(), "30s");
    let mut photos = serving(ports.0).await;
    let jobs: JobsClient = PhotoJobsServiceClient::with_interceptor(channel(local(ports.1)).await, Bearer);

    // The answer, then the job running (attempt 1, for at least 30 s).
    let jpeg = images::jpeg_with_exif(800, 600);
    let created = upload(&mut photos, &ada.id, "Lighthouse", &jpeg).await;
    assert_eq!(state(&created), ProcessingState::Pending);
    let running = job_in(&jobs, &created.id, PhotoJobState::Running, |job| job.attempt == 1).await;
    eprintln!("attempt 1 running on {}", running.worker);

    // SIGKILL mid-job, then a new process (no knob) on the same database.
    first
        .kill()
        .await
        .unwrap_or_else(|err| panic!("cannot kill the worker: {err}"));
    let killed = Instant::now();
    let second = photos_process(&stack, ports, photos_db.url(), "0s");
    let photos = serving(ports.0).await;
    let done = processed(&photos, &created.id, ProcessingState::Done).await;
    let took = killed.elapsed();
    eprintln!("done {took:?} after the kill (lease 1 s, poll 200 ms, restart included)");
    assert!(took < Duration::from_secs(15), "rescued in seconds, not {took:?}");
    let processing = done.processing.clone().unwrap_or_default();
    assert_eq!(
        (processing.width, processing.height, processing.attempts),
        (600, 800, 2)
    );
    let finished = job_in(&jobs, &created.id, PhotoJobState::Done, |_| true).await;
    assert_eq!(finished.attempt, 2);
    assert_eq!(finished.errors.len(), 1, "{finished:?}");
    assert!(finished.errors[0].message.contains("lease lapsed"), "{finished:?}");

    // Once in effect: one DONE change for the photo, one thumbnail, no upload left.
    let mut client = photos.clone();
    let changes = client
        .list_photo_changes(ListPhotoChangesRequest {
            since_revision: 1,
            page_size: 1000,
            ..ListPhotoChangesRequest::default()
        })
        .await
        .unwrap_or_else(|status| panic!("changes: {status:?}"))
        .into_inner();
    let dones = changes
        .changes
        .iter()
        .filter(|c| {
            c.photo
                .as_ref()
                .is_some_and(|p| p.id == created.id && state(p) == ProcessingState::Done)
        })
        .count();
    assert_eq!(dones, 1, "{:?}", changes.changes);
    let pool = photos_db.connect().await;
    for (sql, expected) in [
        ("SELECT COUNT(*) FROM photo_thumbnails", 1),
        ("SELECT COUNT(*) FROM photo_uploads", 0),
    ] {
        let count: i64 = sqlx::query_scalar(sql)
            .fetch_one(pool.pool())
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        assert_eq!(count, expected, "{sql}");
    }
    pool.close().await;

    // Bad uploads fail fast, and the process's peak memory stays bounded.
    let pid = second.id().unwrap_or_else(|| panic!("the process has no id"));
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let before = status_kib(pid, if reset { "VmRSS" } else { "VmHWM" });
    let mut photos = photos;
    for (what, bytes) in [
        ("a decompression bomb", images::bomb()),
        ("a truncated JPEG", images::truncated(&images::jpeg(1600, 1200), 0.4)),
    ] {
        let started = Instant::now();
        let created = upload(&mut photos, &ada.id, what, &bytes).await;
        let failed = processed(&photos, &created.id, ProcessingState::Failed).await;
        let took = started.elapsed();
        eprintln!(
            "{what}: FAILED after {took:?}: {}",
            failed.processing.map(|p| p.failure_reason).unwrap_or_default()
        );
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
    }
    let peak = status_kib(pid, "VmHWM");
    let grown = peak.saturating_sub(before);
    eprintln!("peak RSS {peak} KiB, {grown} KiB over the {before} KiB before (reset: {reset})");
    assert!(grown < 64 * 1024, "the bad uploads raised the peak RSS by {grown} KiB");
    drop(second);
    stack.stop().await;
}
