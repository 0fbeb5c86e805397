//! The one HTTP error type: RFC 9457 `application/problem+json`.
//!
//! Every handler returns `Result<_, Problem>`. A problem carries its status, a
//! short title, a human detail, and, for invalid input, a JSON pointer to the
//! offending field; `Retry-After` is set on 503 and 429. Errors are logged
//! once, here, when they are server-side (5xx).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank` when the status says it all).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, stable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// JSON pointer into the request body at the offending value, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub pointer: Option<Box<str>>,
    /// Seconds to wait before retrying (also sent as the `Retry-After` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
    /// On an `in-doubt` 503: the jobs that may run although they were not
    /// accepted (one for `POST /v1/jobs`). Should one run, it runs under its id.
    // Boxed, as `pointer` is, to keep every handler's `Result<_, Problem>` small.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[schema(value_type = Vec<uuid::Uuid>)]
    pub job_ids: Box<[uuid::Uuid]>,
}

impl Problem {
    /// A problem with `status`, a title and a detail.
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://conveyor.dev/problems/{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            pointer: None,
            retry_after: None,
            job_ids: Box::default(),
        }
    }

    /// Adds the JSON pointer of the offending value.
    pub fn at(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into().into_boxed_str());
        self
    }

    /// 400: the body is not valid JSON.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-body",
            "Malformed request body",
            detail,
        )
    }

    /// 422: the body is JSON but not an acceptable request.
    pub fn invalid(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            "Invalid request",
            detail,
        )
        .at(pointer)
    }

    /// 400: a query parameter is missing, malformed or out of range.
    pub fn bad_query(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "Invalid query parameter",
            detail,
        )
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        let mut problem = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        );
        problem.retry_after = Some(retry_after_secs);
        problem
    }

    /// 503 for jobs that were not accepted but may run all the same (their
    /// messages may have been, or were, confirmed): names them in `job_ids`.
    pub fn in_doubt(detail: impl Into<String>, job_ids: impl Into<Box<[uuid::Uuid]>>) -> Self {
        let mut problem = Self::unavailable(detail, 1);
        problem.kind = "https://conveyor.dev/problems/in-doubt".into();
        problem.title = "Not accepted, but may run".into();
        problem.job_ids = job_ids.into();
        problem
    }

    /// 500, logging the cause.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "an internal error occurred; it has been logged",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() && status != StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(status = self.status, detail = %self.detail, "request failed");
        }
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
