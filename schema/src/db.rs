//! Diesel's view of the database (what `diesel print-schema` would generate).
//!
//! Kept by hand in step with `migrations/`; the migration test in `platform`
//! checks every table here exists after all migrations run.

#![expect(missing_docs, reason = "generated-style table definitions")]

diesel::table! {
    jobs (id) {
        id -> Uuid,
        task -> Text,
        queue -> Text,
        state -> Text,
        args -> Jsonb,
        attempts -> Int4,
        runs -> Int4,
        max_attempts -> Int4,
        last_error -> Nullable<Text>,
        errors -> Jsonb,
        idempotency_key -> Nullable<Text>,
        replay_of -> Nullable<Uuid>,
        enqueued_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        next_attempt_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}
