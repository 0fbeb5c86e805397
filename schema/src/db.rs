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

diesel::table! {
    workers (id) {
        id -> Text,
        host -> Text,
        pid -> Int4,
        version -> Text,
        started_at -> Timestamptz,
        queues -> Array<Text>,
        in_flight -> Int4,
        last_seen_at -> Timestamptz,
        stopped_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    dead_jobs (id) {
        id -> Uuid,
        task -> Text,
        queue -> Text,
        envelope -> Nullable<Jsonb>,
        body -> Nullable<Text>,
        attempts -> Int4,
        errors -> Jsonb,
        reason -> Text,
        x_death -> Nullable<Jsonb>,
        source -> Text,
        dead_at -> Timestamptz,
        replayed_as -> Nullable<Uuid>,
        replayed_at -> Nullable<Timestamptz>,
        replay_count -> Int4,
        discarded_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    dead_job_actions (id) {
        id -> Int8,
        dead_job_id -> Uuid,
        action -> Text,
        actor -> Text,
        at -> Timestamptz,
        new_job_id -> Nullable<Uuid>,
        detail -> Jsonb,
    }
}

diesel::joinable!(dead_job_actions -> dead_jobs (dead_job_id));
diesel::allow_tables_to_appear_in_same_query!(jobs, workers, dead_jobs, dead_job_actions);
