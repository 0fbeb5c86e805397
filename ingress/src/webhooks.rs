//! What the webhook endpoint needs beyond the request: the configured sources
//! with their parsed keys, and the memory of `webhook-id`s already accepted.
//!
//! Deduplication is a claim row in `webhook_deliveries`, inserted with
//! `ON CONFLICT DO NOTHING` before the job is submitted, naming the job id it
//! will get. A repeat finds the claim: when the named job exists the webhook
//! was accepted (answer 200, publish nothing); when it does not, the first
//! delivery is still being recorded (answer 409, the producer retries), unless
//! the claim is older than [`ORPHAN_AFTER`], in which case its request died
//! between claim and record and the repeat takes the claim over, under the job
//! id the claim names. A submit that failed for certain removes its own claim;
//! one in doubt (the job may have been published) keeps it, so that a repeat
//! never makes a second job: it waits out [`ORPHAN_AFTER`], then submits the
//! same job again, or finds it recorded. Claims expire at `webhook-timestamp + 2 ×
//! tolerance + margin`; past that the timestamp check alone refuses a replay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::config::WebhooksConfig;
use conveyor_platform::webhook_signature::VerifyingKey;
use conveyor_schema::db::{jobs, webhook_deliveries, webhook_events};
use conveyor_schema::pool::{DbError, PgPool};
use diesel::prelude::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch_writer::BatchWriter;

/// A claim older than this whose job does not exist was abandoned (its request
/// crashed or timed out between claim and record) and may be taken over.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(60);

/// One configured source, ready to verify.
#[derive(Debug, Clone)]
pub struct Source {
    /// Any of these may have signed.
    pub keys: Vec<VerifyingKey>,
    /// Allowed distance of `webhook-timestamp` from now, either way.
    pub tolerance_secs: u64,
    /// How long an accepted id is remembered past its timestamp.
    pub retention_secs: u64,
}

/// Every source by name, plus the body limit.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// By the `{source}` path segment.
    pub by_name: HashMap<String, Source>,
    /// Largest body, checked before hashing.
    pub body_limit: usize,
}

impl Sources {
    /// Parses the configured keys (already validated at start-up).
    pub fn from_config(config: &WebhooksConfig) -> anyhow::Result<Self> {
        let mut by_name = HashMap::new();
        for (name, source) in &config.sources {
            let keys = source
                .verifying_keys()
                .map_err(|e| anyhow::anyhow!("webhooks.sources.{name}.keys: {e}"))?;
            by_name.insert(
                name.clone(),
                Source {
                    keys,
                    tolerance_secs: source.tolerance_secs,
                    retention_secs: source.dedup_retention_secs(config.dedup_margin_secs),
                },
            );
        }
        Ok(Self {
            by_name,
            body_limit: config.body_limit_bytes,
        })
    }
}

/// What the claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// New (or taken over): submit the job with this id.
    Fresh(Uuid),
    /// Already accepted as this job.
    Accepted(Uuid),
    /// Another request is recording it right now.
    InProgress,
}

/// A claim on `(source, webhook_id)` for the job `job_id`, kept until `expires_at`.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = webhook_deliveries)]
struct NewClaim {
    source: String,
    webhook_id: String,
    job_id: Uuid,
    expires_at: DateTime<Utc>,
}

/// Inserts `claims` in one statement; `true` for each that is now held by its
/// job (its `webhook-id` was not claimed before, also not earlier in the batch).
/// Rows go in key order, so that two ingress replicas inserting some of the
/// same keys wait on each other in one order and cannot deadlock.
fn insert_claims(conn: &mut PgConnection, mut claims: Vec<NewClaim>) -> QueryResult<Vec<bool>> {
    let job_ids: Vec<Uuid> = claims.iter().map(|c| c.job_id).collect();
    claims.sort_unstable_by(|a, b| (&a.source, &a.webhook_id).cmp(&(&b.source, &b.webhook_id)));
    let won: std::collections::HashSet<Uuid> = diesel::insert_into(webhook_deliveries::table)
        .values(&claims)
        .on_conflict_do_nothing()
        .returning(webhook_deliveries::job_id)
        .get_results(conn)?
        .into_iter()
        .collect();
    Ok(job_ids.iter().map(|id| won.contains(id)).collect())
}

/// What a `webhook-id` that is claimed already means for a new delivery.
fn existing_claim(conn: &mut PgConnection, source: &str, webhook_id: &str) -> QueryResult<Claim> {
    let key = webhook_deliveries::table.find((source, webhook_id));
    let Some((existing, received_at)) = key
        .select((webhook_deliveries::job_id, webhook_deliveries::received_at))
        .first::<(Uuid, DateTime<Utc>)>(conn)
        .optional()?
    else {
        // Expired and swept since the insert: treat as in progress; a retry claims it.
        return Ok(Claim::InProgress);
    };
    let recorded: i64 = jobs::table
        .filter(jobs::id.eq(existing))
        .count()
        .get_result(conn)?;
    if recorded > 0 {
        return Ok(Claim::Accepted(existing));
    }
    let orphaned =
        Utc::now() - received_at > chrono::Duration::from_std(ORPHAN_AFTER).unwrap_or_default();
    if orphaned {
        // Under the job id the claim named: should its request have published
        // the job after all (an answer in doubt), the job is the same one.
        let taken = diesel::update(key.filter(webhook_deliveries::job_id.eq(existing)))
            .set(webhook_deliveries::received_at.eq(diesel::dsl::now))
            .execute(conn)?;
        if taken == 1 {
            return Ok(Claim::Fresh(existing));
        }
    }
    Ok(Claim::InProgress)
}

/// Most rows one batched insert writes.
const ROWS_PER_INSERT: usize = 1000;

/// The ingress's writes for each webhook: its claim and its outcome event.
///
/// Each used to be a transaction of its own, so an accepted webhook waited for
/// the database's flush twice besides its job's group commit, which held
/// signed webhooks near the single-row commit rate. Both now go through
/// `BatchWriter`s: concurrent webhooks share one insert and one commit.
/// Only a `webhook-id` found claimed already takes the slower path.
#[derive(Clone)]
pub struct Ledger {
    db: PgPool,
    claims: BatchWriter<NewClaim, bool>,
    events: BatchWriter<NewEvent, ()>,
}

impl Ledger {
    /// Starts the two writers.
    pub fn start(db: PgPool) -> Self {
        let events =
            BatchWriter::start(db.clone(), ROWS_PER_INSERT, |conn, rows: Vec<NewEvent>| {
                let written = diesel::insert_into(webhook_events::table)
                    .values(&rows)
                    .execute(conn)?;
                Ok(vec![(); written])
            });
        Self {
            claims: BatchWriter::start(db.clone(), ROWS_PER_INSERT, insert_claims),
            events,
            db,
        }
    }

    /// Claims `(source, webhook_id)` for a new job `job_id`.
    pub async fn claim(
        &self,
        source: &str,
        webhook_id: &str,
        job_id: Uuid,
        expires_at: DateTime<Utc>,
    ) -> Result<Claim, String> {
        let (source, webhook_id) = (source.to_owned(), webhook_id.to_owned());
        let claim = NewClaim {
            source: source.clone(),
            webhook_id: webhook_id.clone(),
            job_id,
            expires_at,
        };
        if self.claims.write(claim).await? {
            return Ok(Claim::Fresh(job_id));
        }
        conveyor_schema::pool::run(&self.db, move |conn| {
            existing_claim(conn, &source, &webhook_id)
        })
        .await
        .map_err(|err| err.to_string())
    }

    /// Records an ingress-side outcome for statistics; returns once the insert
    /// holding it has committed or failed. A failure is logged, never returned:
    /// the webhook's fate is already decided.
    pub async fn record_event(&self, event: NewEvent) {
        let outcome = event.outcome;
        if let Err(err) = self.events.write(event).await {
            tracing::warn!(error = %err, outcome, "could not record a webhook event");
        }
    }
}

/// Removes the claim of a job that could not be submitted, so a retry may claim again.
pub async fn release(db: &PgPool, source: &str, webhook_id: &str, job_id: Uuid) {
    let (source, webhook_id) = (source.to_owned(), webhook_id.to_owned());
    let released = conveyor_schema::pool::run(db, move |conn| {
        diesel::delete(
            webhook_deliveries::table
                .find((&source, &webhook_id))
                .filter(webhook_deliveries::job_id.eq(job_id)),
        )
        .execute(conn)
    })
    .await;
    if let Err(err) = released {
        tracing::warn!(error = %err, "could not release a webhook claim; it is taken over after {ORPHAN_AFTER:?}");
    }
}

/// One ingress-side outcome (`accepted` or `duplicate`) of a webhook, for statistics.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = webhook_events)]
pub struct NewEvent {
    /// The configured source.
    pub source: String,
    /// The `webhook-id`.
    pub webhook_id: String,
    /// The profile it was about.
    pub profile_id: Option<String>,
    /// The event's action.
    pub action: Option<String>,
    /// `accepted` or `duplicate`.
    pub outcome: &'static str,
}

/// How often the sweeper forgets expired ids.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Deletes the claims whose `expires_at` has passed; returns how many.
pub async fn sweep_expired(db: &PgPool) -> Result<usize, DbError> {
    conveyor_schema::pool::run(db, |conn| {
        diesel::delete(
            webhook_deliveries::table.filter(webhook_deliveries::expires_at.lt(diesel::dsl::now)),
        )
        .execute(conn)
    })
    .await
}

/// Runs [`sweep_expired`] every [`SWEEP_EVERY`] until `stop`.
pub fn spawn_sweeper(db: PgPool, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            match sweep_expired(&db).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(swept = n, "expired webhook ids forgotten"),
                Err(err) => tracing::warn!(error = %err, "could not sweep expired webhook ids"),
            }
        }
    });
}

/// The claims' handle for the application state.
pub type SharedSources = Arc<Sources>;
