//! The messages of etcd's `etcdserverpb` (api/etcdserverpb/rpc.proto) and
//! `mvccpb` (api/mvccpb/kv.proto) that the bench uses, with etcd's field
//! numbers, and the calls made with them; fields the bench never sets or
//! reads are left out (protobuf skips them). Written by hand: the bench
//! needs a few messages of etcd's API, not all of it, and no protoc.

use tokio_stream::StreamExt;
use tonic::{Request, Status, codec::Streaming, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;

/// Every answer's header.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The cluster that answered.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// The member that answered.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// The store's revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// The raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// A key and its value (`mvccpb.KeyValue`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The revision of its last creation.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// The revision of its last modification.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Modifications since its creation.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Its lease, 0 for none.
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `KV/Range`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    /// The first key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The end of the range, empty for `key` alone.
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// At most this many keys, 0 for all.
    #[prost(int64, tag = "3")]
    pub limit: i64,
    /// At this revision, 0 for the newest.
    #[prost(int64, tag = "4")]
    pub revision: i64,
    /// Member-local, without a round of consensus.
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

/// `KV/Range`'s answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    /// The header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The keys found.
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    /// Whether there are more.
    #[prost(bool, tag = "3")]
    pub more: bool,
    /// The keys in the range.
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `KV/Put`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// A lease, 0 for none.
    #[prost(int64, tag = "3")]
    pub lease: i64,
    /// Whether to answer the previous value.
    #[prost(bool, tag = "4")]
    pub prev_kv: bool,
}

/// `KV/Put`'s answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// The header: the write's revision.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// What a client sends on a `Watch` stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    /// Create, cancel, or ask for progress.
    #[prost(oneof = "watch_request::RequestUnion", tags = "1, 2, 3")]
    pub request_union: Option<watch_request::RequestUnion>,
}

/// [`WatchRequest`]'s one of (the variants are named freely: the wire
/// knows them by tag).
pub mod watch_request {
    /// Create, cancel, or ask for progress.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum RequestUnion {
        /// A new watch.
        #[prost(message, tag = "1")]
        Create(super::WatchCreateRequest),
        /// The end of a watch.
        #[prost(message, tag = "2")]
        Cancel(super::WatchCancelRequest),
        /// A progress report, now.
        #[prost(message, tag = "3")]
        Progress(super::WatchProgressRequest),
    }
}

/// A new watch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreateRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The end of the range, empty for `key` alone.
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// From this revision on (inclusive), 0 for now.
    #[prost(int64, tag = "3")]
    pub start_revision: i64,
    /// Periodic empty answers when idle.
    #[prost(bool, tag = "4")]
    pub progress_notify: bool,
    /// Event kinds left out.
    #[prost(enumeration = "FilterType", repeated, tag = "5")]
    pub filters: Vec<i32>,
    /// Whether events carry the previous value.
    #[prost(bool, tag = "6")]
    pub prev_kv: bool,
    /// An id chosen by the client, 0 for the server's.
    #[prost(int64, tag = "7")]
    pub watch_id: i64,
    /// Whether large revisions may be split over answers.
    #[prost(bool, tag = "8")]
    pub fragment: bool,
}

/// Event kinds a watch may leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FilterType {
    /// Leave out puts.
    Noput = 0,
    /// Leave out deletes.
    Nodelete = 1,
}

/// The end of a watch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCancelRequest {
    /// The watch.
    #[prost(int64, tag = "1")]
    pub watch_id: i64,
}

/// A progress report, now.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchProgressRequest {}

/// What the server sends on a `Watch` stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    /// The header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The watch it is for.
    #[prost(int64, tag = "2")]
    pub watch_id: i64,
    /// The watch was created: events from now on reach it.
    #[prost(bool, tag = "3")]
    pub created: bool,
    /// The watch was canceled: nothing more comes.
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    /// The oldest revision left, when the watch started before it.
    #[prost(int64, tag = "5")]
    pub compact_revision: i64,
    /// Why it was canceled.
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    /// More of the same revision follows.
    #[prost(bool, tag = "7")]
    pub fragment: bool,
    /// The changes.
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

/// One change (`mvccpb.Event`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Put or delete.
    #[prost(enumeration = "EventType", tag = "1")]
    pub r#type: i32,
    /// The key and its new value.
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
    /// The previous value, when asked for.
    #[prost(message, optional, tag = "3")]
    pub prev_kv: Option<KeyValue>,
}

/// [`Event`]'s kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EventType {
    /// A value was stored.
    Put = 0,
    /// The key was deleted.
    Delete = 1,
}

/// A unary call to etcd on `channel`.
async fn call<Req, Resp>(channel: Channel, path: &'static str, request: Req) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
    let codec = ProstCodec::<Req, Resp>::default();
    Ok(grpc
        .unary(Request::new(request), PathAndQuery::from_static(path), codec)
        .await?
        .into_inner())
}

/// `KV/Range` of `key` alone.
pub(super) async fn range(channel: Channel, key: &[u8], serializable: bool) -> Result<RangeResponse, Status> {
    let request = RangeRequest {
        key: key.to_vec(),
        serializable,
        ..RangeRequest::default()
    };
    call(channel, "/etcdserverpb.KV/Range", request).await
}

/// `KV/Put` of `key`, answered once etcd has committed it.
pub(super) async fn put(channel: Channel, key: &[u8], value: Vec<u8>) -> Result<PutResponse, Status> {
    let request = PutRequest {
        key: key.to_vec(),
        value,
        ..PutRequest::default()
    };
    call(channel, "/etcdserverpb.KV/Put", request).await
}

/// A `Watch` stream on `channel` with one watch of `key` from now on; the
/// request half stays open (closing it would end the stream).
pub(super) async fn watch(channel: Channel, key: &[u8]) -> Result<Streaming<WatchResponse>, Status> {
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::Create(WatchCreateRequest {
            key: key.to_vec(),
            ..WatchCreateRequest::default()
        })),
    };
    let requests = tokio_stream::once(create).chain(tokio_stream::pending());
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
    let codec = ProstCodec::<WatchRequest, WatchResponse>::default();
    Ok(grpc
        .streaming(
            Request::new(requests),
            PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
            codec,
        )
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn messages_use_etcds_field_numbers() {
        // Field 1 (key, bytes) then field 7 (serializable, varint).
        let range = RangeRequest {
            key: b"k".to_vec(),
            serializable: true,
            ..RangeRequest::default()
        };
        assert_eq!(range.encode_to_vec(), [0x0a, 1, b'k', 0x38, 1]);
        // Field 1 (create_request) holding field 1 (key) and field 3 (start_revision).
        let watch = WatchRequest {
            request_union: Some(watch_request::RequestUnion::Create(WatchCreateRequest {
                key: b"k".to_vec(),
                start_revision: 5,
                ..WatchCreateRequest::default()
            })),
        };
        assert_eq!(watch.encode_to_vec(), [0x0a, 5, 0x0a, 1, b'k', 0x18, 5]);
        // created (3), then events (11) holding type DELETE (1) and kv (2) with value (5).
        let bytes = [0x18, 1, 0x5a, 6, 0x08, 1, 0x12, 2, 0x2a, 0];
        let answer = WatchResponse::decode(&bytes[..]).map_err(|e| e.to_string());
        assert_eq!(
            answer.map(|a| (a.created, a.events.first().map(|e| (e.r#type, e.kv.is_some())))),
            Ok((true, Some((EventType::Delete as i32, true))))
        );
    }
}
