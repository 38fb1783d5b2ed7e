//! Checks every service applies to its requests, with the messages clients
//! see: ids, page sizes, opaque page tokens, revisions, update masks, times.

use uuid::Uuid;

use crate::ApiError;

/// Parses an entity id (a UUID). `field` names the request field in the message.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is required")));
    }
    Uuid::parse_str(value)
        .map_err(|_| ApiError::InvalidArgument(format!("{field} {value:?} is not a valid id (expected a UUID)")))
}

/// Parses an optional id: empty is allowed.
pub fn parse_optional_id(field: &str, value: &str) -> Result<Option<Uuid>, ApiError> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

/// A new entity id: UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    Uuid::now_v7().to_string()
}

/// The page size to use: `default` for 0, an error for negative values,
/// capped at `max`.
pub fn page_size(value: i32, default: i64, max: i64) -> Result<i64, ApiError> {
    match value {
        0 => Ok(default),
        n if n < 0 => Err(ApiError::InvalidArgument(format!(
            "page_size must not be negative (got {n})"
        ))),
        n => Ok(i64::from(n).min(max)),
    }
}

const TOKEN_PREFIX: &str = "lb2.";

/// The most bytes a page token may carry (its listing and its position).
const TOKEN_MAX_BYTES: usize = 512;

/// Encodes the position after which the next page of `listing` starts as an
/// opaque token. `listing` names the RPC and its filter (`"ListPhotos
/// user_id=…"`): a token is good for that listing only, so one passed to
/// another RPC, or with another filter, is refused instead of answering a
/// page of something else.
pub fn encode_page_token(listing: &str, after: &str) -> String {
    let raw = format!("{listing}\n{after}");
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + raw.len() * 2);
    token.push_str(TOKEN_PREFIX);
    for byte in raw.as_bytes() {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

/// Decodes a token made by [`encode_page_token`] for `listing`; empty means
/// the first page.
pub fn decode_page_token(listing: &str, token: &str) -> Result<String, ApiError> {
    if token.is_empty() {
        return Ok(String::new());
    }
    let invalid = || {
        ApiError::InvalidArgument(
            "page_token is not a token this service issued; pass the next_page_token of the previous page, \
             or none for the first page"
                .into(),
        )
    };
    let hex = token.strip_prefix(TOKEN_PREFIX).ok_or_else(invalid)?;
    if hex.len() % 2 != 0 || hex.len() > TOKEN_MAX_BYTES * 2 {
        return Err(invalid());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid())?;
    let raw = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (issued_for, after) = raw.split_once('\n').ok_or_else(invalid)?;
    if issued_for != listing {
        return Err(ApiError::InvalidArgument(format!(
            "page_token was issued for another listing ({issued_for}), not this one ({listing}); \
             keep the same request fields from page to page, or start again without a token"
        )));
    }
    Ok(after.to_owned())
}

/// Cuts a page read with one item more than `size` (to learn whether more
/// follow) to `size`, and makes the token of the next page of `listing`
/// from the last item's `key`.
pub fn finish_page<T>(mut items: Vec<T>, size: i64, listing: &str, key: impl Fn(&T) -> &str) -> (Vec<T>, String) {
    if items.len() as i64 <= size {
        return (items, String::new());
    }
    items.truncate(size as usize);
    let token = items
        .last()
        .map(|item| encode_page_token(listing, key(item)))
        .unwrap_or_default();
    (items, token)
}

/// Checks a change listing's `since_revision`: 0 (the current state) or a
/// revision to list after; negative values are refused.
pub fn since_revision(value: i64) -> Result<i64, ApiError> {
    if value < 0 {
        return Err(ApiError::InvalidArgument(format!(
            "since_revision must not be negative (got {value})"
        )));
    }
    Ok(value)
}

/// A watch's `since_revision` that means "from now": no snapshot, no
/// replay, the changes committed from the current revision on.
pub const WATCH_FROM_NOW: i64 = -1;

/// Checks a watch's `since_revision`: [`WATCH_FROM_NOW`] (-1), 0 (a
/// snapshot first) or a revision to resume after; other negative values are
/// refused.
pub fn watch_since_revision(value: i64) -> Result<i64, ApiError> {
    if value < WATCH_FROM_NOW {
        return Err(ApiError::InvalidArgument(format!(
            "since_revision must be -1 (from now), 0 (a snapshot first) or a revision to resume after (got {value})"
        )));
    }
    Ok(value)
}

/// Checks an `expected_revision` against the entity's current revision
/// (0: no expectation).
pub fn check_expected_revision(what: &str, expected: i64, current: i64) -> Result<(), ApiError> {
    if expected < 0 {
        return Err(ApiError::InvalidArgument(format!(
            "expected_revision must not be negative (got {expected})"
        )));
    }
    if expected != 0 && expected != current {
        return Err(ApiError::Aborted(format!(
            "{what} is at revision {current}, not the expected revision {expected}; read it again and retry"
        )));
    }
    Ok(())
}

/// Which of `allowed` fields an update mask names (all of them if the mask
/// is empty); an unknown path is an error.
pub fn update_paths<'a>(
    mask: Option<&'a pbjson_types::FieldMask>,
    allowed: &[&'static str],
) -> Result<Vec<&'a str>, ApiError> {
    let Some(mask) = mask.filter(|mask| !mask.paths.is_empty()) else {
        return Ok(Vec::new());
    };
    for path in &mask.paths {
        if !allowed.contains(&path.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "update_mask names {path:?}, which cannot be updated (allowed: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(mask.paths.iter().map(String::as_str).collect())
}

/// Whether an update touches `field`: an empty mask touches every field.
pub fn touches(paths: &[&str], field: &str) -> bool {
    paths.is_empty() || paths.contains(&field)
}

/// Checks a free-text field: trimmed, non-empty if `required`, at most `max`
/// characters, no control characters.
pub fn text(field: &str, value: &str, required: bool, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is required")));
    }
    if value.chars().count() > max {
        return Err(ApiError::InvalidArgument(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(value.to_owned())
}

/// The current time as a protobuf timestamp.
pub fn now() -> pbjson_types::Timestamp {
    timestamp_of(std::time::SystemTime::now())
}

/// A time as a protobuf timestamp (times before 1970 are not expected here
/// and clamp to the epoch).
pub fn timestamp_of(time: std::time::SystemTime) -> pbjson_types::Timestamp {
    let since_epoch = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

/// Checks a timestamp a client sent: nanos in range, between years 1 and 9999.
pub fn timestamp(field: &str, value: &pbjson_types::Timestamp) -> Result<(), ApiError> {
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(0..1_000_000_000).contains(&value.nanos) || !(MIN..=MAX).contains(&value.seconds) {
        return Err(ApiError::InvalidArgument(format!("{field} is not a valid timestamp")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_forgeries_and_other_listings() {
        let listing = "ListPhotos user_id=a";
        let token = encode_page_token(listing, "0190f1d2-aaaa");
        assert_eq!(
            decode_page_token(listing, &token).ok().as_deref(),
            Some("0190f1d2-aaaa")
        );
        assert_eq!(decode_page_token(listing, "").ok().as_deref(), Some(""));
        for bad in ["garbage", "lb2.zz", "lb2.abc", "lb2.ff", "lb1.61", "lb2.61"] {
            assert!(
                matches!(decode_page_token(listing, bad), Err(ApiError::InvalidArgument(_))),
                "{bad}"
            );
        }
        for other in ["ListPhotos user_id=b", "ListUsers"] {
            assert!(
                matches!(decode_page_token(other, &token), Err(ApiError::InvalidArgument(m)) if m.contains("another listing")),
                "{other}"
            );
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0, 50, 1000).ok(), Some(50));
        assert_eq!(page_size(5000, 50, 1000).ok(), Some(1000));
        assert!(matches!(page_size(-1, 50, 1000), Err(ApiError::InvalidArgument(m)) if m.contains("negative")));
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(matches!(parse_id("id", ""), Err(ApiError::InvalidArgument(m)) if m == "id is required"));
        assert!(matches!(parse_id("id", "nope"), Err(ApiError::InvalidArgument(m)) if m.contains("not a valid id")));
        assert!(parse_id("id", &new_id()).is_ok());
    }

    #[test]
    fn watches_may_start_from_now_and_listings_may_not() {
        assert_eq!(watch_since_revision(WATCH_FROM_NOW).ok(), Some(-1));
        assert_eq!(watch_since_revision(0).ok(), Some(0));
        assert_eq!(watch_since_revision(7).ok(), Some(7));
        assert!(
            matches!(watch_since_revision(-2), Err(ApiError::InvalidArgument(m)) if m.contains("-1 (from now)") && m.contains("-2"))
        );
        assert!(matches!(since_revision(-1), Err(ApiError::InvalidArgument(m)) if m.contains("negative")));
    }

    #[test]
    fn stale_expected_revision_is_aborted() {
        assert!(check_expected_revision("user x", 0, 7).is_ok());
        assert!(check_expected_revision("user x", 7, 7).is_ok());
        assert!(matches!(
            check_expected_revision("user x", 6, 7),
            Err(ApiError::Aborted(_))
        ));
    }
}
