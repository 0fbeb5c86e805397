//! `stats.retention`: deletes finished job records, webhook events and webhook
//! rejection counts older than `max_age_days` in bounded batches, after their
//! windows are rolled up.
//!
//! Before any raw row of a UTC day is deleted, that day's hourly and daily job
//! and webhook rollups are recomputed one last time from the complete raw rows
//! and the day is *sealed* (`stats_sealed_days`); deletes only touch sealed days.
//! The sealed-day row is written first in that transaction, so of two
//! overlapping runs only one recomputes a day: the other waits on its primary
//! key, then skips the day rather than recompute it from half-deleted rows. Rollup
//! lookbacks (at most 48 hours, 3 days) never reach a day this old (at least 7),
//! so a sealed window is never recomputed from partial rows. Jobs that never
//! reached a final state are kept: they need an operator, not a sweeper. Old
//! schedule ticks go too, except each schedule's latest (the scheduler's memory).

use chrono::{DateTime, Utc};
use conveyor_schema::args::stats::{self, RetentionArgs};
use conveyor_schema::stats::Granularity;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Timestamptz};

use super::rollup;
use crate::{JobContext, Task, TaskError};

/// Most batches one run deletes; the next run continues.
const MAX_BATCHES: usize = 1000;

/// Deletes old finished job records, webhook events and webhook rejection counts.
pub struct Retention;

impl Task for Retention {
    type Spec = stats::Retention;
    async fn run(&self, args: RetentionArgs, ctx: JobContext) -> Result<(), TaskError> {
        let max_age_days = args.max_age_days.unwrap_or(30);
        let batch = i64::from(args.batch.unwrap_or(5_000));
        let db = ctx.services.db.clone();
        let (cutoff, sealed) =
            conveyor_schema::pool::run(&db, move |conn| seal(conn, max_age_days)).await?;
        let deleted = in_batches(&ctx, batch, move |conn| {
            delete_sealed(conn, &FINISHED_JOBS, cutoff, batch)
        })
        .await?;
        let events = in_batches(&ctx, batch, move |conn| {
            delete_sealed(conn, &WEBHOOK_EVENTS, cutoff, batch)
        })
        .await?;
        let rejections = in_batches(&ctx, batch, move |conn| {
            delete_sealed(conn, &WEBHOOK_REJECTIONS, cutoff, batch)
        })
        .await?;
        let ticks = conveyor_schema::pool::run(&db, move |conn| delete_ticks(conn, cutoff)).await?;
        tracing::info!(
            %cutoff, days.sealed = sealed, jobs.deleted = deleted,
            webhook_events.deleted = events, webhook_rejections.deleted = rejections,
            ticks.deleted = ticks, "retention done"
        );
        Ok(())
    }
}

/// Runs `delete` (one batch of at most `batch` rows, one transaction) until a
/// batch comes back short, [`MAX_BATCHES`] ran, or the worker is stopping;
/// returns the rows deleted.
async fn in_batches<F>(ctx: &JobContext, batch: i64, delete: F) -> Result<usize, TaskError>
where
    F: Fn(&mut PgConnection) -> QueryResult<usize> + Clone + Send + 'static,
{
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES {
        if ctx.shutdown.is_cancelled() {
            break;
        }
        let n = conveyor_schema::pool::run(&ctx.services.db, delete.clone()).await?;
        deleted += n;
        if (n as i64) < batch {
            break;
        }
    }
    Ok(deleted)
}

/// The cutoff (a UTC midnight `max_age_days` back) and how many days this run
/// sealed (a day another run sealed first is skipped, not recomputed).
fn seal(conn: &mut PgConnection, max_age_days: u32) -> QueryResult<(DateTime<Utc>, usize)> {
    #[derive(QueryableByName)]
    struct Day {
        #[diesel(sql_type = Timestamptz)]
        day: DateTime<Utc>,
    }
    let cutoff = diesel::sql_query(
        "SELECT date_trunc('day', now() - make_interval(days => $1), 'UTC') AS day",
    )
    .bind::<Integer, _>(i32::try_from(max_age_days).unwrap_or(i32::MAX))
    .get_result::<Day>(conn)?
    .day;
    // Every day before the cutoff that holds a row to delete and is not sealed yet.
    let days_with_rows: Vec<String> = SEALABLE
        .iter()
        .map(|Sealable { table, at, also, .. }| {
            format!("SELECT date_trunc('day', {at}, 'UTC') AS day FROM {table} WHERE {at} < $1 {also}")
        })
        .collect();
    let days = diesel::sql_query(format!(
        "{} EXCEPT SELECT day FROM stats_sealed_days ORDER BY 1",
        days_with_rows.join(" UNION ")
    ))
    .bind::<Timestamptz, _>(cutoff)
    .load::<Day>(conn)?;
    let mut sealed = 0;
    for Day { day } in &days {
        let end = *day + Granularity::Day.duration();
        sealed += conn.transaction(|conn| {
            // The sealed-day row first: an overlapping run that read the same
            // day list waits here on the primary key until this transaction
            // ends, then finds the day sealed and leaves it alone; otherwise
            // it would recompute the day from rows this run is deleting.
            let claimed = diesel::sql_query(
                "INSERT INTO stats_sealed_days (day) VALUES ($1) \
                 ON CONFLICT DO NOTHING RETURNING day",
            )
            .bind::<Timestamptz, _>(*day)
            .load::<Day>(conn)?;
            if claimed.is_empty() {
                return Ok::<_, diesel::result::Error>(0);
            }
            rollup::jobs(conn, Granularity::Hour, *day, end)?;
            rollup::jobs(conn, Granularity::Day, *day, end)?;
            rollup::webhooks(conn, Granularity::Hour, *day, end)?;
            rollup::webhooks(conn, Granularity::Day, *day, end)?;
            Ok(1)
        })?;
    }
    Ok((cutoff, sealed))
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
