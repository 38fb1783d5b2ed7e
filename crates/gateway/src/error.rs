//! Errors as the gateway answers them: the HTTP status grpc-gateway maps the
//! gRPC code to, and a JSON body `{"code", "message", "details"}` (the
//! shape of `google.rpc.Status`, as grpc-gateway writes it).

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};
use tonic::Code;

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
}

impl HttpError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> HttpError {
        HttpError {
            code,
            message: message.into(),
            status: None,
            headers: Vec::new(),
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

impl From<tonic::Status> for HttpError {
    fn from(status: tonic::Status) -> HttpError {
        HttpError::new(status.code(), status.message())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.code as i32,
            "message": self.message,
            "details": [],
        });
        let mut response = (self.status(), Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
