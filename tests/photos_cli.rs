//! `lightbox photos create --image FILE` against `lightbox dev`: the image
//! goes with the record, its size and format taken from the file, and the
//! photo's processing ends DONE (shown by `photos get`); a file that is no
//! image, or missing, is refused before anything is sent, naming it.

#[path = "support/dev.rs"]
mod dev;
#[path = "support/images.rs"]
mod images;

use dev::{start_dev, tool};
use lightbox_testkit::eventually;

const ADA: &str = "00000000-0000-7000-8000-000000000001";

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|err| panic!("{err}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_uploaded_from_a_file_is_processed() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let photos = dev.photos.to_string();

    let jpeg = images::jpeg(64, 48);
    let file = dir.path().join("harbour.photo");
    std::fs::write(&file, &jpeg).unwrap_or_else(|err| panic!("{err}"));
    let path = file.to_string_lossy().into_owned();
    let (code, out, err) = tool(&[
        "photos", "create", "--user", ADA, "--title", "Harbour", "--image", &path, "--json", "--addr", &photos,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let created = json(&out);
    let photo = &created["photo"];
    assert_eq!(photo["sizeBytes"], jpeg.len().to_string(), "the file's size: {out}");
    assert_eq!(
        photo["contentType"], "image/jpeg",
        "by its first bytes, not its name: {out}"
    );
    let id = photo["id"].as_str().unwrap_or_default().to_owned();

    let done = eventually("the photo's processing to end DONE", || {
        let (id, photos) = (id.clone(), photos.clone());
        async move {
            let (code, out, _) = tool(&["photos", "get", &id, "--json", "--addr", &photos]).await;
            let got = (code == Some(0)).then(|| json(&out))?;
            (got["photo"]["processing"]["state"] == "PROCESSING_STATE_DONE").then_some(got)
        }
    })
    .await;
    let processing = &done["photo"]["processing"];
    assert_eq!(
        (processing["width"].as_i64(), processing["height"].as_i64()),
        (Some(64), Some(48)),
        "{done}"
    );
    let (code, out, err) = tool(&["photos", "get", &id, "--addr", &photos]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ID") && out.contains("PROCESSING"), "{out}");
    assert!(out.contains("done 64x48"), "the table shows the processing: {out}");

    // A PNG's type is taken from it too; a photo without an image shows
    // no processing.
    let png = dir.path().join("dusk.png");
    std::fs::write(&png, images::png(8, 8)).unwrap_or_else(|err| panic!("{err}"));
    let png = png.to_string_lossy().into_owned();
    let (code, out, err) = tool(&[
        "photos", "create", "--user", ADA, "--image", &png, "--json", "--addr", &photos,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(json(&out)["photo"]["contentType"], "image/png", "{out}");
    let (code, out, err) = tool(&["photos", "create", "--user", ADA, "--size", "10", "--addr", &photos]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines().nth(1).is_some_and(|row| row.trim_end().ends_with('-')),
        "{out}"
    );

    // Refused before anything is sent, naming the file: no image (4), no
    // file (2), neither --image nor --size (2, clap's).
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not an image").unwrap_or_else(|err| panic!("{err}"));
    let text = text.to_string_lossy().into_owned();
    let (code, _, err) = tool(&["photos", "create", "--user", ADA, "--image", &text, "--addr", &photos]).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains(&text) && err.contains("neither a JPEG nor a PNG"), "{err}");
    let missing = dir.path().join("missing.jpg").to_string_lossy().into_owned();
    let (code, _, err) = tool(&[
        "photos", "create", "--user", ADA, "--image", &missing, "--addr", &photos,
    ])
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&missing) && err.contains("cannot read it"), "{err}");
    let (code, _, err) = tool(&["photos", "create", "--user", ADA, "--addr", &photos]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--image") && err.contains("--size"), "{err}");
    // A --size that disagrees with the file: the service says both (4).
    let (code, _, err) = tool(&[
        "photos", "create", "--user", ADA, "--image", &path, "--size", "1", "--addr", &photos,
    ])
    .await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("size_bytes"), "{err}");
    assert!(dev.terminate().await.success());
}
