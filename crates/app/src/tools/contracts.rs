//! `lightbox contracts`: the seed's Support App, over the contracts
//! service.

use clap::{Args, Subcommand, ValueEnum};
use lightbox_api::contracts::{
    Contract, ContractOption, ContractStatus, CreateContractRequest, DeleteContractRequest, GetContractRequest,
    ListContractsRequest, ListContractsResponse, Plan, UpdateContractRequest,
    contracts_service_client::ContractsServiceClient,
};

use super::{
    Common, Failure, Kind, Service, StatusArg, all_pages,
    failure::Endpoint,
    mask,
    output::{Json, Proto, enum_word, print_deleted, print_table},
};

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

/// The columns of a contracts table.
pub(crate) const CONTRACT_HEADER: &[&str] = &["ID", "HOLDER", "PLAN", "STATUS", "OPTIONS", "REVISION"];

/// A contract as a table row.
pub(crate) fn contract_row(contract: &Contract) -> Vec<String> {
    let plan = enum_word(Plan::try_from(contract.plan).ok().map(|p| p.as_str_name()), "PLAN_");
    let status = enum_word(
        ContractStatus::try_from(contract.status).ok().map(|s| s.as_str_name()),
        "CONTRACT_STATUS_",
    );
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

/// `--option code=value[:off]`, each.
pub(crate) fn parse_options(options: &[String]) -> Result<Vec<ContractOption>, Failure> {
    options
        .iter()
        .map(|spec| {
            let (spec, enabled) = match spec.strip_suffix(":off") {
                Some(spec) => (spec, false),
                None => (spec.as_str(), true),
            };
            let (code, value) = spec.split_once('=').ok_or_else(|| {
                Failure::new(
                    Kind::Invalid,
                    format!("--option {spec:?} is not code=value, such as photo_quota=500; nothing was sent"),
                )
            })?;
            Ok(ContractOption {
                code: code.trim().to_owned(),
                value: value.trim().to_owned(),
                enabled,
            })
        })
        .collect()
}

fn contract_status(status: StatusArg) -> i32 {
    match status {
        StatusArg::Active => ContractStatus::Active as i32,
        StatusArg::Suspended => ContractStatus::Suspended as i32,
        StatusArg::Terminated => ContractStatus::Terminated as i32,
    }
}

pub(crate) fn plan(plan: PlanArg) -> i32 {
    match plan {
        PlanArg::Free => Plan::Free as i32,
        PlanArg::Standard => Plan::Standard as i32,
        PlanArg::Premium => Plan::Premium as i32,
    }
}

/// Prints one contract: the response as JSON, or a one-row table.
fn show<M: Proto>(json: Option<&Json>, response: &M, contract: Option<&Contract>) -> anyhow::Result<()> {
    match json {
        Some(json) => json.print(response),
        None => Ok(print_table(
            CONTRACT_HEADER,
            &[contract_row(&contract.cloned().unwrap_or_default())],
        )?),
    }
}

/// Runs `lightbox contracts …`.
pub async fn run(args: ContractsArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(Service::Contracts, args.common.addr.as_deref(), "contracts")?;
    let mut client = ContractsServiceClient::new(endpoint.channel());
    let json = Json::if_asked(args.common.json)?;
    let json = json.as_ref();
    let failed = |status| endpoint.failed(status);
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
                .map_err(failed)?
                .into_inner();
            show(json, &created, created.contract.as_ref())
        }
        ContractsCommand::Get { id } => {
            let answer = client
                .get_contract(GetContractRequest { id })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.contract.as_ref())
        }
        ContractsCommand::List { holder } => {
            let contracts = all_pages(|page_token| {
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
            .await
            .map_err(failed)?;
            if let Some(json) = json {
                // Every page as one answer: the last page's, with them all.
                return json.print(&ListContractsResponse {
                    contracts,
                    next_page_token: String::new(),
                });
            }
            Ok(print_table(
                CONTRACT_HEADER,
                &contracts.iter().map(contract_row).collect::<Vec<_>>(),
            )?)
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
                update_mask: mask(paths, "--plan, --status or --option", "contracts update")?,
                expected_revision,
            };
            let updated = client.update_contract(request).await.map_err(failed)?.into_inner();
            show(json, &updated, updated.contract.as_ref())
        }
        ContractsCommand::Delete { id, expected_revision } => {
            let deleted = client
                .delete_contract(DeleteContractRequest {
                    id: id.clone(),
                    expected_revision,
                })
                .await
                .map_err(failed)?
                .into_inner();
            print_deleted(json, "contract", &id, &deleted, deleted.revision)
        }
    }
}
