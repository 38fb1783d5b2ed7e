//! Compiles `proto/` with protox (pure Rust: no system `protoc`), then
//! generates prost messages, tonic clients and servers, and pbjson serde
//! impls (the proto3 canonical JSON mapping) from one descriptor set, which
//! is also kept for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "lightbox/feed/v1/feed.proto",
    "lightbox/users/v1/users.proto",
    "lightbox/contracts/v1/contracts.proto",
    "lightbox/photos/v1/photos.proto",
    "lightbox/photos/v1/photo_jobs.proto",
    "lightbox/admin/v1/admin.proto",
    "lightbox/events/v1/subscriptions.proto",
];

/// The watch responses a server streams pre-encoded, and the Rust type it
/// streams for each.
const ENCODED_WATCHES: &[(&str, &str)] = &[
    (
        ".lightbox.users.v1.WatchUsersResponse",
        "crate::watch::Encoded<crate::users::WatchUsersResponse>",
    ),
    (
        ".lightbox.contracts.v1.WatchContractsResponse",
        "crate::watch::Encoded<crate::contracts::WatchContractsResponse>",
    ),
    (
        ".lightbox.photos.v1.WatchPhotosResponse",
        "crate::watch::Encoded<crate::photos::WatchPhotosResponse>",
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());

    // Encoded by protox itself, not through `prost_types`, which would drop
    // the `google.api.http` options (extensions) the gateway routes by; with
    // the source info, so comments reach reflection clients and OpenAPI.
    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(FILES)?;
    let bytes = compiler.encode_file_descriptor_set();
    fs::write(out.join("lightbox_descriptor.bin"), &bytes)?;
    let fds = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;

    // Messages and clients: the typed API every client keeps.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds.clone())?;

    // Servers, apart (into `server/`, over the messages above): a watch's
    // responses are served as `Encoded<…>`, so that a change encoded once
    // is written as the same bytes to every stream (see `src/watch.rs`).
    // On the wire they are the same messages.
    let servers = out.join("server");
    fs::create_dir_all(&servers)?;
    let mut config = tonic_prost_build::configure()
        .build_client(false)
        .build_transport(false)
        .compile_well_known_types(true)
        .out_dir(&servers)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.api", "crate::google::api")
        .extern_path(".lightbox", "crate::lightbox");
    for (response, encoded) in ENCODED_WATCHES {
        config = config.extern_path(*response, *encoded);
    }
    config.compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .build(&[".lightbox"])?;
    Ok(())
}
