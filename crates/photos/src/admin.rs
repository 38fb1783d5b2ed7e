//! `lightbox.photos.v1.PhotoJobsService`: the operators' view of the photo
//! jobs (list, get) and their hands on them (retry a discarded job, discard
//! one). The app serves it on the process's admin listener, behind the
//! admin credential, never on the photos port.

use lightbox_api::{
    ApiError,
    photos::{
        DiscardPhotoJobRequest, DiscardPhotoJobResponse, GetPhotoJobRequest, GetPhotoJobResponse, ListPhotoJobsRequest,
        ListPhotoJobsResponse, PhotoJob, PhotoJobError, PhotoJobState, RetryPhotoJobRequest, RetryPhotoJobResponse,
        photo_jobs_service_server::{PhotoJobsService, PhotoJobsServiceServer},
    },
    request,
};
use lightbox_changefeed::FeedError;
use tonic::{Request, Response, Status};

use crate::{
    PhotosService,
    job_rows::{self, ErrorRow, JobRow},
    jobs, processing,
};

/// The photo jobs service, over a [`PhotosService`] (its database, its
/// feed for the photos' state, its workers to wake).
#[derive(Clone)]
pub struct PhotoJobsAdmin {
    service: PhotosService,
}

impl PhotoJobsAdmin {
    /// The admin service of `service`'s jobs.
    pub fn new(service: PhotosService) -> PhotoJobsAdmin {
        PhotoJobsAdmin { service }
    }

    /// The tonic server, with message size limits.
    pub fn into_server(self, max_message_bytes: usize) -> PhotoJobsServiceServer<PhotoJobsAdmin> {
        PhotoJobsServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    async fn list(&self, request: ListPhotoJobsRequest) -> Result<ListPhotoJobsResponse, ApiError> {
        let size = request::page_size(request.page_size, 50, 1000)?;
        let state = match PhotoJobState::try_from(request.state) {
            Ok(PhotoJobState::Unspecified) => "",
            Ok(state) => state_name(state),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "state {} is not a job state",
                    request.state
                )));
            }
        };
        let listing = format!("ListPhotoJobs state={state}");
        let after = request::decode_page_token(&listing, &request.page_token)?;
        let rows = job_rows::list(self.service.feed.db(), state, &after, size + 1)
            .await
            .map_err(FeedError::from)?;
        let page: Vec<PhotoJob> = rows.into_iter().map(|(job, errors)| to_api(job, errors)).collect();
        let (jobs, next_page_token) = request::finish_page(page, size, &listing, |job: &PhotoJob| &job.photo_id);
        Ok(ListPhotoJobsResponse { jobs, next_page_token })
    }

    async fn get(&self, photo_id: &str) -> Result<PhotoJob, ApiError> {
        let id = request::parse_id("photo_id", photo_id)?.to_string();
        match job_rows::get(self.service.feed.db(), &id)
            .await
            .map_err(FeedError::from)?
        {
            Some((job, errors)) => Ok(to_api(job, errors)),
            None => Err(ApiError::NotFound(format!("photo {id} has no processing job"))),
        }
    }

    async fn retry(&self, request: RetryPhotoJobRequest) -> Result<PhotoJob, ApiError> {
        let id = request::parse_id("photo_id", &request.photo_id)?.to_string();
        let allowance = i64::from(self.service.jobs.options.max_attempts.max(1));
        let backend = self.service.feed.db().backend();
        let mut tx = self.service.feed.begin().await?;
        let moved = jobs::set_state(tx.conn(), backend, &id, &[jobs::DISCARDED], jobs::QUEUED, allowance)
            .await
            .map_err(FeedError::from)?;
        if moved.is_none() {
            drop(tx);
            return Err(self.refusal(&id, "retried: only a DISCARDED job is").await);
        }
        // Back to PENDING, through the feed: watchers see it queued again.
        if !processing::rewrite(&mut tx, &id, |photo| photo.processing = Some(processing::pending())).await? {
            return Err(ApiError::NotFound(format!("photo {id} not found")));
        }
        let revision = tx.commit().await?;
        self.service.settle(revision).await;
        self.service.jobs.wake.notify_one();
        tracing::info!(photo_id = %id, "photo job retried by an operator");
        self.get(&id).await
    }

    async fn discard(&self, request: DiscardPhotoJobRequest) -> Result<PhotoJob, ApiError> {
        let id = request::parse_id("photo_id", &request.photo_id)?.to_string();
        let reason = match request.reason.trim() {
            "" => "discarded by an operator".to_owned(),
            reason => request::text("reason", reason, false, 500)?,
        };
        let backend = self.service.feed.db().backend();
        let mut tx = self.service.feed.begin().await?;
        let moved = jobs::set_state(
            tx.conn(),
            backend,
            &id,
            &[jobs::QUEUED, jobs::RUNNING],
            jobs::DISCARDED,
            0,
        )
        .await
        .map_err(FeedError::from)?;
        let Some(job) = moved else {
            drop(tx);
            return Err(self.refusal(&id, "discarded: only a QUEUED or RUNNING job is").await);
        };
        // A running attempt's completion is refused from here on: the job
        // is no longer `running`.
        jobs::record_error(tx.conn(), backend, &id, job.attempt, &reason, true)
            .await
            .map_err(FeedError::from)?;
        let attempts = job.attempt;
        if !processing::rewrite(&mut tx, &id, |photo| processing::failed(photo, &reason, attempts)).await? {
            return Err(ApiError::NotFound(format!("photo {id} not found")));
        }
        let revision = tx.commit().await?;
        self.service.settle(revision).await;
        tracing::info!(photo_id = %id, reason, "photo job discarded by an operator");
        self.get(&id).await
    }

    /// Why a job could not be `what`: it does not exist, or its state.
    async fn refusal(&self, id: &str, what: &str) -> ApiError {
        match self.get(id).await {
            Ok(job) => ApiError::FailedPrecondition(format!(
                "the job of photo {id} is {} and cannot be {what}",
                job.state().as_str_name()
            )),
            Err(err) => err,
        }
    }
}

fn state_name(state: PhotoJobState) -> &'static str {
    match state {
        PhotoJobState::Queued => jobs::QUEUED,
        PhotoJobState::Running => jobs::RUNNING,
        PhotoJobState::Done => jobs::DONE,
        PhotoJobState::Discarded => jobs::DISCARDED,
        PhotoJobState::Unspecified => "",
    }
}

fn state_of(name: &str) -> PhotoJobState {
    match name {
        jobs::QUEUED => PhotoJobState::Queued,
        jobs::RUNNING => PhotoJobState::Running,
        jobs::DONE => PhotoJobState::Done,
        jobs::DISCARDED => PhotoJobState::Discarded,
        _ => PhotoJobState::Unspecified,
    }
}

fn time(ms: i64) -> Option<pbjson_types::Timestamp> {
    let nanos = i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0);
    Some(pbjson_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos,
    })
}

fn to_api(job: JobRow, errors: Vec<ErrorRow>) -> PhotoJob {
    let state = state_of(&job.state);
    let count = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
    PhotoJob {
        photo_id: job.photo_id,
        user_id: job.user_id,
        state: state as i32,
        attempt: count(job.attempt),
        max_attempt: count(job.max_attempt),
        next_run_time: (state == PhotoJobState::Queued)
            .then(|| time(job.run_after_ms))
            .flatten(),
        lease_expire_time: (state == PhotoJobState::Running)
            .then(|| time(job.lease_until_ms))
            .flatten(),
        worker: job.worker,
        errors: errors
            .into_iter()
            .map(|e| PhotoJobError {
                attempt: count(e.attempt),
                time: time(e.time_ms),
                message: e.message,
                permanent: e.permanent,
            })
            .collect(),
        create_time: time(job.create_time_ms),
        update_time: time(job.update_time_ms),
    }
}

#[tonic::async_trait]
impl PhotoJobsService for PhotoJobsAdmin {
    async fn list_photo_jobs(
        &self,
        request: Request<ListPhotoJobsRequest>,
    ) -> Result<Response<ListPhotoJobsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_photo_job(
        &self,
        request: Request<GetPhotoJobRequest>,
    ) -> Result<Response<GetPhotoJobResponse>, Status> {
        let job = self.get(&request.into_inner().photo_id).await?;
        Ok(Response::new(GetPhotoJobResponse { job: Some(job) }))
    }

    async fn retry_photo_job(
        &self,
        request: Request<RetryPhotoJobRequest>,
    ) -> Result<Response<RetryPhotoJobResponse>, Status> {
        let job = self.retry(request.into_inner()).await?;
        Ok(Response::new(RetryPhotoJobResponse { job: Some(job) }))
    }

    async fn discard_photo_job(
        &self,
        request: Request<DiscardPhotoJobRequest>,
    ) -> Result<Response<DiscardPhotoJobResponse>, Status> {
        let job = self.discard(request.into_inner()).await?;
        Ok(Response::new(DiscardPhotoJobResponse { job: Some(job) }))
    }
}
