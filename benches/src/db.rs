//! What the scenarios ask the bench database: counts and timings of job
//! records, and the webhook endpoint's remembered ids and events.

use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text, Uuid as SqlUuid};
use uuid::Uuid;

/// A small pool on the bench database.
pub fn pool(url: &str) -> PgPool {
    pool::pool(url, 4)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Deletes every job record, so each repetition starts from an empty table.
pub async fn truncate_jobs(db: &PgPool) -> anyhow::Result<()> {
    pool::run(db, |conn| diesel::sql_query("TRUNCATE jobs").execute(conn)).await?;
    Ok(())
}

/// Job records in all.
pub async fn count_all(db: &PgPool) -> anyhow::Result<i64> {
    let row = pool::run(db, |conn| {
        diesel::sql_query("SELECT count(*) AS n FROM jobs").get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// Job records in `state`.
pub async fn count_state(db: &PgPool, state: &'static str) -> anyhow::Result<i64> {
    let row = pool::run(db, move |conn| {
        diesel::sql_query("SELECT count(*) AS n FROM jobs WHERE state = $1")
            .bind::<Text, _>(state)
            .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// How many of `ids` have a record.
pub async fn count_ids(db: &PgPool, ids: Vec<Uuid>) -> anyhow::Result<i64> {
    let row = pool::run(db, move |conn| {
        diesel::sql_query("SELECT count(*) AS n FROM jobs WHERE id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(ids)
            .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// How many of `ids` are `succeeded`.
pub async fn count_succeeded(db: &PgPool, ids: Vec<Uuid>) -> anyhow::Result<i64> {
    let row = pool::run(db, move |conn| {
        diesel::sql_query(
            "SELECT count(*) AS n FROM jobs WHERE id = ANY($1) AND state = 'succeeded'",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// Enqueue-to-start and enqueue-to-finish of one job, in milliseconds.
#[derive(Debug, QueryableByName)]
pub struct Timing {
    /// `started_at - enqueued_at`.
    #[diesel(sql_type = Nullable<Double>)]
    pub to_start_ms: Option<f64>,
    /// `finished_at - enqueued_at`.
    #[diesel(sql_type = Nullable<Double>)]
    pub to_finish_ms: Option<f64>,
}

/// The timings of `ids`, from their records.
pub async fn timings(db: &PgPool, ids: Vec<Uuid>) -> anyhow::Result<Vec<Timing>> {
    let rows = pool::run(db, move |conn| {
        diesel::sql_query(
            "SELECT extract(epoch FROM started_at - enqueued_at)::float8 * 1000 AS to_start_ms,
                    extract(epoch FROM finished_at - enqueued_at)::float8 * 1000 AS to_finish_ms
             FROM jobs WHERE id = ANY($1)",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .load::<Timing>(conn)
    })
    .await?;
    Ok(rows)
}

#[derive(QueryableByName)]
struct Span {
    #[diesel(sql_type = Nullable<Double>)]
    seconds: Option<f64>,
}

/// Seconds from the first attempt's start to the last job's finish, over all records.
pub async fn busy_span_seconds(db: &PgPool) -> anyhow::Result<f64> {
    let row = pool::run(db, |conn| {
        diesel::sql_query(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 AS seconds FROM jobs",
        )
        .get_result::<Span>(conn)
    })
    .await?;
    Ok(row.seconds.unwrap_or(0.0))
}

/// Forgets every remembered webhook id and webhook event, so a repetition starts empty.
pub async fn truncate_webhooks(db: &PgPool) -> anyhow::Result<()> {
    pool::run(db, |conn| {
        diesel::sql_query("TRUNCATE webhook_deliveries, webhook_events").execute(conn)
    })
    .await?;
    Ok(())
}

/// Remembered webhook ids (`webhook_deliveries` rows) of `source`.
pub async fn count_webhook_deliveries(db: &PgPool, source: &str) -> anyhow::Result<i64> {
    let source = source.to_owned();
    let row = pool::run(db, move |conn| {
        diesel::sql_query("SELECT count(*) AS n FROM webhook_deliveries WHERE source = $1")
            .bind::<Text, _>(source)
            .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// `webhook_events` of `source` with `outcome` (`accepted`, `duplicate`, …).
pub async fn count_webhook_events(
    db: &PgPool,
    source: &str,
    outcome: &'static str,
) -> anyhow::Result<i64> {
    let source = source.to_owned();
    let row = pool::run(db, move |conn| {
        diesel::sql_query(
            "SELECT count(*) AS n FROM webhook_events WHERE source = $1 AND outcome = $2",
        )
        .bind::<Text, _>(source)
        .bind::<Text, _>(outcome)
        .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}

/// Job records of `task`.
pub async fn count_task(db: &PgPool, task: &'static str) -> anyhow::Result<i64> {
    let row = pool::run(db, move |conn| {
        diesel::sql_query("SELECT count(*) AS n FROM jobs WHERE task = $1")
            .bind::<Text, _>(task)
            .get_result::<Count>(conn)
    })
    .await?;
    Ok(row.n)
}
