//! `lightbox watch`: streams a feed's changes as they happen. Once it has
//! connected, it reconnects by itself when the stream drops, resuming from
//! the last revision it saw, and says so on stderr; if the first connection
//! fails, it exits 7 at once (there is nothing to resume, and a person is
//! better told now that nothing is listening).

use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use lightbox_api::{
    contracts::{WatchContractsRequest, contracts_service_client::ContractsServiceClient},
    photos::{WatchPhotosRequest, photos_service_client::PhotosServiceClient},
    users::{WatchUsersRequest, users_service_client::UsersServiceClient},
    watch::WatchMessage,
};
use lightbox_changefeed::{
    Frame,
    feed::Entity,
    messages::{self, EntityOf},
};
use tonic::{Code, Status};

use super::{
    Common, Failure, Service,
    failure::Endpoint,
    output::{Json, Proto, emit},
};

/// `lightbox watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// What to watch.
    #[arg(value_enum)]
    pub feed: Service,
    /// Start after this revision (0: a snapshot of the current state first).
    #[arg(long, default_value_t = 0)]
    pub since: i64,
    /// Only these ids: `--id A B`, `--id A,B` or `--id A --id B`.
    #[arg(long = "id", value_name = "ID", num_args = 1.., value_delimiter = ',')]
    pub ids: Vec<String>,
    /// Where, and how to print (`--json`: one line per frame, the proto3
    /// JSON of the watch response, progress frames included).
    #[command(flatten)]
    pub common: Common,
}

/// Why a session ended: the stream's status, or stdout closed (the reader
/// went away: the watch is over).
enum Ended {
    Stream { connected: bool, status: Status },
    StdoutClosed,
}

/// Runs `lightbox watch …`: streams until interrupted.
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(args.feed, args.common.addr.as_deref(), "watch")?;
    // The table shows each entity in the same JSON as `--json` does.
    let json = Json::new()?;
    let as_json = args.common.json;
    let mut since = args.since;
    let mut backoff = Duration::from_millis(200);
    let mut ever_connected = false;
    loop {
        let ids = args.ids.clone();
        let channel = endpoint.channel();
        let ended = match args.feed {
            Service::Users => {
                let request = WatchUsersRequest {
                    since_revision: since,
                    user_ids: ids,
                };
                let call = async move { UsersServiceClient::new(channel).watch_users(request).await };
                session(call, args.feed, &mut since, &json, as_json).await?
            }
            Service::Contracts => {
                let request = WatchContractsRequest {
                    since_revision: since,
                    contract_ids: ids,
                    ..Default::default()
                };
                let call = async move { ContractsServiceClient::new(channel).watch_contracts(request).await };
                session(call, args.feed, &mut since, &json, as_json).await?
            }
            Service::Photos => {
                let request = WatchPhotosRequest {
                    since_revision: since,
                    photo_ids: ids,
                    ..Default::default()
                };
                let call = async move { PhotosServiceClient::new(channel).watch_photos(request).await };
                session(call, args.feed, &mut since, &json, as_json).await?
            }
        };
        let (connected, status) = match ended {
            Ended::StdoutClosed => return Ok(()),
            Ended::Stream { connected, status } => (connected, status),
        };
        ever_connected |= connected;
        if connected {
            backoff = Duration::from_millis(200);
        }
        // Nothing to resume yet (and a person is better told now), or a
        // request that will not get better by retrying.
        let hopeless = matches!(
            status.code(),
            Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::Unauthenticated
        );
        if !ever_connected || hopeless {
            return Err(endpoint.failed(status));
        }
        let why = endpoint.describe(&status, false);
        let ms = backoff.as_millis();
        match connected {
            true => eprintln!("stream ended ({why}); reconnecting from revision {since} in {ms} ms"),
            false => eprintln!("{why}; reconnecting from revision {since} in {ms} ms"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Opens a watch and prints it until it ends (each frame's JSON if
/// `as_json`, else in words); keeps `since` at the last revision fully
/// seen. Fails only if a frame cannot be written.
async fn session<R>(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<R>>, Status>>,
    feed: Service,
    since: &mut i64,
    json: &Json,
    as_json: bool,
) -> anyhow::Result<Ended>
where
    R: WatchMessage + Proto,
    EntityOf<R>: Proto,
{
    let mut stream = match call.await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return Ok(Ended::Stream {
                connected: false,
                status,
            });
        }
    };
    eprintln!("watching {feed} from revision {since}");
    // Inside a snapshot the changes carry their entities' own revisions,
    // not a position in the stream: resume only from a complete one.
    let mut in_snapshot = false;
    let ended = |status| Ended::Stream {
        connected: true,
        status,
    };
    while let Some(item) = stream.next().await {
        let response = match item {
            Ok(response) => response,
            Err(status) => return Ok(ended(status)),
        };
        let line = match as_json {
            true => Some(json.line(&response)?),
            false => None,
        };
        let frame = match messages::frame(response) {
            Ok(frame) => frame,
            Err(status) => return Ok(ended(status)),
        };
        let line = match line {
            Some(line) => Some(line),
            None => table_line(&frame, json)?,
        };
        if let Some(line) = line
            && !emit(&line)?
        {
            return Ok(Ended::StdoutClosed);
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
    Ok(ended(Status::unavailable("the server closed the stream")))
}

/// A frame in words, for a person; `None` for progress frames (the
/// stream's heartbeat).
fn table_line<T: Entity + Proto>(frame: &Frame<T>, json: &Json) -> Result<Option<String>, Failure> {
    Ok(Some(match frame {
        Frame::Change(change) => match &change.entity {
            Some(entity) => format!(
                "{:>8}  upsert  {}  {}",
                change.revision,
                change.entity_id,
                json.line(entity)?
            ),
            None => format!("{:>8}  delete  {}", change.revision, change.entity_id),
        },
        Frame::SnapshotBegin { revision } => format!("-- snapshot at revision {revision}"),
        Frame::SnapshotEnd { revision } => format!("-- snapshot complete at revision {revision}; live from here"),
        Frame::Reset { revision, reason } => format!("-- reset: {reason}; a snapshot at revision {revision} follows"),
        Frame::Progress { .. } => return Ok(None),
    }))
}
