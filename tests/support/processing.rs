//! Helpers of the photo processing tests: upload an image, wait for its
//! processing to reach a state, read the admin jobs service.

#![allow(dead_code)]

use lightbox_api::photos::{
    CreatePhotoRequest, GetPhotoJobRequest, GetPhotoRequest, Photo, PhotoJob, PhotoJobState, ProcessingState,
    photo_jobs_service_client::PhotoJobsServiceClient, photos_service_client::PhotosServiceClient,
};
use lightbox_testkit::eventually;
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor, transport::Channel};

/// The admin token of the tests' admin listeners.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Sends the admin token.
#[derive(Clone)]
pub struct Bearer;

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = MetadataValue::try_from(format!("Bearer {ADMIN_TOKEN}"))
            .unwrap_or_else(|err| panic!("the token is a header value: {err}"));
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

/// A jobs client of the admin listener at `channel`, with the token.
pub type JobsClient = PhotoJobsServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Uploads `image` as a photo of `user_id` (size and type left to the
/// server); the answer.
pub async fn upload(photos: &mut PhotosServiceClient<Channel>, user_id: &str, title: &str, image: &[u8]) -> Photo {
    photos
        .create_photo(CreatePhotoRequest {
            photo: Some(Photo {
                user_id: user_id.into(),
                title: title.into(),
                image: Some(image.to_vec()),
                ..Photo::default()
            }),
        })
        .await
        .unwrap_or_else(|status| panic!("upload {title}: {status:?}"))
        .into_inner()
        .photo
        .unwrap_or_default()
}

/// The processing state of `photo`.
pub fn state(photo: &Photo) -> ProcessingState {
    photo
        .processing
        .as_ref()
        .map_or(ProcessingState::Unspecified, |p| p.state())
}

/// Waits until the photo `id`'s processing is in `wanted`; the photo.
pub async fn processed(photos: &PhotosServiceClient<Channel>, id: &str, wanted: ProcessingState) -> Photo {
    eventually(&format!("photo {id} to be {wanted:?}"), || {
        let mut photos = photos.clone();
        async move {
            let request = GetPhotoRequest {
                id: id.into(),
                ..GetPhotoRequest::default()
            };
            let photo = photos.get_photo(request).await.ok()?.into_inner().photo?;
            (state(&photo) == wanted).then_some(photo)
        }
    })
    .await
}

/// The job of photo `id`, from the admin listener.
pub async fn job(jobs: &mut JobsClient, id: &str) -> PhotoJob {
    jobs.get_photo_job(GetPhotoJobRequest { photo_id: id.into() })
        .await
        .unwrap_or_else(|status| panic!("get the job of {id}: {status:?}"))
        .into_inner()
        .job
        .unwrap_or_default()
}

/// Waits until the job of photo `id` is in `wanted` and `check` holds.
pub async fn job_in(jobs: &JobsClient, id: &str, wanted: PhotoJobState, check: impl Fn(&PhotoJob) -> bool) -> PhotoJob {
    eventually(&format!("the job of {id} to be {wanted:?}"), || {
        let mut jobs = jobs.clone();
        let check = &check;
        async move {
            let job = jobs
                .get_photo_job(GetPhotoJobRequest { photo_id: id.into() })
                .await
                .ok()?
                .into_inner()
                .job?;
            (job.state() == wanted && check(&job)).then_some(job)
        }
    })
    .await
}
