//! What a user must look like: the checks on creation and update, with the
//! messages clients see.

use lightbox_api::{
    ApiError, request,
    users::{User, UserStatus},
};

/// The fields `UpdateUser` may change.
pub(crate) const UPDATABLE: &[&str] = &["display_name", "email", "status", "contract_id"];

/// A user to create, checked and completed (id, status, times).
pub(crate) fn new_user(user: Option<User>, keep_id: bool) -> Result<User, ApiError> {
    let user = user.ok_or_else(|| ApiError::InvalidArgument("user is required".into()))?;
    let now = request::now();
    let mut user = User {
        id: if keep_id { user.id.clone() } else { request::new_id() },
        revision: 0,
        create_time: Some(now),
        update_time: Some(now),
        ..user
    };
    if user.status == UserStatus::Unspecified as i32 {
        user.status = UserStatus::Active as i32;
    }
    check(&mut user)?;
    Ok(user)
}

/// `current` with the fields of `changes` named in `paths` (all if empty).
pub(crate) fn apply_update(mut current: User, changes: User, paths: &[&str]) -> Result<User, ApiError> {
    if request::touches(paths, "display_name") {
        current.display_name = changes.display_name;
    }
    if request::touches(paths, "email") {
        current.email = changes.email;
    }
    if request::touches(paths, "status") {
        current.status = changes.status;
    }
    if request::touches(paths, "contract_id") {
        current.contract_id = changes.contract_id;
    }
    check(&mut current)?;
    Ok(current)
}

/// Checks and normalises the client-set fields.
fn check(user: &mut User) -> Result<(), ApiError> {
    user.display_name = request::text("user.display_name", &user.display_name, true, 200)?;
    user.email = email(&user.email)?;
    match UserStatus::try_from(user.status) {
        Ok(UserStatus::Active | UserStatus::Suspended) => {}
        _ => {
            return Err(ApiError::InvalidArgument(format!(
                "user.status {} is not a valid status (USER_STATUS_ACTIVE or USER_STATUS_SUSPENDED)",
                user.status
            )));
        }
    }
    if let Some(id) = request::parse_optional_id("user.contract_id", &user.contract_id)? {
        user.contract_id = id.to_string();
    }
    Ok(())
}

/// A plausible e-mail address: one `@` with something on each side, no
/// spaces, at most 254 characters. Deliverability is not ours to judge.
fn email(value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::InvalidArgument("user.email is required".into()));
    }
    let valid = value.len() <= 254
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(value.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if !valid {
        return Err(ApiError::InvalidArgument(format!(
            "user.email {value:?} is not a valid e-mail address"
        )));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, email: &str) -> Option<User> {
        Some(User {
            display_name: name.into(),
            email: email.into(),
            ..User::default()
        })
    }

    #[test]
    fn a_new_user_gets_an_id_times_and_the_active_status() {
        let created = new_user(user(" Ada ", "ada@example.com"), false).ok();
        let created = created.as_ref();
        assert_eq!(created.map(|u| u.display_name.as_str()), Some("Ada"));
        assert_eq!(created.map(|u| u.status), Some(UserStatus::Active as i32));
        assert!(created.is_some_and(|u| !u.id.is_empty() && u.create_time.is_some()));
    }

    #[test]
    fn bad_fields_are_named_in_the_error() {
        for (name, email, field) in [
            ("", "a@b.c", "display_name"),
            ("Ada", "nope", "email"),
            ("Ada", "a @b.c", "email"),
        ] {
            let err = new_user(user(name, email), false)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(field), "{err}");
        }
        let mut bad_status = user("Ada", "a@b.c");
        if let Some(u) = bad_status.as_mut() {
            u.status = 42;
        }
        assert!(matches!(new_user(bad_status, false), Err(ApiError::InvalidArgument(m)) if m.contains("status")));
    }
}
