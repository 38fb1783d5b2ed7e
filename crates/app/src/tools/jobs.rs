//! `lightbox jobs`: the photo processing jobs, through the admin listener
//! of the process running photos (never its photos port): list them, show
//! one with every attempt's error, retry a discarded one, discard one.

use super::{
    Service, all_pages,
    failure::{AdminToken, Endpoint},
    output::{Json, Proto, emit, enum_word, print_table},
    parse_addr,
};
use clap::{Args, Subcommand, ValueEnum};
use lightbox_api::photos::{
    DiscardPhotoJobRequest, DiscardPhotoJobResponse, GetPhotoJobRequest, GetPhotoJobResponse, ListPhotoJobsRequest,
    ListPhotoJobsResponse, PhotoJob, PhotoJobState, RetryPhotoJobRequest, RetryPhotoJobResponse,
    photo_jobs_service_client::PhotoJobsServiceClient,
};

impl Proto for ListPhotoJobsResponse {
    const NAME: &'static str = "lightbox.photos.v1.ListPhotoJobsResponse";
}
impl Proto for GetPhotoJobResponse {
    const NAME: &'static str = "lightbox.photos.v1.GetPhotoJobResponse";
}
impl Proto for RetryPhotoJobResponse {
    const NAME: &'static str = "lightbox.photos.v1.RetryPhotoJobResponse";
}
impl Proto for DiscardPhotoJobResponse {
    const NAME: &'static str = "lightbox.photos.v1.DiscardPhotoJobResponse";
}

/// Arguments of `lightbox jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The admin listener of the process running photos, `HOST:PORT` or a
    /// URL (its --admin-addr; default: LIGHTBOX_ADMIN_ADDR, or
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
    command: JobsCommand,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Lists the jobs (oldest photo first), with their last error.
    List {
        /// Only the jobs in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
    },
    /// Shows a photo's job, with every failed attempt.
    Get {
        /// The photo's id.
        photo_id: String,
    },
    /// Queues a discarded job again, with a fresh allowance of attempts.
    Retry {
        /// The photo's id.
        photo_id: String,
    },
    /// Gives up on a queued or running job: its photo ends FAILED.
    Discard {
        /// The photo's id.
        photo_id: String,
        /// Why (the photo's failure reason).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// A job state on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Queued,
    Running,
    Done,
    Discarded,
}

impl From<StateArg> for PhotoJobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Queued => PhotoJobState::Queued,
            StateArg::Running => PhotoJobState::Running,
            StateArg::Done => PhotoJobState::Done,
            StateArg::Discarded => PhotoJobState::Discarded,
        }
    }
}

const HEADER: &[&str] = &["PHOTO", "USER", "STATE", "ATTEMPT", "LAST ERROR"];

fn row(job: &PhotoJob) -> Vec<String> {
    let state = PhotoJobState::try_from(job.state).ok().map(|s| s.as_str_name());
    let last = job.errors.last().map_or_else(String::new, |e| e.message.clone());
    vec![
        job.photo_id.clone(),
        job.user_id.clone(),
        enum_word(state, "PHOTO_JOB_STATE_"),
        format!("{}/{}", job.attempt, job.max_attempt),
        last,
    ]
}

/// One job as a table row, then each failed attempt on a line.
fn show<M: Proto>(json: Option<&Json>, response: &M, job: Option<&PhotoJob>) -> anyhow::Result<()> {
    if let Some(json) = json {
        return json.print(response);
    }
    let job = job.cloned().unwrap_or_default();
    print_table(HEADER, &[row(&job)])?;
    for error in &job.errors {
        let kind = if error.permanent { "permanent" } else { "transient" };
        emit(&format!("attempt {} ({kind}): {}", error.attempt, error.message))?;
    }
    Ok(())
}

/// Runs `lightbox jobs …`.
pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::admin(Service::Photos, args.addr.as_deref(), "jobs")?;
    let token = AdminToken::new(args.token.as_deref())?;
    let mut client = PhotoJobsServiceClient::with_interceptor(endpoint.channel(), token);
    let json = Json::if_asked(args.json)?;
    let json = json.as_ref();
    let failed = |status| endpoint.failed(status);
    match args.command {
        JobsCommand::List { state } => {
            let state = state.map_or(PhotoJobState::Unspecified, PhotoJobState::from) as i32;
            let jobs = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_photo_jobs(ListPhotoJobsRequest {
                            state,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.jobs, page.next_page_token))
                }
            })
            .await
            .map_err(failed)?;
            match json {
                Some(json) => json.print(&ListPhotoJobsResponse {
                    jobs,
                    next_page_token: String::new(),
                }),
                None => Ok(print_table(HEADER, &jobs.iter().map(row).collect::<Vec<_>>())?),
            }
        }
        JobsCommand::Get { photo_id } => {
            let answer = client
                .get_photo_job(GetPhotoJobRequest { photo_id })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.job.as_ref())
        }
        JobsCommand::Retry { photo_id } => {
            let answer = client
                .retry_photo_job(RetryPhotoJobRequest { photo_id })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.job.as_ref())
        }
        JobsCommand::Discard { photo_id, reason } => {
            let answer = client
                .discard_photo_job(DiscardPhotoJobRequest { photo_id, reason })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.job.as_ref())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_messages_are_described_under_their_names() {
        let pool = lightbox_gateway::descriptors().expect("the descriptors decode");
        for name in [
            ListPhotoJobsResponse::NAME,
            GetPhotoJobResponse::NAME,
            RetryPhotoJobResponse::NAME,
            DiscardPhotoJobResponse::NAME,
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name} is not described");
        }
    }
}
