//! `stats.retention`: deletes finished job records, webhook events and webhook
//! rejection counts older than `max_age_days` in bounded batches, after their
//! windows are rolled up.
//!
//! It runs hourly, and each run goes on until nothing old is left or its
//! `max_seconds` are up, so the rows it can delete grow with the time it is
//! given, not with a fixed number of batches: a backlog (retention enabled on
//! a large table, a burst) is worked off over the following runs. Every
//! statement goes through [`run_cancel_on_drop`], so one running when the
//! attempt's timeout strikes is cancelled rather than left running unseen.
//!
//! Before any raw row of a UTC day is deleted, that day's hourly and daily job
//! and webhook rollups are recomputed one last time from the complete raw rows
//! and the day is *sealed* (`stats_sealed_days`); deletes only touch sealed days.
//! The sealed-day row is written first in that transaction, so of two
//! overlapping runs only one recomputes a day: the other waits on its primary
//! key, then skips the day rather than recompute it from half-deleted rows. Rollup
//! lookbacks and catch-ups (at most 48 hours, 3 days) never reach a day this
//! old (at least 7), so a sealed window is never recomputed from partial rows
//! (a recompute replaces the window's rows, groups without raw rows deleted). Jobs that never
//! reached a final state are kept: they need an operator, not a sweeper. Old
//! schedule ticks go too, except each schedule's latest (the scheduler's memory).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_schema::args::stats::{self, MAX_RETENTION_SECONDS, RetentionArgs};
use conveyor_schema::pool::{PgPool, run_cancel_on_drop};
use conveyor_schema::stats::Granularity;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Timestamptz};

use super::rollup;
use crate::{JobContext, Task, TaskError};

/// Deletes old finished job records, webhook events and webhook rejection counts.
pub struct Retention;

impl Task for Retention {
    type Spec = stats::Retention;
    async fn run(&self, args: RetentionArgs, ctx: JobContext) -> Result<(), TaskError> {
        let max_age_days = args.max_age_days.unwrap_or(30);
        let batch = i64::from(args.batch.unwrap_or(5_000));
        let seconds = args.max_seconds.unwrap_or(MAX_RETENTION_SECONDS);
        let budget = Budget {
            ends: Instant::now() + Duration::from_secs(u64::from(seconds)),
            ctx: &ctx,
        };
        let db = &ctx.services.db;
        let (cutoff, days) =
            run_cancel_on_drop(db, move |conn| unsealed_days(conn, max_age_days)).await?;
        let mut sealed = 0;
        for day in days {
            if budget.spent() {
                break;
            }
            sealed += run_cancel_on_drop(db, move |conn| seal(conn, day)).await?;
        }
        let mut deleted = [0; 3];
        for (rows, deleted) in SEALABLE.into_iter().zip(&mut deleted) {
            *deleted = in_batches(db, &budget, batch, move |conn| {
                delete_sealed(conn, rows, cutoff, batch)
            })
            .await?;
        }
        let ticks = run_cancel_on_drop(db, move |conn| delete_ticks(conn, cutoff)).await?;
        let [jobs, events, rejections] = deleted;
        if budget.spent() {
            tracing::warn!(
                %cutoff, days.sealed = sealed, jobs.deleted = jobs,
                webhook_events.deleted = events, webhook_rejections.deleted = rejections,
                ticks.deleted = ticks, max_seconds = seconds,
                "retention stopped at its time budget (or the worker's drain); the next run carries on"
            );
        } else {
            tracing::info!(
                %cutoff, days.sealed = sealed, jobs.deleted = jobs,
                webhook_events.deleted = events, webhook_rejections.deleted = rejections,
                ticks.deleted = ticks, "retention done"
            );
        }
        Ok(())
    }
}

/// How long a run may go on: until its `max_seconds` are up or the worker
/// starts draining. Checked between statements; the statement running when
/// the attempt's timeout strikes is cancelled ([`run_cancel_on_drop`]).
struct Budget<'a> {
    ends: Instant,
    ctx: &'a JobContext,
}

impl Budget<'_> {
    fn spent(&self) -> bool {
        Instant::now() >= self.ends || self.ctx.shutdown.is_cancelled()
    }
}

/// Runs `delete` (one batch of at most `batch` rows, one transaction) until a
/// batch comes back short or the budget is spent; returns the rows deleted.
/// There is no cap on batches: a backlog is worked off for as long as the
/// budget lasts, and the next run carries on.
async fn in_batches<F>(
    db: &PgPool,
    budget: &Budget<'_>,
    batch: i64,
    delete: F,
) -> Result<usize, TaskError>
where
    F: Fn(&mut PgConnection) -> QueryResult<usize> + Clone + Send + 'static,
{
    let mut deleted = 0;
    while !budget.spent() {
        let n = run_cancel_on_drop(db, delete.clone()).await?;
        deleted += n;
        if (n as i64) < batch {
            break;
        }
    }
    Ok(deleted)
}

#[derive(QueryableByName)]
struct Day {
    #[diesel(sql_type = Timestamptz)]
    day: DateTime<Utc>,
}

/// The cutoff (a UTC midnight `max_age_days` back) and every day before it
/// that holds a row to delete and is not sealed yet, oldest first.
fn unsealed_days(
    conn: &mut PgConnection,
    max_age_days: u32,
) -> QueryResult<(DateTime<Utc>, Vec<DateTime<Utc>>)> {
    let cutoff = diesel::sql_query(
        "SELECT date_trunc('day', now() - make_interval(days => $1), 'UTC') AS day",
    )
    .bind::<Integer, _>(i32::try_from(max_age_days).unwrap_or(i32::MAX))
    .get_result::<Day>(conn)?
    .day;
    let days = diesel::sql_query(days_to_seal_statement())
        .bind::<Timestamptz, _>(cutoff)
        .load::<Day>(conn)?;
    Ok((cutoff, days.into_iter().map(|Day { day }| day).collect()))
}

/// The statement listing the unsealed UTC days before the cutoff (`$1`) that
/// hold a row to delete, as `day`, oldest first. Each table is walked a day at
/// a time through the index on its timestamp (the oldest row, then the oldest
/// at least a day later, …): a few index entries per day, however many rows
/// wait, where reading every old row would cost each hourly run the whole
/// backlog. Public so that a test can check its plan.
pub fn days_to_seal_statement() -> String {
    let days_with_rows: Vec<String> = SEALABLE
        .iter()
        .map(
            |Sealable {
                 table, at, also, ..
             }| {
                let oldest_from = |from: &str| {
                    format!(
                        "SELECT date_trunc('day', {at}, 'UTC') FROM {table} \
                     WHERE {at} >= {from} AND {at} < $1 {also} ORDER BY {at} LIMIT 1"
                    )
                };
                format!(
                    "(WITH RECURSIVE d(day) AS ( \
                     ({first}) \
                     UNION ALL \
                     SELECT ({next}) FROM d WHERE d.day IS NOT NULL) \
                  SELECT day FROM d WHERE day IS NOT NULL)",
                    first = oldest_from("'-infinity'"),
                    // UTC days are always 24 hours long.
                    next = oldest_from("d.day + interval '24 hours'"),
                )
            },
        )
        .collect();
    format!(
        "{} EXCEPT SELECT day FROM stats_sealed_days ORDER BY 1",
        days_with_rows.join(" UNION ")
    )
}

/// Rolls `day` up one last time and seals it, in one transaction; 0 when
/// another run sealed it first (skipped, not recomputed), else 1.
fn seal(conn: &mut PgConnection, day: DateTime<Utc>) -> QueryResult<usize> {
    let end = day + Granularity::Day.duration();
    conn.transaction(|conn| {
        // The sealed-day row first: an overlapping run that read the same
        // day list waits here on the primary key until this transaction
        // ends, then finds the day sealed and leaves it alone; otherwise
        // it would recompute the day from rows this run is deleting.
        let claimed = diesel::sql_query(
            "INSERT INTO stats_sealed_days (day) VALUES ($1) \
             ON CONFLICT DO NOTHING RETURNING day",
        )
        .bind::<Timestamptz, _>(day)
        .load::<Day>(conn)?;
        if claimed.is_empty() {
            return Ok(0);
        }
        rollup::jobs(conn, Granularity::Hour, day, end)?;
        rollup::jobs(conn, Granularity::Day, day, end)?;
        rollup::webhooks(conn, Granularity::Hour, day, end)?;
        rollup::webhooks(conn, Granularity::Day, day, end)?;
        Ok(1)
    })
}

/// Raw rows that retention deletes once their UTC day is sealed.
struct Sealable {
    table: &'static str,
    /// The columns that identify a row.
    key: &'static str,
    /// The timestamp that places a row in its day.
    at: &'static str,
    /// A further condition (`AND …`), or nothing.
    also: &'static str,
}

/// Finished jobs only: a job still in flight needs an operator, not a sweeper.
const FINISHED_JOBS: Sealable = Sealable {
    table: "jobs",
    key: "id",
    at: "finished_at",
    also: "AND state IN ('succeeded', 'dead')",
};

const WEBHOOK_EVENTS: Sealable = Sealable {
    table: "webhook_events",
    key: "id",
    at: "recorded_at",
    also: "",
};

const WEBHOOK_REJECTIONS: Sealable = Sealable {
    table: rollup::WEBHOOK_REJECTIONS,
    key: "minute, source, reason",
    at: "minute",
    also: "",
};

/// Every kind of raw row retention deletes: their days are sealed first.
const SEALABLE: [&Sealable; 3] = [&FINISHED_JOBS, &WEBHOOK_EVENTS, &WEBHOOK_REJECTIONS];

/// Deletes at most `batch` rows of `rows` older than `cutoff` whose day is sealed.
fn delete_sealed(
    conn: &mut PgConnection,
    rows: &Sealable,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> QueryResult<usize> {
    let Sealable {
        table,
        key,
        at,
        also,
    } = rows;
    diesel::sql_query(format!(
        "DELETE FROM {table} WHERE ({key}) IN ( \
             SELECT {key} FROM {table} \
             WHERE {at} < $1 {also} \
               AND EXISTS (SELECT 1 FROM stats_sealed_days s \
                           WHERE s.day = date_trunc('day', {at}, 'UTC')) \
             LIMIT $2)"
    ))
    .bind::<Timestamptz, _>(cutoff)
    .bind::<BigInt, _>(batch)
    .execute(conn)
}

fn delete_ticks(conn: &mut PgConnection, cutoff: DateTime<Utc>) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM schedule_ticks t WHERE t.tick_at < $1 AND t.published_at IS NOT NULL \
           AND t.tick_at < (SELECT max(l.tick_at) FROM schedule_ticks l WHERE l.schedule = t.schedule)",
    )
    .bind::<Timestamptz, _>(cutoff)
    .execute(conn)
}
