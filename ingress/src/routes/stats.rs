//! `GET /v1/stats/{jobs|mail|webhooks}`: rollup rows for a time range, as JSON,
//! or as CSV with `Accept: text/csv` (one header line, then one line per row,
//! the same columns and values as the JSON rows).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use conveyor_schema::stats::{Family, Granularity};
use conveyor_schema::timestamptz;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::problem::Problem;
use crate::state::AppState;

/// Query of `GET /v1/stats/{family}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// First bucket included (RFC 3339, from 4714-11-24 00:00:00 UTC BC; default: `to` minus 24 hours, or 30 days by day, not before 4714 BC).
    pub from: Option<DateTime<Utc>>,
    /// End, excluded (RFC 3339, from 4714-11-24 00:00:00 UTC BC; default: now).
    pub to: Option<DateTime<Utc>>,
    /// `hour` (default) or `day` (UTC days).
    pub granularity: Option<Granularity>,
    /// Jobs only: one task.
    pub task: Option<String>,
    /// Mail only: one campaign id.
    pub campaign: Option<Uuid>,
    /// Webhooks only: one source.
    pub source: Option<String>,
    /// Webhooks only: one outcome (`rejected` for every rejection reason).
    pub outcome: Option<String>,
    /// Webhooks only: one rejection reason (e.g. `bad_signature`).
    pub reason: Option<String>,
}

/// Job runs of one task in one bucket (jobs that reached a final state then).
#[derive(Debug, Serialize, Deserialize, ToSchema, QueryableByName, PartialEq)]
pub struct JobStatsRow {
    /// Start of the bucket (UTC).
    #[diesel(sql_type = Timestamptz)]
    pub bucket: DateTime<Utc>,
    /// Task name.
    #[diesel(sql_type = Text)]
    pub task: String,
    /// Jobs that succeeded.
    #[diesel(sql_type = BigInt)]
    pub succeeded: i64,
    /// Finished jobs that needed more than one attempt.
    #[diesel(sql_type = BigInt)]
    pub retried: i64,
    /// Jobs that died.
    #[diesel(sql_type = BigInt)]
    pub dead: i64,
    /// Median duration of the final attempt, ms.
    #[diesel(sql_type = Nullable<Double>)]
    pub p50_ms: Option<f64>,
    /// 95th percentile, ms.
    #[diesel(sql_type = Nullable<Double>)]
    pub p95_ms: Option<f64>,
    /// Longest, ms.
    #[diesel(sql_type = Nullable<Double>)]
    pub max_ms: Option<f64>,
}

/// Mail deliveries of one campaign in one bucket.
#[derive(Debug, Serialize, Deserialize, ToSchema, QueryableByName, PartialEq)]
pub struct MailStatsRow {
    /// Start of the bucket (UTC).
    #[diesel(sql_type = Timestamptz)]
    pub bucket: DateTime<Utc>,
    /// Campaign id.
    #[diesel(sql_type = SqlUuid)]
    pub campaign_id: Uuid,
    /// Accepted by the mail server.
    #[diesel(sql_type = BigInt)]
    pub sent: i64,
    /// Refused.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    /// Outcome unknown (e.g. the connection broke after DATA).
    #[diesel(sql_type = BigInt)]
    pub unknown: i64,
}

/// Webhook events of one source, outcome and reason in one bucket. Rejected
/// requests have outcome `rejected`, one row per reason; their total is the
/// sum of those rows.
#[derive(Debug, Serialize, Deserialize, ToSchema, QueryableByName, PartialEq)]
pub struct WebhookStatsRow {
    /// Start of the bucket (UTC).
    #[diesel(sql_type = Timestamptz)]
    pub bucket: DateTime<Utc>,
    /// Source name; `(unknown)` for rejected requests to a source that is not configured.
    #[diesel(sql_type = Text)]
    pub source: String,
    /// `accepted`, `duplicate`, `applied`, `unchanged`, `skipped_stale`,
    /// `skipped_deleted`, `failed`, or `rejected`.
    #[diesel(sql_type = Text)]
    pub outcome: String,
    /// Why a request was rejected (`unknown_source`, `bad_headers`,
    /// `too_large`, `stale_timestamp`, `bad_signature`, `invalid_body`,
    /// `in_progress`, `unavailable`); empty for the other outcomes.
    #[diesel(sql_type = Text)]
    pub reason: String,
    /// Events.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
}

/// Rows of one family.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StatsRows {
    /// `jobs` rows.
    Jobs(Vec<JobStatsRow>),
    /// `mail` rows.
    Mail(Vec<MailStatsRow>),
    /// `webhooks` rows.
    Webhooks(Vec<WebhookStatsRow>),
}

/// A statistics answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsResponse {
    /// `jobs`, `mail` or `webhooks`.
    pub family: Family,
    /// `hour` or `day`.
    pub granularity: Granularity,
    /// First bucket included.
    pub from: DateTime<Utc>,
    /// End, excluded.
    pub to: DateTime<Utc>,
    /// Rows by bucket, then key.
    pub rows: StatsRows,
}

/// Rolled-up statistics of one family.
#[utoipa::path(
    get, path = "/v1/stats/{family}", tag = "stats",
    params(("family" = Family, Path, description = "jobs, mail or webhooks"), StatsQuery),
    responses(
        (status = 200, description = "Rows (JSON, or CSV with `Accept: text/csv`)", content(
            (StatsResponse = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "Bad query parameter (e.g. `from` or `to` before 4714-11-24 BC, which PostgreSQL cannot store)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such family", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stats(
    State(state): State<AppState>,
    Path(family): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let family = match family.as_str() {
        "jobs" => Family::Jobs,
        "mail" => Family::Mail,
        "webhooks" => Family::Webhooks,
        other => return Err(Problem::not_found(format!("no statistics `{other}`"))),
    };
    let Query(query) = query.map_err(|err| Problem::bad_query(err.body_text()))?;
    let granularity = query.granularity.unwrap_or(Granularity::Hour);
    let (longest, default_span) = match granularity {
        Granularity::Hour => (Duration::days(31), Duration::hours(24)),
        Granularity::Day => (Duration::days(3660), Duration::days(30)),
    };
    let stored = |field: &str, at: Option<DateTime<Utc>>| {
        at.map(|at| timestamptz::check(field, at))
            .transpose()
            .map_err(|err| Problem::bad_query(err.to_string()))
    };
    let from = stored("from", query.from)?;
    let to = stored("to", query.to)?.unwrap_or_else(Utc::now);
    // `to` is storable, so far enough from chrono's earliest time to subtract
    // the span; the default stops at PostgreSQL's earliest.
    let from = from.unwrap_or_else(|| (to - default_span).max(timestamptz::earliest()));
    if from >= to {
        return Err(Problem::bad_query("`from` must be before `to`"));
    }
    if to - from > longest {
        return Err(Problem::bad_query(format!(
            "at most {} days by {}",
            longest.num_days(),
            granularity.unit()
        )));
    }
    let given = [
        ("task", query.task.is_some(), Family::Jobs),
        ("campaign", query.campaign.is_some(), Family::Mail),
        ("source", query.source.is_some(), Family::Webhooks),
        ("outcome", query.outcome.is_some(), Family::Webhooks),
        ("reason", query.reason.is_some(), Family::Webhooks),
    ];
    if let Some((name, ..)) = given
        .iter()
        .find(|(_, set, owner)| *set && *owner != family)
    {
        return Err(Problem::bad_query(format!(
            "`{name}` does not filter {family:?} statistics"
        )));
    }
    let table = family.table(granularity);
    let rows = conveyor_schema::pool::run(&state.db, move |conn| {
        let range = "bucket >= $1 AND bucket < $2";
        Ok(match family {
            Family::Jobs => StatsRows::Jobs(
                diesel::sql_query(format!(
                    "SELECT bucket, task, succeeded, retried, dead, p50_ms, p95_ms, max_ms FROM {table} \
                     WHERE {range} AND ($3::text IS NULL OR task = $3) ORDER BY bucket, task"
                ))
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<Nullable<Text>, _>(query.task)
                .load(conn)?,
            ),
            Family::Mail => StatsRows::Mail(
                diesel::sql_query(format!(
                    "SELECT bucket, campaign_id, sent, failed, unknown FROM {table} \
                     WHERE {range} AND ($3::uuid IS NULL OR campaign_id = $3) ORDER BY bucket, campaign_id"
                ))
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<Nullable<SqlUuid>, _>(query.campaign)
                .load(conn)?,
            ),
            Family::Webhooks => StatsRows::Webhooks(
                diesel::sql_query(format!(
                    "SELECT bucket, source, outcome, reason, events FROM {table} \
                     WHERE {range} AND ($3::text IS NULL OR source = $3) \
                       AND ($4::text IS NULL OR outcome = $4) \
                       AND ($5::text IS NULL OR reason = $5) \
                     ORDER BY bucket, source, outcome, reason"
                ))
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<Nullable<Text>, _>(query.source)
                .bind::<Nullable<Text>, _>(query.outcome)
                .bind::<Nullable<Text>, _>(query.reason)
                .load(conn)?,
            ),
        })
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv"));
    if wants_csv {
        let body = match &rows {
            StatsRows::Jobs(rows) => to_csv(rows),
            StatsRows::Mail(rows) => to_csv(rows),
            StatsRows::Webhooks(rows) => to_csv(rows),
        }
        .map_err(Problem::internal)?;
        let mut response = (StatusCode::OK, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(response);
    }
    Ok(Json(StatsResponse {
        family,
        granularity,
        from,
        to,
        rows,
    })
    .into_response())
}

/// The CSV header of a row type: its serde field names, in order.
trait Columns {
    const COLUMNS: &'static [&'static str];
}

impl Columns for JobStatsRow {
    const COLUMNS: &'static [&'static str] = &[
        "bucket",
        "task",
        "succeeded",
        "retried",
        "dead",
        "p50_ms",
        "p95_ms",
        "max_ms",
    ];
}

impl Columns for MailStatsRow {
    const COLUMNS: &'static [&'static str] =
        &["bucket", "campaign_id", "sent", "failed", "unknown"];
}

impl Columns for WebhookStatsRow {
    const COLUMNS: &'static [&'static str] = &["bucket", "source", "outcome", "reason", "events"];
}

/// `rows` as CSV with a header line (written even when there are no rows).
fn to_csv<T: Serialize + Columns>(rows: &[T]) -> Result<Vec<u8>, csv::Error> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    writer.write_record(T::COLUMNS)?;
    for row in rows {
        writer.serialize(row)?;
    }
    writer
        .into_inner()
        .map_err(|err| csv::Error::from(err.into_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of<T: Serialize>(row: &T) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.serialize(row).unwrap();
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        text.lines().next().unwrap().to_owned()
    }

    #[test]
    fn csv_headers_match_the_fields() {
        let bucket = Utc::now();
        let jobs = JobStatsRow {
            bucket,
            task: "t".into(),
            succeeded: 1,
            retried: 0,
            dead: 0,
            p50_ms: Some(1.5),
            p95_ms: None,
            max_ms: None,
        };
        assert_eq!(header_of(&jobs), JobStatsRow::COLUMNS.join(","));
        let mail = MailStatsRow {
            bucket,
            campaign_id: Uuid::nil(),
            sent: 1,
            failed: 2,
            unknown: 3,
        };
        assert_eq!(header_of(&mail), MailStatsRow::COLUMNS.join(","));
        let hooks = WebhookStatsRow {
            bucket,
            source: "s".into(),
            outcome: "accepted".into(),
            reason: String::new(),
            events: 4,
        };
        assert_eq!(header_of(&hooks), WebhookStatsRow::COLUMNS.join(","));
        let empty: Vec<MailStatsRow> = Vec::new();
        assert_eq!(
            String::from_utf8(to_csv(&empty).unwrap()).unwrap(),
            "bucket,campaign_id,sent,failed,unknown\n"
        );
    }
}
