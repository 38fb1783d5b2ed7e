//! `lightbox.events.v1.SubscriptionsService`: the RPCs, over the checks
//! and conversions of `manage`, behind an optional bearer token.

use std::sync::Arc;

use lightbox_api::{
    ApiError,
    events::{
        CreateSubscriptionRequest, CreateSubscriptionResponse, DeadLetter, DeleteSubscriptionRequest,
        DeleteSubscriptionResponse, DeliveryAttempt, GetSubscriptionRequest, GetSubscriptionResponse,
        ListDeadLettersRequest, ListDeadLettersResponse, ListSubscriptionsRequest, ListSubscriptionsResponse,
        PauseSubscriptionRequest, PauseSubscriptionResponse, RedeliverDeadLettersRequest, RedeliverDeadLettersResponse,
        ReplaySubscriptionRequest, ReplaySubscriptionResponse, ResumeSubscriptionRequest, ResumeSubscriptionResponse,
        RotateSubscriptionSecretRequest, RotateSubscriptionSecretResponse, Subscription as ApiSubscription,
        subscriptions_service_server::{SubscriptionsService, SubscriptionsServiceServer},
    },
    request,
};
use tonic::{Request, Response, Status, service::Interceptor, service::interceptor::InterceptedService};

use crate::{
    EventsService,
    manage::{dead_letter_name, parse_dead_letter, parse_name, secrets, timestamp},
    queue,
    source::{EntityKind, millis},
    store,
};

/// Checks `authorization: Bearer <token>` on every call when a token is set.
#[derive(Clone, Debug)]
pub struct RequireToken(Option<Arc<str>>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(request) };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        // Constant time in the token's length, not in where it differs.
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the subscriptions service needs `authorization: Bearer TOKEN` with the delivery component's token",
            ))
        }
    }
}

impl EventsService {
    /// The tonic server, with message size limits, behind the API token if
    /// one is set ([`crate::EventsOptions::api_token`]; outside `lightbox
    /// dev`, set one or serve this on the admin listener).
    pub fn into_server(
        self,
        max_message_bytes: usize,
    ) -> InterceptedService<SubscriptionsServiceServer<EventsService>, RequireToken> {
        let token = self.engine.options.api_token.as_deref().map(Arc::from);
        InterceptedService::new(self.into_bare_server(max_message_bytes), RequireToken(token))
    }

    /// The tonic server with message size limits and no token check of its
    /// own, for a listener that checks its callers already (the admin
    /// listener, behind its credential).
    pub fn into_bare_server(self, max_message_bytes: usize) -> SubscriptionsServiceServer<EventsService> {
        SubscriptionsServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn answer<T>(result: Result<T, ApiError>) -> Answer<T> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl SubscriptionsService for EventsService {
    async fn create_subscription(
        &self,
        request: Request<CreateSubscriptionRequest>,
    ) -> Answer<CreateSubscriptionResponse> {
        answer(self.create(request.into_inner()).await)
    }

    async fn get_subscription(&self, request: Request<GetSubscriptionRequest>) -> Answer<GetSubscriptionResponse> {
        answer(
            async {
                let sub = self.find(&request.get_ref().name).await?;
                Ok(GetSubscriptionResponse {
                    subscription: Some(self.view(&sub).await?),
                })
            }
            .await,
        )
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Answer<ListSubscriptionsResponse> {
        const LISTING: &str = "subscriptions";
        answer(
            async {
                let request = request.into_inner();
                let size = request::page_size(request.page_size, 50, 1000)?;
                let after = match request.page_token.as_str() {
                    "" => String::new(),
                    token => request::decode_page_token(LISTING, token)?,
                };
                let page = store::list(&self.engine.db, &after, size + 1).await?;
                let (page, next_page_token) = request::finish_page(page, size, LISTING, |sub| sub.id.as_str());
                let mut subscriptions = Vec::with_capacity(page.len());
                for sub in &page {
                    subscriptions.push(self.view(sub).await?);
                }
                Ok(ListSubscriptionsResponse {
                    subscriptions,
                    next_page_token,
                })
            }
            .await,
        )
    }

    async fn pause_subscription(
        &self,
        request: Request<PauseSubscriptionRequest>,
    ) -> Answer<PauseSubscriptionResponse> {
        answer(
            async {
                let sub = self.set_paused(&request.get_ref().name, true).await?;
                Ok(PauseSubscriptionResponse {
                    subscription: Some(sub),
                })
            }
            .await,
        )
    }

    async fn resume_subscription(
        &self,
        request: Request<ResumeSubscriptionRequest>,
    ) -> Answer<ResumeSubscriptionResponse> {
        answer(
            async {
                let sub = self.set_paused(&request.get_ref().name, false).await?;
                Ok(ResumeSubscriptionResponse {
                    subscription: Some(sub),
                })
            }
            .await,
        )
    }

    async fn replay_subscription(
        &self,
        request: Request<ReplaySubscriptionRequest>,
    ) -> Answer<ReplaySubscriptionResponse> {
        answer(
            async {
                let request = request.into_inner();
                let sub = self.find(&request.name).await?;
                if request.since_revision < 0 {
                    return Err(ApiError::InvalidArgument("since_revision must be 0 or more".into()));
                }
                let kinds = match EntityKind::from_api(request.entity_type) {
                    Some(kind) if sub.kinds.contains(&kind) => vec![kind],
                    Some(kind) => {
                        return Err(ApiError::InvalidArgument(format!(
                            "the subscription delivers no {} events",
                            kind.name()
                        )));
                    }
                    None if sub.kinds.len() > 1 && request.since_revision > 0 => {
                        return Err(ApiError::InvalidArgument(
                            "each entity type has its own revisions: name the entity_type to replay from a revision \
                         other than 0"
                                .into(),
                        ));
                    }
                    None => sub.kinds.clone(),
                };
                store::replay(&self.engine.db, &sub.id, &kinds, request.since_revision).await?;
                self.poke();
                let sub = self.find(&request.name).await?;
                Ok(ReplaySubscriptionResponse {
                    subscription: Some(self.view(&sub).await?),
                })
            }
            .await,
        )
    }

    async fn rotate_subscription_secret(
        &self,
        request: Request<RotateSubscriptionSecretRequest>,
    ) -> Answer<RotateSubscriptionSecretResponse> {
        answer(
            async {
                let request = request.into_inner();
                let sub = self.find(&request.name).await?;
                let (mut secrets, made) = secrets(
                    &[request.secret]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>(),
                )?;
                if !request.drop_previous
                    && let Some(previous) = sub.secrets.iter().find(|s| !secrets.contains(s))
                {
                    secrets.push(previous.clone());
                }
                store::set_secrets(&self.engine.db, &sub.id, &secrets).await?;
                self.poke();
                let sub = self.find(&request.name).await?;
                Ok(RotateSubscriptionSecretResponse {
                    subscription: Some(self.view(&sub).await?),
                    secret: made.map(|s| s.expose().to_owned()).unwrap_or_default(),
                })
            }
            .await,
        )
    }

    async fn delete_subscription(
        &self,
        request: Request<DeleteSubscriptionRequest>,
    ) -> Answer<DeleteSubscriptionResponse> {
        answer(
            async {
                let id = parse_name(&request.get_ref().name)?;
                if !store::delete(&self.engine.db, id).await? {
                    return Err(ApiError::NotFound(format!(
                        "there is no subscription {}",
                        request.get_ref().name
                    )));
                }
                self.poke();
                Ok(DeleteSubscriptionResponse {})
            }
            .await,
        )
    }

    async fn list_dead_letters(&self, request: Request<ListDeadLettersRequest>) -> Answer<ListDeadLettersResponse> {
        answer(
            async {
                let request = request.into_inner();
                let sub = self.find(&request.parent).await?;
                let listing = format!("dead letters of {}", sub.id);
                let size = request::page_size(request.page_size, 50, 1000)?;
                let after = match request.page_token.as_str() {
                    "" => (String::new(), 0),
                    token => {
                        let raw = request::decode_page_token(&listing, token)?;
                        let (feed, revision) = raw.split_once(':').unwrap_or(("", "0"));
                        (feed.to_owned(), revision.parse().unwrap_or(0))
                    }
                };
                let mut rows = queue::dead_letters(&self.engine.db, &sub.id, (&after.0, after.1), size + 1).await?;
                let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > size;
                rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
                let next_page_token = match (more, rows.last()) {
                    (true, Some(last)) => request::encode_page_token(
                        &listing,
                        &format!("{}:{}", last.event.kind.feed(), last.event.revision),
                    ),
                    _ => String::new(),
                };
                let dead_letters = rows
                    .into_iter()
                    .map(|row| DeadLetter {
                        name: dead_letter_name(&sub.id, (row.event.kind, row.event.revision)),
                        event_id: format!("{}:{}", row.event.kind.feed(), row.event.revision),
                        event_type: row.event.event_type,
                        entity_type: row.event.kind.to_api() as i32,
                        entity_id: row.event.entity_id,
                        revision: row.event.revision,
                        attempts: row
                            .errors
                            .into_iter()
                            .map(|a| DeliveryAttempt {
                                attempt: i32::try_from(a.attempt).unwrap_or(i32::MAX),
                                attempt_time: Some(timestamp(a.time_ms)),
                                http_status: i32::from(a.status),
                                error: a.error,
                            })
                            .collect(),
                        dead_time: Some(timestamp(row.dead_time_ms)),
                    })
                    .collect();
                Ok(ListDeadLettersResponse {
                    dead_letters,
                    next_page_token,
                })
            }
            .await,
        )
    }

    async fn redeliver_dead_letters(
        &self,
        request: Request<RedeliverDeadLettersRequest>,
    ) -> Answer<RedeliverDeadLettersResponse> {
        answer(
            async {
                let request = request.into_inner();
                let sub = self.find(&request.parent).await?;
                let keys = request
                    .names
                    .iter()
                    .map(|name| parse_dead_letter(&sub.id, name))
                    .collect::<Result<Vec<_>, _>>()?;
                let keys = (!keys.is_empty()).then_some(keys.as_slice());
                let now = millis(std::time::SystemTime::now());
                let moved = queue::redeliver(&self.engine.db, &sub.id, keys, now).await?;
                self.poke();
                Ok(RedeliverDeadLettersResponse {
                    redelivered_count: i64::try_from(moved).unwrap_or(i64::MAX),
                })
            }
            .await,
        )
    }
}

impl EventsService {
    async fn set_paused(&self, name: &str, paused: bool) -> Result<ApiSubscription, ApiError> {
        let id = parse_name(name)?;
        if !store::set_paused(&self.engine.db, id, paused).await? {
            return Err(ApiError::NotFound(format!("there is no subscription {name}")));
        }
        self.poke();
        let sub = self.find(name).await?;
        self.view(&sub).await
    }
}
