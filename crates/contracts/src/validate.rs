//! What a contract must look like: the checks on creation and update, with
//! the messages clients see.

use std::collections::HashSet;

use lightbox_api::{
    ApiError,
    contracts::{Contract, ContractOption, ContractStatus, Plan},
    request,
};

/// The fields `UpdateContract` may change.
pub(crate) const UPDATABLE: &[&str] = &["holder_user_id", "plan", "options", "status", "valid_until"];

/// The most options a contract may have.
const MAX_OPTIONS: usize = 64;

/// A contract to create, checked and completed (id, status, times).
pub(crate) fn new_contract(contract: Option<Contract>, keep_id: bool) -> Result<Contract, ApiError> {
    let contract = contract.ok_or_else(|| ApiError::InvalidArgument("contract is required".into()))?;
    let now = request::now();
    let mut contract = Contract {
        id: if keep_id {
            contract.id.clone()
        } else {
            request::new_id()
        },
        revision: 0,
        create_time: Some(now),
        update_time: Some(now),
        ..contract
    };
    if contract.status == ContractStatus::Unspecified as i32 {
        contract.status = ContractStatus::Active as i32;
    }
    check(&mut contract)?;
    Ok(contract)
}

/// `current` with the fields of `changes` named in `paths` (all if empty).
pub(crate) fn apply_update(mut current: Contract, changes: Contract, paths: &[&str]) -> Result<Contract, ApiError> {
    if request::touches(paths, "holder_user_id") {
        current.holder_user_id = changes.holder_user_id;
    }
    if request::touches(paths, "plan") {
        current.plan = changes.plan;
    }
    if request::touches(paths, "options") {
        current.options = changes.options;
    }
    if request::touches(paths, "status") {
        current.status = changes.status;
    }
    if request::touches(paths, "valid_until") {
        current.valid_until = changes.valid_until;
    }
    check(&mut current)?;
    Ok(current)
}

/// Checks and normalises the client-set fields.
fn check(contract: &mut Contract) -> Result<(), ApiError> {
    contract.holder_user_id = request::parse_id("contract.holder_user_id", &contract.holder_user_id)?.to_string();
    match Plan::try_from(contract.plan) {
        Ok(Plan::Free | Plan::Standard | Plan::Premium) => {}
        _ => {
            return Err(ApiError::InvalidArgument(format!(
                "contract.plan {} is not a valid plan (PLAN_FREE, PLAN_STANDARD or PLAN_PREMIUM)",
                contract.plan
            )));
        }
    }
    match ContractStatus::try_from(contract.status) {
        Ok(ContractStatus::Active | ContractStatus::Suspended | ContractStatus::Terminated) => {}
        _ => {
            return Err(ApiError::InvalidArgument(format!(
                "contract.status {} is not a valid status",
                contract.status
            )));
        }
    }
    if let Some(until) = &contract.valid_until {
        request::timestamp("contract.valid_until", until)?;
    }
    if contract.options.len() > MAX_OPTIONS {
        return Err(ApiError::InvalidArgument(format!(
            "contract.options has more than {MAX_OPTIONS} options"
        )));
    }
    let mut seen = HashSet::new();
    for option in &mut contract.options {
        let code = option.code.trim();
        let valid = !code.is_empty()
            && code.len() <= 64
            && code
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(ApiError::InvalidArgument(format!(
                "contract option code {:?} is not valid (1 to 64 of a-z, 0-9, _)",
                option.code
            )));
        }
        option.code = code.to_owned();
        if !seen.insert(option.code.clone()) {
            return Err(ApiError::InvalidArgument(format!(
                "contract option {:?} appears twice",
                option.code
            )));
        }
        option.value = request::text(
            &format!("contract option {:?} value", option.code),
            &option.value,
            false,
            256,
        )?;
        typed(option)?;
    }
    Ok(())
}

/// The options whose values Lightbox reads, and what each must be.
const KNOWN_OPTIONS: &[(&str, OptionType)] = &[("photo_quota", OptionType::Count), ("hd_upload", OptionType::Flag)];

/// What a known option's value must be.
#[derive(Clone, Copy)]
enum OptionType {
    /// A non-negative whole number, such as a quota.
    Count,
    /// `true` or `false`.
    Flag,
}

/// Refuses a known option whose value is not of its type (an unknown
/// option's value is free text), so that a contract cannot be stored that
/// fails later, at an upload. Normalises the value (`" 10 "` → `"10"`).
fn typed(option: &mut ContractOption) -> Result<(), ApiError> {
    let Some((_, kind)) = KNOWN_OPTIONS.iter().find(|(code, _)| *code == option.code) else {
        return Ok(());
    };
    let value = option.value.trim();
    let normal = match kind {
        OptionType::Count => value.parse::<u64>().ok().map(|n| n.to_string()),
        OptionType::Flag => match value {
            "true" | "false" => Some(value.to_owned()),
            _ => None,
        },
    };
    let expected = match kind {
        OptionType::Count => "a non-negative whole number, such as \"100\"",
        OptionType::Flag => "\"true\" or \"false\"",
    };
    option.value = normal.ok_or_else(|| {
        ApiError::InvalidArgument(format!(
            "contract option {:?} must be {expected} (got {:?})",
            option.code, option.value
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    fn contract(plan: Plan, options: Vec<ContractOption>) -> Option<Contract> {
        Some(Contract {
            holder_user_id: request::new_id(),
            plan: plan as i32,
            options,
            ..Contract::default()
        })
    }

    fn valued(code: &str, value: &str) -> ContractOption {
        ContractOption {
            value: value.into(),
            ..option(code)
        }
    }

    #[test]
    fn known_options_are_typed_and_normalised_and_others_are_free_text() {
        let created = new_contract(
            contract(
                Plan::Free,
                vec![
                    valued("photo_quota", " 10 "),
                    valued("hd_upload", "true"),
                    valued("colour", "teal"),
                ],
            ),
            false,
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let values: Vec<&str> = created.options.iter().map(|o| o.value.as_str()).collect();
        assert_eq!(values, ["10", "true", "teal"]);
    }

    fn option(code: &str) -> ContractOption {
        ContractOption {
            code: code.into(),
            value: "1".into(),
            enabled: true,
        }
    }

    #[test]
    fn a_new_contract_is_active_with_an_id() {
        let created = new_contract(contract(Plan::Premium, vec![option("photo_quota")]), false).ok();
        assert!(created.is_some_and(|c| c.status == ContractStatus::Active as i32 && !c.id.is_empty()));
    }

    #[test]
    fn bad_contracts_are_refused_with_the_reason() {
        let cases = [
            (contract(Plan::Unspecified, vec![]), "plan"),
            (contract(Plan::Free, vec![option("Bad Code")]), "not valid"),
            (contract(Plan::Free, vec![option("a"), option("a")]), "twice"),
            (
                contract(Plan::Free, vec![valued("photo_quota", "lots")]),
                "\"photo_quota\" must be a non-negative",
            ),
            (
                contract(Plan::Free, vec![valued("photo_quota", "-1")]),
                "\"photo_quota\" must be a non-negative",
            ),
            (
                contract(Plan::Free, vec![valued("hd_upload", "yes")]),
                "\"hd_upload\" must be \"true\" or",
            ),
        ];
        for (input, needle) in cases {
            let err = new_contract(input, false)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{err}");
        }
    }
}
