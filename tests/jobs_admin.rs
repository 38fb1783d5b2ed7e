//! Photo jobs, the hard parts, on SQLite and PostgreSQL: a stale worker's
//! late completion is refused (fencing by attempt), and a job that always
//! fails is dead-lettered after its attempts with every error, visible
//! through `PhotoJobsService` on the admin listener (and only there, behind
//! the credential) and through `lightbox jobs`; retried from there, it is
//! done.

#[path = "support/images.rs"]
mod images;
#[path = "support/processing.rs"]
mod processing;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use lightbox_api::photos::{
    CreatePhotoRequest, GetPhotoRequest, ListPhotoJobsRequest, Photo, PhotoJobState, ProcessingState,
    photo_jobs_service_client::PhotoJobsServiceClient, photos_service_client::PhotosServiceClient,
    photos_service_server::PhotosService as _,
};
use lightbox_app::Target;
use lightbox_cache::CacheOptions;
use lightbox_changefeed::{Backend, FeedOptions};
use lightbox_photos::{ImageLimits, JobFailure, JobOptions, PhotosOptions, PhotosService, Processor, decode};
use lightbox_server::{AdminCredential, AdminOptions, ProcessHealth, Shutdown};
use lightbox_testkit::{Stack, TestDb, bind_any, channel, conformance, customer, eventually, upstream};
use processing::{ADMIN_TOKEN, Bearer, JobsClient, job, job_in, processed, state, upload};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

conformance!(
    a_stale_workers_late_completion_is_refused,
    a_job_that_always_fails_is_discarded_then_retried,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// Another database of `like`'s backend.
async fn another_db(like: Backend) -> TestDb {
    match like {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => TestDb::postgres()
            .await
            .unwrap_or_else(|| panic!("PostgreSQL answered a moment ago and no longer does")),
    }
}

/// Plays two workers by hand, on a photos service that runs no pool.
async fn a_stale_workers_late_completion_is_refused(db: TestDb) {
    let backend = db.backend();
    let stack = Stack::start(db, feed_options()).await;
    let (ada, _) = customer(&stack, "ada@example.com", "10").await;
    let photos_db = another_db(backend).await;
    let options = PhotosOptions {
        jobs: JobOptions {
            workers: 0,
            ..JobOptions::default()
        },
        ..PhotosOptions::default()
    };
    let service = PhotosService::open(
        photos_db.connect().await,
        feed_options(),
        CacheOptions::default(),
        upstream(stack.addr(Target::Users)),
        upstream(stack.addr(Target::Contracts)),
        options,
    )
    .await
    .unwrap_or_else(|err| panic!("open photos: {err}"));
    let jpeg = images::jpeg(320, 240);
    let photo = Photo {
        user_id: ada.id.clone(),
        title: "Quay".into(),
        image: Some(jpeg.clone()),
        ..Photo::default()
    };
    let created = service
        .create_photo(tonic::Request::new(CreatePhotoRequest { photo: Some(photo) }))
        .await
        .unwrap_or_else(|status| panic!("create: {status:?}"))
        .into_inner()
        .photo
        .unwrap_or_default();
    let claim = |worker: &'static str, lease: Duration| {
        let service = service.clone();
        async move {
            service
                .claim_photo_job(worker, lease)
                .await
                .unwrap_or_else(|err| panic!("claim: {err}"))
        }
    };
    let stale = claim("stale worker", Duration::from_millis(300))
        .await
        .unwrap_or_else(|| panic!("a job is due"));
    assert_eq!((stale.photo_id.as_str(), stale.attempt), (created.id.as_str(), 1));
    assert_eq!(
        claim("other worker", Duration::from_secs(30)).await,
        None,
        "a leased job is not claimed twice"
    );
    // Its lease lapses (the worker paused): the job is taken back, then
    // claimed by another worker, at the next attempt.
    eventually(
        "the stale worker's lease to lapse and the job to be rescued",
        || async {
            (service
                .rescue_photo_jobs()
                .await
                .unwrap_or_else(|err| panic!("rescue: {err}"))
                == 1)
                .then_some(())
        },
    )
    .await;
    let fresh = claim("fresh worker", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("rescued, due"));
    assert_eq!(fresh.attempt, 2);
    let done = decode::process(&jpeg, &ImageLimits::default()).unwrap_or_else(|err| panic!("process: {err}"));
    let complete = |claim| {
        let (service, done) = (service.clone(), done.clone());
        async move {
            service
                .complete_photo_job(&claim, &done)
                .await
                .unwrap_or_else(|err| panic!("complete: {err}"))
        }
    };
    let get = || async {
        let request = GetPhotoRequest {
            id: created.id.clone(),
            ..GetPhotoRequest::default()
        };
        service
            .get_photo(tonic::Request::new(request))
            .await
            .ok()
            .and_then(|r| r.into_inner().photo)
            .unwrap_or_default()
    };
    assert!(
        !complete(stale.clone()).await,
        "the stale worker's late completion is refused"
    );
    assert_eq!(state(&get().await), ProcessingState::Pending, "and changed nothing");
    assert!(complete(fresh.clone()).await, "the current attempt completes");
    let photo = get().await;
    assert_eq!(state(&photo), ProcessingState::Done);
    assert_eq!(photo.processing.as_ref().map(|p| p.attempts), Some(2));
    assert!(!complete(fresh).await, "once in effect: a second completion is refused");
    assert!(!complete(stale).await);
    // Once in effect: one thumbnail, one DONE change in the feed.
    let changes = service
        .feed()
        .list_changes(0, 1000, "")
        .await
        .unwrap_or_else(|err| panic!("changes: {err}"));
    let dones = changes
        .changes
        .iter()
        .filter(|c| c.entity.as_ref().is_some_and(|p| state(p) == ProcessingState::Done))
        .count();
    assert_eq!(dones, 1, "{:?}", changes.changes);
    let db = photos_db.connect().await;
    let thumbnails: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM photo_thumbnails")
        .fetch_one(db.pool())
        .await
        .unwrap_or_else(|err| panic!("count: {err}"));
    assert_eq!(thumbnails, 1);
    let lost: String = sqlx::query_scalar("SELECT message FROM photo_job_errors WHERE attempt = 1")
        .fetch_one(db.pool())
        .await
        .unwrap_or_else(|err| panic!("errors: {err}"));
    assert!(lost.contains("lease lapsed"), "{lost}");
    db.close().await;
    stack.stop().await;
}

/// Runs `lightbox jobs ARGS --addr ADMIN`; (exit code, stdout, stderr).
async fn cli(admin: std::net::SocketAddr, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .arg("jobs")
        .args(args)
        .args(["--addr", &admin.to_string()])
        .env_remove("LIGHTBOX_ADMIN_TOKEN")
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"));
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    (
        output.status.code().unwrap_or(-1),
        text(output.stdout),
        text(output.stderr),
    )
}

async fn a_job_that_always_fails_is_discarded_then_retried(db: TestDb) {
    let backend = db.backend();
    let stack = Stack::start(db, feed_options()).await;
    let (ada, _) = customer(&stack, "ada@example.com", "10").await;
    // A photos component of its own, whose processing fails (transiently)
    // in mode BROKEN, takes its time first in mode SLOW, works in mode
    // FIXED; with its admin listener.
    const BROKEN: u8 = 0;
    const SLOW: u8 = 1;
    const FIXED: u8 = 2;
    let mode = Arc::new(AtomicU8::new(BROKEN));
    let photos_db = another_db(backend).await;
    let mut settings = stack.settings.clone();
    settings.database_url = Some(photos_db.url().to_owned());
    let failing = Arc::clone(&mode);
    settings.photos.jobs = JobOptions {
        max_attempts: 3,
        poll_interval: Duration::from_millis(100),
        lease: Duration::from_secs(2),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        processor: Processor(Arc::new(move |bytes, limits| {
            let now = failing.load(Ordering::SeqCst);
            if now == SLOW {
                std::thread::sleep(Duration::from_secs(2));
            }
            if now != FIXED {
                return Err(JobFailure {
                    message: "the thumbnail store is unreachable (injected)".into(),
                    permanent: false,
                });
            }
            decode::process(bytes, limits).map_err(|message| JobFailure {
                message,
                permanent: true,
            })
        })),
        ..JobOptions::default()
    };
    let component = lightbox_app::targets::start(Target::Photos, &settings, bind_any().await)
        .await
        .unwrap_or_else(|err| panic!("start photos: {err:#}"));
    let admin_listener = bind_any().await;
    let admin = admin_listener.local_addr().unwrap_or_else(|err| panic!("{err}"));
    let (_admin_stop, admin_shutdown) = Shutdown::new();
    let options = AdminOptions {
        faults: false,
        credential: AdminCredential::bearer(ADMIN_TOKEN).unwrap_or_else(|err| panic!("{err}")),
        metrics: None,
        max_message_bytes: 4 * 1024 * 1024,
        tls: None,
    };
    tokio::spawn(lightbox_server::serve_admin_with(
        admin_listener,
        ProcessHealth::new(),
        Vec::new(),
        component.admin_services.clone(),
        options,
        admin_shutdown,
    ));
    let mut photos = PhotosServiceClient::new(channel(component.addr).await);
    let jobs: JobsClient = PhotoJobsServiceClient::with_interceptor(channel(admin).await, Bearer);

    let created = upload(&mut photos, &ada.id, "Cliff", &images::jpeg(200, 100)).await;
    let discarded = job_in(&jobs, &created.id, PhotoJobState::Discarded, |_| true).await;
    assert_eq!((discarded.attempt, discarded.max_attempt), (3, 3));
    let attempts: Vec<i32> = discarded.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "every attempt's error: {discarded:?}");
    assert!(
        discarded
            .errors
            .iter()
            .all(|e| !e.permanent && e.message.contains("injected"))
    );
    let failed = processed(&photos, &created.id, ProcessingState::Failed).await;
    let reason = failed.processing.map(|p| p.failure_reason).unwrap_or_default();
    assert!(
        reason.contains("gave up after 3 attempts") && reason.contains("injected"),
        "{reason}"
    );

    // The jobs service is on the admin listener only, behind the credential.
    let on_photos_port = PhotoJobsServiceClient::new(channel(component.addr).await)
        .list_photo_jobs(ListPhotoJobsRequest::default())
        .await;
    assert_eq!(on_photos_port.map_err(|s| s.code()).err(), Some(Code::Unimplemented));
    let anonymous = PhotoJobsServiceClient::new(channel(admin).await)
        .list_photo_jobs(ListPhotoJobsRequest::default())
        .await;
    assert_eq!(anonymous.map_err(|s| s.code()).err(), Some(Code::Unauthenticated));

    // By CLI: listed with its errors; refused without the token.
    let (code, out, err) = cli(admin, &["list", "--token", ADMIN_TOKEN]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&created.id) && out.contains("discarded") && out.contains("3/3"),
        "{out}"
    );
    assert!(out.contains("injected"), "the last error is shown: {out}");
    let (code, out, err) = cli(
        admin,
        &["list", "--state", "discarded", "--json", "--token", ADMIN_TOKEN],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(listed["jobs"][0]["state"], "PHOTO_JOB_STATE_DISCARDED", "{listed}");
    assert_eq!(
        listed["jobs"][0]["errors"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );
    let (code, _, err) = cli(admin, &["list"]).await;
    assert_eq!(code, 6, "no token: refused: {err}");
    assert!(err.contains("UNAUTHENTICATED") || err.contains("credential"), "{err}");

    // Retried from the dead letter, once the cause is fixed: done.
    mode.store(FIXED, Ordering::SeqCst);
    let (code, out, err) = cli(admin, &["retry", &created.id, "--token", ADMIN_TOKEN]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&created.id), "{out}");
    let done = processed(&photos, &created.id, ProcessingState::Done).await;
    assert_eq!(done.processing.map(|p| p.attempts), Some(4));
    let mut client = jobs.clone();
    let finished = job(&mut client, &created.id).await;
    assert_eq!(
        (finished.state(), finished.attempt, finished.errors.len()),
        (PhotoJobState::Done, 4, 3)
    );
    // A done job can be neither discarded nor retried.
    let (code, _, err) = cli(admin, &["discard", &created.id, "--token", ADMIN_TOKEN]).await;
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = cli(admin, &["retry", &created.id, "--token", ADMIN_TOKEN]).await;
    assert_eq!(code, 5, "{err}");

    // An operator's discard of a running job: the photo FAILED with the
    // reason, and the attempt's own outcome, when it comes, is refused.
    mode.store(SLOW, Ordering::SeqCst);
    let second = upload(&mut photos, &ada.id, "Dune", &images::png(40, 40)).await;
    job_in(&jobs, &second.id, PhotoJobState::Running, |_| true).await;
    let (code, out, err) = cli(
        admin,
        &["discard", &second.id, "--reason", "bad upload", "--token", ADMIN_TOKEN],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded"), "{out}");
    let failed = processed(&photos, &second.id, ProcessingState::Failed).await;
    assert_eq!(
        failed.processing.map(|p| p.failure_reason).as_deref(),
        Some("bad upload")
    );
    // The slow attempt ends (failing) after the discard: refused, so the job
    // stays discarded with the operator's reason as its last error.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut client = jobs.clone();
    let after = job(&mut client, &second.id).await;
    assert_eq!(after.state(), PhotoJobState::Discarded);
    assert_eq!(
        after.errors.last().map(|e| e.message.as_str()),
        Some("bad upload"),
        "{after:?}"
    );
    if let Err(err) = component.stop().await {
        panic!("photos failed to stop cleanly: {err:#}");
    }
    stack.stop().await;
}
