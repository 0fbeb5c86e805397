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
    profiles (id) {
        id -> Text,
        source -> Text,
        email -> Nullable<Text>,
        display_name -> Nullable<Text>,
        locale -> Nullable<Text>,
        fields_updated_at -> Nullable<Timestamptz>,
        headshot_sha256 -> Nullable<Text>,
        headshot_content_type -> Nullable<Text>,
        headshot_size_bytes -> Nullable<Int4>,
        headshot_url -> Nullable<Text>,
        headshot_updated_at -> Nullable<Timestamptz>,
        source_updated_at -> Nullable<Timestamptz>,
        deleted_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    headshots (sha256) {
        sha256 -> Text,
        content_type -> Text,
        size_bytes -> Int4,
        data -> Nullable<Bytea>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    webhook_deliveries (source, webhook_id) {
        source -> Text,
        webhook_id -> Text,
        job_id -> Uuid,
        received_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    webhook_events (id) {
        id -> Int8,
        source -> Text,
        webhook_id -> Text,
        profile_id -> Nullable<Text>,
        action -> Nullable<Text>,
        outcome -> Text,
        detail -> Nullable<Text>,
        recorded_at -> Timestamptz,
    }
}
