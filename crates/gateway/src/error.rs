//! Errors as the gateway answers them: the HTTP status grpc-gateway maps the
//! gRPC code to, and a JSON body `{"code", "message", "details"}` (the
//! shape of `google.rpc.Status`, as grpc-gateway writes it).
//!
//! Every error answer passes through [`HttpError::into_response`], so that
//! is where a failed request is logged, once, in the request's span: an
//! `INTERNAL` (a bug, or an upstream's bug) at ERROR; an expected server-side
//! failure (an upstream `UNAVAILABLE` or too slow, the gateway at its
//! limits) at WARN; a client's mistake (4xx) not at all. The HTTP trace
//! layer logs no status of its own (see `Gateway::router`).

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};
use tonic::Code;
use tracing::Level;

/// An error answer of the gateway.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The gRPC code; the HTTP status follows from it unless overridden.
    pub code: Code,
    /// What was wrong, for the client.
    pub message: String,
    /// An HTTP status other than the one the code maps to (405, 415).
    status: Option<StatusCode>,
    /// Extra headers (`WWW-Authenticate`, `Allow`).
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// What an upstream said of a failure on its side, logged but not told
    /// the client: it can name the upstream's replicas and database.
    detail: Option<String>,
}

impl HttpError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> HttpError {
        HttpError {
            code,
            message: message.into(),
            status: None,
            headers: Vec::new(),
            detail: None,
        }
    }

    /// A 400: the request itself is wrong.
    pub fn invalid(message: impl Into<String>) -> HttpError {
        HttpError::new(Code::InvalidArgument, message)
    }

    /// A 401, with the `WWW-Authenticate` challenge RFC 6750 asks for.
    pub fn unauthenticated(message: impl Into<String>) -> HttpError {
        let message = message.into();
        let challenge = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            message.replace('"', "'")
        );
        let mut error = HttpError::new(Code::Unauthenticated, message);
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            error.headers.push((header::WWW_AUTHENTICATE, value));
        }
        error
    }

    /// Overrides the HTTP status.
    pub fn with_status(mut self, status: StatusCode) -> HttpError {
        self.status = Some(status);
        self
    }

    /// Adds a header to the answer.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> HttpError {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| {
            StatusCode::from_u16(lightbox_api::http_status(self.code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }
}

/// The level a failed request with `code` (answered with `status`) is
/// logged at; `None`: not logged (the client's mistake, told in the answer).
fn log_level(code: Code, status: StatusCode) -> Option<Level> {
    match code {
        Code::Internal | Code::Unknown | Code::DataLoss => Some(Level::ERROR),
        _ if status.is_server_error() => Some(Level::WARN),
        _ => None,
    }
}

/// An upstream's status as the gateway answers it: the client's mistakes
/// (4xx) with the upstream's words, which say what to fix; failures on the
/// upstream's side (5xx) in the gateway's own words, the upstream's kept
/// for the log (they name internal addresses, replicas, database errors).
impl From<tonic::Status> for HttpError {
    fn from(status: tonic::Status) -> HttpError {
        let code = status.code();
        let mut error = HttpError::new(code, status.message());
        if error.status().is_server_error() {
            error.message = server_side(code).to_owned();
            error.detail = Some(status.message().to_owned());
        }
        error
    }
}

/// What a client is told of an upstream's `UNAVAILABLE`.
pub const UPSTREAM_UNAVAILABLE: &str = "a service behind the gateway is unavailable; retry with backoff";

/// What a client is told of a failure behind the gateway.
fn server_side(code: Code) -> &'static str {
    match code {
        Code::Unavailable => UPSTREAM_UNAVAILABLE,
        Code::DeadlineExceeded => "a service behind the gateway did not answer in time; retry",
        Code::Unimplemented => "this is not implemented",
        _ => "the request failed behind the gateway; the gateway's log has the cause under this request's x-request-id",
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        match log_level(self.code, status) {
            Some(Level::ERROR) => {
                let error = self.detail.as_deref().unwrap_or(&self.message);
                tracing::error!(code = ?self.code, status = status.as_u16(), %error, "request failed");
            }
            Some(_) => {
                let error = self.detail.as_deref().unwrap_or(&self.message);
                tracing::warn!(code = ?self.code, status = status.as_u16(), %error, "request failed")
            }
            None => {}
        }
        let body = serde_json::json!({
            "code": self.code as i32,
            "message": self.message,
            "details": [],
        });
        let mut response = (status, Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_are_errors_expected_refusals_warnings_and_client_mistakes_silent() {
        let level = |error: HttpError| log_level(error.code, error.status());
        assert_eq!(level(HttpError::new(Code::Internal, "bug")), Some(Level::ERROR));
        assert_eq!(level(HttpError::new(Code::Unknown, "?")), Some(Level::ERROR));
        assert_eq!(
            level(HttpError::new(Code::Unavailable, "photos is down")),
            Some(Level::WARN)
        );
        assert_eq!(level(HttpError::new(Code::DeadlineExceeded, "slow")), Some(Level::WARN));
        assert_eq!(level(HttpError::new(Code::NotFound, "no route")), None);
        assert_eq!(level(HttpError::unauthenticated("no token")), None);
        assert_eq!(level(HttpError::invalid("bad body")), None);
        let not_allowed = HttpError::new(Code::Unimplemented, "POST").with_status(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(level(not_allowed), None);
    }

    #[test]
    fn an_upstream_failure_is_told_in_general_words_and_a_client_mistake_as_the_upstream_said() {
        let down = HttpError::from(tonic::Status::unavailable(
            "no replica of users is healthy (10.0.3.7:50051: connection refused)",
        ));
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!down.message.contains("10.0.3.7"), "{}", down.message);
        assert!(down.message.contains("retry"), "{}", down.message);
        assert_eq!(down.detail.as_deref().map(|d| d.contains("10.0.3.7")), Some(true));
        let mistake = HttpError::from(tonic::Status::invalid_argument(
            "photo.title is longer than 200 characters",
        ));
        assert_eq!(mistake.status(), StatusCode::BAD_REQUEST);
        assert_eq!(mistake.message, "photo.title is longer than 200 characters");
        assert_eq!(mistake.detail, None);
    }
}
