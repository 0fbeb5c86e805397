//! Finding dead jobs: the filter shared by the listing (admin API, dashboard,
//! `conveyor dlq list`) and the bulk operations, and keyset pages over it.
//!
//! Records are ordered by `(dead_at, id)`, newest first for the listing and
//! oldest first for bulk operations; the id breaks ties between records dead
//! at the same instant, so a [`Position`] (the last record handed out) says
//! exactly where the next page starts, however many records share a time and
//! however many lie beyond the first 10 000. Each caller selects only the
//! columns it shows: the envelope (up to a message's size), errors and
//! `x-death` are read only where they are shown.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use conveyor_schema::db::dead_jobs;
use conveyor_schema::models::DeadJob;
use conveyor_schema::pool::{self, DbError, PgPool};
use diesel::dsl::sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Timestamptz};
use serde_json::{Value, json};
use uuid::Uuid;

/// Most records one query hands out.
pub const MAX_LIMIT: i64 = 10_000;

/// Which dead jobs to list or act on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exact task name.
    pub task: Option<String>,
    /// Exact logical queue.
    pub queue: Option<String>,
    /// Dead at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Dead at or before this time (a bulk run's bound: records that die
    /// while it runs, its own replays among them, are not taken).
    pub until: Option<DateTime<Utc>>,
    /// The final reason contains this text (case-insensitive, taken literally).
    pub error_contains: Option<String>,
    /// Include discarded records.
    pub include_discarded: bool,
    /// Include records already replayed.
    pub include_replayed: bool,
    /// At most this many (1 to [`MAX_LIMIT`]), newest first (oldest first with `oldest_first`).
    pub limit: i64,
    /// Take the oldest matches first (bulk operations work in death order).
    pub oldest_first: bool,
    /// Only records past this one in the order (where the previous page ended).
    pub after: Option<Position>,
}

impl Filter {
    /// The filter as recorded in the audit of a bulk operation.
    pub fn audit(&self) -> Value {
        json!({
            "task": self.task, "queue": self.queue, "since": self.since,
            "error_contains": self.error_contains,
        })
    }
}

/// A record's place in the order: its `dead_at` (to the microsecond, as
/// stored) and id. Written as `<dead_at in µs since 1970>.<id>`, which a
/// client passes back without reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// When the record died.
    pub dead_at: DateTime<Utc>,
    /// Its id, the tie-breaker.
    pub id: Uuid,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.dead_at.timestamp_micros(), self.id)
    }
}

/// A cursor that is not one this ingress wrote.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a cursor from an earlier answer")]
pub struct BadCursor(pub String);

impl FromStr for Position {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let bad = || BadCursor(s.to_owned());
        let (micros, id) = s.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            dead_at: time_of(micros).ok_or_else(bad)?,
            id: Uuid::try_parse(id).map_err(|_| bad())?,
        })
    }
}

/// The time `micros` (µs since 1970, as a cursor writes it) names, if
/// PostgreSQL can hold it (see [`conveyor_schema::timestamptz`]: binding an
/// earlier time would fail the query).
pub(super) fn time_of(micros: &str) -> Option<DateTime<Utc>> {
    let time = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    conveyor_schema::timestamptz::holds(time).then_some(time)
}

/// `text` as an `ILIKE` pattern matching it anywhere, literally: the
/// backslash (`ILIKE`'s escape character) is escaped first, then `%` and `_`.
fn contains_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// `query` narrowed to `filter`'s records, in its order, at most `limit`.
fn narrowed<'a, ST: 'a>(
    mut query: dead_jobs::BoxedQuery<'a, Pg, ST>,
    filter: Filter,
    limit: i64,
) -> dead_jobs::BoxedQuery<'a, Pg, ST> {
    if let Some(task) = filter.task {
        query = query.filter(dead_jobs::task.eq(task));
    }
    if let Some(queue) = filter.queue {
        query = query.filter(dead_jobs::queue.eq(queue));
    }
    if let Some(since) = filter.since {
        query = query.filter(dead_jobs::dead_at.ge(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(dead_jobs::dead_at.le(until));
    }
    if let Some(text) = filter.error_contains {
        query = query.filter(dead_jobs::reason.ilike(contains_pattern(&text)));
    }
    if !filter.include_discarded {
        query = query.filter(dead_jobs::discarded_at.is_null());
    }
    if !filter.include_replayed {
        query = query.filter(dead_jobs::replayed_at.is_null());
    }
    if let Some(after) = filter.after {
        // A row comparison, which PostgreSQL answers from the dead_at index.
        let past = if filter.oldest_first { ">" } else { "<" };
        query = query.filter(
            sql::<Bool>(&format!("(dead_jobs.dead_at, dead_jobs.id) {past} ("))
                .bind::<Timestamptz, _>(after.dead_at)
                .sql(", ")
                .bind::<diesel::sql_types::Uuid, _>(after.id)
                .sql(")"),
        );
    }
    query = if filter.oldest_first {
        query.order((dead_jobs::dead_at.asc(), dead_jobs::id.asc()))
    } else {
        query.order((dead_jobs::dead_at.desc(), dead_jobs::id.desc()))
    };
    query.limit(limit)
}

/// Lists dead jobs matching `filter` (whole records), at most `filter.limit`.
pub async fn list(db: &PgPool, filter: Filter) -> Result<Vec<DeadJob>, DbError> {
    Ok(page(db, filter).await?.0)
}

/// One page of `filter`'s records (whole records), and where the next page
/// starts: `None` when this one holds the last record.
pub async fn page(
    db: &PgPool,
    filter: Filter,
) -> Result<(Vec<DeadJob>, Option<Position>), DbError> {
    let limit = filter.limit.clamp(1, MAX_LIMIT);
    let rows = pool::run(db, move |conn| {
        let query = dead_jobs::table.select(DeadJob::as_select()).into_boxed();
        narrowed(query, filter, limit + 1).load(conn)
    })
    .await?;
    Ok(split(rows, limit, |d| Position {
        dead_at: d.dead_at,
        id: d.id,
    }))
}

/// What `conveyor dlq list` shows of a dead job.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = dead_jobs, check_for_backend(diesel::pg::Pg))]
pub struct Summary {
    /// The dead job's id.
    pub id: Uuid,
    /// Task name.
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// Attempts made.
    pub attempts: i32,
    /// The final reason.
    pub reason: String,
    /// `worker` or `broker`.
    pub source: String,
    /// When it died.
    pub dead_at: DateTime<Utc>,
    /// The job the latest replay created.
    pub replayed_as: Option<Uuid>,
    /// When it was discarded.
    pub discarded_at: Option<DateTime<Utc>>,
}

/// [`page`] without the envelope, body, errors and `x-death`.
pub async fn summaries(
    db: &PgPool,
    filter: Filter,
) -> Result<(Vec<Summary>, Option<Position>), DbError> {
    let limit = filter.limit.clamp(1, MAX_LIMIT);
    let rows = pool::run(db, move |conn| {
        let query = dead_jobs::table.select(Summary::as_select()).into_boxed();
        narrowed(query, filter, limit + 1).load(conn)
    })
    .await?;
    Ok(split(rows, limit, |d| Position {
        dead_at: d.dead_at,
        id: d.id,
    }))
}

/// The fields of a dead job a bulk operation needs.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = dead_jobs, check_for_backend(diesel::pg::Pg))]
pub struct Target {
    /// The dead job's id.
    pub id: Uuid,
    /// Task name (for the answer).
    pub task: String,
    /// Logical queue (for the metrics).
    pub queue: String,
    /// When it died (where a run carries on).
    pub dead_at: DateTime<Utc>,
}

impl Target {
    /// Its place in the order.
    pub fn position(&self) -> Position {
        Position {
            dead_at: self.dead_at,
            id: self.id,
        }
    }
}

/// `filter`'s records as [`Target`]s, at most `filter.limit`, and whether
/// more match; with `filter.until` unset, that bound is set to the
/// database's time now (and returned), so later pages take no newer record.
pub(super) async fn targets(
    db: &PgPool,
    mut filter: Filter,
) -> Result<(Vec<Target>, bool, DateTime<Utc>), DbError> {
    let limit = filter.limit.clamp(1, MAX_LIMIT);
    pool::run(db, move |conn| {
        let until = match filter.until {
            Some(until) => until,
            None => diesel::select(sql::<Timestamptz>("now()")).get_result(conn)?,
        };
        filter.until = Some(until);
        let query = dead_jobs::table.select(Target::as_select()).into_boxed();
        let mut rows = narrowed(query, filter, limit + 1).load(conn)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Ok((rows, more, until))
    })
    .await
}

/// The first `limit` of `rows` (fetched one past it), and the position of the
/// last one kept when there were more.
fn split<T>(
    mut rows: Vec<T>,
    limit: i64,
    position: impl Fn(&T) -> Position,
) -> (Vec<T>, Option<Position>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = rows.last().filter(|_| more).map(position);
    (rows, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_written_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap();
        let position = Position {
            dead_at: at,
            id: Uuid::now_v7(),
        };
        let written = position.to_string();
        assert_eq!(written.parse::<Position>().unwrap(), position);
        let ancient = format!("-250000000000000000.{}", position.id);
        for bad in [
            "",
            "1",
            "x.y",
            "1.not-a-uuid",
            "99999999999999999999.0",
            ".",
            &ancient,
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    #[test]
    fn error_text_is_matched_literally() {
        assert_eq!(contains_pattern("plain"), "%plain%");
        assert_eq!(
            contains_pattern(r#"field \"x\" 100%_"#),
            r#"%field \\"x\\" 100\%\_%"#
        );
    }
}
