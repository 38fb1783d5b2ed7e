//! `lightbox users`: the seed's Back Office App, over the users service.

use clap::{Args, Subcommand};
use lightbox_api::users::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, ListUsersResponse, UpdateUserRequest, User,
    UserStatus, users_service_client::UsersServiceClient,
};

use super::{
    Common, Failure, Kind, Service, StatusArg, all_pages,
    contracts::{CONTRACT_HEADER, contract_row},
    failure::Endpoint,
    mask,
    output::{Json, Proto, emit, enum_word, freshness_line, print_table},
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
    /// Creates a user.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// E-mail address (unique).
        #[arg(long)]
        email: String,
        /// The user's contract id.
        #[arg(long)]
        contract_id: Option<String>,
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
            contract_id,
        } => {
            let user = User {
                display_name: name,
                email,
                contract_id: contract_id.unwrap_or_default(),
                ..User::default()
            };
            let created = client
                .create_user(CreateUserRequest { user: Some(user) })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &created, created.user.as_ref())
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
            match json {
                Some(json) => json.print(&deleted),
                None => Ok(emit(&format!("deleted user {id} at revision {}", deleted.revision)).map(drop)?),
            }
        }
    }
}
