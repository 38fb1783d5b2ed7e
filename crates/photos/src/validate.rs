//! What a photo must look like, and what a contract allows.

use lightbox_api::{
    ApiError,
    contracts::{Contract, ContractStatus},
    photos::Photo,
    request,
    users::{User, UserStatus},
};

/// The largest photo accepted, in bytes.
const MAX_SIZE_BYTES: i64 = 200 * 1024 * 1024;

/// A photo to create, checked and completed (id, time), and its image if
/// one was given (at most `max_image_bytes`, a JPEG or a PNG: what would
/// fail later is refused now); the photo returned carries no image.
pub(crate) fn new_photo(photo: Option<Photo>, max_image_bytes: usize) -> Result<(Photo, Option<Vec<u8>>), ApiError> {
    let mut photo = photo.ok_or_else(|| ApiError::InvalidArgument("photo is required".into()))?;
    let user_id = request::parse_id("photo.user_id", &photo.user_id)?.to_string();
    let title = request::text("photo.title", &photo.title, false, 200)?;
    let image = photo.image.take();
    if let Some(image) = &image {
        image_fits(&mut photo, image, max_image_bytes)?;
    }
    let content_type = photo.content_type.trim().to_ascii_lowercase();
    let valid_type = matches!(content_type.split_once('/'), Some((kind, sub)) if kind == "image" && !sub.is_empty()
        && sub.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)));
    if !valid_type {
        return Err(ApiError::InvalidArgument(format!(
            "photo.content_type {:?} is not an image media type such as image/jpeg",
            photo.content_type
        )));
    }
    if !(1..=MAX_SIZE_BYTES).contains(&photo.size_bytes) {
        return Err(ApiError::InvalidArgument(format!(
            "photo.size_bytes must be from 1 to {MAX_SIZE_BYTES} (got {})",
            photo.size_bytes
        )));
    }
    if let Some(taken) = &photo.taken_time {
        request::timestamp("photo.taken_time", taken)?;
    }
    let photo = Photo {
        id: request::new_id(),
        user_id,
        title,
        content_type,
        size_bytes: photo.size_bytes,
        taken_time: photo.taken_time,
        create_time: Some(request::now()),
        revision: 0,
        processing: None,
        image: None,
    };
    Ok((photo, image))
}

/// Checks an uploaded image against its photo record, filling the size and
/// the media type when they were left out.
fn image_fits(photo: &mut Photo, image: &[u8], max_bytes: usize) -> Result<(), ApiError> {
    if image.is_empty() || image.len() > max_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "photo.image must have from 1 to {max_bytes} bytes (got {})",
            image.len()
        )));
    }
    let format = crate::decode::sniff(image).ok_or_else(|| {
        ApiError::InvalidArgument("photo.image must be a JPEG or a PNG (its first bytes are neither)".into())
    })?;
    let size = i64::try_from(image.len()).unwrap_or(i64::MAX);
    match photo.size_bytes {
        0 => photo.size_bytes = size,
        given if given != size => {
            return Err(ApiError::InvalidArgument(format!(
                "photo.size_bytes is {given} but photo.image has {size} bytes (leave size_bytes out to take the image's)"
            )));
        }
        _ => {}
    }
    match photo.content_type.trim().to_ascii_lowercase().as_str() {
        "" => photo.content_type = format.to_owned(),
        given if given != format => {
            return Err(ApiError::InvalidArgument(format!(
                "photo.content_type is {given:?} but photo.image is {format}"
            )));
        }
        _ => {}
    }
    Ok(())
}

/// Whether `user`, holding `contract`, may upload one more photo beside the
/// `count` they have.
pub(crate) fn may_upload(user: &User, contract: Option<&Contract>, count: i64) -> Result<(), ApiError> {
    if user.status != UserStatus::Active as i32 {
        return Err(ApiError::PermissionDenied(format!(
            "user {} is suspended and cannot upload photos",
            user.id
        )));
    }
    let contract = contract.ok_or_else(|| {
        ApiError::FailedPrecondition(format!("user {} has no contract, and uploads need one", user.id))
    })?;
    match ContractStatus::try_from(contract.status) {
        Ok(ContractStatus::Active) => {}
        Ok(ContractStatus::Suspended) => {
            return Err(ApiError::FailedPrecondition(format!(
                "contract {} is suspended: uploads are paused",
                contract.id
            )));
        }
        _ => {
            return Err(ApiError::FailedPrecondition(format!(
                "contract {} is not active: uploads are closed",
                contract.id
            )));
        }
    }
    if let Some(quota) = photo_quota(contract)?
        && count >= quota
    {
        return Err(ApiError::ResourceExhausted(format!(
            "photo quota of contract {} reached: {count} of {quota} photos; delete some or raise the plan's photo_quota",
            contract.id
        )));
    }
    Ok(())
}

/// The `photo_quota` option of a contract, if enabled.
fn photo_quota(contract: &Contract) -> Result<Option<i64>, ApiError> {
    let Some(option) = contract.options.iter().find(|o| o.code == "photo_quota" && o.enabled) else {
        return Ok(None);
    };
    option.value.trim().parse::<i64>().map(Some).map_err(|_| {
        ApiError::FailedPrecondition(format!(
            "contract {} has a photo_quota of {:?}, which is not a number",
            contract.id, option.value
        ))
    })
}

#[cfg(test)]
mod tests {
    use lightbox_api::contracts::ContractOption;

    use super::*;

    fn photo(content_type: &str, size: i64) -> Option<Photo> {
        Some(Photo {
            user_id: request::new_id(),
            title: "Sunset".into(),
            content_type: content_type.into(),
            size_bytes: size,
            ..Photo::default()
        })
    }

    #[test]
    fn photos_are_checked() {
        let max = 1024;
        assert!(new_photo(photo("image/jpeg", 10), max).is_ok());
        assert!(
            matches!(new_photo(photo("text/plain", 10), max), Err(ApiError::InvalidArgument(m)) if m.contains("content_type"))
        );
        assert!(
            matches!(new_photo(photo("image/png", 0), max), Err(ApiError::InvalidArgument(m)) if m.contains("size_bytes"))
        );
    }

    #[test]
    fn images_must_be_jpeg_or_png_and_agree_with_the_record() {
        let png = b"\x89PNG\r\n\x1a\n0000".to_vec();
        let with = |content_type: &str, size: i64, image: &[u8]| {
            let mut photo = photo(content_type, size);
            if let Some(photo) = &mut photo {
                photo.image = Some(image.to_vec());
            }
            new_photo(photo, 64)
        };
        let (created, image) = with("", 0, &png).expect("size and type taken from the image");
        assert_eq!((created.size_bytes, created.content_type.as_str()), (12, "image/png"));
        assert_eq!((image.as_deref(), created.image), (Some(png.as_slice()), None));
        let refused = |result: Result<_, ApiError>, words: &str| {
            assert!(
                matches!(&result, Err(ApiError::InvalidArgument(m)) if m.contains(words)),
                "{words}"
            );
        };
        refused(with("", 0, b"GIF89a-not-accepted"), "JPEG or a PNG");
        refused(with("image/jpeg", 0, &png), "content_type");
        refused(with("", 5, &png), "size_bytes");
        refused(with("", 0, &[0x89; 65]), "64 bytes");
    }

    #[test]
    fn the_quota_counts_and_status_gates() {
        let user = User {
            id: "u".into(),
            status: UserStatus::Active as i32,
            ..User::default()
        };
        let mut contract = Contract {
            id: "c".into(),
            status: ContractStatus::Active as i32,
            options: vec![ContractOption {
                code: "photo_quota".into(),
                value: "2".into(),
                enabled: true,
            }],
            ..Contract::default()
        };
        assert!(may_upload(&user, Some(&contract), 1).is_ok());
        assert!(
            matches!(may_upload(&user, Some(&contract), 2), Err(ApiError::ResourceExhausted(m)) if m.contains("2 of 2"))
        );
        contract.status = ContractStatus::Suspended as i32;
        assert!(matches!(
            may_upload(&user, Some(&contract), 0),
            Err(ApiError::FailedPrecondition(_))
        ));
        assert!(matches!(
            may_upload(&user, None, 0),
            Err(ApiError::FailedPrecondition(_))
        ));
    }
}
