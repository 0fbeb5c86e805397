//! `Idempotency-Key` on `POST /v1/jobs`, `POST /v1/jobs/batch`, `POST /v1/campaigns` and
//! `POST /v1/campaigns/{id}/send`, after the IETF httpapi idempotency-key draft
//! and Stripe's behaviour.
//!
//! The key is claimed per producer with `INSERT … ON CONFLICT DO NOTHING` into
//! `idempotency_keys` together with a hash of method, path and body, then:
//! - the first request runs; a success (status < 400) is stored and replayed
//!   to every later request with the same key and body, with
//!   `Idempotent-Replayed: true`; a 4xx is not stored (the row is deleted,
//!   so the key can be retried with a corrected request), nor is a 5xx or a
//!   batch's 207 (the row is marked `failed`, so the same request can be
//!   retried until every job is accepted);
//! - the same key with another body → 422 until the key expires, after a 5xx,
//!   a 207 or an abandoned claim too: the same request's retry must still be
//!   able to make what the first may have made;
//! - the same key while the first is still running → 409;
//! - a claim left `in_flight` longer than [`Settings::in_flight_timeout`]
//!   (a crashed ingress) is taken over by the same request.
//!
//! A claim also holds an [`IdSeed`], from which the ids of what the request
//! makes (jobs, a campaign) are derived. A retry of a first request that
//! failed or was abandoned keeps the seed when it sends the same body, so it
//! makes the same things: after a 503 in doubt (the message may be in the
//! broker), a client timeout or an ingress that died mid-request, the retry
//! enqueues the job it may already have enqueued, under the same id, and the
//! worker runs it once (it does not run a keyed job that has finished or is
//! running; see `worker::execute`); a campaign the first request committed is
//! found, not made twice. Only an expired key draws a new seed.
//!
//! A request settles only its own claim, named by the claim's `created_at`: a
//! takeover sets a later one (it happens after the claim's timeout or expiry,
//! or after its owner settled it `failed`), so a first request that was
//! presumed dead and answers late leaves the row of the request that took its
//! key over as it is.
//!
//! The first request runs on its own task, so a client that disconnects does
//! not leave its claim unfinished. Rows expire after [`Settings::retention`]
//! (`auth.idempotency_retention_secs`, default 24 h) and are purged in batches
//! of [`PURGE_BATCH`] by [`spawn_purger`].

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_schema::db::idempotency_keys as ik;
use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
use diesel::sql_types::{Bytea, Text, Timestamptz, Uuid as SqlUuid};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::Principal;
use crate::json_body;
use crate::problem::Problem;
use crate::recorder::handed_over;
use crate::state::AppState;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header set on a replayed response.
pub const REPLAYED: &str = "idempotent-replayed";
/// Rows deleted per purge statement.
pub const PURGE_BATCH: i64 = 1_000;
/// Longest key accepted.
const MAX_KEY_LEN: usize = 255;

/// Retention settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a key and its response are kept.
    pub retention: Duration,
    /// An `in_flight` claim older than this is presumed abandoned and taken over.
    pub in_flight_timeout: Duration,
}

/// Where a keyed request's ids (of its jobs, or its campaign) come from: the
/// same for every retry of a first request that did not succeed (see the
/// module header). A request extension, set by the middleware for the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdSeed(pub Uuid);

impl IdSeed {
    /// The id of what the request makes at `index` (its job, or a batch's
    /// job at `index`, or its campaign at 0): the seed, a UUIDv7, with `index`
    /// XORed into its random low bits, so the ids keep the seed's time order
    /// and version.
    pub fn id(self, index: usize) -> Uuid {
        Uuid::from_u128(self.0.as_u128() ^ index as u128)
    }
}

/// A claim this request holds.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    /// Where the request's ids come from.
    seed: IdSeed,
    /// The claim's `created_at`, as stored: it names this claim (see the module header).
    claimed_at: DateTime<Utc>,
}

/// What a claim found.
enum Claim {
    /// This request owns the key: run it, with this seed.
    Mine(Ticket),
    /// Another request with this key and another body.
    Mismatch,
    /// The first request with this key is still running.
    InFlight,
    /// The stored first response.
    Done(i16, Option<String>, Vec<u8>),
}

fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    Problem::new(status, kind, title, detail).into_response()
}

/// True for a key the middleware accepts: 1 to 255 visible ASCII characters.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN
}

/// Middleware: runs the request at most once per (producer, key).
pub async fn idempotent(State(state): State<AppState>, request: Request, next: Next) -> Response {
    run_once(state, request, next, false).await
}

/// [`idempotent`] for routes whose body must be JSON: a wrong content type is
/// refused (415) before the key is claimed, like an oversized declared length
/// (413) on every route.
pub async fn idempotent_json(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    run_once(state, request, next, true).await
}

async fn run_once(state: AppState, request: Request, next: Next, want_json: bool) -> Response {
    let Some(key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(k) if is_valid_key(k) => k.to_owned(),
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            );
        }
    };
    let Some(producer) = request
        .extensions()
        .get::<Principal>()
        .map(|p| p.producer.clone())
    else {
        return next.run(request).await;
    };
    // The cheap checks first: nothing is read or claimed for a request that fails them.
    let limit = json_body::limit_of(&request);
    if let Err(refused) = json_body::check_headers(request.headers(), limit, want_json) {
        return refused.into_response();
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            &format!("the body exceeds the limit of {limit} bytes"),
        );
    };
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update(b"\n");
    hasher.update(parts.uri.path());
    hasher.update(b"\n");
    hasher.update(&body);
    let hash = hasher.finalize().to_vec();

    let claim = claim(&state, producer.clone(), key.clone(), hash).await;
    match claim {
        Err(err) => {
            tracing::warn!(error = %err, "cannot claim an idempotency key");
            Problem::unavailable("cannot record the Idempotency-Key: database unavailable", 1)
                .into_response()
        }
        Ok(Claim::Mismatch) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used with a different request",
        ),
        Ok(Claim::InFlight) => problem(
            StatusCode::CONFLICT,
            "idempotency-key-in-flight",
            "Request in progress",
            "a request with this Idempotency-Key is still being processed; retry later",
        ),
        Ok(Claim::Done(status, content_type, body)) => replay(status, content_type, body),
        Ok(Claim::Mine(ticket)) => {
            let mut request = Request::from_parts(parts, Body::from(body));
            request.extensions_mut().insert(ticket.seed);
            let db = state.db.clone();
            // Own task: the outcome is stored even if the client goes away.
            let run = tokio::spawn(handed_over::carried(async move {
                let response = next.run(request).await;
                settle(&db, producer, key, ticket, response).await
            }));
            run.await
                .unwrap_or_else(|err| Problem::internal(err).into_response())
        }
    }
}

fn replay(status: i16, content_type: Option<String>, body: Vec<u8>) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    if let Some(value) = content_type.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

async fn claim(
    state: &AppState,
    producer: String,
    key: String,
    hash: Vec<u8>,
) -> Result<Claim, pool::DbError> {
    let settings = state.idempotency;
    pool::run(&state.db, move |conn| {
        let now = Utc::now();
        let expires = now + settings.retention;
        let stale = now - settings.in_flight_timeout;
        let fresh = Uuid::now_v7();
        for _ in 0..3 {
            let inserted = diesel::insert_into(ik::table)
                .values((
                    ik::producer.eq(&producer),
                    ik::key.eq(&key),
                    ik::request_hash.eq(&hash),
                    ik::state.eq("in_flight"),
                    ik::created_at.eq(now),
                    ik::expires_at.eq(expires),
                    ik::id_seed.eq(fresh),
                ))
                .on_conflict_do_nothing()
                .returning(ik::created_at)
                .get_result::<DateTime<Utc>>(conn)
                .optional()?;
            if let Some(claimed_at) = inserted {
                return Ok(Claim::Mine(Ticket {
                    seed: IdSeed(fresh),
                    claimed_at,
                }));
            }
            let taken_over = diesel::sql_query(TAKE_OVER)
                .bind::<Text, _>(&producer)
                .bind::<Text, _>(&key)
                .bind::<Bytea, _>(&hash)
                .bind::<Timestamptz, _>(now)
                .bind::<Timestamptz, _>(expires)
                .bind::<Timestamptz, _>(stale)
                .bind::<SqlUuid, _>(fresh)
                .get_result::<TakenOver>(conn)
                .optional()?;
            if let Some(TakenOver {
                id_seed,
                created_at,
            }) = taken_over
            {
                return Ok(Claim::Mine(Ticket {
                    seed: IdSeed(id_seed),
                    claimed_at: created_at,
                }));
            }
            let row = ik::table
                .find((&producer, &key))
                .select((
                    ik::request_hash,
                    ik::state,
                    ik::response_status,
                    ik::response_type,
                    ik::response_body,
                ))
                .first::<(
                    Vec<u8>,
                    String,
                    Option<i16>,
                    Option<String>,
                    Option<Vec<u8>>,
                )>(conn)
                .optional()?;
            // Deleted in between (the first request failed): try to claim again.
            let Some((stored_hash, row_state, status, content_type, body)) = row else {
                continue;
            };
            if stored_hash != hash {
                return Ok(Claim::Mismatch);
            }
            return Ok(match (row_state.as_str(), status) {
                ("done", Some(status)) => {
                    Claim::Done(status, content_type, body.unwrap_or_default())
                }
                _ => Claim::InFlight,
            });
        }
        Ok(Claim::InFlight)
    })
    .await
}

/// Takes over the key `($1, $2)` for a request with hash `$3` at `$4`, until
/// `$5`: an expired key, for any request with the fresh seed `$7`; or, for the
/// same request (hash `$3`) only, keeping the seed so that it makes the same
/// jobs, a first request that failed (5xx, 207) or one still `in_flight` since
/// before `$6` (its ingress died). Returns the seed and the claim's
/// `created_at`; no row when the key is not to be taken over (another request
/// then finds the hash differs: 422).
const TAKE_OVER: &str = "
UPDATE idempotency_keys SET
    id_seed = CASE WHEN expires_at >= $4 THEN COALESCE(id_seed, $7) ELSE $7 END,
    request_hash = $3, state = 'in_flight',
    response_status = NULL, response_type = NULL, response_body = NULL,
    created_at = $4, expires_at = $5
WHERE producer = $1 AND key = $2
  AND (expires_at < $4
       OR (request_hash = $3 AND (state = 'failed' OR (state = 'in_flight' AND created_at < $6))))
RETURNING id_seed, created_at";

/// What [`TAKE_OVER`] returns.
#[derive(QueryableByName)]
struct TakenOver {
    #[diesel(sql_type = SqlUuid)]
    id_seed: Uuid,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

/// Stores a success for replay, or releases the key after a failure; returns the response.
///
/// After a 4xx the key is deleted: nothing was enqueued, and the corrected
/// request may differ. After a 5xx it is kept as `failed`, with its seed, so a
/// retry of the same request makes the same jobs (the 5xx may be in doubt).
/// So is a batch's 207: a retry enqueues the refused jobs, in doubt or not,
/// under the ids the 207 named, and the accepted ones again, which a worker
/// does not run twice.
///
/// Only the claim `ticket` names is settled: a key taken over meanwhile
/// (this request was presumed dead) is left to the request that took it.
async fn settle(
    db: &PgPool,
    producer: String,
    key: String,
    ticket: Ticket,
    response: Response,
) -> Response {
    let status = response.status();
    if status.as_u16() >= 400 || status == StatusCode::MULTI_STATUS {
        let released = pool::run(db, move |conn| {
            let mine = ik::table
                .find((producer, key))
                .filter(ik::created_at.eq(ticket.claimed_at))
                .filter(ik::id_seed.eq(ticket.seed.0));
            if !status.is_client_error() {
                diesel::update(mine)
                    .set(ik::state.eq("failed"))
                    .execute(conn)
            } else {
                diesel::delete(mine).execute(conn)
            }
        })
        .await;
        match released {
            Ok(0) => lost_claim(status),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot release an idempotency key"),
        }
        return response;
    }
    let (parts, body) = response.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(err) => return Problem::internal(err).into_response(),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let stored = body.to_vec();
    let code = status.as_u16() as i16;
    let saved = pool::run(db, move |conn| {
        let mine = ik::table
            .find((producer, key))
            .filter(ik::created_at.eq(ticket.claimed_at))
            .filter(ik::id_seed.eq(ticket.seed.0));
        diesel::update(mine)
            .set((
                ik::state.eq("done"),
                ik::response_status.eq(Some(code)),
                ik::response_type.eq(content_type),
                ik::response_body.eq(Some(stored)),
            ))
            .execute(conn)
    })
    .await;
    match saved {
        Ok(0) => lost_claim(status),
        Ok(_) => {}
        Err(err) => {
            tracing::error!(error = %err, "cannot store an idempotent response; the key stays in flight until it is taken over");
        }
    }
    Response::from_parts(parts, Body::from(body))
}

/// Logs a request that answered after its key was taken over (or expired and was purged).
fn lost_claim(status: StatusCode) {
    tracing::warn!(
        http.status = status.as_u16(),
        "an idempotent request answered after its key was taken over; its outcome is not stored"
    );
}

/// Deletes expired keys every minute, [`PURGE_BATCH`] rows per statement.
pub fn spawn_purger(db: PgPool, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            match purge_expired(&db).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "expired idempotency keys purged"),
                Err(err) => tracing::warn!(error = %err, "could not purge idempotency keys"),
            }
        }
    });
}

/// Deletes every expired key in batches; returns how many.
pub async fn purge_expired(db: &PgPool) -> Result<usize, pool::DbError> {
    let mut total = 0;
    loop {
        let n = pool::run(db, |conn| {
            diesel::sql_query(
                "DELETE FROM idempotency_keys WHERE (producer, key) IN \
                 (SELECT producer, key FROM idempotency_keys WHERE expires_at < now() LIMIT $1)",
            )
            .bind::<diesel::sql_types::BigInt, _>(PURGE_BATCH)
            .execute(conn)
        })
        .await?;
        total += n;
        if (n as i64) < PURGE_BATCH {
            return Ok(total);
        }
    }
}
