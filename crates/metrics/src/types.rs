//! Which methods stream: the `grpc_type` label, read from descriptors.

use std::collections::HashMap;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prost::Message as _;

/// The kind of a gRPC method, as go-grpc-middleware labels it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GrpcType {
    /// One request, one response (`unary`). Also what a method missing
    /// from the [`GrpcTypes`] table is labelled.
    #[default]
    Unary,
    /// A stream of requests, one response (`client_stream`).
    ClientStream,
    /// One request, a stream of responses (`server_stream`).
    ServerStream,
    /// Streams both ways (`bidi_stream`).
    BidiStream,
}

impl GrpcType {
    /// The label value: `unary`, `client_stream`, `server_stream` or
    /// `bidi_stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcType::Unary => "unary",
            GrpcType::ClientStream => "client_stream",
            GrpcType::ServerStream => "server_stream",
            GrpcType::BidiStream => "bidi_stream",
        }
    }

    fn of(client_streaming: bool, server_streaming: bool) -> Self {
        match (client_streaming, server_streaming) {
            (false, false) => GrpcType::Unary,
            (true, false) => GrpcType::ClientStream,
            (false, true) => GrpcType::ServerStream,
            (true, true) => GrpcType::BidiStream,
        }
    }
}

impl EncodeLabelValue for GrpcType {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A descriptor set that did not decode.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode the file descriptor set")]
pub struct DescriptorSetError(#[from] prost::DecodeError);

/// Each method's [`GrpcType`] by its path (`/package.Service/Method`), as
/// the layers need it: a request's path does not say whether it streams.
#[derive(Debug, Clone, Default)]
pub struct GrpcTypes {
    methods: HashMap<String, GrpcType>,
}

impl GrpcTypes {
    /// The methods of every service in an encoded `FileDescriptorSet` (what
    /// reflection is given, e.g. `tonic_health::pb::FILE_DESCRIPTOR_SET`).
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, DescriptorSetError> {
        GrpcTypes::default().with_descriptor_set(bytes)
    }

    /// These methods and those of another descriptor set.
    pub fn with_descriptor_set(mut self, bytes: &[u8]) -> Result<Self, DescriptorSetError> {
        let set = prost_types::FileDescriptorSet::decode(bytes)?;
        for file in &set.file {
            for service in &file.service {
                let service_name = match file.package() {
                    "" => service.name().to_owned(),
                    package => format!("{package}.{}", service.name()),
                };
                for method in &service.method {
                    let path = format!("/{service_name}/{}", method.name());
                    let kind = GrpcType::of(method.client_streaming(), method.server_streaming());
                    self.methods.insert(path, kind);
                }
            }
        }
        Ok(self)
    }

    /// The type of the method at `path`; [`GrpcType::Unary`] if unknown.
    pub fn get(&self, path: &str) -> GrpcType {
        self.methods.get(path).copied().unwrap_or_default()
    }

    /// Every known method's path and type.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, GrpcType)> {
        self.methods.iter().map(|(path, kind)| (path.as_str(), *kind))
    }
}
