//! `lightbox photos`: photo records over the photos service, and a user's
//! photos with the user, their contract and where each came from.

use clap::{Args, Subcommand};
use lightbox_api::photos::{
    Consistency, CreatePhotoRequest, DeletePhotoRequest, GetPhotoRequest, ListPhotosRequest, ListPhotosResponse, Photo,
    photos_service_client::PhotosServiceClient,
};

use super::{
    Common, Service,
    failure::Endpoint,
    output::{Json, Proto, emit, freshness_line, print_deleted, print_table},
};

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

/// The columns of a photos table.
const PHOTO_HEADER: &[&str] = &["ID", "USER", "TITLE", "TYPE", "BYTES", "REVISION"];

/// A photo as a table row.
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

/// Prints one photo: the response as JSON, or a one-row table.
fn show<M: Proto>(json: Option<&Json>, response: &M, photo: Option<&Photo>) -> anyhow::Result<()> {
    match json {
        Some(json) => json.print(response),
        None => Ok(print_table(
            PHOTO_HEADER,
            &[photo_row(&photo.cloned().unwrap_or_default())],
        )?),
    }
}

/// Runs `lightbox photos …`.
pub async fn run(args: PhotosArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(Service::Photos, args.common.addr.as_deref(), "photos")?;
    let mut client = PhotosServiceClient::new(endpoint.channel());
    let json = Json::if_asked(args.common.json)?;
    let json = json.as_ref();
    let failed = |status| endpoint.failed(status);
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
                .map_err(failed)?
                .into_inner();
            show(json, &created, created.photo.as_ref())
        }
        PhotosCommand::Get { id } => {
            let answer = client
                .get_photo(GetPhotoRequest {
                    id,
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner();
            show(json, &answer, answer.photo.as_ref())
        }
        PhotosCommand::List { user, fresh } => {
            let consistency = if fresh { Consistency::Fresh } else { Consistency::Cached };
            let mut request = ListPhotosRequest {
                user_id: user,
                page_size: 1000,
                consistency: consistency as i32,
                ..ListPhotosRequest::default()
            };
            // Every page as one answer: the first page's owner, contract and
            // freshness, with every page's photos.
            let mut all: Option<ListPhotosResponse> = None;
            loop {
                let page = client.list_photos(request.clone()).await.map_err(failed)?.into_inner();
                let next = page.next_page_token.clone();
                match &mut all {
                    Some(all) => all.photos.extend(page.photos),
                    None => all = Some(page),
                }
                if next.is_empty() {
                    break;
                }
                request.page_token = next;
            }
            let mut all = all.unwrap_or_default();
            all.next_page_token.clear();
            if let Some(json) = json {
                return json.print(&all);
            }
            print_table(PHOTO_HEADER, &all.photos.iter().map(photo_row).collect::<Vec<_>>())?;
            emit("")?;
            if let Some(user) = &all.user {
                emit(&format!("owner: {} <{}>", user.display_name, user.email))?;
            }
            emit(&freshness_line("user", all.user_freshness.as_ref()))?;
            emit(&freshness_line("contract", all.contract_freshness.as_ref()))?;
            Ok(())
        }
        PhotosCommand::Delete { id } => {
            let deleted = client
                .delete_photo(DeletePhotoRequest {
                    id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner();
            print_deleted(json, "photo", &id, &deleted, deleted.revision)
        }
    }
}
