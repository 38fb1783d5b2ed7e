//! Demo data for `lightbox dev`: a few users, their contracts and photos, with fixed
//! ids so that the README's commands work as written. Loaded through the
//! services themselves (validation, changelog) on first start only.

use anyhow::Context;
use lightbox_api::{
    contracts::{Contract, ContractOption, ContractStatus, Plan},
    photos::{CreatePhotoRequest, Photo, photos_service_server::PhotosService as _},
    users::{User, UserStatus},
};

/// The demo users' ids, in the order of [`users`].
pub const USER_IDS: [&str; 3] = [
    "00000000-0000-7000-8000-000000000001",
    "00000000-0000-7000-8000-000000000002",
    "00000000-0000-7000-8000-000000000003",
];

/// The demo contracts' ids, in the order of [`contracts`].
pub const CONTRACT_IDS: [&str; 3] = [
    "00000000-0000-7000-8000-0000000000c1",
    "00000000-0000-7000-8000-0000000000c2",
    "00000000-0000-7000-8000-0000000000c3",
];

/// The demo contracts: premium, standard, and a free one that is suspended.
pub fn contracts() -> Vec<Contract> {
    let option = |code: &str, value: &str| ContractOption {
        code: code.into(),
        value: value.into(),
        enabled: true,
    };
    let plans = [
        (Plan::Premium, "1000", ContractStatus::Active),
        (Plan::Standard, "100", ContractStatus::Active),
        (Plan::Free, "10", ContractStatus::Suspended),
    ];
    plans
        .into_iter()
        .enumerate()
        .map(|(i, (plan, quota, status))| Contract {
            id: CONTRACT_IDS[i].into(),
            holder_user_id: USER_IDS[i].into(),
            plan: plan as i32,
            options: vec![
                option("photo_quota", quota),
                option("hd_upload", if i == 0 { "true" } else { "false" }),
            ],
            status: status as i32,
            ..Contract::default()
        })
        .collect()
}

/// The demo users, each holding the contract of the same rank.
pub fn users() -> Vec<User> {
    [
        ("Ada Lovelace", "ada@example.com"),
        ("Grace Hopper", "grace@example.com"),
        ("Alan Turing", "alan@example.com"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, email))| User {
        id: USER_IDS[i].into(),
        display_name: name.into(),
        email: email.into(),
        status: UserStatus::Active as i32,
        contract_id: CONTRACT_IDS[i].into(),
        ..User::default()
    })
    .collect()
}

/// Loads a few photos of the first demo user, through the service (quota
/// and all; the owner comes through the synchronous path, as the copies are
/// still filling at first start).
pub async fn load_photos(service: &lightbox_photos::PhotosService) -> anyhow::Result<()> {
    for (title, size) in [("Analytical Engine", 2_400_000), ("Notes on Menabrea", 1_100_000)] {
        let photo = Photo {
            user_id: USER_IDS[0].into(),
            title: title.into(),
            content_type: "image/jpeg".into(),
            size_bytes: size,
            ..Photo::default()
        };
        service
            .create_photo(tonic::Request::new(CreatePhotoRequest { photo: Some(photo) }))
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .context("cannot load the demo photos")?;
    }
    Ok(())
}
