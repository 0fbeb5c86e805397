//! Limits that keep one ingress answering under abuse or overload: a request
//! timeout (whose 503 names the jobs it may leave running, see
//! `recorder::handed_over`), a global concurrency limit that sheds load (503
//! with `Retry-After` instead of queueing), a header-size limit (431), a URL
//! holding an encoded NUL (`%00`, which PostgreSQL cannot store or compare)
//! refused as 400, gzip/deflate request bodies inflated in front of the
//! body limit, so a small compressed body that inflates past it is a 413 like
//! any other, and every error answer made problem+json, whoever wrote it.

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::BoxError;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::decompression::RequestDecompressionLayer;

use crate::problem::Problem;
use crate::recorder::handed_over;

/// The limits (from `[ingress]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a request may take before a 503.
    pub request_timeout: Duration,
    /// Requests served at once before new ones are shed.
    pub max_concurrent: usize,
    /// Largest total size of the request headers.
    pub max_header_bytes: usize,
}

/// Wraps `router` (already holding its state) in the limits.
pub fn apply(router: Router, limits: Limits) -> Router {
    let max_header_bytes = limits.max_header_bytes;
    router
        .layer(RequestDecompressionLayer::new())
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(limits.max_concurrent))
                .timeout(limits.request_timeout),
        )
        .layer(middleware::from_fn(|request: Request, next: Next| {
            handed_over::scope(next.run(request))
        }))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            header_limit(max_header_bytes, request, next)
        }))
        .layer(middleware::map_response(as_problem))
}

/// Every error answer is problem+json. Our handlers answer so; what others
/// write (an extractor's rejection of a path or query string as plain text,
/// the decompression layer's empty 415 for an unknown `Content-Encoding`) is
/// rewritten here, its text kept as the detail. HTML (the dashboard's login
/// form answering 401) is left as it is.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|value| value.as_bytes().starts_with(b"text/plain"));
    if !plain || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let detail = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::UNSUPPORTED_MEDIA_TYPE) => {
            "the request's Content-Encoding is not one this ingress inflates (gzip, deflate)"
                .to_owned()
        }
        (true, _) => status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_owned(),
    };
    let problem = Problem {
        kind: "about:blank".to_owned(),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        ..Problem::new(status, "", "", detail)
    };
    let mut rewritten = problem.into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}

async fn overloaded(err: BoxError) -> Response {
    if err.is::<tower::timeout::error::Elapsed>() {
        let jobs = handed_over::pending();
        if !jobs.is_empty() {
            return Problem::in_doubt(
                "the request took too long and was abandoned after its jobs were handed over; \
                 they may run all the same, and a retry without its Idempotency-Key enqueues them again",
                jobs,
            )
            .into_response();
        }
        return Problem::unavailable("the request took too long and was abandoned", 1)
            .into_response();
    }
    if err.is::<tower::load_shed::error::Overloaded>() {
        return Problem::unavailable("the ingress is at its concurrency limit", 1).into_response();
    }
    Problem::internal(err).into_response()
}

async fn header_limit(max: usize, request: Request, next: Next) -> Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max {
        return Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
            format!("the request's headers total {size} bytes; the limit is {max}"),
        )
        .into_response();
    }
    let url = request.uri().path_and_query().map_or("", |pq| pq.as_str());
    if url.contains("%00") {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-url",
            "Malformed URL",
            "the URL may not contain the NUL character (%00)",
        )
        .into_response();
    }
    next.run(request).await
}
