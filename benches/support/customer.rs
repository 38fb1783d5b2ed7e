//! A customer of Photos, made over gRPC. Included by the benches that
//! upload or list photos (`#[path = "support/customer.rs"]`), next to
//! `harness.rs`.

use lightbox_api::{
    contracts::{Contract, CreateContractRequest, Plan, contracts_service_client::ContractsServiceClient},
    users::{CreateUserRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient},
};
use lightbox_testkit::photo_quota;

use crate::harness::{Dev, Res, connect, status_text};

/// A user (`display_name`, `email`), a contract with a photo quota of
/// `quota`, the link, created over gRPC on `server`: (the linked user,
/// the contract).
pub async fn create_customer(server: &Dev, display_name: &str, email: &str, quota: usize) -> Res<(User, Contract)> {
    let mut users = UsersServiceClient::new(connect(&server.url("users")).await?);
    let mut contracts = ContractsServiceClient::new(connect(&server.url("contracts")).await?);
    let user = users
        .create_user(CreateUserRequest {
            user: Some(User {
                display_name: display_name.into(),
                email: email.into(),
                ..User::default()
            }),
        })
        .await
        .map_err(|s| format!("CreateUser: {}", status_text(&s)))?
        .into_inner()
        .user
        .ok_or("CreateUser answered no user")?;
    let contract = contracts
        .create_contract(CreateContractRequest {
            contract: Some(Contract {
                holder_user_id: user.id.clone(),
                plan: Plan::Standard as i32,
                options: vec![photo_quota(&quota.to_string())],
                ..Contract::default()
            }),
        })
        .await
        .map_err(|s| format!("CreateContract: {}", status_text(&s)))?
        .into_inner()
        .contract
        .ok_or("CreateContract answered no contract")?;
    let user = users
        .update_user(UpdateUserRequest {
            user: Some(User {
                contract_id: contract.id.clone(),
                ..user
            }),
            update_mask: None,
            expected_revision: 0,
        })
        .await
        .map_err(|s| format!("UpdateUser (the contract link): {}", status_text(&s)))?
        .into_inner()
        .user
        .ok_or("UpdateUser answered no user")?;
    Ok((user, contract))
}
