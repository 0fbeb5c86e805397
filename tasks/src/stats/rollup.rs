//! The rollup queries: recompute windows `[from, to)` of one granularity from
//! raw rows and upsert them.
//!
//! Each statement is deterministic, so recomputing a window gives identical
//! rows; the upsert leaves a row untouched (its `computed_at` included) when
//! nothing changed. Rows are never deleted: windows whose raw rows retention
//! removed are sealed and lie outside every rollup's lookback.
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
use diesel::sql_types::{Bool, Integer, Text, Timestamptz};

/// What one rollup did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rolled {
    /// Job rows inserted or changed.
    pub jobs: usize,
    /// Mail rows inserted or changed; `None` when `campaign_recipients` is absent.
    pub mail: Option<usize>,
    /// Webhook rows inserted or changed; `None` when both `webhook_events`
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
    let sql = format!(
        "WITH finished AS ( \
             SELECT date_trunc('{unit}', finished_at, 'UTC') AS bucket, task, state, attempts, \
                    (extract(epoch FROM finished_at - started_at) * 1000)::float8 AS ms \
             FROM jobs \
             WHERE finished_at >= $1 AND finished_at < $2 AND state IN ('succeeded', 'dead')) \
         INSERT INTO {table} AS t \
             (bucket, task, succeeded, retried, dead, p50_ms, p95_ms, max_ms, computed_at) \
         SELECT bucket, task, \
                count(*) FILTER (WHERE state = 'succeeded'), \
                count(*) FILTER (WHERE attempts > 1), \
                count(*) FILTER (WHERE state = 'dead'), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms), \
                max(ms), now() \
         FROM finished GROUP BY bucket, task \
         ON CONFLICT (bucket, task) DO UPDATE SET \
             succeeded = EXCLUDED.succeeded, retried = EXCLUDED.retried, dead = EXCLUDED.dead, \
             p50_ms = EXCLUDED.p50_ms, p95_ms = EXCLUDED.p95_ms, max_ms = EXCLUDED.max_ms, \
             computed_at = EXCLUDED.computed_at \
         WHERE (t.succeeded, t.retried, t.dead, t.p50_ms, t.p95_ms, t.max_ms) IS DISTINCT FROM \
               (EXCLUDED.succeeded, EXCLUDED.retried, EXCLUDED.dead, EXCLUDED.p50_ms, EXCLUDED.p95_ms, EXCLUDED.max_ms)",
        unit = granularity.unit(),
        table = Family::Jobs.table(granularity),
    );
    diesel::sql_query(sql)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .execute(conn)
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
/// new window. [`FINISHED_AT`] is the expression the partial index
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
    diesel::sql_query(mail_statement(granularity))
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .execute(conn)
        .map(Some)
}

/// [`mail`]'s statement for `granularity`, taking the window as `$1` (from)
/// and `$2` (to); public so that a test can check that its plan reads the
/// index.
pub fn mail_statement(granularity: Granularity) -> String {
    format!(
        "INSERT INTO {table} AS t (bucket, campaign_id, sent, failed, unknown, computed_at) \
         SELECT date_trunc('{unit}', {FINISHED_AT}, 'UTC'), campaign_id, \
                count(*) FILTER (WHERE state = 'sent'), \
                count(*) FILTER (WHERE state = 'failed'), \
                count(*) FILTER (WHERE state = 'unknown'), now() \
         FROM campaign_recipients \
         WHERE {FINISHED_AT} >= $1 AND {FINISHED_AT} < $2 \
           AND state IN ('sent', 'failed', 'unknown') \
         GROUP BY 1, 2 \
         ON CONFLICT (bucket, campaign_id) DO UPDATE SET \
             sent = EXCLUDED.sent, failed = EXCLUDED.failed, unknown = EXCLUDED.unknown, \
             computed_at = EXCLUDED.computed_at \
         WHERE (t.sent, t.failed, t.unknown) IS DISTINCT FROM \
               (EXCLUDED.sent, EXCLUDED.failed, EXCLUDED.unknown)",
        unit = granularity.unit(),
        table = Family::Mail.table(granularity),
    )
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
    diesel::sql_query(sql)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .execute(conn)
        .map(Some)
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
    Ok(Some(format!(
        "INSERT INTO {table} AS t (bucket, source, outcome, reason, events, computed_at) \
         SELECT date_trunc('{unit}', at, 'UTC'), source, outcome, reason, sum(n)::bigint, now() \
         FROM ({raw}) AS raw \
         GROUP BY 1, 2, 3, 4 \
         ON CONFLICT (bucket, source, outcome, reason) DO UPDATE SET \
             events = EXCLUDED.events, computed_at = EXCLUDED.computed_at \
         WHERE t.events IS DISTINCT FROM EXCLUDED.events",
        unit = granularity.unit(),
        table = Family::Webhooks.table(granularity),
        raw = parts.join(" UNION ALL "),
    )))
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
