//! A photo's processing state as the API shows it ([`Processing`] in the
//! photo), its changes written through the photos feed (so `WatchPhotos`,
//! the views and the phones' event streams see them), and the thumbnails.

use lightbox_api::{
    ApiError,
    google::api::HttpBody,
    photos::{Photo, Processing, ProcessingState},
    request,
};
use lightbox_changefeed::{Db, FeedError, WriteTx};

use crate::decode::{Processed, THUMBNAIL_TYPE};

/// The processing of a photo just uploaded.
pub(crate) fn pending() -> Processing {
    Processing {
        state: ProcessingState::Pending as i32,
        update_time: Some(request::now()),
        ..Processing::default()
    }
}

/// Where the gateway serves a photo's thumbnail.
pub(crate) fn thumbnail_uri(photo: &Photo) -> String {
    format!("/v1/users/{}/photos/{}/thumbnail", photo.user_id, photo.id)
}

/// `photo` once its image is processed: the metadata, the thumbnail's
/// reference, and the EXIF date as the photo's `taken_time` unless the
/// uploader gave one.
pub(crate) fn done(photo: &mut Photo, processed: &Processed, attempts: i64) {
    let taken = processed
        .taken
        .map(|(seconds, nanos)| pbjson_types::Timestamp { seconds, nanos });
    if photo.taken_time.is_none() {
        photo.taken_time = taken;
    }
    photo.processing = Some(Processing {
        state: ProcessingState::Done as i32,
        format: processed.format.to_owned(),
        width: i32::try_from(processed.width).unwrap_or(i32::MAX),
        height: i32::try_from(processed.height).unwrap_or(i32::MAX),
        taken_time: taken,
        orientation: i32::from(processed.orientation),
        location_removed: processed.had_location,
        thumbnail_uri: thumbnail_uri(photo),
        thumbnail_width: i32::try_from(processed.thumbnail_width).unwrap_or(i32::MAX),
        thumbnail_height: i32::try_from(processed.thumbnail_height).unwrap_or(i32::MAX),
        failure_reason: String::new(),
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        update_time: Some(request::now()),
    });
}

/// `photo` given up on, saying why.
pub(crate) fn failed(photo: &mut Photo, reason: &str, attempts: i64) {
    photo.processing = Some(Processing {
        state: ProcessingState::Failed as i32,
        failure_reason: reason.to_owned(),
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        update_time: Some(request::now()),
        ..Processing::default()
    });
}

/// Rewrites the photo `photo_id` with `change`, in the transaction `tx`
/// (a new revision, published to every watcher at commit); false if the
/// photo is gone.
pub(crate) async fn rewrite(
    tx: &mut WriteTx<Photo>,
    photo_id: &str,
    change: impl FnOnce(&mut Photo),
) -> Result<bool, FeedError> {
    let Some(mut photo) = tx.get(photo_id).await? else {
        return Ok(false);
    };
    change(&mut photo);
    photo.revision = tx.next_revision();
    let owner = photo.user_id.clone();
    tx.put_scoped(photo_id, &owner, &photo).await?;
    Ok(true)
}

/// Stores (or replaces) a photo's thumbnail, in the transaction completing
/// its job.
pub(crate) async fn store_thumbnail(tx: &mut WriteTx<Photo>, photo_id: &str, data: &[u8]) -> Result<(), FeedError> {
    sqlx::query(
        "INSERT INTO photo_thumbnails (photo_id, content_type, data) VALUES ($1, $2, $3) \
         ON CONFLICT (photo_id) DO UPDATE SET content_type = excluded.content_type, data = excluded.data",
    )
    .bind(photo_id)
    .bind(THUMBNAIL_TYPE)
    .bind(data.to_vec())
    .execute(tx.conn())
    .await?;
    // The original goes with its job: only the thumbnail and the metadata
    // are kept (and so no GPS location).
    sqlx::query("DELETE FROM photo_uploads WHERE photo_id = $1")
        .bind(photo_id)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The thumbnail of `photo` (visible to the caller), as an HTTP body.
pub(crate) async fn thumbnail(db: &Db, photo: &Photo) -> Result<HttpBody, ApiError> {
    let state = photo.processing.as_ref().map(|p| p.state());
    if state != Some(ProcessingState::Done) {
        let why = match state {
            None => "was created without an image".to_owned(),
            Some(state) => format!("is {}", state.as_str_name()),
        };
        return Err(ApiError::FailedPrecondition(format!(
            "photo {} has no thumbnail: its processing {why}",
            photo.id
        )));
    }
    let row: Option<(String, Vec<u8>)> =
        sqlx::query_as("SELECT content_type, data FROM photo_thumbnails WHERE photo_id = $1")
            .bind(photo.id.as_str())
            .fetch_optional(db.pool())
            .await
            .map_err(FeedError::from)?;
    let (content_type, data) = row.ok_or_else(|| ApiError::NotFound(format!("photo {} not found", photo.id)))?;
    Ok(HttpBody {
        content_type,
        data,
        extensions: Vec::new(),
    })
}
