//! The group commit's one insert statement.

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
/// the row already (its state upsert): the insert keeps that state and adds
/// what only the ingress knows.
const INSERT: &str = "
INSERT INTO jobs (id, task, queue, state, args, max_attempts, idempotency_key, replay_of,
                  enqueued_at, next_attempt_at, producer)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[],
                     $7::text[], $8::uuid[], $9::timestamptz[], $10::timestamptz[], $11::text[])
ON CONFLICT (id) DO UPDATE SET
    producer = EXCLUDED.producer,
    idempotency_key = EXCLUDED.idempotency_key,
    replay_of = EXCLUDED.replay_of";

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
conveyor_schema::prepared_statement!(InsertJobs);

pub(super) fn insert_records(conn: &mut PgConnection, records: &[NewJob]) -> QueryResult<usize> {
    fn column<'a, T>(records: &'a [NewJob], field: impl Fn(&'a NewJob) -> T) -> Vec<T> {
        records.iter().map(field).collect()
    }
    InsertJobs {
        ids: column(records, |r| r.id),
        tasks: column(records, |r| r.task.as_str()),
        queues: column(records, |r| r.queue.as_str()),
        states: column(records, |r| r.state.as_str()),
        args: column(records, |r| &r.args),
        max_attempts: column(records, |r| r.max_attempts),
        idempotency_keys: column(records, |r| r.idempotency_key.as_deref()),
        replays_of: column(records, |r| r.replay_of),
        enqueued_at: column(records, |r| r.enqueued_at),
        next_attempt_at: column(records, |r| r.next_attempt_at),
        producers: column(records, |r| r.producer.as_deref()),
    }
    .execute(conn)
}
