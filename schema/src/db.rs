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
        producer -> Nullable<Text>,
        runner -> Nullable<Text>,
    }
}

diesel::table! {
    campaigns (id) {
        id -> Uuid,
        name -> Text,
        template -> Text,
        from_addr -> Text,
        reply_to -> Nullable<Text>,
        vars -> Jsonb,
        rate_per_sec -> Nullable<Float8>,
        state -> Text,
        plan_generation -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        send_started_at -> Nullable<Timestamptz>,
        completed_at -> Nullable<Timestamptz>,
        producer -> Nullable<Text>,
    }
}

diesel::table! {
    campaign_recipients (id) {
        id -> Int8,
        campaign_id -> Uuid,
        email -> Text,
        vars -> Jsonb,
        state -> Text,
        chunk_id -> Nullable<Uuid>,
        claimed_by -> Nullable<Text>,
        claimed_at -> Nullable<Timestamptz>,
        claim_expires_at -> Nullable<Timestamptz>,
        attempts -> Int4,
        next_attempt_at -> Nullable<Timestamptz>,
        last_reply -> Nullable<Text>,
        sent_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    campaign_chunks (id) {
        id -> Uuid,
        campaign_id -> Uuid,
        plan_generation -> Int4,
        first_recipient -> Int8,
        last_recipient -> Int8,
        recipients -> Int4,
        published_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    send_rate_slots (key) {
        key -> Text,
        next_slot_at -> Timestamptz,
    }
}

diesel::joinable!(campaign_recipients -> campaigns (campaign_id));
diesel::joinable!(campaign_chunks -> campaigns (campaign_id));
diesel::allow_tables_to_appear_in_same_query!(campaigns, campaign_recipients, campaign_chunks);

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

diesel::table! {
    api_keys (id) {
        id -> Text,
        producer -> Text,
        secret_hash -> Bytea,
        display_prefix -> Text,
        scopes -> Array<Text>,
        expires_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        rate_per_sec -> Nullable<Float8>,
        burst -> Nullable<Int4>,
    }
}

diesel::table! {
    idempotency_keys (producer, key) {
        producer -> Text,
        key -> Text,
        request_hash -> Bytea,
        state -> Text,
        response_status -> Nullable<Int2>,
        response_type -> Nullable<Text>,
        response_body -> Nullable<Bytea>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        id_seed -> Nullable<Uuid>,
    }
}

diesel::table! {
    stats_rollup_marks (granularity) {
        granularity -> Text,
        completed_to -> Timestamptz,
        updated_at -> Timestamptz,
    }
}
