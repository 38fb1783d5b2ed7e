//! A request of the route table, served as one unary gRPC call: the steps
//! 1 to 7 of the crate docs, each a function below, in order.

use std::time::Duration;

use axum::{
    Json,
    body::Bytes,
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use prost_reflect::DynamicMessage;
use tokio::sync::SemaphorePermit;
use tonic::{Code, metadata::MetadataValue};

use crate::{
    Gateway, HttpError, authorize,
    body::{self, BodyError},
    codec, json, metrics, ready,
    routes::{Bindings, Route},
    transcode,
};

/// The message a method answers to send raw bytes instead of JSON (an
/// image), as grpc-gateway and Envoy's transcoder serve it.
pub(crate) const HTTP_BODY: &str = "google.api.HttpBody";

/// Every route of the table: authenticate, match, authorize, transcode,
/// call.
pub(crate) async fn dispatch(State(gateway): State<std::sync::Arc<Gateway>>, request: Request) -> Response {
    // A request refused before its body was read (unauthenticated, too
    // large, …) leaves that body on the connection: the answer closes it,
    // so a client does not send its next request on a connection the
    // server is about to drop.
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0");
    let mut route = None;
    let mut response = match serve_route(&gateway, request, &mut route).await {
        Ok(response) => response,
        Err(error) => {
            // Logged once, by `HttpError::into_response`.
            let mut response = error.into_response();
            if has_body {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    if let Some(route) = route {
        response.extensions_mut().insert(metrics::RouteLabel(route));
    }
    response
}

/// Serves a request of the route table; `matched` is set to the route's
/// template once one matches (for the metrics, even if it then fails).
async fn serve_route(gateway: &Gateway, request: Request, matched: &mut Option<String>) -> Result<Response, HttpError> {
    let _permit = gateway.requests.try_acquire().map_err(|_| {
        busy(format!(
            "the gateway is serving its limit of {} requests; retry later",
            gateway.options.max_concurrent_requests
        ))
    })?;
    let (parts, body) = request.into_parts();
    if !parts.uri.path().starts_with("/v1/") {
        return Err(not_found(&parts));
    }
    let subject = gateway.options.auth.authenticate(&parts.headers)?;
    let (route, mut bound) = find_route(gateway, &parts)?;
    *matched = Some(route.template.clone());
    for (field, value) in &mut bound {
        if **field == route.owner {
            *value = authorize(&subject, value)?;
        }
    }
    let (body, _upload) = read_body(gateway, route, &parts.headers, body).await?;
    let message = transcode::request_message(route, &bound, parts.uri.query(), &body)?;
    let answer = call(gateway, route, message, &parts.headers).await?;
    respond(route, answer)
}

/// The route matching the request's verb and path: 404 if none has the
/// path, 405 with `Allow` if none has it with this verb.
fn find_route<'g>(gateway: &'g Gateway, parts: &Parts) -> Result<(&'g Route, Bindings<'g>), HttpError> {
    let segments: Vec<&str> = parts.uri.path().trim_start_matches('/').split('/').collect();
    let mut allowed = Vec::new();
    for route in &gateway.routes {
        if let Some(bound) = route.matches(&segments) {
            if route.verb == parts.method {
                return Ok((route, bound));
            }
            allowed.push(route.verb.as_str());
        }
    }
    if allowed.is_empty() {
        return Err(not_found(parts));
    }
    let allow = HeaderValue::from_str(&allowed.join(", ")).unwrap_or(HeaderValue::from_static(""));
    Err(
        HttpError::new(Code::Unimplemented, format!("{} is not allowed here", parts.method))
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
            .with_header(header::ALLOW, allow),
    )
}

/// The request body, read within the route's size limit (413 past it) and
/// at a minimum rate (408 below it, see [`body`]), and checked to be JSON (415); for
/// an upload route, with the upload slot it holds while in memory (503 when
/// every slot is taken).
async fn read_body<'g>(
    gateway: &'g Gateway,
    route: &Route,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(Bytes, Option<SemaphorePermit<'g>>), HttpError> {
    let (limit, upload) = match route.uploads {
        false => (gateway.options.max_body_bytes, None),
        true => {
            let permit = gateway.uploads.try_acquire().map_err(|_| {
                busy(format!(
                    "the gateway is reading its limit of {} uploads; retry later",
                    gateway.options.max_concurrent_uploads
                ))
            })?;
            (gateway.options.max_upload_bytes, Some(permit))
        }
    };
    // A client trickling its body would hold its slots (the request's, an
    // upload's) for as long as it likes: it must start within the request's
    // deadline, and keep up a minimum rate after.
    let timeout = gateway.options.request_timeout;
    let body = body::read(body, limit, timeout).await.map_err(|err| match err {
        BodyError::TooLarge => HttpError::invalid(format!(
            "the request body is larger than the {limit} bytes accepted for {} {}",
            route.verb, route.template
        ))
        .with_status(StatusCode::PAYLOAD_TOO_LARGE),
        BodyError::TooSlow => HttpError::new(
            Code::DeadlineExceeded,
            format!(
                "the request body did not start within {timeout:?}, or then came slower than {} KiB/s; send it at once",
                body::MIN_RATE / 1024.0
            ),
        )
        .with_status(StatusCode::REQUEST_TIMEOUT),
        BodyError::BrokeOff => HttpError::invalid("the request body broke off before its end"),
    })?;
    if !body.is_empty() && !is_json(headers) {
        return Err(
            HttpError::invalid("the request body must be JSON (Content-Type: application/json)")
                .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE),
        );
    }
    Ok((body, upload))
}

/// Calls the route's method with the gateway's deadline (504 past it),
/// passing the request id and trace context on.
async fn call(
    gateway: &Gateway,
    route: &Route,
    message: DynamicMessage,
    headers: &HeaderMap,
) -> Result<DynamicMessage, HttpError> {
    let channel = gateway
        .channel(&route.method)
        .ok_or_else(|| HttpError::new(Code::Internal, "the route has no upstream"))?;
    let timeout = gateway.options.request_timeout;
    let mut call = tonic::Request::new(message);
    call.set_timeout(timeout);
    forward_context(headers, call.metadata_mut());
    let codec = codec::DynamicCodec::new(route.method.output());
    let answer = tokio::time::timeout(timeout, async {
        let mut grpc = ready(channel, route.method.parent_service().name()).await?;
        grpc.unary(call, route.grpc_path.clone(), codec).await
    })
    .await
    .map_err(|_| deadline_exceeded(timeout))?
    .map_err(|status| match status.code() {
        // tonic's servers answer an expired `grpc-timeout` with CANCELLED
        // ("Timeout expired") where gRPC says DEADLINE_EXCEEDED; the
        // gateway cancels nothing else, so this is its deadline: 504.
        Code::Cancelled => deadline_exceeded(timeout),
        _ => HttpError::from(status),
    })?;
    Ok(answer.into_inner())
}

/// The answer (or its `response_body` field) in the proto3 JSON mapping,
/// or as raw bytes for a `google.api.HttpBody`.
fn respond(route: &Route, answer: DynamicMessage) -> Result<Response, HttpError> {
    let answer = match &route.response_body {
        Some(field) => match answer.get_field(field).as_message() {
            Some(part) => part.clone(),
            None => {
                return Err(HttpError::new(
                    Code::Internal,
                    "the response body field is not a message",
                ));
            }
        },
        None => answer,
    };
    if prost_reflect::ReflectMessage::descriptor(&answer).full_name() == HTTP_BODY {
        return Ok(raw_body(&answer));
    }
    let json = json::to_json(&answer).map_err(|e| HttpError::new(Code::Internal, e))?;
    Ok(Json(json).into_response())
}

/// A `google.api.HttpBody` answer: its `data` as the body, with its
/// `content_type` (`application/octet-stream` if unset or not a valid
/// header value).
fn raw_body(answer: &DynamicMessage) -> Response {
    let content_type = answer
        .get_field_by_name("content_type")
        .and_then(|v| v.as_str().and_then(|t| HeaderValue::from_str(t).ok()))
        .filter(|t| !t.is_empty())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let data = answer
        .get_field_by_name("data")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, content_type)], data).into_response()
}

fn not_found(parts: &Parts) -> HttpError {
    HttpError::new(
        Code::NotFound,
        format!("no route for {} {}", parts.method, parts.uri.path()),
    )
}

/// 503 with `Retry-After`: a limit of the gateway is reached.
fn busy(message: String) -> HttpError {
    HttpError::new(Code::Unavailable, message).with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

fn deadline_exceeded(timeout: Duration) -> HttpError {
    HttpError::new(Code::DeadlineExceeded, format!("no answer within {timeout:?}"))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_none_or(|media| {
            let media = media.trim();
            media.eq_ignore_ascii_case("application/json") || media.to_ascii_lowercase().ends_with("+json")
        })
}

/// Passes the request id and the W3C trace context on to the gRPC call,
/// starting a trace if the client did not.
fn forward_context(headers: &HeaderMap, metadata: &mut tonic::metadata::MetadataMap) {
    for name in ["x-request-id", "traceparent", "tracestate"] {
        if let Some(value) = headers
            .get(name)
            .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
        {
            metadata.insert(name, value);
        }
    }
    if !metadata.contains_key("traceparent") {
        let trace = uuid::Uuid::new_v4().simple().to_string();
        let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
        if let Ok(value) = MetadataValue::try_from(format!("00-{trace}-{span}-01")) {
            metadata.insert("traceparent", value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_body_answer_is_its_bytes_with_its_content_type() {
        let pool = crate::descriptors().expect("descriptors");
        let desc = pool.get_message_by_name(HTTP_BODY).expect("HttpBody is described");
        let mut body = DynamicMessage::new(desc);
        body.set_field_by_name("content_type", prost_reflect::Value::String("image/jpeg".into()));
        body.set_field_by_name(
            "data",
            prost_reflect::Value::Bytes(prost::bytes::Bytes::from_static(b"\xff\xd8\xff")),
        );
        let response = raw_body(&body);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "image/jpeg");
        body.clear_field_by_name("content_type");
        let response = raw_body(&body);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/octet-stream");
    }

    #[test]
    fn the_trace_context_is_passed_on_or_started() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("r-1"));
        let mut metadata = tonic::metadata::MetadataMap::new();
        forward_context(&headers, &mut metadata);
        assert_eq!(metadata.get("x-request-id").and_then(|v| v.to_str().ok()), Some("r-1"));
        let started = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .expect("a trace is started");
        assert_eq!(started.len(), 55, "{started}");
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let mut metadata = tonic::metadata::MetadataMap::new();
        forward_context(&headers, &mut metadata);
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
