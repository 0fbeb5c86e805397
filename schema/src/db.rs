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
    schedule_ticks (schedule, tick_at) {
        schedule -> Text,
        tick_at -> Timestamptz,
        job_id -> Uuid,
        catch_up -> Bool,
        claimed_by -> Text,
        claimed_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(schedule_ticks -> jobs (job_id));
diesel::allow_tables_to_appear_in_same_query!(jobs, schedule_ticks);
