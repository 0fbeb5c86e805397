//! The rollup queries: recompute windows `[from, to)` of one granularity from
//! raw rows and replace that range's rows with the result.
//!
//! Each statement is deterministic, so recomputing a window gives identical
//! rows; the upsert leaves a row untouched (its `computed_at` included) when
//! nothing changed. In the same statement, a row of the range whose group has
//! no raw row left is deleted: raw rows can leave a window (a recipient that
//! was `unknown` is set `pending` by resend-unknown and later sent in another
//! window; an operator deletes jobs), and an upsert alone would keep their old
//! counts beside the new ones. So `from` and `to` must be window boundaries,
//! and the raw rows of the range must be complete: windows whose raw rows
//! retention removed are sealed and lie outside every rollup's reach (at most
//! `MAX_HOURLY_LOOKBACK` hours, `MAX_DAILY_LOOKBACK` days back).
//!
//! Two rollups of one table (two overlapping `stats.rollup_hourly` runs, say)
//! run one after the other: each takes `lock` on its table before its
//! statement reads, so the second reads after the first committed. Without it,
//! under READ COMMITTED, a rollup whose snapshot predates a late row could
//! upsert its older counts over a newer rollup's committed row.
//!
//! Mail and webhook rollups read tables that other features own
//! (`campaign_recipients`, `webhook_events`, `webhook_rejections`); when such a
//! table does not exist in this database, that part is skipped.

use chrono::{DateTime, Utc};
use conveyor_schema::stats::{Family, Granularity};
use diesel::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text, Timestamptz};

/// What one rollup did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rolled {
    /// Job rows inserted, changed or deleted.
    pub jobs: usize,
    /// Mail rows inserted, changed or deleted; `None` when `campaign_recipients` is absent.
    pub mail: Option<usize>,
    /// Webhook rows inserted, changed or deleted; `None` when both `webhook_events`
    /// and `webhook_rejections` are absent.
    pub webhooks: Option<usize>,
}

/// First key of the rollups' advisory locks; the second is `hashtext` of the
/// rollup table's name. Two-key locks never meet single-key ones (the
/// migrations' lock); distinct from the headshot files' class.
const ROLLUP_LOCK_CLASS: i32 = 0x5354_4154;

/// Takes the lock on the rollup table `table` until the transaction ends, in
/// a statement of its own, so the rollup's statement after it takes its
/// snapshot once an earlier rollup of the table has committed. Call it inside
/// the rollup's transaction (outside one it is released at once).
fn lock(conn: &mut PgConnection, table: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind::<Integer, _>(ROLLUP_LOCK_CLASS)
        .bind::<Text, _>(table)
        .execute(conn)?;
    Ok(())
}

/// Recomputes job statistics for `[from, to)`: jobs that reached a final
/// state in each window, per task. `retried` counts those that needed more
/// than one attempt; durations are of the final attempt. Waits for any other
/// rollup of the same table to commit first (see `lock`).
pub fn jobs(
    conn: &mut PgConnection,
    granularity: Granularity,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<usize> {
    lock(conn, Family::Jobs.table(granularity))?;
    let sql = replace_statement(Replace {
        table: Family::Jobs.table(granularity),
        fresh: format!(
            "SELECT date_trunc('{unit}', finished_at, 'UTC') AS bucket, task, \
                    count(*) FILTER (WHERE state = 'succeeded') AS succeeded, \
                    count(*) FILTER (WHERE attempts > 1) AS retried, \
                    count(*) FILTER (WHERE state = 'dead') AS dead, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms, \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95_ms, \
                    max(ms) AS max_ms \
             FROM (SELECT finished_at, task, state, attempts, \
                          (extract(epoch FROM finished_at - started_at) * 1000)::float8 AS ms \
                   FROM jobs \
                   WHERE finished_at >= $1 AND finished_at < $2 \
                     AND state IN ('succeeded', 'dead')) AS finished \
             GROUP BY 1, 2",
            unit = granularity.unit(),
        ),
        key: &["task"],
        values: &["succeeded", "retried", "dead", "p50_ms", "p95_ms", "max_ms"],
    });
    count(conn, &sql, from, to)
}

/// When a recipient reached its final state (see [`mail`]); the expression of
/// the index `campaign_recipients_finished`, spelled the same so it is used.
pub const FINISHED_AT: &str = "coalesce(sent_at, updated_at)";

/// Recomputes mail statistics for `[from, to)` per campaign: recipients in a
/// final state (`sent`, `failed`, `unknown`), each bucketed by when it reached
/// that state; `None` when `campaign_recipients` does not exist.
///
/// That time is `sent_at` for a sent recipient and `updated_at` for the others:
/// the ledger writes `sent_at` only on a 250, and sets `updated_at` in every
/// statement that changes a row's state, so for a failed or unknown row it is
/// the moment it failed or fell into doubt. A final row changes again only if
/// it leaves doubt (a late outcome, or resend-unknown): it then counts in its
/// new window, and no longer in its old one (see the module header).
/// [`FINISHED_AT`] is the expression the partial index
/// `campaign_recipients_finished` is built on, so the window is an index range.
pub fn mail(
    conn: &mut PgConnection,
    granularity: Granularity,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<Option<usize>> {
    if !table_exists(conn, Family::Mail.source_table())? {
        return Ok(None);
    }
    lock(conn, Family::Mail.table(granularity))?;
    count(conn, &mail_statement(granularity), from, to).map(Some)
}

/// [`mail`]'s statement for `granularity`, taking the window as `$1` (from)
/// and `$2` (to); public so that a test can check that its plan reads the
/// index.
pub fn mail_statement(granularity: Granularity) -> String {
    replace_statement(Replace {
        table: Family::Mail.table(granularity),
        fresh: format!(
            "SELECT date_trunc('{unit}', {FINISHED_AT}, 'UTC') AS bucket, campaign_id, \
                    count(*) FILTER (WHERE state = 'sent') AS sent, \
                    count(*) FILTER (WHERE state = 'failed') AS failed, \
                    count(*) FILTER (WHERE state = 'unknown') AS unknown \
             FROM campaign_recipients \
             WHERE {FINISHED_AT} >= $1 AND {FINISHED_AT} < $2 \
               AND state IN ('sent', 'failed', 'unknown') \
             GROUP BY 1, 2",
            unit = granularity.unit(),
        ),
        key: &["campaign_id"],
        values: &["sent", "failed", "unknown"],
    })
}

/// The raw counts of rejected webhook requests, per minute, source and
/// reason (written in batches by the ingress).
pub const WEBHOOK_REJECTIONS: &str = "webhook_rejections";

/// Recomputes webhook statistics for `[from, to)` per source, outcome and
/// reason: one event per `webhook_events` row, bucketed by `recorded_at`
/// (reason `''`, or its `reason` column when the table has one), plus the
/// `webhook_rejections` counts as outcome `rejected` with their reason,
/// bucketed by minute. `None` when neither table exists.
pub fn webhooks(
    conn: &mut PgConnection,
    granularity: Granularity,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<Option<usize>> {
    let Some(sql) = webhooks_statement(conn, granularity)? else {
        return Ok(None);
    };
    lock(conn, Family::Webhooks.table(granularity))?;
    count(conn, &sql, from, to).map(Some)
}

/// [`webhooks`]'s statement for `granularity` in this database, taking the
/// window as `$1` (from) and `$2` (to); `None` when neither source table
/// exists. Public so that a test can check that its plan reads only the
/// window of `webhook_events` (through the index `webhook_events_recorded_at`).
pub fn webhooks_statement(
    conn: &mut PgConnection,
    granularity: Granularity,
) -> QueryResult<Option<String>> {
    let mut parts = Vec::new();
    if table_exists(conn, Family::Webhooks.source_table())? {
        let reason = if column_exists(conn, "webhook_events", "reason")? {
            "coalesce(reason::text, '')"
        } else {
            "''"
        };
        parts.push(format!(
            "SELECT recorded_at AS at, source::text AS source, outcome::text AS outcome, \
                    {reason} AS reason, 1::bigint AS n \
             FROM webhook_events WHERE recorded_at >= $1 AND recorded_at < $2"
        ));
    }
    if table_exists(conn, WEBHOOK_REJECTIONS)? {
        parts.push(format!(
            "SELECT minute AS at, source, 'rejected'::text AS outcome, reason, requests AS n \
             FROM {WEBHOOK_REJECTIONS} WHERE minute >= $1 AND minute < $2"
        ));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(replace_statement(Replace {
        table: Family::Webhooks.table(granularity),
        fresh: format!(
            "SELECT date_trunc('{unit}', at, 'UTC') AS bucket, source, outcome, reason, \
                    sum(n)::bigint AS events \
             FROM ({raw}) AS raw \
             GROUP BY 1, 2, 3, 4",
            unit = granularity.unit(),
            raw = parts.join(" UNION ALL "),
        ),
        key: &["source", "outcome", "reason"],
        values: &["events"],
    })))
}

/// A rollup statement's parts: its rows are `fresh` (a query taking the
/// window as `$1` and `$2`, one row per `bucket` and `key`, naming its
/// columns `bucket`, `key` and `values`).
struct Replace<'a> {
    table: &'a str,
    fresh: String,
    key: &'a [&'a str],
    values: &'a [&'a str],
}

/// The statement that makes the rows of `table` with a bucket in `[$1, $2)`
/// exactly `fresh`: it upserts `fresh` (rewriting a row only when its values
/// changed) and deletes the rows of the range whose group is not in it, in
/// one snapshot; it returns the rows inserted, changed or deleted as `n`.
fn replace_statement(
    Replace {
        table,
        fresh,
        key,
        values,
    }: Replace<'_>,
) -> String {
    let key = key.join(", ");
    let values = values.join(", ");
    let qualified = |prefix: &str, columns: &str| {
        columns
            .split(", ")
            .map(|c| format!("{prefix}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let set = values
        .split(", ")
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH fresh AS ({fresh}), \
         gone AS ( \
             DELETE FROM {table} AS t WHERE t.bucket >= $1 AND t.bucket < $2 \
               AND NOT EXISTS (SELECT 1 FROM fresh f \
                               WHERE (f.bucket, {f_key}) = (t.bucket, {t_key})) \
             RETURNING 1), \
         kept AS ( \
             INSERT INTO {table} AS t (bucket, {key}, {values}, computed_at) \
             SELECT bucket, {key}, {values}, now() FROM fresh \
             ON CONFLICT (bucket, {key}) DO UPDATE SET {set}, computed_at = EXCLUDED.computed_at \
             WHERE ({t_values}) IS DISTINCT FROM ({x_values}) \
             RETURNING 1) \
         SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM kept) AS n",
        f_key = qualified("f", &key),
        t_key = qualified("t", &key),
        t_values = qualified("t", &values),
        x_values = qualified("EXCLUDED", &values),
    )
}

/// The rows a rollup statement inserted, changed or deleted.
#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs the rollup statement `sql` for `[from, to)`; see [`Count`].
fn count(
    conn: &mut PgConnection,
    sql: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<usize> {
    diesel::sql_query(sql)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .get_result::<Count>(conn)
        .map(|Count { n }| usize::try_from(n).unwrap_or(0))
}

/// Every family for `[from, to)`, each in its own transaction, so job
/// statistics are committed even if a table owned by another feature has an
/// unexpected shape (that error is returned after).
pub fn all(
    conn: &mut PgConnection,
    granularity: Granularity,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<Rolled> {
    let jobs = conn.transaction(|conn| jobs(conn, granularity, from, to))?;
    let mail = conn.transaction(|conn| mail(conn, granularity, from, to))?;
    let webhooks = conn.transaction(|conn| webhooks(conn, granularity, from, to))?;
    Ok(Rolled {
        jobs,
        mail,
        webhooks,
    })
}

/// The start of the current window of `granularity` by the database clock.
pub fn current_window(
    conn: &mut PgConnection,
    granularity: Granularity,
) -> QueryResult<DateTime<Utc>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Timestamptz)]
        start: DateTime<Utc>,
    }
    diesel::sql_query(format!(
        "SELECT date_trunc('{}', now(), 'UTC') AS start",
        granularity.unit()
    ))
    .get_result::<Row>(conn)
    .map(|r| r.start)
}

fn table_exists(conn: &mut PgConnection, table: &str) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Bool)]
        found: bool,
    }
    diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS found")
        .bind::<Text, _>(table)
        .get_result::<Row>(conn)
        .map(|r| r.found)
}

fn column_exists(conn: &mut PgConnection, table: &str, column: &str) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Bool)]
        found: bool,
    }
    diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2) AS found",
    )
    .bind::<Text, _>(table)
    .bind::<Text, _>(column)
    .get_result::<Row>(conn)
    .map(|r| r.found)
}
