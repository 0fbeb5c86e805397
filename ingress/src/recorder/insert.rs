//! The group commit's one insert statement.

use std::collections::HashSet;

use conveyor_schema::models::NewJob;
use conveyor_schema::prepared::walk_sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

/// One constant statement for any batch size, with one array parameter per
/// column: prepared once per lane connection (see `conveyor_schema::prepared`).
///
/// A worker that got a message before this insert reached its row has created
/// the row already (its state upsert), and a retry under an `Idempotency-Key`
/// submits the same jobs again: the insert keeps such a row's state and adds
/// what only the ingress knows. It returns the ids of those rows, which this
/// transaction did not create (an updated row's `xmax` holds the updater's
/// lock; a new row's is 0), so that a failed publish removes only what the
/// batch created.
const INSERT: &str = "
WITH written AS (
INSERT INTO jobs (id, task, queue, state, args, max_attempts, idempotency_key, replay_of,
                  enqueued_at, next_attempt_at, producer)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[],
                     $7::text[], $8::uuid[], $9::timestamptz[], $10::timestamptz[], $11::text[])
ON CONFLICT (id) DO UPDATE SET
    producer = EXCLUDED.producer,
    idempotency_key = EXCLUDED.idempotency_key,
    replay_of = EXCLUDED.replay_of
RETURNING id, xmax
)
SELECT id FROM written WHERE xmax <> 0";

/// [`INSERT`]'s parameters, one array per column.
struct InsertJobs<'a> {
    ids: Vec<Uuid>,
    tasks: Vec<&'a str>,
    queues: Vec<&'a str>,
    states: Vec<&'a str>,
    args: Vec<&'a serde_json::Value>,
    max_attempts: Vec<i32>,
    idempotency_keys: Vec<Option<&'a str>>,
    replays_of: Vec<Option<Uuid>>,
    enqueued_at: Vec<chrono::DateTime<chrono::Utc>>,
    next_attempt_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    producers: Vec<Option<&'a str>>,
}

impl QueryFragment<Pg> for InsertJobs<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(INSERT, out, |n, out| match n {
            1 => out.push_bind_param::<Array<SqlUuid>, _>(&self.ids),
            2 => out.push_bind_param::<Array<Text>, _>(&self.tasks),
            3 => out.push_bind_param::<Array<Text>, _>(&self.queues),
            4 => out.push_bind_param::<Array<Text>, _>(&self.states),
            5 => out.push_bind_param::<Array<Jsonb>, _>(&self.args),
            6 => out.push_bind_param::<Array<Int4>, _>(&self.max_attempts),
            7 => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.idempotency_keys),
            8 => out.push_bind_param::<Array<Nullable<SqlUuid>>, _>(&self.replays_of),
            9 => out.push_bind_param::<Array<Timestamptz>, _>(&self.enqueued_at),
            10 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.next_attempt_at),
            _ => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.producers),
        })
    }
}
conveyor_schema::prepared_statement!(InsertJobs, returning rows);

/// A row [`INSERT`] found already there.
#[derive(QueryableByName)]
struct Existing {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Inserts `records`, in id order as the group commit sorts them, each id once
/// (the first of several records of one id is written; PostgreSQL refuses one
/// statement that writes a row twice), and returns the ids whose rows existed
/// before.
pub(super) fn insert_records(
    conn: &mut PgConnection,
    records: &[NewJob],
) -> QueryResult<HashSet<Uuid>> {
    debug_assert!(records.is_sorted_by_key(|r| r.id), "records in id order");
    let records: Vec<&NewJob> = records
        .chunk_by(|a, b| a.id == b.id)
        .map(|copies| &copies[0])
        .collect();
    fn column<'a, T>(records: &[&'a NewJob], field: impl Fn(&'a NewJob) -> T) -> Vec<T> {
        records.iter().map(|r| field(r)).collect()
    }
    InsertJobs {
        ids: column(&records, |r| r.id),
        tasks: column(&records, |r| r.task.as_str()),
        queues: column(&records, |r| r.queue.as_str()),
        states: column(&records, |r| r.state.as_str()),
        args: column(&records, |r| &r.args),
        max_attempts: column(&records, |r| r.max_attempts),
        idempotency_keys: column(&records, |r| r.idempotency_key.as_deref()),
        replays_of: column(&records, |r| r.replay_of),
        enqueued_at: column(&records, |r| r.enqueued_at),
        next_attempt_at: column(&records, |r| r.next_attempt_at),
        producers: column(&records, |r| r.producer.as_deref()),
    }
    .load::<Existing>(conn)
    .map(|rows| rows.into_iter().map(|row| row.id).collect())
}
