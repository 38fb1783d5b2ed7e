//! `lightbox subscriptions`: the subscriptions of functions to events,
//! through the admin listener of the process delivering them (behind the
//! admin credential, like `lightbox jobs`): create one (its signing secret
//! is shown once), list, show, pause, resume, replay from a revision,
//! rotate its secret, delete; list its dead letters and redeliver them.
//!
//! A subscription is named `subscriptions/ID`; every command takes that or
//! the bare `ID`.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use lightbox_api::events::{
    ContentMode, CreateSubscriptionRequest, CreateSubscriptionResponse, DeleteSubscriptionRequest,
    DeleteSubscriptionResponse, EntityType, GetSubscriptionRequest, GetSubscriptionResponse, ListDeadLettersRequest,
    ListDeadLettersResponse, ListSubscriptionsRequest, ListSubscriptionsResponse, PauseSubscriptionRequest,
    PauseSubscriptionResponse, RedeliverDeadLettersRequest, RedeliverDeadLettersResponse, ReplaySubscriptionRequest,
    ReplaySubscriptionResponse, ResumeSubscriptionRequest, ResumeSubscriptionResponse, RotateSubscriptionSecretRequest,
    RotateSubscriptionSecretResponse, Subscription, subscriptions_service_client::SubscriptionsServiceClient,
};

use super::{
    all_pages,
    failure::{AdminToken, Endpoint},
    output::{Json, Proto, emit, print_table},
    parse_addr,
};

mod table;

use table::{DEAD_HEADER, HEADER, count, dead_row, row, show};

/// Every message printed, under its proto name (the Rust name is the
/// proto name, in `lightbox.events.v1`).
macro_rules! printed {
    ($($ty:ident),* $(,)?) => {
        $(impl Proto for $ty {
            const NAME: &'static str = concat!("lightbox.events.v1.", stringify!($ty));
        })*
        /// The names above, for the test that checks them.
        #[cfg(test)]
        const PRINTED: &[&str] = &[$(<$ty as Proto>::NAME),*];
    };
}

printed! {
    CreateSubscriptionResponse, GetSubscriptionResponse, ListSubscriptionsResponse, PauseSubscriptionResponse,
    ResumeSubscriptionResponse, ReplaySubscriptionResponse, RotateSubscriptionSecretResponse,
    DeleteSubscriptionResponse, ListDeadLettersResponse, RedeliverDeadLettersResponse,
}

/// Arguments of `lightbox subscriptions`.
#[derive(Debug, Args)]
pub struct SubscriptionsArgs {
    /// The admin listener of the process delivering events, `HOST:PORT` or
    /// a URL (its --admin-addr; default: LIGHTBOX_ADMIN_ADDR, or
    /// 127.0.0.1:50050).
    #[arg(long, global = true, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub addr: Option<String>,

    /// The server's admin token (its --admin-token); `lightbox dev` needs
    /// none on loopback.
    #[arg(long, global = true, env = "LIGHTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the proto3 JSON mapping of the response instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    command: SubscriptionsCommand,
}

/// The table's columns, for `--help`.
const COLUMNS: &str = "Tables: NAME, STATE, ENDPOINT, TYPES, PENDING (events queued), DEAD (dead letters), \
                       CURSORS (per feed, `users:READ/DELIVERED`: the last revision read into the queue, \
                       and the last one delivered or dead-lettered; `-` before a subscription made from now \
                       has started reading).";

#[derive(Debug, Subcommand)]
enum SubscriptionsCommand {
    /// Creates a subscription, and prints its signing secret when one was
    /// made (the only time it is shown).
    Create {
        /// Where the events go: an `http://` URL.
        #[arg(long, value_name = "URL")]
        endpoint: String,
        /// The changes delivered: `--types users,contracts,photos`.
        #[arg(long, value_name = "TYPE", value_enum, required = true, num_args = 1.., value_delimiter = ',')]
        types: Vec<TypeArg>,
        /// Only the changes to these entities (UUIDs): `--ids A,B`.
        #[arg(long, value_name = "ID", num_args = 1.., value_delimiter = ',')]
        ids: Vec<String>,
        /// The subscription's id (lowercase letters, digits and hyphens,
        /// starting with a letter); default: one is made.
        #[arg(long, value_name = "SUBSCRIPTION_ID", default_value = "")]
        id: String,
        /// Send each event whole as `application/cloudevents+json`
        /// (structured content mode), not as `ce-` headers and the entity's
        /// JSON (binary, the default).
        #[arg(long)]
        structured: bool,
        /// The most deliveries per second (default: the component's).
        #[arg(long, value_name = "N")]
        rate_limit: Option<f64>,
        /// Attempts per event before it is dead-lettered, 1 to 100
        /// (default: the component's).
        #[arg(long, value_name = "N")]
        max_attempts: Option<i32>,
        /// How long one delivery may take, e.g. `5s` (default: the
        /// component's).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// A signing secret, `whsec_…` (twice: both sign, as during a
        /// rotation); default: one is made and printed once.
        #[arg(long = "secret", value_name = "SECRET")]
        secrets: Vec<String>,
        /// Start with the next change (the default).
        #[arg(long, conflicts_with = "since")]
        from_now: bool,
        /// Start after this revision of each feed; 0: a snapshot of the
        /// current state first.
        #[arg(long, value_name = "REV")]
        since: Option<i64>,
    },
    /// Lists the subscriptions, in name order.
    #[command(after_help = COLUMNS)]
    List,
    /// Shows a subscription, with its cursors, queue and secrets (masked).
    #[command(after_help = COLUMNS)]
    Get {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Stops delivering (and reading changes) until resumed; the cursors
    /// and the queue stay.
    Pause {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Delivers again from where a paused subscription stopped.
    Resume {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Moves the cursors to a revision: every change after it is delivered
    /// again, in order per entity.
    Replay {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Deliver every change after this revision; 0: a snapshot of the
        /// current state first. Each feed has its own revisions: give
        /// another than 0 with --type.
        #[arg(long, value_name = "REV")]
        since: i64,
        /// Only this feed (default: every feed of the subscription).
        #[arg(long = "type", value_name = "TYPE", value_enum)]
        entity_type: Option<TypeArg>,
    },
    /// Rotates the signing secret: the new one signs beside the previous
    /// one until --drop-previous.
    RotateSecret {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The new secret, `whsec_…`; default: one is made and printed once.
        #[arg(long)]
        secret: Option<String>,
        /// Drop every previous secret at once (the end of a rotation: give
        /// the same --secret again).
        #[arg(long)]
        drop_previous: bool,
    },
    /// Deletes a subscription, its queue and its dead letters.
    Delete {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Lists the events of a subscription that could not be delivered.
    DeadLetters {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Puts dead letters back in the delivery queue, attempts reset.
    Redeliver {
        /// `subscriptions/ID`, or the ID.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The dead letters (as `dead-letters` lists them, `user-12`, or
        /// their full names); none: all of them.
        #[arg(value_name = "DEAD_LETTER")]
        dead_letters: Vec<String>,
    },
}

/// An entity type on the command line, named as its feed.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum TypeArg {
    /// Users (`dev.lightbox.user.*`).
    #[value(alias = "user")]
    Users,
    /// Contracts (`dev.lightbox.contract.*`).
    #[value(alias = "contract")]
    Contracts,
    /// Photos (`dev.lightbox.photo.*`).
    #[value(alias = "photo")]
    Photos,
}

impl From<TypeArg> for EntityType {
    fn from(kind: TypeArg) -> Self {
        match kind {
            TypeArg::Users => EntityType::User,
            TypeArg::Contracts => EntityType::Contract,
            TypeArg::Photos => EntityType::Photo,
        }
    }
}

/// `subscriptions/ID`, or `ID` made into it. Whether the ID is a valid
/// one is the server's to say (exit 4), in the same words as for any
/// client.
fn parse_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    match name.strip_prefix("subscriptions/") {
        Some(_) => Ok(name.to_owned()),
        None => Ok(format!("subscriptions/{name}")),
    }
}

/// A dead letter of `parent`: its full name, or the last part of it
/// (`user-12`) made into one.
fn dead_letter_name(parent: &str, name: &str) -> String {
    let name = name.trim();
    match name.starts_with("subscriptions/") {
        true => name.to_owned(),
        false => format!("{parent}/deadLetters/{name}"),
    }
}

/// Runs `lightbox subscriptions …`.
pub async fn run(args: SubscriptionsArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::subscriptions(args.addr.as_deref())?;
    let token = AdminToken::new(args.token.as_deref())?;
    let mut client = SubscriptionsServiceClient::with_interceptor(endpoint.channel(), token);
    let json = Json::if_asked(args.json)?;
    let json = json.as_ref();
    let failed = |status| endpoint.failed(status);
    match args.command {
        SubscriptionsCommand::Create {
            endpoint: url,
            types,
            ids,
            id,
            structured,
            rate_limit,
            max_attempts,
            timeout,
            secrets,
            from_now,
            since,
        } => {
            let subscription = Subscription {
                endpoint: url,
                entity_types: types.into_iter().map(|t| EntityType::from(t) as i32).collect(),
                entity_ids: ids,
                content_mode: match structured {
                    true => ContentMode::Structured,
                    false => ContentMode::Binary,
                } as i32,
                rate_limit: rate_limit.unwrap_or(0.0),
                max_attempts: max_attempts.unwrap_or(0),
                timeout: timeout.map(|d| pbjson_types::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                }),
                ..Subscription::default()
            };
            let created = client
                .create_subscription(CreateSubscriptionRequest {
                    subscription: Some(subscription),
                    subscription_id: id,
                    secrets,
                    // Unset is "from now"; --from-now only says so.
                    start_revision: since.filter(|_| !from_now),
                })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &created, created.subscription.as_ref(), &created.secret)
        }
        SubscriptionsCommand::List => {
            let subscriptions = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_subscriptions(ListSubscriptionsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.subscriptions, page.next_page_token))
                }
            })
            .await
            .map_err(failed)?;
            match json {
                Some(json) => json.print(&ListSubscriptionsResponse {
                    subscriptions,
                    next_page_token: String::new(),
                }),
                None => Ok(print_table(HEADER, &subscriptions.iter().map(row).collect::<Vec<_>>())?),
            }
        }
        SubscriptionsCommand::Get { name } => {
            let answer = client
                .get_subscription(GetSubscriptionRequest { name })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.subscription.as_ref(), "")
        }
        SubscriptionsCommand::Pause { name } => {
            let answer = client
                .pause_subscription(PauseSubscriptionRequest { name })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.subscription.as_ref(), "")
        }
        SubscriptionsCommand::Resume { name } => {
            let answer = client
                .resume_subscription(ResumeSubscriptionRequest { name })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.subscription.as_ref(), "")
        }
        SubscriptionsCommand::Replay {
            name,
            since,
            entity_type,
        } => {
            let answer = client
                .replay_subscription(ReplaySubscriptionRequest {
                    name,
                    entity_type: entity_type.map_or(EntityType::Unspecified, EntityType::from) as i32,
                    since_revision: since,
                })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.subscription.as_ref(), "")
        }
        SubscriptionsCommand::RotateSecret {
            name,
            secret,
            drop_previous,
        } => {
            let answer = client
                .rotate_subscription_secret(RotateSubscriptionSecretRequest {
                    name,
                    secret: secret.unwrap_or_default(),
                    drop_previous,
                })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.subscription.as_ref(), &answer.secret)
        }
        SubscriptionsCommand::Delete { name } => {
            let answer = client
                .delete_subscription(DeleteSubscriptionRequest { name: name.clone() })
                .await
                .map_err(failed)?
                .into_inner();
            match json {
                Some(json) => json.print(&answer),
                None => Ok(emit(&format!("deleted {name}")).map(drop)?),
            }
        }
        SubscriptionsCommand::DeadLetters { name } => {
            let dead_letters = all_pages(|page_token| {
                let (mut client, parent) = (client.clone(), name.clone());
                async move {
                    let page = client
                        .list_dead_letters(ListDeadLettersRequest {
                            parent,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.dead_letters, page.next_page_token))
                }
            })
            .await
            .map_err(failed)?;
            match json {
                Some(json) => json.print(&ListDeadLettersResponse {
                    dead_letters,
                    next_page_token: String::new(),
                }),
                None => Ok(print_table(
                    DEAD_HEADER,
                    &dead_letters.iter().map(|d| dead_row(&name, d)).collect::<Vec<_>>(),
                )?),
            }
        }
        SubscriptionsCommand::Redeliver { name, dead_letters } => {
            let names = dead_letters.iter().map(|d| dead_letter_name(&name, d)).collect();
            let answer = client
                .redeliver_dead_letters(RedeliverDeadLettersRequest {
                    parent: name.clone(),
                    names,
                })
                .await
                .map_err(failed)?
                .into_inner();
            match json {
                Some(json) => json.print(&answer),
                None => Ok(emit(&format!(
                    "{name}: {} back in the delivery queue",
                    count(answer.redelivered_count, "dead letter")
                ))
                .map(drop)?),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightbox_api::events::{Cursor, SubscriptionState};

    #[test]
    fn the_printed_messages_are_described_under_their_names() {
        let pool = lightbox_gateway::descriptors().expect("the descriptors decode");
        for name in PRINTED {
            assert!(pool.get_message_by_name(name).is_some(), "{name} is not described");
        }
        assert_eq!(PRINTED.len(), 10);
    }

    #[test]
    fn a_name_is_the_resource_name_or_the_bare_id() {
        assert_eq!(parse_name("sub-1").as_deref(), Ok("subscriptions/sub-1"));
        assert_eq!(parse_name("subscriptions/sub-1").as_deref(), Ok("subscriptions/sub-1"));
        assert_eq!(parse_name(" hooks ").as_deref(), Ok("subscriptions/hooks"));
        let parent = "subscriptions/sub-1";
        assert_eq!(
            dead_letter_name(parent, "user-12"),
            "subscriptions/sub-1/deadLetters/user-12"
        );
        assert_eq!(
            dead_letter_name(parent, "subscriptions/sub-1/deadLetters/photo-3"),
            "subscriptions/sub-1/deadLetters/photo-3"
        );
    }

    #[test]
    fn a_row_says_the_state_the_types_and_each_cursor() {
        let sub = Subscription {
            name: "subscriptions/hooks".into(),
            endpoint: "http://fn.example/hook".into(),
            entity_types: vec![EntityType::User as i32, EntityType::Photo as i32],
            state: SubscriptionState::Paused as i32,
            cursors: vec![
                Cursor {
                    entity_type: EntityType::User as i32,
                    read_revision: 12,
                    delivered_revision: 10,
                },
                Cursor {
                    entity_type: EntityType::Photo as i32,
                    read_revision: -1,
                    delivered_revision: -1,
                },
            ],
            pending_count: 2,
            dead_letter_count: 1,
            ..Subscription::default()
        };
        assert_eq!(
            row(&sub),
            [
                "subscriptions/hooks",
                "paused",
                "http://fn.example/hook",
                "users,photos",
                "2",
                "1",
                "users:12/10 photos:-/-"
            ]
        );
    }
}
