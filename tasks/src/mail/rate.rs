//! A send rate shared by every worker: slots in time handed out by PostgreSQL.
//!
//! Each key (`campaign:<id>`, `global`) has a `next_slot_at`. Reserving `n`
//! sends moves every key that applies forward from one common start: the
//! latest of their `next_slot_at`s (and now), by `n / rate` seconds at each
//! key's own rate. The caller spaces its sends from that start at the slowest
//! rate. One common start matters: a group held back by the global ceiling
//! sends later than its campaign's next slot, and a campaign slot reserved
//! on its own would then lie before the group's real sends, so the campaign's
//! next group could send beside this one, above the campaign's rate.
//!
//! The keys' rows are locked in one order (by key) within one transaction, so
//! concurrent reservations neither interleave nor deadlock. One row update
//! per key per group of sends keeps the hot rows cool, and the rates hold
//! across workers because every reservation goes through the same rows.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Double, Text, Timestamptz};

#[derive(QueryableByName)]
struct Slot {
    #[diesel(sql_type = Timestamptz)]
    start: DateTime<Utc>,
}

/// Reserves `n` send slots under every `(key, rate_per_sec)` of `limits`
/// from one common start; returns it (when the first send may go).
pub fn reserve(
    conn: &mut PgConnection,
    limits: &[(&str, f64)],
    n: usize,
) -> QueryResult<DateTime<Utc>> {
    let keys: Vec<&str> = limits.iter().map(|(key, _)| *key).collect();
    let spans: Vec<f64> = limits.iter().map(|(_, rate)| n as f64 / rate).collect();
    conn.transaction(|conn| {
        diesel::sql_query(
            "INSERT INTO send_rate_slots (key, next_slot_at)
             SELECT key, now() FROM unnest($1::text[]) AS key ORDER BY key
             ON CONFLICT (key) DO NOTHING",
        )
        .bind::<Array<Text>, _>(&keys)
        .execute(conn)?;
        // Locked in key order; the statements after see the rows as the
        // last reservation before ours left them.
        let slot: Slot = diesel::sql_query(
            "SELECT GREATEST(max(next_slot_at), now()) AS start
               FROM (SELECT next_slot_at FROM send_rate_slots
                      WHERE key = ANY($1) ORDER BY key FOR UPDATE) AS locked",
        )
        .bind::<Array<Text>, _>(&keys)
        .get_result(conn)?;
        diesel::sql_query(
            "UPDATE send_rate_slots AS s
                SET next_slot_at = $3 + make_interval(secs => l.span)
               FROM unnest($1::text[], $2::float8[]) AS l(key, span)
              WHERE s.key = l.key",
        )
        .bind::<Array<Text>, _>(&keys)
        .bind::<Array<Double>, _>(&spans)
        .bind::<Timestamptz, _>(slot.start)
        .execute(conn)?;
        Ok(slot.start)
    })
}
