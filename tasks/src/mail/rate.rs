//! A send rate shared by every worker: slots in time handed out by PostgreSQL.
//!
//! Each key (`campaign:<id>`, `global`) has a `next_slot_at`. Reserving `n`
//! sends at `rate` per second moves it forward by `n / rate` seconds and
//! returns the first slot; the caller spaces its sends from there. One row
//! update per group of sends keeps the hot row cool, and the rate holds across
//! workers because every reservation goes through the same row.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Double, Text, Timestamptz};

#[derive(QueryableByName)]
struct Slot {
    #[diesel(sql_type = Timestamptz)]
    start: DateTime<Utc>,
}

/// Reserves `n` send slots at `rate_per_sec` under `key`; returns when the first may go.
pub fn reserve(
    conn: &mut PgConnection,
    key: &str,
    rate_per_sec: f64,
    n: usize,
) -> QueryResult<DateTime<Utc>> {
    let span_secs = n as f64 / rate_per_sec;
    diesel::sql_query(
        "INSERT INTO send_rate_slots (key, next_slot_at) VALUES ($1, now())
         ON CONFLICT (key) DO NOTHING",
    )
    .bind::<Text, _>(key)
    .execute(conn)?;
    let slot: Slot = diesel::sql_query(
        "UPDATE send_rate_slots
            SET next_slot_at = GREATEST(next_slot_at, now()) + make_interval(secs => $2)
          WHERE key = $1
         RETURNING next_slot_at - make_interval(secs => $2) AS start",
    )
    .bind::<Text, _>(key)
    .bind::<Double, _>(span_secs)
    .get_result(conn)?;
    Ok(slot.start)
}
