//! The group commit's one insert statement.

use conveyor_schema::models::NewJob;
use diesel::prelude::*;

/// One constant statement for any batch size (prepared once per connection,
/// never re-planned), with one array parameter per column.
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

pub(super) fn insert_records(conn: &mut PgConnection, records: &[NewJob]) -> QueryResult<usize> {
    use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    diesel::sql_query(INSERT)
        .bind::<Array<SqlUuid>, _>(records.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.task.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
        .bind::<Array<Jsonb>, _>(records.iter().map(|r| &r.args).collect::<Vec<_>>())
        .bind::<Array<Int4>, _>(records.iter().map(|r| r.max_attempts).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            records
                .iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<SqlUuid>>, _>(
            records.iter().map(|r| r.replay_of).collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(records.iter().map(|r| r.enqueued_at).collect::<Vec<_>>())
        .bind::<Array<Nullable<Timestamptz>>, _>(
            records
                .iter()
                .map(|r| r.next_attempt_at)
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(
            records
                .iter()
                .map(|r| r.producer.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(conn)
}
