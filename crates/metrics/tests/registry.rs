//! The registry, scrape-time gauges and the method table, without a server.

mod common;

use common::sample;
use lightbox_metrics::{
    CONTENT_TYPE, GaugeFn, GrpcType, GrpcTypes, Metrics,
    prometheus_client::{
        encoding::EncodeLabelSet,
        metrics::{counter::Counter, family::Family},
    },
};

#[test]
fn the_sample_helper_reads_names_and_labels() {
    let text = "# TYPE x counter\n\
                x_total{a=\"1\",b=\"q\\\"uote, comma\"} 2\n\
                x_total{a=\"2\",b=\"z\"} 3\n\
                y 4.5\n\
                # EOF\n";
    assert_eq!(sample(text, "x_total", &[("a", "1")]), 2.0);
    assert_eq!(sample(text, "x_total", &[("b", "q\"uote, comma")]), 2.0);
    assert_eq!(sample(text, "x_total", &[]), 5.0);
    assert_eq!(sample(text, "y", &[]), 4.5);
    assert_eq!(sample(text, "x_total", &[("a", "3")]), 0.0);
    assert_eq!(sample(text, "x", &[]), 0.0);
}

#[test]
fn encodes_openmetrics_text() {
    let metrics = Metrics::new();
    let counter = Counter::<u64>::default();
    metrics.register("lightbox_things", "Things done", counter.clone());
    counter.inc_by(3);

    // Clones share the registry.
    let text = metrics.clone().encode();
    assert_eq!(sample(&text, "lightbox_things_total", &[]), 3.0);
    assert!(text.contains("# HELP lightbox_things Things done.\n"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CopyLabels {
    copy: String,
}

#[test]
fn registers_families_and_scrape_time_gauges() {
    let metrics = Metrics::new();
    let applied = Family::<CopyLabels, Counter>::default();
    metrics
        .registry_mut()
        .register("lightbox_copy_applied", "Changes applied", applied.clone());
    applied.get_or_create(&CopyLabels { copy: "users".into() }).inc();

    // The gauge reads state at each scrape.
    let age = std::sync::Arc::new(std::sync::Mutex::new(1.5));
    let read = age.clone();
    metrics.register_collector(GaugeFn::new(
        "lightbox_copy_age_seconds",
        "Age of each copy",
        move || {
            let age = *read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            vec![
                (CopyLabels { copy: "users".into() }, age),
                (CopyLabels { copy: "photos".into() }, 0.25),
            ]
        },
    ));

    let text = metrics.encode();
    assert_eq!(sample(&text, "lightbox_copy_applied_total", &[("copy", "users")]), 1.0);
    assert_eq!(sample(&text, "lightbox_copy_age_seconds", &[("copy", "users")]), 1.5);
    assert_eq!(sample(&text, "lightbox_copy_age_seconds", &[("copy", "photos")]), 0.25);
    assert!(text.contains("# TYPE lightbox_copy_age_seconds gauge\n"), "{text}");
    assert!(
        text.contains("# HELP lightbox_copy_age_seconds Age of each copy.\n"),
        "{text}"
    );

    *age.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = 7.0;
    assert_eq!(
        sample(&metrics.encode(), "lightbox_copy_age_seconds", &[("copy", "users")]),
        7.0
    );
}

#[test]
fn method_types_come_from_the_descriptor_set() -> Result<(), Box<dyn std::error::Error>> {
    let types = GrpcTypes::from_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
    assert_eq!(types.get("/grpc.health.v1.Health/Check"), GrpcType::Unary);
    assert_eq!(types.get("/grpc.health.v1.Health/Watch"), GrpcType::ServerStream);
    assert_eq!(types.get("/no.Such/Method"), GrpcType::Unary);
    assert_eq!(GrpcType::ClientStream.as_str(), "client_stream");
    assert_eq!(GrpcType::BidiStream.as_str(), "bidi_stream");

    // A second set adds to the first.
    let types = types.with_descriptor_set(&[])?;
    assert_eq!(types.get("/grpc.health.v1.Health/Watch"), GrpcType::ServerStream);

    assert!(GrpcTypes::from_descriptor_set(b"\xff\xff\xff").is_err());
    Ok(())
}

#[test]
fn method_types_cover_every_kind_and_packageless_services() -> Result<(), Box<dyn std::error::Error>> {
    use prost::Message as _;
    use prost_types::{FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto};

    let method = |name: &str, client: bool, server: bool| MethodDescriptorProto {
        name: Some(name.to_owned()),
        client_streaming: Some(client),
        server_streaming: Some(server),
        ..Default::default()
    };
    let set = FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("bare.proto".to_owned()),
            service: vec![ServiceDescriptorProto {
                name: Some("Bare".to_owned()),
                method: vec![
                    method("One", false, false),
                    method("Upload", true, false),
                    method("Follow", false, true),
                    method("Chat", true, true),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let types = GrpcTypes::from_descriptor_set(&set.encode_to_vec())?;
    assert_eq!(types.get("/Bare/One"), GrpcType::Unary);
    assert_eq!(types.get("/Bare/Upload"), GrpcType::ClientStream);
    assert_eq!(types.get("/Bare/Follow"), GrpcType::ServerStream);
    assert_eq!(types.get("/Bare/Chat"), GrpcType::BidiStream);
    Ok(())
}
