//! A customer of Photos, made over gRPC: `lightbox bench`'s. Included by the
//! benches that upload or list photos (`#[path = "support/customer.rs"]`),
//! next to `harness.rs`.

use lightbox_api::{contracts::Contract, users::User};

use crate::harness::{Dev, Res};

/// A user (`display_name`, `email`), a contract with a photo quota of
/// `quota`, the link, created over gRPC on `server`: (the linked user,
/// the contract).
pub async fn create_customer(server: &Dev, display_name: &str, email: &str, quota: usize) -> Res<(User, Contract)> {
    lightbox_bench::photos::create_customer(server.server(), display_name, email, quota).await
}
