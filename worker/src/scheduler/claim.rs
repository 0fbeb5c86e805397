//! The scheduler's database side: read the clock and the last ticks, claim a
//! tick together with its job record, mark it published, and take over ticks
//! whose claimer died before publishing.
//!
//! A claim is one transaction: `INSERT INTO schedule_ticks … ON CONFLICT DO
//! NOTHING` and, only when that row landed, the job's `queued` record. So a
//! tick has a job record exactly when it has a tick row, and the tick row
//! names the job. Publication happens after the commit and is confirmed; the
//! row's `published_at` stays NULL until then, so a claimer that dies between
//! commit and confirm leaves a row that any worker re-publishes from the job
//! record after `scheduler.republish_after_ms`. Re-publishing uses the same
//! job id, and the job carries the tick as its idempotency key
//! (`schedule:<name>@<tick>`), so a worker does not run a second message of a
//! tick's job that has finished or is running (`worker::execute`): a
//! re-publish after a lost `published_at` does not run the tick twice.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use conveyor_platform::db::{DbError, run};
use conveyor_schema::db::jobs;
use conveyor_schema::models::NewJob;
use conveyor_schema::pool::PgPool;
use conveyor_schema::{ENVELOPE_VERSION, Envelope, find_task};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use super::plan::Due;

/// The database clock and, per schedule name, the latest claimed tick.
pub async fn read_state(
    db: &PgPool,
    names: Vec<String>,
) -> Result<(DateTime<Utc>, HashMap<String, DateTime<Utc>>), DbError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Timestamptz)]
        now: DateTime<Utc>,
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        last: Option<DateTime<Utc>>,
    }
    let rows = run(db, move |conn| {
        diesel::sql_query(
            "SELECT clock_timestamp() AS now, n.name, \
                    (SELECT max(tick_at) FROM schedule_ticks WHERE schedule = n.name) AS last \
             FROM unnest($1::text[]) AS n(name)",
        )
        .bind::<Array<Text>, _>(names)
        .load::<Row>(conn)
    })
    .await?;
    let now = rows.first().map_or_else(Utc::now, |r| r.now);
    let lasts = rows
        .into_iter()
        .filter_map(|r| r.last.map(|last| (r.name, last)))
        .collect();
    Ok((now, lasts))
}

/// Claims `due` of schedule `name` for `task` with `args`. `Some(envelope)`
/// when this worker won the tick (its job record is committed); `None` when
/// another worker had already claimed it.
pub async fn claim(
    db: &PgPool,
    name: &str,
    task: &str,
    args: &serde_json::Value,
    due: Due,
    worker_id: &str,
) -> Result<Option<Envelope>, DbError> {
    let descriptor = find_task(task).ok_or_else(|| {
        DbError::Query(diesel::result::Error::QueryBuilderError(
            format!("unknown task `{task}`").into(),
        ))
    })?;
    let envelope = Envelope {
        idempotency_key: Some(tick_key(name, due.tick_at)),
        ..Envelope::new(task, args.clone())
    };
    let record = NewJob::queued(&envelope, &descriptor.options);
    let (name, worker_id) = (name.to_owned(), worker_id.to_owned());
    let job_id = envelope.id;
    let won = run(db, move |conn| {
        conn.transaction(|conn| {
            let inserted = diesel::sql_query(
                "INSERT INTO schedule_ticks (schedule, tick_at, job_id, catch_up, claimed_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind::<Text, _>(&name)
            .bind::<Timestamptz, _>(due.tick_at)
            .bind::<SqlUuid, _>(job_id)
            .bind::<Bool, _>(due.catch_up)
            .bind::<Text, _>(&worker_id)
            .execute(conn)?;
            if inserted == 0 {
                return Ok(false);
            }
            diesel::insert_into(jobs::table)
                .values(&record)
                .on_conflict(jobs::id)
                .do_nothing()
                .execute(conn)?;
            Ok(true)
        })
    })
    .await?;
    Ok(won.then_some(envelope))
}

/// The idempotency key of tick (`name`, `tick_at`)'s job.
fn tick_key(name: &str, tick_at: DateTime<Utc>) -> String {
    format!(
        "schedule:{name}@{}",
        tick_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

/// Records that the job of tick (`name`, `tick_at`) was confirmed by the broker.
pub async fn mark_published(
    db: &PgPool,
    name: String,
    tick_at: DateTime<Utc>,
) -> Result<(), DbError> {
    run(db, move |conn| {
        diesel::sql_query(
            "UPDATE schedule_ticks SET published_at = clock_timestamp() \
             WHERE schedule = $1 AND tick_at = $2 AND published_at IS NULL",
        )
        .bind::<Text, _>(name)
        .bind::<Timestamptz, _>(tick_at)
        .execute(conn)
    })
    .await?;
    Ok(())
}

/// A tick whose job must be published again.
pub struct Stale {
    /// Schedule name.
    pub schedule: String,
    /// Tick time.
    pub tick_at: DateTime<Utc>,
    /// The job, rebuilt from its record.
    pub envelope: Envelope,
}

/// Takes over up to 100 ticks left unpublished for longer than `after_ms`:
/// each is re-leased to `worker_id` (so two workers never re-publish the same
/// one at once). Ticks whose job already started (so it was published) are
/// just marked published; the rest are returned to be published again.
pub async fn take_stale(
    db: &PgPool,
    worker_id: &str,
    after_ms: u64,
) -> Result<Vec<Stale>, DbError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        schedule: String,
        #[diesel(sql_type = Timestamptz)]
        tick_at: DateTime<Utc>,
        #[diesel(sql_type = SqlUuid)]
        job_id: Uuid,
        #[diesel(sql_type = Nullable<Text>)]
        task: Option<String>,
        #[diesel(sql_type = Nullable<Jsonb>)]
        args: Option<serde_json::Value>,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        enqueued_at: Option<DateTime<Utc>>,
        #[diesel(sql_type = Nullable<Text>)]
        idempotency_key: Option<String>,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        published_at: Option<DateTime<Utc>>,
    }
    let worker_id = worker_id.to_owned();
    let rows = run(db, move |conn| {
        diesel::sql_query(
            "WITH stale AS ( \
                 SELECT t.schedule, t.tick_at, t.job_id, j.task, j.args, j.enqueued_at, j.idempotency_key, \
                        (j.id IS NULL OR j.state <> 'queued') AS started \
                 FROM schedule_ticks t LEFT JOIN jobs j ON j.id = t.job_id \
                 WHERE t.published_at IS NULL \
                   AND t.claimed_at < clock_timestamp() - make_interval(secs => $1::bigint / 1000.0) \
                 ORDER BY t.claimed_at LIMIT 100 \
                 FOR UPDATE OF t SKIP LOCKED) \
             UPDATE schedule_ticks t \
             SET claimed_by = $2, claimed_at = clock_timestamp(), \
                 published_at = CASE WHEN s.started THEN clock_timestamp() END \
             FROM stale s WHERE t.schedule = s.schedule AND t.tick_at = s.tick_at \
             RETURNING s.schedule, s.tick_at, s.job_id, s.task, s.args, s.enqueued_at, s.idempotency_key, \
                       t.published_at",
        )
        .bind::<BigInt, _>(i64::try_from(after_ms).unwrap_or(i64::MAX))
        .bind::<Text, _>(worker_id)
        .load::<Row>(conn)
    })
    .await?;
    Ok(rows
        .into_iter()
        .filter(|r| r.published_at.is_none())
        .filter_map(|r| {
            let envelope = Envelope {
                id: r.job_id,
                task: r.task?,
                version: ENVELOPE_VERSION,
                args: r.args?,
                attempt: 1,
                enqueued_at: r.enqueued_at?,
                idempotency_key: r.idempotency_key,
                trace: None,
                replay_of: None,
                not_before: None,
            };
            Some(Stale {
                schedule: r.schedule,
                tick_at: r.tick_at,
                envelope,
            })
        })
        .collect())
}
