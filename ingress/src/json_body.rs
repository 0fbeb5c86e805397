//! A strict JSON body extractor whose every rejection is a [`Problem`].
//!
//! Order of checks, so nothing is read that need not be: content type (415),
//! declared `Content-Length` over the limit (413, before reading), the body
//! read with the limit enforced (413 when a chunked body grows past it, 400
//! when it cannot be read, such as a corrupt gzip stream), JSON
//! syntax (400), then the shape of the request (422 with a JSON pointer;
//! unknown fields are rejected by the request types).

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// Largest accepted body, set by the ingress as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON request body of type `T`, plus the raw bytes (for hashing or re-use).
pub struct StrictJson<T> {
    /// The decoded value.
    pub value: T,
    /// The body as received.
    pub raw: axum::body::Bytes,
}

/// The checks that need only the headers, so that nothing (no body, no
/// database) is touched for a request that fails them: the content type when
/// `want_json` (415), then a declared `Content-Length` over `limit` (413).
pub fn check_headers(headers: &HeaderMap, limit: usize, want_json: bool) -> Result<(), Problem> {
    if want_json {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                format!("expected Content-Type: application/json, got `{content_type}`"),
            ));
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    Ok(())
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Request body too large",
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// The [`BodyLimit`] of `request` (1 MiB when none is set).
pub fn limit_of(request: &Request) -> usize {
    request
        .extensions()
        .get::<BodyLimit>()
        .map_or(1024 * 1024, |l| l.0)
}

/// Reads the body of `request` up to its [`BodyLimit`], after [`check_headers`].
pub async fn read_limited(request: Request, want_json: bool) -> Result<axum::body::Bytes, Problem> {
    let limit = limit_of(&request);
    let (parts, body) = request.into_parts();
    read_within(&parts.headers, body, limit, want_json).await
}

/// Reads `body` up to `limit` bytes, after [`check_headers`] on its `headers`.
pub async fn read_within(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    want_json: bool,
) -> Result<axum::body::Bytes, Problem> {
    check_headers(headers, limit, want_json)?;
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let over_limit =
            std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |err| {
                err.source()
            })
            .any(|err| err.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large(limit)
        } else {
            // A client that stopped sending, or a compressed body that does not inflate.
            Problem::malformed(format!("the body could not be read: {err}"))
        }
    })
}

/// Decodes JSON `raw` into `T`: 400 for bad syntax, 422 with a pointer for a
/// bad shape or for a string holding U+0000, which PostgreSQL can store in
/// neither `text` nor `jsonb` (it would fail the write, as a 5xx, every time
/// the client retried).
pub fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let result = serde_path_to_error::deserialize::<_, T>(&mut de);
    if result.is_ok() {
        de.end()
            .map_err(|err| Problem::malformed(format!("the body is not valid JSON: {err}")))?;
        if let Some(pointer) = conveyor_schema::nul::nul_character_at(raw) {
            return Err(Problem::invalid(
                pointer,
                "text may not contain the NUL character (U+0000)",
            ));
        }
    }
    result.map_err(|err| {
        let inner = err.inner();
        if !matches!(inner.classify(), serde_json::error::Category::Data) {
            return Problem::malformed(format!("the body is not valid JSON: {inner}"));
        }
        let message = inner.to_string();
        let pointer = conveyor_schema::json_pointer::pointer_to(err.path());
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        Problem::invalid(
            if pointer.is_empty() {
                "/".into()
            } else {
                pointer
            },
            message,
        )
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, _: &S) -> Result<Self, Problem> {
        let raw = read_limited(request, true).await?;
        let value = decode(&raw)?;
        Ok(Self { value, raw })
    }
}
