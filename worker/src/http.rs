//! The worker's small HTTP side: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/readyz` answers 200 only while every consumer is attached on an open
//! channel (see [`crate::readiness`]) and the worker is not draining.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use conveyor_platform::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::readiness::Consuming;

/// What the probes look at.
#[derive(Clone)]
pub struct Probe {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Whether every consumer is attached on an open channel.
    pub consuming: Consuming,
    /// Cancelled when draining: readiness fails at once.
    pub shutdown: CancellationToken,
}

/// The router.
pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(probe)
}

async fn metrics(State(probe): State<Probe>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        probe.metrics.render(),
    )
}

async fn ready(State(probe): State<Probe>) -> impl IntoResponse {
    if probe.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !probe.consuming.is_consuming() {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming")
    } else {
        (StatusCode::OK, "ready")
    }
}
