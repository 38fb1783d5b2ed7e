//! Photo processing (fire and forget, done safely), on SQLite and
//! PostgreSQL: `CreatePhoto` answers at once with processing `PENDING`; the
//! job recorded with the photo is done afterwards by the worker pool, and
//! its outcome arrives on `WatchPhotos` and the phone's event stream; a
//! decompression bomb and truncated files fail fast and for good.
//!
//! A stale worker's late completion, and the dead letter by RPC and CLI:
//! `tests/jobs_admin.rs`; killing the worker process mid-job, and its
//! memory: `tests/jobs_process.rs`.

#[path = "support/images.rs"]
mod images;
#[path = "support/processing.rs"]
mod processing;

use std::time::{Duration, Instant};

use base64::Engine;
use lightbox_api::photos::{
    CreatePhotoRequest, GetPhotoThumbnailRequest, ListPhotosRequest, Photo, ProcessingState, WatchPhotosRequest,
    WatchPhotosResponse, photos_service_client::PhotosServiceClient, watch_photos_response::Event,
};
use lightbox_app::{Settings, Target};
use lightbox_changefeed::FeedOptions;
use lightbox_testkit::{DEADLINE, Stack, TestDb, conformance, customer, eventually, sse::EventStream};
use processing::{processed, state, upload};
use sqlx::Row;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

conformance!(
    a_jpeg_and_a_png_are_processed_after_the_answer,
    bombs_and_truncated_files_fail_fast_and_for_good,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// Jobs tuned for tests: quick polls and backoffs, short leases.
fn fast_jobs(settings: &mut Settings) {
    let jobs = &mut settings.photos.jobs;
    jobs.poll_interval = Duration::from_millis(100);
    jobs.lease = Duration::from_secs(2);
    jobs.backoff_min = Duration::from_millis(50);
    jobs.backoff_max = Duration::from_millis(200);
}

/// A customer whose user and contract Photos' copies hold already.
async fn ready_customer(stack: &Stack, email: &str) -> String {
    let (user, contract) = customer(stack, email, "100").await;
    let photos = stack.photos_client().await;
    eventually("Photos' copies to hold the customer", || {
        let mut photos = photos.clone();
        let request = ListPhotosRequest {
            user_id: user.id.clone(),
            min_users_revision: user.revision,
            min_contracts_revision: contract.revision,
            ..ListPhotosRequest::default()
        };
        async move { photos.list_photos(request).await.ok().map(drop) }
    })
    .await;
    user.id
}

/// Reads a photos watch until a change puts `id` in `wanted`; that photo.
async fn watched(stream: &mut tonic::Streaming<WatchPhotosResponse>, id: &str, wanted: ProcessingState) -> Photo {
    loop {
        let frame = tokio::time::timeout(DEADLINE, stream.next()).await;
        let Ok(Some(Ok(WatchPhotosResponse { event: Some(event) }))) = frame else {
            panic!("the watch ended or stalled waiting for {id} to be {wanted:?}: {frame:?}");
        };
        if let Event::Change(change) = event
            && let Some(photo) = change.photo
            && photo.id == id
            && state(&photo) == wanted
        {
            return photo;
        }
    }
}

async fn watch(photos: &mut PhotosServiceClient<Channel>, user_id: &str) -> tonic::Streaming<WatchPhotosResponse> {
    photos
        .watch_photos(WatchPhotosRequest {
            since_revision: -1,
            user_id: user_id.into(),
            ..WatchPhotosRequest::default()
        })
        .await
        .unwrap_or_else(|status| panic!("watch: {status:?}"))
        .into_inner()
}

/// Every byte string the photos database keeps (entities, changes,
/// thumbnails, uploads).
async fn stored_blobs(db: &TestDb) -> Vec<Vec<u8>> {
    let db = db.connect().await;
    let mut blobs = Vec::new();
    for sql in [
        "SELECT payload FROM feed_entities WHERE payload IS NOT NULL",
        "SELECT payload FROM feed_changes WHERE payload IS NOT NULL",
        "SELECT data FROM photo_thumbnails",
        "SELECT data FROM photo_uploads",
    ] {
        for row in sqlx::query(sql)
            .fetch_all(db.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
        {
            blobs.push(row.try_get::<Vec<u8>, _>(0).unwrap_or_else(|e| panic!("{sql}: {e}")));
        }
    }
    db.close().await;
    blobs
}

async fn a_jpeg_and_a_png_are_processed_after_the_answer(db: TestDb) {
    let stack = Stack::start_with(db, feed_options(), fast_jobs).await;
    let ada = ready_customer(&stack, "ada@example.com").await;
    let mut photos = stack.photos_client().await;
    let mut stream = watch(&mut photos, &ada).await;

    // The answer comes before the work: PENDING, size and type from the image.
    let jpeg = images::jpeg_with_exif(600, 300);
    let created = upload(&mut photos, &ada, "Harbour", &jpeg).await;
    assert_eq!(state(&created), ProcessingState::Pending, "{created:?}");
    assert_eq!(created.size_bytes, i64::try_from(jpeg.len()).unwrap_or(0));
    assert_eq!(
        (created.content_type.as_str(), created.image.as_ref()),
        ("image/jpeg", None)
    );
    let pending = watched(&mut stream, &created.id, ProcessingState::Pending).await;
    let done = watched(&mut stream, &created.id, ProcessingState::Done).await;
    assert!(done.revision > pending.revision);
    let processing = done.processing.clone().unwrap_or_default();
    assert_eq!(processing.format, "image/jpeg");
    // Orientation 6 (a quarter turn): 600×300 is shown 300×600.
    assert_eq!(
        (processing.width, processing.height, processing.orientation),
        (300, 600, 6)
    );
    assert_eq!(processing.taken_time.map(|t| t.seconds), Some(images::TAKEN_SECONDS));
    assert_eq!(
        done.taken_time, processing.taken_time,
        "the EXIF date becomes the photo's"
    );
    assert!(processing.location_removed, "the GPS location was seen, and dropped");
    assert_eq!(
        processing.thumbnail_uri,
        format!("/v1/users/{ada}/photos/{}/thumbnail", done.id)
    );
    assert_eq!((processing.thumbnail_width, processing.thumbnail_height), (128, 256));
    assert_eq!(processing.attempts, 1);

    // The thumbnail, over gRPC and through the gateway (with its auth).
    let thumbnail = photos
        .get_photo_thumbnail(GetPhotoThumbnailRequest {
            id: done.id.clone(),
            user_id: ada.clone(),
        })
        .await
        .unwrap_or_else(|status| panic!("thumbnail: {status:?}"))
        .into_inner();
    assert_eq!(thumbnail.content_type, "image/jpeg");
    let decoded = image::load_from_memory(&thumbnail.data).unwrap_or_else(|err| panic!("thumbnail: {err}"));
    assert_eq!((decoded.width(), decoded.height()), (128, 256), "rotated as displayed");
    assert!(
        !images::contains(&thumbnail.data, b"Exif"),
        "the thumbnail carries no metadata"
    );
    let http = reqwest::Client::new();
    let url = format!("{}/v1/users/me/photos/{}/thumbnail", stack.gateway_url(), done.id);
    let response = http.get(&url).bearer_auth(stack.token(&ada)).send().await;
    let response = response.unwrap_or_else(|err| panic!("GET {url}: {err}"));
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    assert_eq!(
        response.bytes().await.map(|b| b.to_vec()).ok(),
        Some(thumbnail.data.clone())
    );
    let stranger = stack.token(&lightbox_api::request::new_id());
    let response = http.get(&url).bearer_auth(stranger).send().await;
    assert_eq!(
        response.map(|r| r.status().as_u16()).ok(),
        Some(404),
        "someone else's photo"
    );

    // GPS stripped from what is stored: no original kept, no trace anywhere.
    let marker = images::GPS_MARKER.to_le_bytes();
    let blobs = stored_blobs(stack.db(Target::Photos)).await;
    assert!(!blobs.is_empty());
    assert!(
        blobs.iter().all(|blob| !images::contains(blob, &marker)),
        "a GPS value was stored"
    );

    // A PNG, uploaded by the phone through the gateway (base64 in JSON),
    // seen on the phone's event stream too.
    let mut events = EventStream::open(
        &http,
        &format!("{}/v1/users/me/events", stack.gateway_url()),
        &stack.token(&ada),
        None,
    )
    .await;
    events.synced().await;
    let png = images::png(300, 200);
    let body = serde_json::json!({ "title": "Plan", "image": base64::engine::general_purpose::STANDARD.encode(&png) });
    let response = http
        .post(format!("{}/v1/users/me/photos", stack.gateway_url()))
        .bearer_auth(stack.token(&ada))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST a PNG: {err}"));
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(
        answer["photo"]["processing"]["state"], "PROCESSING_STATE_PENDING",
        "{answer}"
    );
    assert!(
        answer["photo"].get("image").is_none(),
        "an upload is never returned: {answer}"
    );
    let id = answer["photo"]["id"].as_str().unwrap_or_default().to_owned();
    let seen = events
        .until("the PNG done on the phone's stream", |e| {
            e.name == "photo"
                && e.data["photoId"] == id.as_str()
                && e.data["photo"]["processing"]["state"] == "PROCESSING_STATE_DONE"
        })
        .await;
    let processing = &seen[seen.len() - 1].data["photo"]["processing"];
    assert_eq!(processing["format"], "image/png");
    assert_eq!(
        (processing["width"].as_i64(), processing["height"].as_i64()),
        (Some(300), Some(200))
    );
    assert_eq!(processing["orientation"], 0);
    assert_eq!(processing["takenTime"], serde_json::Value::Null);
    assert_eq!(processing["thumbnailWidth"], 256);
    let done = watched(&mut stream, &id, ProcessingState::Done).await;
    assert_eq!(done.processing.map(|p| p.location_removed), Some(false));
    stack.stop().await;
}

async fn bombs_and_truncated_files_fail_fast_and_for_good(db: TestDb) {
    let stack = Stack::start_with(db, feed_options(), fast_jobs).await;
    let ada = ready_customer(&stack, "ada@example.com").await;
    let mut photos = stack.photos_client().await;
    let cases = [
        ("a decompression bomb", images::bomb(), "60000×60000"),
        (
            "a truncated JPEG",
            images::truncated(&images::jpeg(800, 600), 0.5),
            "does not decode",
        ),
        (
            "a truncated PNG",
            images::truncated(&images::png(800, 600), 0.3),
            "does not decode",
        ),
    ];
    for (what, bytes, reason) in cases {
        let started = Instant::now();
        let created = upload(&mut photos, &ada, what, &bytes).await;
        assert_eq!(state(&created), ProcessingState::Pending, "{what}");
        let failed = processed(&photos, &created.id, ProcessingState::Failed).await;
        let took = started.elapsed();
        let processing = failed.processing.unwrap_or_default();
        assert!(
            processing.failure_reason.contains(reason),
            "{what}: {}",
            processing.failure_reason
        );
        assert_eq!(processing.attempts, 1, "{what}: permanent, never retried");
        assert!(took < Duration::from_secs(5), "{what} took {took:?} to fail");
        eprintln!(
            "{what}: FAILED {took:?} after the upload: {}",
            processing.failure_reason
        );
        // Dead-lettered at once, with its one permanent error.
        let db = stack.db(Target::Photos).connect().await;
        let row = sqlx::query("SELECT state, attempt FROM photo_jobs WHERE photo_id = $1")
            .bind(created.id.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(row.try_get::<String, _>(0).ok().as_deref(), Some("discarded"), "{what}");
        let permanent: i64 = sqlx::query_scalar("SELECT permanent FROM photo_job_errors WHERE photo_id = $1")
            .bind(created.id.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(permanent, 1, "{what}");
        db.close().await;
        let refused = photos
            .get_photo_thumbnail(GetPhotoThumbnailRequest {
                id: created.id.clone(),
                ..GetPhotoThumbnailRequest::default()
            })
            .await;
        assert_eq!(
            refused.map_err(|s| s.code()).err(),
            Some(tonic::Code::FailedPrecondition),
            "{what}"
        );
    }
    // Still serving, and processing good images: one of 3 MiB (past the
    // servers' 1 MiB message limit here: uploads have their own), and
    // one past the 10 MiB cap refused at once, saying so.
    let large = images::padded(&images::jpeg(64, 64), 3 * 1024 * 1024);
    let fine = upload(&mut photos, &ada, "large", &large).await;
    let done = processed(&photos, &fine.id, ProcessingState::Done).await;
    assert_eq!(done.size_bytes, i64::try_from(large.len()).unwrap_or(0));
    let too_large = images::padded(&images::jpeg(64, 64), 10 * 1024 * 1024 + 1);
    let refused = photos
        .create_photo(CreatePhotoRequest {
            photo: Some(Photo {
                user_id: ada.clone(),
                image: Some(too_large),
                ..Photo::default()
            }),
        })
        .await
        .map(drop);
    assert!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("10485760")),
        "{refused:?}"
    );
    stack.stop().await;
}
