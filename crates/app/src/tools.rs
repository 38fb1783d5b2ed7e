//! The command-line tools: the seed's Back Office App (`lightbox users`),
//! Support App (`lightbox contracts`), `lightbox photos`, and the streaming
//! watcher (`lightbox watch`).
//!
//! Output is a readable table by default and the proto3 JSON mapping with
//! `--json` (NDJSON for `watch`). Errors are one line on stderr, and the exit
//! code says what kind of failure it was, for scripts: see [`Failure`].

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use lightbox_api::{
    contracts::{
        Contract, ContractOption, ContractStatus, CreateContractRequest, DeleteContractRequest, GetContractRequest,
        ListContractsRequest, Plan, UpdateContractRequest, WatchContractsRequest,
        contracts_service_client::ContractsServiceClient,
    },
    feed::Freshness,
    photos::{
        Consistency, CreatePhotoRequest, DeletePhotoRequest, GetPhotoRequest, ListPhotosRequest, Photo,
        WatchPhotosRequest, photos_service_client::PhotosServiceClient,
    },
    users::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, UserStatus,
        WatchUsersRequest, users_service_client::UsersServiceClient,
    },
};
use lightbox_changefeed::{Frame, feed::Entity, watch::WatchStream};
use tonic::{Code, Status, transport::Channel};

/// A failed command: its one-line message and the exit code scripts see.
///
/// | exit code | meaning |
/// |---:|---|
/// | 0 | done |
/// | 1 | any other failure (cannot connect, internal error) |
/// | 2 | bad usage (unknown flag, missing argument) |
/// | 3 | not found |
/// | 4 | invalid argument |
/// | 5 | conflict: already exists, stale expected revision, failed precondition |
/// | 6 | refused: permission denied, quota reached |
/// | 7 | unavailable or too slow: try again later |
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit_code: u8,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        let exit_code = match status.code() {
            Code::NotFound => 3,
            Code::InvalidArgument | Code::OutOfRange => 4,
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => 5,
            Code::PermissionDenied | Code::ResourceExhausted | Code::Unauthenticated => 6,
            Code::Unavailable | Code::DeadlineExceeded => 7,
            _ => 1,
        };
        Failure {
            exit_code,
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

/// Where to reach a service, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The service's address (default: its local default port).
    #[arg(long, global = true)]
    pub addr: Option<String>,
    /// Print the proto3 JSON mapping instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

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

/// A lifecycle state on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    /// Active.
    Active,
    /// Suspended.
    Suspended,
    /// Terminated (contracts only).
    Terminated,
}

/// `lightbox contracts`.
#[derive(Debug, Args)]
pub struct ContractsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: ContractsCommand,
}

#[derive(Debug, Subcommand)]
enum ContractsCommand {
    /// Creates a contract.
    Create {
        /// The holder's user id.
        #[arg(long)]
        holder: String,
        /// The plan.
        #[arg(long, value_enum)]
        plan: PlanArg,
        /// An option, `code=value` (add `:off` to disable it); repeatable.
        #[arg(long = "option")]
        options: Vec<String>,
    },
    /// Shows a contract.
    Get {
        /// The contract's id.
        id: String,
    },
    /// Lists contracts, every page (only a holder's with --holder).
    List {
        /// Only this user's contracts.
        #[arg(long)]
        holder: Option<String>,
    },
    /// Updates the fields given (only if still at --expected-revision).
    Update {
        /// The contract's id.
        id: String,
        /// New plan.
        #[arg(long, value_enum)]
        plan: Option<PlanArg>,
        /// New status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Replaces every option: `code=value` (`:off` to disable); repeatable.
        #[arg(long = "option")]
        options: Vec<String>,
        /// Refuse (exit 5) unless the contract is at this revision.
        #[arg(long, default_value_t = 0)]
        expected_revision: i64,
    },
    /// Deletes a contract.
    Delete {
        /// The contract's id.
        id: String,
        /// Refuse (exit 5) unless the contract is at this revision.
        #[arg(long, default_value_t = 0)]
        expected_revision: i64,
    },
}

/// A plan on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlanArg {
    /// Free.
    Free,
    /// Standard.
    Standard,
    /// Premium.
    Premium,
}

/// `lightbox photos`.
#[derive(Debug, Args)]
pub struct PhotosArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: PhotosCommand,
}

#[derive(Debug, Subcommand)]
enum PhotosCommand {
    /// Records a photo of a user (within their contract's quota).
    Create {
        /// The owner's user id.
        #[arg(long)]
        user: String,
        /// Title.
        #[arg(long, default_value = "")]
        title: String,
        /// Media type.
        #[arg(long, default_value = "image/jpeg")]
        content_type: String,
        /// Size in bytes.
        #[arg(long)]
        size: i64,
    },
    /// Shows a photo.
    Get {
        /// The photo's id.
        id: String,
    },
    /// Lists a user's photos with the user, their contract and freshness.
    List {
        /// The owner's user id.
        #[arg(long)]
        user: String,
        /// Read through the synchronous chain instead of the local copies.
        #[arg(long)]
        fresh: bool,
    },
    /// Deletes a photo.
    Delete {
        /// The photo's id.
        id: String,
    },
}

/// `lightbox watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// What to watch.
    #[arg(value_enum)]
    pub feed: FeedArg,
    /// Start after this revision (0: a snapshot of the current state first).
    #[arg(long, default_value_t = 0)]
    pub since: i64,
    /// Only these ids; repeatable.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// The service's address (default: its local default port).
    #[arg(long)]
    pub addr: Option<String>,
    /// One JSON object per line (the proto3 JSON of each frame).
    #[arg(long)]
    pub json: bool,
}

/// A watchable feed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FeedArg {
    /// Users (port 50051).
    Users,
    /// Contracts (port 50052).
    Contracts,
    /// Photos (port 50053).
    Photos,
}

fn channel(addr: Option<&str>, default_port: u16) -> anyhow::Result<Channel> {
    let url = match addr {
        Some(addr) if addr.contains("://") => addr.to_owned(),
        Some(addr) => format!("http://{addr}"),
        None => format!("http://127.0.0.1:{default_port}"),
    };
    Ok(Channel::from_shared(url.clone())
        .with_context(|| format!("invalid address {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Turns a call's status into a [`Failure`] with its exit code.
fn failed(status: Status) -> anyhow::Error {
    anyhow::Error::new(Failure::from(status))
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Every page of a listing: `fetch` gets the page after a token and answers
/// its items and the next token (empty on the last page).
async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
{
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let (items, next) = fetch(token).await.map_err(failed)?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Reports a deletion: JSON, or a sentence.
fn print_deleted(json: bool, kind: &str, id: &str, revision: i64) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ "id": id, "revision": revision.to_string() }));
    }
    println!("deleted {kind} {id} at revision {revision}");
    Ok(())
}

/// Prints one entity: its proto3 JSON, or a one-row table.
fn show<T: serde::Serialize>(json: bool, value: &T, header: &[&str], row: fn(&T) -> Vec<String>) -> anyhow::Result<()> {
    if json {
        return print_json(value);
    }
    print_table(header, &[row(value)]);
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn user_row(user: &User) -> Vec<String> {
    let status = UserStatus::try_from(user.status).map_or("?".into(), |s| {
        s.as_str_name().trim_start_matches("USER_STATUS_").to_lowercase()
    });
    vec![
        user.id.clone(),
        user.display_name.clone(),
        user.email.clone(),
        status,
        user.contract_id.clone(),
        user.revision.to_string(),
    ]
}

const USER_HEADER: &[&str] = &["ID", "NAME", "EMAIL", "STATUS", "CONTRACT", "REVISION"];

fn contract_row(contract: &Contract) -> Vec<String> {
    let plan = Plan::try_from(contract.plan).map_or("?".into(), |p| {
        p.as_str_name().trim_start_matches("PLAN_").to_lowercase()
    });
    let status = ContractStatus::try_from(contract.status).map_or("?".into(), |s| {
        s.as_str_name().trim_start_matches("CONTRACT_STATUS_").to_lowercase()
    });
    let options: Vec<String> = contract
        .options
        .iter()
        .map(|o| format!("{}={}{}", o.code, o.value, if o.enabled { "" } else { ":off" }))
        .collect();
    vec![
        contract.id.clone(),
        contract.holder_user_id.clone(),
        plan,
        status,
        options.join(","),
        contract.revision.to_string(),
    ]
}

const CONTRACT_HEADER: &[&str] = &["ID", "HOLDER", "PLAN", "STATUS", "OPTIONS", "REVISION"];

fn photo_row(photo: &Photo) -> Vec<String> {
    vec![
        photo.id.clone(),
        photo.user_id.clone(),
        photo.title.clone(),
        photo.content_type.clone(),
        photo.size_bytes.to_string(),
        photo.revision.to_string(),
    ]
}

const PHOTO_HEADER: &[&str] = &["ID", "USER", "TITLE", "TYPE", "BYTES", "REVISION"];

fn freshness_line(part: &str, freshness: Option<&Freshness>) -> String {
    let Some(f) = freshness else {
        return format!("{part}: -");
    };
    let source = lightbox_api::feed::Source::try_from(f.source).map_or("?".into(), |s| {
        s.as_str_name().trim_start_matches("SOURCE_").to_lowercase()
    });
    let age = f.age.map_or(0.0, |a| a.seconds as f64 + f64::from(a.nanos) / 1e9);
    let stream = match &f.stream_state {
        Some(s) if s.connected => ", stream connected".to_owned(),
        Some(_) => ", stream DISCONNECTED".to_owned(),
        None => String::new(),
    };
    format!(
        "{part}: from {source} at revision {}, {age:.1}s old{stream}",
        f.revision
    )
}

fn parse_options(options: &[String]) -> anyhow::Result<Vec<ContractOption>> {
    options
        .iter()
        .map(|spec| {
            let (spec, enabled) = match spec.strip_suffix(":off") {
                Some(spec) => (spec, false),
                None => (spec.as_str(), true),
            };
            let (code, value) = spec.split_once('=').ok_or_else(|| Failure {
                exit_code: 4,
                message: format!("option {spec:?} is not code=value"),
            })?;
            Ok(ContractOption {
                code: code.trim().to_owned(),
                value: value.trim().to_owned(),
                enabled,
            })
        })
        .collect()
}

/// The update mask of the fields given; an invalid-argument failure naming
/// `flags` when none was.
fn mask(paths: Vec<&str>, flags: &str) -> anyhow::Result<Option<pbjson_types::FieldMask>> {
    if paths.is_empty() {
        return Err(Failure {
            exit_code: 4,
            message: format!("nothing to update: give {flags}"),
        }
        .into());
    }
    Ok(Some(pbjson_types::FieldMask {
        paths: paths.into_iter().map(str::to_owned).collect(),
    }))
}

fn user_status(status: StatusArg) -> anyhow::Result<i32> {
    match status {
        StatusArg::Active => Ok(UserStatus::Active as i32),
        StatusArg::Suspended => Ok(UserStatus::Suspended as i32),
        StatusArg::Terminated => Err(Failure {
            exit_code: 4,
            message: "users are active or suspended, not terminated".into(),
        }
        .into()),
    }
}

fn contract_status(status: StatusArg) -> i32 {
    match status {
        StatusArg::Active => ContractStatus::Active as i32,
        StatusArg::Suspended => ContractStatus::Suspended as i32,
        StatusArg::Terminated => ContractStatus::Terminated as i32,
    }
}

fn plan(plan: PlanArg) -> i32 {
    match plan {
        PlanArg::Free => Plan::Free as i32,
        PlanArg::Standard => Plan::Standard as i32,
        PlanArg::Premium => Plan::Premium as i32,
    }
}

/// Runs `lightbox users …`.
pub async fn users(args: UsersArgs) -> anyhow::Result<()> {
    let mut client = UsersServiceClient::new(channel(args.common.addr.as_deref(), 50051)?);
    let json = args.common.json;
    let show = |user: &User| show(json, user, USER_HEADER, user_row);
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
                .map_err(failed)?;
            show(&created.into_inner().user.unwrap_or_default())
        }
        UsersCommand::Get { id, include_contract } => {
            let request = GetUserRequest {
                id,
                include_contract,
                contract_read: 0,
            };
            let answer = client.get_user(request).await.map_err(failed)?.into_inner();
            if json {
                return print_json(&answer);
            }
            print_table(USER_HEADER, &[user_row(&answer.user.unwrap_or_default())]);
            if let Some(contract) = &answer.contract {
                println!();
                print_table(CONTRACT_HEADER, &[contract_row(contract)]);
                println!("{}", freshness_line("contract", answer.contract_freshness.as_ref()));
            }
            Ok(())
        }
        UsersCommand::List => {
            let all = all_pages(|page_token| {
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
            .await?;
            if json {
                return print_json(&all);
            }
            print_table(USER_HEADER, &all.iter().map(user_row).collect::<Vec<_>>());
            Ok(())
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
                update_mask: mask(paths, "--name, --email, --status or --contract-id")?,
                expected_revision,
            };
            let updated = client.update_user(request).await.map_err(failed)?;
            show(&updated.into_inner().user.unwrap_or_default())
        }
        UsersCommand::Delete { id, expected_revision } => {
            let deleted = client
                .delete_user(DeleteUserRequest {
                    id: id.clone(),
                    expected_revision,
                })
                .await
                .map_err(failed)?;
            print_deleted(json, "user", &id, deleted.into_inner().revision)
        }
    }
}

/// Runs `lightbox contracts …`.
pub async fn contracts(args: ContractsArgs) -> anyhow::Result<()> {
    let mut client = ContractsServiceClient::new(channel(args.common.addr.as_deref(), 50052)?);
    let json = args.common.json;
    let show = |contract: &Contract| show(json, contract, CONTRACT_HEADER, contract_row);
    match args.command {
        ContractsCommand::Create {
            holder,
            plan: chosen,
            options,
        } => {
            let contract = Contract {
                holder_user_id: holder,
                plan: plan(chosen),
                options: parse_options(&options)?,
                ..Contract::default()
            };
            let created = client
                .create_contract(CreateContractRequest {
                    contract: Some(contract),
                })
                .await
                .map_err(failed)?;
            show(&created.into_inner().contract.unwrap_or_default())
        }
        ContractsCommand::Get { id } => {
            let answer = client.get_contract(GetContractRequest { id }).await.map_err(failed)?;
            show(&answer.into_inner().contract.unwrap_or_default())
        }
        ContractsCommand::List { holder } => {
            let all = all_pages(|page_token| {
                let (mut client, holder_user_id) = (client.clone(), holder.clone().unwrap_or_default());
                async move {
                    let request = ListContractsRequest {
                        page_size: 1000,
                        page_token,
                        holder_user_id,
                    };
                    let page = client.list_contracts(request).await?.into_inner();
                    Ok((page.contracts, page.next_page_token))
                }
            })
            .await?;
            if json {
                return print_json(&all);
            }
            print_table(CONTRACT_HEADER, &all.iter().map(contract_row).collect::<Vec<_>>());
            Ok(())
        }
        ContractsCommand::Update {
            id,
            plan: chosen,
            status,
            options,
            expected_revision,
        } => {
            let mut paths = Vec::new();
            let mut contract = Contract {
                id,
                ..Contract::default()
            };
            if let Some(chosen) = chosen {
                contract.plan = plan(chosen);
                paths.push("plan");
            }
            if let Some(status) = status {
                contract.status = contract_status(status);
                paths.push("status");
            }
            if !options.is_empty() {
                contract.options = parse_options(&options)?;
                paths.push("options");
            }
            let request = UpdateContractRequest {
                contract: Some(contract),
                update_mask: mask(paths, "--plan, --status or --option")?,
                expected_revision,
            };
            let updated = client.update_contract(request).await.map_err(failed)?;
            show(&updated.into_inner().contract.unwrap_or_default())
        }
        ContractsCommand::Delete { id, expected_revision } => {
            let deleted = client
                .delete_contract(DeleteContractRequest {
                    id: id.clone(),
                    expected_revision,
                })
                .await
                .map_err(failed)?;
            print_deleted(json, "contract", &id, deleted.into_inner().revision)
        }
    }
}

/// Runs `lightbox photos …`.
pub async fn photos(args: PhotosArgs) -> anyhow::Result<()> {
    let mut client = PhotosServiceClient::new(channel(args.common.addr.as_deref(), 50053)?);
    let json = args.common.json;
    let show = |photo: &Photo| show(json, photo, PHOTO_HEADER, photo_row);
    match args.command {
        PhotosCommand::Create {
            user,
            title,
            content_type,
            size,
        } => {
            let photo = Photo {
                user_id: user,
                title,
                content_type,
                size_bytes: size,
                ..Photo::default()
            };
            let created = client
                .create_photo(CreatePhotoRequest { photo: Some(photo) })
                .await
                .map_err(failed)?;
            show(&created.into_inner().photo.unwrap_or_default())
        }
        PhotosCommand::Get { id } => {
            let answer = client
                .get_photo(GetPhotoRequest {
                    id,
                    ..Default::default()
                })
                .await
                .map_err(failed)?;
            show(&answer.into_inner().photo.unwrap_or_default())
        }
        PhotosCommand::List { user, fresh } => {
            let consistency = if fresh { Consistency::Fresh } else { Consistency::Cached };
            let mut request = ListPhotosRequest {
                user_id: user,
                page_size: 1000,
                consistency: consistency as i32,
                ..ListPhotosRequest::default()
            };
            let mut pages = Vec::new();
            loop {
                let page = client.list_photos(request.clone()).await.map_err(failed)?.into_inner();
                let next = page.next_page_token.clone();
                pages.push(page);
                if next.is_empty() {
                    break;
                }
                request.page_token = next;
            }
            if json {
                return print_json(&pages);
            }
            let Some(first) = pages.first() else { return Ok(()) };
            print_table(
                PHOTO_HEADER,
                &pages
                    .iter()
                    .flat_map(|p| p.photos.iter().map(photo_row))
                    .collect::<Vec<_>>(),
            );
            println!();
            if let Some(user) = &first.user {
                println!("owner: {} <{}>", user.display_name, user.email);
            }
            println!("{}", freshness_line("user", first.user_freshness.as_ref()));
            println!("{}", freshness_line("contract", first.contract_freshness.as_ref()));
            Ok(())
        }
        PhotosCommand::Delete { id } => {
            let deleted = client
                .delete_photo(DeletePhotoRequest {
                    id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(failed)?;
            print_deleted(json, "photo", &id, deleted.into_inner().revision)
        }
    }
}

/// Runs `lightbox watch …`: streams until interrupted, reconnecting and
/// resuming from the last revision seen, and saying so on stderr.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let (port, name) = match args.feed {
        FeedArg::Users => (50051, "users"),
        FeedArg::Contracts => (50052, "contracts"),
        FeedArg::Photos => (50053, "photos"),
    };
    let channel = channel(args.addr.as_deref(), port)?;
    let mut since = args.since;
    let mut backoff = Duration::from_millis(200);
    loop {
        let ids = args.ids.clone();
        let (connected, ended) = match args.feed {
            FeedArg::Users => {
                let request = WatchUsersRequest {
                    since_revision: since,
                    user_ids: ids,
                };
                let mut client = UsersServiceClient::new(channel.clone());
                let call = client.watch_users(request);
                session::<User, _>(call, name, &mut since, args.json).await
            }
            FeedArg::Contracts => {
                let request = WatchContractsRequest {
                    since_revision: since,
                    contract_ids: ids,
                    ..Default::default()
                };
                let mut client = ContractsServiceClient::new(channel.clone());
                let call = client.watch_contracts(request);
                session::<Contract, _>(call, name, &mut since, args.json).await
            }
            FeedArg::Photos => {
                let request = WatchPhotosRequest {
                    since_revision: since,
                    photo_ids: ids,
                    ..Default::default()
                };
                let mut client = PhotosServiceClient::new(channel.clone());
                let call = client.watch_photos(request);
                session::<Photo, _>(call, name, &mut since, args.json).await
            }
        };
        if connected {
            backoff = Duration::from_millis(200);
        }
        match ended.code() {
            // A bad request will not get better by retrying.
            Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::Unauthenticated => {
                return Err(failed(ended));
            }
            _ => {}
        }
        eprintln!(
            "stream ended ({:?}: {}); reconnecting from revision {since} in {} ms",
            ended.code(),
            ended.message(),
            backoff.as_millis()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// An open watch, with its frames in the feed's own terms.
struct Opened<T>(WatchStream<T>);

/// Opens a watch and prints it until it ends; answers whether it opened,
/// and why it ended.
async fn session<T, R>(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<R>>, Status>>,
    name: &str,
    since: &mut i64,
    json: bool,
) -> (bool, Status)
where
    T: Entity + serde::Serialize,
    R: Send + 'static,
    Frame<T>: TryFrom<R, Error = Status>,
{
    let stream = match call.await {
        Ok(response) => response.into_inner(),
        Err(status) => return (false, status),
    };
    eprintln!("watching {name} from revision {since}");
    let opened: Opened<T> = Opened(Box::pin(stream.map(|item| item.and_then(Frame::try_from))));
    (true, opened.run(since, json).await)
}

impl<T: Entity + serde::Serialize> Opened<T> {
    /// Prints frames until the stream ends; keeps `since` at the last
    /// revision fully seen. Returns why the stream ended.
    async fn run(mut self, since: &mut i64, json: bool) -> Status {
        // Inside a snapshot the changes carry their entities' own revisions,
        // not a position in the stream: resume only from a complete one.
        let mut in_snapshot = false;
        while let Some(item) = self.0.next().await {
            let frame = match item {
                Ok(frame) => frame,
                Err(status) => return status,
            };
            match &frame {
                Frame::Change(change) if json => {
                    let line = serde_json::json!({
                        "revision": change.revision.to_string(),
                        "kind": if change.entity.is_some() { "CHANGE_KIND_UPSERT" } else { "CHANGE_KIND_DELETE" },
                        "id": change.entity_id,
                        "entity": change.entity,
                    });
                    println!("{line}");
                }
                Frame::Change(change) => match &change.entity {
                    Some(entity) => println!(
                        "{:>8}  upsert  {}  {}",
                        change.revision,
                        change.entity_id,
                        serde_json::to_string(entity).unwrap_or_default()
                    ),
                    None => println!("{:>8}  delete  {}", change.revision, change.entity_id),
                },
                Frame::SnapshotBegin { revision } if json => println!(
                    "{}",
                    serde_json::json!({ "snapshotBegin": { "revision": revision.to_string() } })
                ),
                Frame::SnapshotEnd { revision } if json => println!(
                    "{}",
                    serde_json::json!({ "snapshotEnd": { "revision": revision.to_string() } })
                ),
                Frame::Reset { revision, reason } if json => {
                    println!(
                        "{}",
                        serde_json::json!({ "reset": { "revision": revision.to_string(), "reason": reason } })
                    );
                }
                Frame::SnapshotBegin { revision } => println!("-- snapshot at revision {revision}"),
                Frame::SnapshotEnd { revision } => {
                    println!("-- snapshot complete at revision {revision}; live from here")
                }
                Frame::Reset { revision, reason } => {
                    println!("-- reset: {reason}; a snapshot at revision {revision} follows")
                }
                Frame::Progress { .. } => {}
            }
            // Where to resume: after a change or a progress, their revision;
            // a snapshot counts only once complete.
            match frame {
                Frame::SnapshotBegin { .. } => in_snapshot = true,
                Frame::SnapshotEnd { revision } => {
                    in_snapshot = false;
                    *since = revision;
                }
                Frame::Change(change) if !in_snapshot => *since = (*since).max(change.revision),
                Frame::Progress { revision } => *since = (*since).max(revision),
                _ => {}
            }
        }
        Status::unavailable("the server closed the stream")
    }
}
