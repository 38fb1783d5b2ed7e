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

/// A photo to create, checked and completed (id, time).
pub(crate) fn new_photo(photo: Option<Photo>) -> Result<Photo, ApiError> {
    let photo = photo.ok_or_else(|| ApiError::InvalidArgument("photo is required".into()))?;
    let user_id = request::parse_id("photo.user_id", &photo.user_id)?.to_string();
    let title = request::text("photo.title", &photo.title, false, 200)?;
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
    Ok(Photo {
        id: request::new_id(),
        user_id,
        title,
        content_type,
        size_bytes: photo.size_bytes,
        taken_time: photo.taken_time,
        create_time: Some(request::now()),
        revision: 0,
    })
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
        assert!(new_photo(photo("image/jpeg", 10)).is_ok());
        assert!(
            matches!(new_photo(photo("text/plain", 10)), Err(ApiError::InvalidArgument(m)) if m.contains("content_type"))
        );
        assert!(
            matches!(new_photo(photo("image/png", 0)), Err(ApiError::InvalidArgument(m)) if m.contains("size_bytes"))
        );
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
