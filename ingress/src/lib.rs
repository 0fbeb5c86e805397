//! The HTTP ingress: a thin axum service in front of the broker.
//!
//! It validates a request against the task catalogue, records the job and
//! publishes a persistent message with publisher confirms (batched, see
//! [`recorder`]), and answers 202 only after both are durable. [`start`] is used
//! by `conveyor ingress` and by the integration tests alike.

pub mod admin_auth;
pub mod auth;
mod batch_writer;
pub mod dashboard;
pub mod dead_jobs;
pub mod hardening;
pub mod idempotency;
pub mod json_body;
pub mod monitor;
pub mod openapi;
pub mod problem;
pub mod recorder;
pub mod routes;
pub mod state;
pub mod webhook_rejections;
pub mod webhooks;

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use conveyor_platform::Config;
use conveyor_platform::amqp::Publisher;
use conveyor_platform::metrics::Metrics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::json_body::BodyLimit;
use crate::problem::Problem;
use crate::recorder::Recorder;
use crate::state::AppState;

/// A started ingress.
pub struct Ingress {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Resolves when the server has stopped.
    pub finished: JoinHandle<()>,
}

/// The application router over `state`: every route behind [`auth::guard`],
/// `Idempotency-Key` on the three creating POSTs, then the [`hardening`] limits.
pub fn router(
    state: AppState,
    body_limit: usize,
    recipients_body_limit: usize,
    limits: hardening::Limits,
) -> Router {
    use routes::campaigns;
    let idempotent = middleware::from_fn_with_state(state.clone(), idempotency::idempotent);
    let idempotent_json =
        middleware::from_fn_with_state(state.clone(), idempotency::idempotent_json);
    // Campaign creation and recipient lists may be far larger than a job.
    let bulk = Router::new()
        .route(
            "/v1/campaigns",
            post(campaigns::create).route_layer(idempotent_json.clone()),
        )
        .route(
            "/v1/campaigns/{id}/recipients",
            post(campaigns::add_recipients).get(campaigns::recipients),
        )
        .layer(axum::Extension(BodyLimit(recipients_body_limit)));
    let admin = Router::new()
        .route("/v1/admin/dead-jobs", get(routes::admin::list))
        .route("/v1/admin/dead-jobs/{id}", get(routes::admin::show))
        .route(
            "/v1/admin/dead-jobs/{id}/replay",
            post(routes::admin::replay),
        )
        .route(
            "/v1/admin/dead-jobs/{id}/discard",
            post(routes::admin::discard),
        )
        .route("/v1/admin/queues", get(routes::admin::queues))
        .route(
            "/v1/admin/dead-jobs/replay-matching",
            post(routes::admin::bulk::replay_matching),
        )
        .route(
            "/v1/admin/dead-jobs/discard-matching",
            post(routes::admin::bulk::discard_matching),
        )
        .layer(axum::Extension(routes::admin::bulk::Budget::within(
            limits.request_timeout,
            state.publisher.timeout(),
        )));
    let app = Router::new()
        .merge(bulk)
        .merge(admin)
        .merge(dashboard::router())
        .route("/v1/campaigns/{id}", get(campaigns::status))
        .route(
            "/v1/campaigns/{id}/send",
            post(campaigns::send).route_layer(idempotent),
        )
        .route("/v1/campaigns/{id}/pause", post(campaigns::pause))
        .route("/v1/campaigns/{id}/resume", post(campaigns::resume))
        .route("/v1/campaigns/{id}/cancel", post(campaigns::cancel))
        .route(
            "/v1/campaigns/{id}/resend-unknown",
            post(campaigns::resend_unknown),
        )
        .route(
            "/v1/jobs",
            post(routes::jobs::enqueue).route_layer(idempotent_json.clone()),
        )
        .route(
            "/v1/jobs/batch",
            post(routes::job_batches::enqueue_batch).route_layer(idempotent_json),
        )
        .route("/v1/jobs/{id}", get(routes::jobs::status))
        .route("/v1/schedules", get(routes::schedules::list))
        .route("/v1/schedules/{name}/ticks", get(routes::schedules::ticks))
        .route("/v1/stats/{family}", get(routes::stats::stats))
        .route(
            "/v1/webhooks/{source}/profiles",
            post(routes::webhooks::receive),
        )
        .route("/v1/profiles/{id}", get(routes::profiles::show))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(openapi::serve))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { Problem::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), auth::guard))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::Extension(BodyLimit(body_limit)))
        .with_state(state);
    hardening::apply(app, limits)
}

/// A known route asked with a method it does not take: 405 as problem+json
/// (axum adds the `Allow` header).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Problem {
    Problem::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!(
            "{} does not take {method}; its `Allow` header lists what it takes",
            uri.path()
        ),
    )
}

/// Counts and times each request by route template.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Checks the database schema, connects to the broker in the background and
/// starts serving. On `shutdown`, readiness fails at once, the server stops
/// accepting and finishes in-flight requests.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Ingress> {
    let db_config = config.database.clone();
    tokio::task::spawn_blocking(move || conveyor_platform::migrations::ensure_current(&db_config))
        .await?
        .context("refusing to start")?;
    let db = conveyor_schema::pool::pool(
        &conveyor_platform::config::database_url(&config),
        config.database.pool_size,
    );
    let topology = conveyor_platform::amqp::Topology::for_config(&config);
    let schedules = std::sync::Arc::new(
        conveyor_platform::schedule::schedules(&config).context("invalid schedules")?,
    );
    let metrics = Metrics::new();
    let plumbing = CancellationToken::new();
    let publisher = Publisher::start(
        &config.amqp_urls(),
        "conveyor-ingress",
        topology.clone(),
        config.ingress.publisher_channels,
        config.publish_timeout(),
        plumbing.clone(),
    );
    let recorder = Recorder::start(
        &conveyor_platform::config::database_url(&config),
        publisher.clone(),
        metrics.clone(),
        &config.ingress,
    )
    .context("starting the recorder's database lanes")?;
    let snapshot = monitor::SharedSnapshot::default();
    // Started once the publisher has declared the topology (below): polled
    // before that, the queues of a new namespace do not exist yet, and each
    // passive declare would log a broker error.
    let monitoring = monitor::run(
        config.amqp_urls().iter().map(|u| (*u).to_owned()).collect(),
        topology.clone(),
        db.clone(),
        metrics.clone(),
        snapshot.clone(),
        monitor::PollSettings::from_config(&config),
        plumbing.clone(),
    );
    let webhooks = std::sync::Arc::new(webhooks::Sources::from_config(&config.webhooks)?);
    webhooks::spawn_sweeper(db.clone(), plumbing.clone());
    let webhook_rejections = webhook_rejections::Rejections::default();
    let rejections_flushed = webhook_rejections
        .clone()
        .spawn_flusher(db.clone(), plumbing.clone());
    idempotency::spawn_purger(db.clone(), plumbing.clone());
    let auth = auth::Auth::new(db.clone(), &config.auth);
    let state = AppState::new(state::Handles {
        webhooks,
        webhook_ledger: webhooks::Ledger::start(db.clone()),
        webhook_rejections,
        db,
        publisher: publisher.clone(),
        recorder,
        topology,
        metrics,
        templates: conveyor_templates::MailTemplates::new(config.mail.templates_dir.clone()),
        shutdown: shutdown.clone(),
        schedules,
        auth,
        idempotency: idempotency::Settings {
            retention: std::time::Duration::from_secs(config.auth.idempotency_retention_secs),
            in_flight_timeout: std::time::Duration::from_millis(
                config
                    .ingress
                    .request_timeout_ms
                    .saturating_mul(2)
                    .max(60_000),
            ),
        },
        snapshot,
        worker_gone_after: std::time::Duration::from_millis(config.monitor.worker_gone_after_ms),
    });
    let listener = tokio::net::TcpListener::bind(config.ingress.addr)
        .await
        .with_context(|| format!("ingress.addr: cannot listen on {}", config.ingress.addr))?;
    let addr = listener.local_addr()?;
    let app = router(
        state,
        config.ingress.body_limit_bytes,
        config.ingress.recipients_body_limit_bytes,
        hardening::Limits {
            request_timeout: std::time::Duration::from_millis(config.ingress.request_timeout_ms),
            max_concurrent: config.ingress.max_concurrent_requests,
            max_header_bytes: config.ingress.max_header_bytes,
        },
    );
    // Wait briefly for the broker so the first requests do not all see 503.
    publisher
        .wait_connected(std::time::Duration::from_secs(5))
        .await;
    tokio::spawn(monitoring);
    tracing::info!(%addr, "ingress listening");
    let finished = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "ingress server failed");
        }
        plumbing.cancel();
        let _ = rejections_flushed.await;
        tracing::info!("ingress stopped");
    });
    Ok(Ingress { addr, finished })
}
