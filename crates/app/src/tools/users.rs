//! `lightbox users`: the seed's Back Office App, over the users service.

use clap::{Args, Subcommand};
use lightbox_api::{
    contracts::{Contract, CreateContractRequest, contracts_service_client::ContractsServiceClient},
    users::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, ListUsersResponse, UpdateUserRequest,
        User, UserStatus, users_service_client::UsersServiceClient,
    },
};

use super::{
    Common, Failure, Kind, Service, StatusArg, all_pages,
    contracts::{CONTRACT_HEADER, PlanArg, contract_row, parse_options, plan},
    failure::Endpoint,
    mask,
    output::{Json, Proto, emit, enum_word, freshness_line, print_deleted, print_table},
    parse_addr,
};

/// `lightbox users`.
#[derive(Debug, Args)]
pub struct UsersArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: UsersCommand,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Creates a user; with --plan, also their contract, and links it to
    /// them (the back office's whole sign-up, three calls).
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// E-mail address (unique).
        #[arg(long)]
        email: String,
        /// Also create the user's contract on this plan, and link it.
        #[arg(long, value_enum)]
        plan: Option<PlanArg>,
        /// With --plan: a contract option, `code=value` (add `:off` to
        /// disable it); repeatable.
        #[arg(long = "option", requires = "plan")]
        options: Vec<String>,
        /// With --plan: the contracts service's address, `HOST:PORT` or a
        /// URL (default: its local default port).
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr, requires = "plan")]
        contracts_addr: Option<String>,
    },
    /// Shows a user (and their contract with --include-contract).
    Get {
        /// The user's id.
        id: String,
        /// Also show the contract, with where it came from.
        #[arg(long)]
        include_contract: bool,
    },
    /// Lists users, every page.
    List,
    /// Updates the fields given (only if still at --expected-revision).
    Update {
        /// The user's id.
        id: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New e-mail address.
        #[arg(long)]
        email: Option<String>,
        /// New status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// New contract id ("" to clear).
        #[arg(long)]
        contract_id: Option<String>,
        /// Refuse (exit 5) unless the user is at this revision.
        #[arg(long, default_value_t = 0)]
        expected_revision: i64,
    },
    /// Deletes a user.
    Delete {
        /// The user's id.
        id: String,
        /// Refuse (exit 5) unless the user is at this revision.
        #[arg(long, default_value_t = 0)]
        expected_revision: i64,
    },
}

/// The columns of a users table.
pub(crate) const USER_HEADER: &[&str] = &["ID", "NAME", "EMAIL", "STATUS", "CONTRACT", "REVISION"];

/// A user as a table row.
pub(crate) fn user_row(user: &User) -> Vec<String> {
    let status = enum_word(
        UserStatus::try_from(user.status).ok().map(|s| s.as_str_name()),
        "USER_STATUS_",
    );
    vec![
        user.id.clone(),
        user.display_name.clone(),
        user.email.clone(),
        status,
        user.contract_id.clone(),
        user.revision.to_string(),
    ]
}

fn user_status(status: StatusArg) -> Result<i32, Failure> {
    match status {
        StatusArg::Active => Ok(UserStatus::Active as i32),
        StatusArg::Suspended => Ok(UserStatus::Suspended as i32),
        StatusArg::Terminated => Err(Failure::new(
            Kind::Invalid,
            "--status terminated: users are active or suspended, not terminated; nothing was sent",
        )),
    }
}

/// Prints one user: the response as JSON, or a one-row table.
fn show<M: Proto>(json: Option<&Json>, response: &M, user: Option<&User>) -> anyhow::Result<()> {
    match json {
        Some(json) => json.print(response),
        None => Ok(print_table(
            USER_HEADER,
            &[user_row(&user.cloned().unwrap_or_default())],
        )?),
    }
}

/// Runs `lightbox users …`.
pub async fn run(args: UsersArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(Service::Users, args.common.addr.as_deref(), "users")?;
    let mut client = UsersServiceClient::new(endpoint.channel());
    let json = Json::if_asked(args.common.json)?;
    let json = json.as_ref();
    let failed = |status| endpoint.failed(status);
    match args.command {
        UsersCommand::Create {
            name,
            email,
            plan: chosen,
            options,
            contracts_addr,
        } => {
            let user = User {
                display_name: name,
                email,
                ..User::default()
            };
            // Checked before anything is written: a bad option creates nothing.
            let options = parse_options(&options)?;
            let created = client
                .create_user(CreateUserRequest { user: Some(user) })
                .await
                .map_err(failed)?
                .into_inner();
            let Some(chosen) = chosen else {
                return show(json, &created, created.user.as_ref());
            };
            let user = created.user.clone().unwrap_or_default();
            let contracts = Endpoint::new(Service::Contracts, contracts_addr.as_deref(), "users")?;
            let contract = Contract {
                holder_user_id: user.id.clone(),
                plan: plan(chosen),
                options,
                ..Contract::default()
            };
            let made = ContractsServiceClient::new(contracts.channel())
                .create_contract(CreateContractRequest {
                    contract: Some(contract),
                })
                .await
                .map_err(|status| {
                    let what = contracts.describe(&status, true);
                    anyhow::Error::new(Failure::new(
                        Kind::of(status.code()),
                        format!("user {} was created, but not their contract: {what}", user.id),
                    ))
                })?
                .into_inner();
            let contract = made.contract.clone().unwrap_or_default();
            let request = UpdateUserRequest {
                user: Some(User {
                    id: user.id.clone(),
                    contract_id: contract.id.clone(),
                    ..User::default()
                }),
                update_mask: Some(pbjson_types::FieldMask {
                    paths: vec!["contract_id".into()],
                }),
                expected_revision: user.revision,
            };
            let linked = client
                .update_user(request)
                .await
                .map_err(|status| {
                    let what = endpoint.describe(&status, true);
                    anyhow::Error::new(Failure::new(
                        Kind::of(status.code()),
                        format!(
                            "user {} and contract {} were created, but not linked: {what}; link them with \
                             `lightbox users update {} --contract-id {}`",
                            user.id, contract.id, user.id, contract.id
                        ),
                    ))
                })?
                .into_inner();
            match json {
                // One line per call, in order: what each answered.
                Some(json) => {
                    json.print(&created)?;
                    json.print(&made)?;
                    json.print(&linked)
                }
                None => {
                    print_table(USER_HEADER, &[user_row(&linked.user.unwrap_or_default())])?;
                    emit("")?;
                    Ok(print_table(CONTRACT_HEADER, &[contract_row(&contract)])?)
                }
            }
        }
        UsersCommand::Get { id, include_contract } => {
            let request = GetUserRequest {
                id,
                include_contract,
                contract_read: 0,
            };
            let answer = client.get_user(request).await.map_err(failed)?.into_inner();
            if let Some(json) = json {
                return json.print(&answer);
            }
            print_table(USER_HEADER, &[user_row(&answer.user.unwrap_or_default())])?;
            if let Some(contract) = &answer.contract {
                emit("")?;
                print_table(CONTRACT_HEADER, &[contract_row(contract)])?;
                emit(&freshness_line("contract", answer.contract_freshness.as_ref()))?;
            }
            Ok(())
        }
        UsersCommand::List => {
            let users = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let request = ListUsersRequest {
                        page_size: 1000,
                        page_token,
                    };
                    let page = client.list_users(request).await?.into_inner();
                    Ok((page.users, page.next_page_token))
                }
            })
            .await
            .map_err(failed)?;
            if let Some(json) = json {
                // Every page as one answer: the last page's, with them all.
                return json.print(&ListUsersResponse {
                    users,
                    next_page_token: String::new(),
                });
            }
            Ok(print_table(
                USER_HEADER,
                &users.iter().map(user_row).collect::<Vec<_>>(),
            )?)
        }
        UsersCommand::Update {
            id,
            name,
            email,
            status,
            contract_id,
            expected_revision,
        } => {
            let mut paths = Vec::new();
            let mut user = User { id, ..User::default() };
            if let Some(name) = name {
                user.display_name = name;
                paths.push("display_name");
            }
            if let Some(email) = email {
                user.email = email;
                paths.push("email");
            }
            if let Some(status) = status {
                user.status = user_status(status)?;
                paths.push("status");
            }
            if let Some(contract_id) = contract_id {
                user.contract_id = contract_id;
                paths.push("contract_id");
            }
            let request = UpdateUserRequest {
                user: Some(user),
                update_mask: mask(paths, "--name, --email, --status or --contract-id", "users update")?,
                expected_revision,
            };
            let updated = client.update_user(request).await.map_err(failed)?.into_inner();
            show(json, &updated, updated.user.as_ref())
        }
        UsersCommand::Delete { id, expected_revision } => {
            let deleted = client
                .delete_user(DeleteUserRequest {
                    id: id.clone(),
                    expected_revision,
                })
                .await
                .map_err(failed)?
                .into_inner();
            print_deleted(json, "user", &id, &deleted, deleted.revision)
        }
    }
}
