//! `lightbox photos`: photo records over the photos service, and a user's
//! photos with the user, their contract and where each came from.

use std::{io::Read as _, path::PathBuf};

use clap::{Args, Subcommand};
use lightbox_api::photos::{
    Consistency, CreatePhotoRequest, DeletePhotoRequest, GetPhotoRequest, ListPhotosRequest, ListPhotosResponse, Photo,
    ProcessingState, photos_service_client::PhotosServiceClient,
};

use super::{
    Common, Failure, Kind, Service,
    failure::Endpoint,
    output::{Json, Proto, emit, enum_word, freshness_line, print_deleted, print_table},
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
    /// Records a photo of a user (within their contract's quota), with its
    /// image (`--image FILE`, processed after the answer) or only its size.
    Create {
        /// The owner's user id.
        #[arg(long)]
        user: String,
        /// Title.
        #[arg(long, default_value = "")]
        title: String,
        /// The image, a JPEG or a PNG of at most 10 MiB: sent with the
        /// record, which takes its size and (unless --content-type) its
        /// format from it.
        #[arg(long, value_name = "FILE", required_unless_present = "size")]
        image: Option<PathBuf>,
        /// Media type (default: the image's format, or image/jpeg).
        #[arg(long)]
        content_type: Option<String>,
        /// Size in bytes (default: the image's).
        #[arg(long, required_unless_present = "image")]
        size: Option<i64>,
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
const PHOTO_HEADER: &[&str] = &["ID", "USER", "TITLE", "TYPE", "BYTES", "REVISION", "PROCESSING"];

/// A photo as a table row; PROCESSING is `-` for a photo created without
/// an image.
fn photo_row(photo: &Photo) -> Vec<String> {
    vec![
        photo.id.clone(),
        photo.user_id.clone(),
        photo.title.clone(),
        photo.content_type.clone(),
        photo.size_bytes.to_string(),
        photo.revision.to_string(),
        processing_word(photo),
    ]
}

/// What became of a photo's image: `pending`, `done 640x480`, `failed:
/// why`, or `-` without one.
fn processing_word(photo: &Photo) -> String {
    let Some(processing) = &photo.processing else {
        return "-".to_owned();
    };
    let state = ProcessingState::try_from(processing.state).ok();
    let word = enum_word(state.map(|s| s.as_str_name()), "PROCESSING_STATE_");
    match state {
        Some(ProcessingState::Done) => format!("{word} {}x{}", processing.width, processing.height),
        Some(ProcessingState::Failed) if !processing.failure_reason.is_empty() => {
            format!("{word}: {}", processing.failure_reason)
        }
        _ => word,
    }
}

/// The largest image the photos service takes (its default limit), in
/// bytes: a larger file is refused before it is read.
fn max_image_bytes() -> u64 {
    u64::try_from(lightbox_photos::ImageLimits::default().max_bytes).unwrap_or(u64::MAX)
}

/// The image at `path`, read whole once its size is known to fit; a
/// failure naming the file.
fn read_image(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let unreadable = |err: std::io::Error| {
        Failure::new(
            Kind::Usage,
            format!("--image {}: cannot read it: {err}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let max = max_image_bytes();
    let too_large = |size: u64| {
        Failure::new(
            Kind::Invalid,
            format!(
                "--image {}: {size} bytes, more than the {max} bytes ({} MiB) the photos service takes; nothing was sent",
                path.display(),
                max / (1024 * 1024)
            ),
        )
    };
    let size = file.metadata().map_err(unreadable)?.len();
    if size > max {
        return Err(too_large(size));
    }
    // Read at most one byte past the cap: a file that grew since is
    // refused too, without reading all of it.
    let mut image = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut image).map_err(unreadable)?;
    let read = u64::try_from(image.len()).unwrap_or(u64::MAX);
    if read > max {
        return Err(too_large(read));
    }
    if image.is_empty() {
        return Err(Failure::new(
            Kind::Invalid,
            format!("--image {}: the file is empty; nothing was sent", path.display()),
        ));
    }
    Ok(image)
}

/// An image's media type from its first bytes (JPEG `FF D8 FF`, PNG
/// `89 50 4E 47`): the two formats the photos service takes.
fn sniff(image: &[u8]) -> Option<&'static str> {
    match image {
        [0xFF, 0xD8, 0xFF, ..] => Some("image/jpeg"),
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        _ => None,
    }
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
            image,
            content_type,
            size,
        } => {
            let image = match &image {
                Some(path) => {
                    let bytes = read_image(path)?;
                    // With --content-type, the photos service checks it
                    // against the bytes itself.
                    let format = match (&content_type, sniff(&bytes)) {
                        (Some(given), _) => given.clone(),
                        (None, Some(format)) => format.to_owned(),
                        (None, None) => {
                            return Err(Failure::new(
                                Kind::Invalid,
                                format!(
                                    "--image {}: neither a JPEG nor a PNG (by its first bytes), the formats \
                                     the photos service takes; nothing was sent",
                                    path.display()
                                ),
                            )
                            .into());
                        }
                    };
                    Some((bytes, format))
                }
                None => None,
            };
            let (size, content_type, image) = match image {
                Some((bytes, format)) => {
                    // A --size that disagrees with the file is refused by
                    // the service, saying both.
                    let size = size.unwrap_or_else(|| i64::try_from(bytes.len()).unwrap_or(i64::MAX));
                    (size, format, Some(bytes))
                }
                None => (
                    size.unwrap_or_default(),
                    content_type.unwrap_or_else(|| "image/jpeg".to_owned()),
                    None,
                ),
            };
            let photo = Photo {
                user_id: user,
                title,
                content_type,
                size_bytes: size,
                image,
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

#[cfg(test)]
mod tests {
    use lightbox_api::photos::Processing;

    use super::*;

    #[test]
    fn the_format_comes_from_the_first_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0]), Some("image/jpeg"));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), Some("image/png"));
        assert_eq!(sniff(b"GIF89a"), None);
        assert_eq!(sniff(&[0xFF, 0xD8]), None);
    }

    #[test]
    fn a_file_past_the_cap_is_refused_before_it_is_read_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("lightbox-photos-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        // Sparse: as large as it says, without writing the bytes.
        let large = dir.join("large.jpg");
        let file = std::fs::File::create(&large).expect("a file");
        file.set_len(max_image_bytes() + 1).expect("a length");
        let refused = read_image(&large).expect_err("past the cap");
        assert_eq!(refused.kind, Kind::Invalid);
        let said = refused.to_string();
        assert!(said.contains("large.jpg") && said.contains("10 MiB"), "{said}");

        let missing = read_image(&dir.join("missing.jpg")).expect_err("no such file");
        assert_eq!(missing.kind, Kind::Usage);
        assert!(missing.to_string().contains("missing.jpg"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_row_says_what_became_of_the_image() {
        let mut photo = Photo::default();
        assert_eq!(processing_word(&photo), "-");
        photo.processing = Some(Processing {
            state: ProcessingState::Done as i32,
            width: 640,
            height: 480,
            ..Processing::default()
        });
        assert_eq!(processing_word(&photo), "done 640x480");
        photo.processing = Some(Processing {
            state: ProcessingState::Failed as i32,
            failure_reason: "truncated".into(),
            ..Processing::default()
        });
        assert_eq!(processing_word(&photo), "failed: truncated");
    }
}
