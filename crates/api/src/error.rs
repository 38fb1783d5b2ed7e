//! The one error type at the API boundary, and its mapping to gRPC codes and
//! HTTP statuses.
//!
//! Services return [`ApiError`]; it becomes a [`tonic::Status`] here and
//! nowhere else. Internal errors are logged with their cause and reach
//! clients only as "internal error".

use tonic::{Code, Status};

/// An error a client may see, by kind. The message says what was wrong in
/// words a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The entity does not exist (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// The entity, or a unique value of it, already exists (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// A concurrent change won: the expected revision is stale (`ABORTED`).
    #[error("{0}")]
    Aborted(String),
    /// The system is not in the state the request needs (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (`PERMISSION_DENIED`).
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was reached (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency could not be reached; retrying may help (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// A dependency did not answer in time (`DEADLINE_EXCEEDED`).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or an infrastructure failure (`INTERNAL`). The cause is logged,
    /// not shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Wraps an unexpected failure (database, I/O) whose details must not
    /// reach clients.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        ApiError::Internal(cause.to_string())
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::internal("internal error")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

/// Calls another service with a deadline and says plainly what went wrong:
/// `DEADLINE_EXCEEDED` naming `service` when it is slow, `UNAVAILABLE` when
/// it is down or failing, and its own `NOT_FOUND` / `INVALID_ARGUMENT` /
/// `FAILED_PRECONDITION` / `PERMISSION_DENIED` passed through.
pub async fn call_upstream<T>(
    service: &str,
    timeout: std::time::Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ApiError> {
    let too_slow = || {
        ApiError::DeadlineExceeded(format!(
            "the {service} service did not answer within {} ms",
            timeout.as_millis()
        ))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(too_slow()),
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(match status.code() {
            Code::NotFound => ApiError::NotFound(status.message().to_owned()),
            Code::InvalidArgument => ApiError::InvalidArgument(status.message().to_owned()),
            Code::FailedPrecondition => ApiError::FailedPrecondition(status.message().to_owned()),
            Code::PermissionDenied => ApiError::PermissionDenied(status.message().to_owned()),
            Code::DeadlineExceeded | Code::Cancelled => too_slow(),
            _ => ApiError::Unavailable(format!("the {service} service is unavailable: {}", status.message())),
        }),
    }
}

/// The HTTP status for a gRPC code, as grpc-gateway maps them
/// (`runtime.HTTPStatusFromCode`).
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::Unknown => 500,
        Code::InvalidArgument => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::PermissionDenied => 403,
        Code::Unauthenticated => 401,
        Code::ResourceExhausted => 429,
        Code::FailedPrecondition => 400,
        Code::Aborted => 409,
        Code::OutOfRange => 400,
        Code::Unimplemented => 501,
        Code::Internal => 500,
        Code::Unavailable => 503,
        Code::DataLoss => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let status = Status::from(ApiError::internal("password=hunter2 in connection string"));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }

    #[test]
    fn codes_map_to_grpc_gateway_statuses() {
        assert_eq!(http_status(ApiError::NotFound(String::new()).code()), 404);
        assert_eq!(http_status(ApiError::Unavailable(String::new()).code()), 503);
        assert_eq!(http_status(ApiError::DeadlineExceeded(String::new()).code()), 504);
        assert_eq!(http_status(ApiError::Aborted(String::new()).code()), 409);
    }
}
