//! Messages whose job record PostgreSQL would refuse, from a producer that
//! publishes straight to the queue: each costs one job (dead-lettered with a
//! reason), never the worker's state commits.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::db::jobs;
use conveyor_schema::models::NewJob;
use conveyor_schema::{Envelope, JobState, find_task};
use conveyor_worker::{Batching, Commit, StateChange, StateWriter};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{TestApp, TestDb, wait_until};
use crate::jobs::{WAIT, dead_letter_reasons, publish_raw, raw_message};

/// Midnight UTC of `year`-`month`-`day` (astronomical years: 0 is 1 BC).
fn utc(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(year, month, day)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
}

/// Waits until job `id` has succeeded: the worker still commits.
async fn wait_succeeded(app: &TestApp, id: Uuid) {
    wait_until(WAIT, || async {
        app.job(id)
            .await
            .is_some_and(|job| job.state == "succeeded")
    })
    .await;
}

/// Waits for the dead-job record `id` and returns the length of its task.
async fn dead_job_task_len(app: &TestApp, id: Uuid) -> i64 {
    let named = format!("SELECT count(*) AS n FROM dead_jobs WHERE id = '{id}'");
    wait_until(WAIT, || async { app.count(&named).await == 1 }).await;
    let task = format!("SELECT length(task)::int8 AS n FROM dead_jobs WHERE id = '{id}'");
    app.count(&task).await
}

/// A task name of ~8 000 random characters (an unknown task) would make an
/// index entry of `jobs` and `dead_jobs` larger than a btree takes; the
/// message is refused as unreadable instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_name_too_long_to_index_is_dead_lettered_and_the_worker_goes_on() {
    let app = TestApp::spawn().await;
    // Random hex: PostgreSQL cannot compress it below the btree limit.
    let task: String = (0..250)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let message = raw_message(&app, Envelope::new(task, json!({})).encode());
    let named = message.message_id;
    publish_raw(&app, &[message]).await;
    let after = app.enqueue("diag.noop", json!({})).await;
    wait_succeeded(&app, after).await;
    let reasons = dead_letter_reasons(&app, 1).await;
    assert!(
        reasons[0].contains("task name is 8000 bytes long; at most 200"),
        "{reasons:?}"
    );
    // Recorded as unreadable: named after its message_id, with no task.
    assert_eq!(dead_job_task_len(&app, named).await, 0);
    // The ingress holds task names to the same bound.
    let refused = app.post_job(json!({"task": "t".repeat(201)})).await;
    assert_eq!(refused.status(), 422);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["pointer"], "/task", "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .ends_with("longer than 200 bytes"),
        "{problem}"
    );
}

/// Timestamps chrono reads but `timestamptz` cannot hold (before 4714 BC) in
/// `enqueued_at` or `not_before` are refused as unreadable; the earliest
/// PostgreSQL holds is a job like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_out_of_postgres_range_are_dead_lettered_and_the_worker_goes_on() {
    let app = TestApp::spawn().await;
    let mut too_early = Envelope::new("diag.noop", json!({}));
    too_early.enqueued_at = utc(-100_000, 1, 1);
    let mut not_before = Envelope::new("diag.noop", json!({}));
    not_before.not_before = Some(utc(-100_000, 1, 1));
    let mut earliest = Envelope::new("diag.noop", json!({}));
    earliest.enqueued_at = utc(-4713, 11, 24);
    let messages = [
        raw_message(&app, too_early.encode()),
        raw_message(&app, not_before.encode()),
        raw_message(&app, earliest.encode()),
    ];
    let named = [messages[0].message_id, messages[1].message_id];
    publish_raw(&app, &messages).await;
    let after = app.enqueue("diag.noop", json!({})).await;
    wait_succeeded(&app, after).await;
    wait_succeeded(&app, earliest.id).await;
    let mut reasons = dead_letter_reasons(&app, 2).await;
    reasons.sort();
    assert!(
        reasons[0]
            .contains("enqueued_at -100000-01-01T00:00:00Z is before 4714-11-24 00:00:00 UTC BC"),
        "{reasons:?}"
    );
    assert!(
        reasons[1]
            .contains("not_before -100000-01-01T00:00:00Z is before 4714-11-24 00:00:00 UTC BC"),
        "{reasons:?}"
    );
    for id in named {
        assert_eq!(dead_job_task_len(&app, id).await, 0);
    }
}

/// A job whose row PostgreSQL refuses (here a test-only CHECK constraint on
/// its id) among others: the others commit and succeed, the refused one is
/// dead-lettered with the database's reason and recorded, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_row_is_refused_is_dead_lettered_and_the_rest_commit() {
    let app = TestApp::spawn().await;
    let poison = Envelope::new("diag.noop", json!({}));
    let check = format!(
        "ALTER TABLE jobs ADD CONSTRAINT test_poison CHECK (id <> '{}')",
        poison.id
    );
    app.db.conn().batch_execute(&check).unwrap();
    let others: Vec<Envelope> = (0..20)
        .map(|_| Envelope::new("diag.noop", json!({})))
        .collect();
    let mut messages: Vec<_> = others
        .iter()
        .map(|envelope| raw_message(&app, envelope.encode()))
        .collect();
    messages.insert(10, raw_message(&app, poison.encode()));
    publish_raw(&app, &messages).await;
    for envelope in &others {
        wait_succeeded(&app, envelope.id).await;
    }
    let reasons = dead_letter_reasons(&app, 1).await;
    assert!(
        reasons[0].contains("the database refused this job's `succeeded` state")
            && reasons[0].contains("test_poison"),
        "{reasons:?}"
    );
    assert_eq!(dead_job_task_len(&app, poison.id).await, 9);
    assert!(app.job(poison.id).await.is_none());
    let after = app.enqueue("diag.noop", json!({})).await;
    wait_succeeded(&app, after).await;
    let metrics = app.worker_metrics().await;
    // The job's `running` and `succeeded` changes.
    assert!(
        metrics.contains("conveyor_worker_state_rows_refused_total 2"),
        "{metrics}"
    );
}

/// Asks the admin API to replay dead job `id`.
async fn replay(app: &TestApp, id: Uuid) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/admin/dead-jobs/{id}/replay")))
        .bearer_auth(&app.admin_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
}

/// A job whose `succeeded` state PostgreSQL refuses once its `running` state
/// has committed (a test-only CHECK on its row), and whose dead-job record it
/// refuses in full too (another, on records holding an envelope): its row is
/// brought to `dead`, not left `running`, and its fallback record, which
/// holds the envelope only as text, replays from that text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_running_job_is_marked_dead_and_its_fallback_record_replays() {
    let app = TestApp::spawn().await;
    let poison = Envelope::new("diag.sleep", json!({"ms": 1500}));
    let checks = format!(
        "ALTER TABLE jobs ADD CONSTRAINT test_poison CHECK (id <> '{id}' OR state <> 'succeeded');
         ALTER TABLE dead_jobs ADD CONSTRAINT test_poison_record CHECK (id <> '{id}' OR envelope IS NULL);",
        id = poison.id
    );
    app.db.conn().batch_execute(&checks).unwrap();
    publish_raw(&app, &[raw_message(&app, poison.encode())]).await;
    app.wait_for_state(poison.id, "running", WAIT).await;
    let reasons = dead_letter_reasons(&app, 1).await;
    assert!(
        reasons[0].contains("the database refused this job's `succeeded` state"),
        "{reasons:?}"
    );
    // The job's row changes in the record's transaction.
    assert_eq!(dead_job_task_len(&app, poison.id).await, 10);
    let job = app.job(poison.id).await.unwrap();
    assert_eq!(job.state, "dead", "{job:?}");
    assert!(job.finished_at.is_some(), "{job:?}");
    assert_eq!(
        job.last_error.as_deref(),
        Some(
            "the database refused this job's `succeeded` state; its dead-job record holds the reason"
        )
    );
    let fallback = format!(
        "SELECT count(*) AS n FROM dead_jobs WHERE id = '{}' AND envelope IS NULL AND body IS NOT NULL",
        poison.id
    );
    assert_eq!(app.count(&fallback).await, 1);

    let replayed = replay(&app, poison.id).await;
    assert_eq!(replayed.status(), 200);
    let replayed: serde_json::Value = replayed.json().await.unwrap();
    assert_eq!(replayed["outcome"], "replayed", "{replayed}");
    let new_id: Uuid = replayed["job_id"].as_str().unwrap().parse().unwrap();
    let new_job = app.wait_for_state(new_id, "succeeded", WAIT).await;
    assert_eq!(new_job.args, json!({"ms": 1500}));
}

/// A dead job whose `dead` state and full record PostgreSQL refuses together
/// (a test-only CHECK on records holding an envelope), and whose record it
/// then refuses without the state too: its row, `queued` as the ingress left
/// it, is brought to `dead` with the fallback record. That record's body holds
/// only a cut copy of the envelope (one longer than a record keeps), so it
/// cannot be replayed, and the refusal says so and names the queue that holds
/// the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_record_with_a_cut_envelope_is_refused_naming_its_dead_letter_queue() {
    let app = TestApp::spawn().await;
    // Arguments the task refuses (it dies at once), longer than a record's body.
    let poison = Envelope::new("diag.sleep", json!({"ms": 0, "pad": "x".repeat(70_000)}));
    let check = format!(
        "ALTER TABLE dead_jobs ADD CONSTRAINT test_poison_record CHECK (id <> '{}' OR envelope IS NULL)",
        poison.id
    );
    app.db.conn().batch_execute(&check).unwrap();
    let options = &find_task("diag.sleep").unwrap().options;
    diesel::insert_into(jobs::table)
        .values(NewJob::queued(&poison, options))
        .execute(&mut app.db.conn())
        .unwrap();
    publish_raw(&app, &[raw_message(&app, poison.encode())]).await;
    assert_eq!(dead_job_task_len(&app, poison.id).await, 10);
    let job = app.job(poison.id).await.unwrap();
    assert_eq!(job.state, "dead", "{:?}", job.last_error);
    assert_eq!(
        job.last_error.as_deref(),
        Some(
            "the database refused this job's `dead` state with its dead-job record; that record holds the reason"
        )
    );
    let cut = format!(
        "SELECT count(*) AS n FROM dead_jobs WHERE id = '{}' AND envelope IS NULL AND length(body) = 65536",
        poison.id
    );
    assert_eq!(app.count(&cut).await, 1);

    let refused = replay(&app, poison.id).await;
    assert_eq!(refused.status(), 409);
    let problem: serde_json::Value = refused.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    let dlq = app.topology().dead_letter_queue("default");
    assert!(
        detail.contains("holds no replayable envelope")
            && detail.contains(&format!("the message itself is in `{dlq}`")),
        "{problem}"
    );
}

/// The state writer, driven directly: of one batch in which PostgreSQL
/// refuses the rows of two jobs (a test-only CHECK constraint), the others
/// commit, the two come back refused with the database's error and are
/// counted, and the writer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_writer_commits_a_batch_around_the_rows_postgres_refuses() {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let envelopes: Vec<Envelope> = (0..12)
        .map(|_| Envelope::new("diag.noop", json!({})))
        .collect();
    let poison = [envelopes[3].id, envelopes[8].id];
    let check = format!(
        "ALTER TABLE jobs ADD CONSTRAINT test_poison CHECK (id NOT IN ('{}', '{}'))",
        poison[0], poison[1]
    );
    db.conn().batch_execute(&check).unwrap();
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let batching = Batching {
        max: 512,
        linger: Duration::from_millis(500),
    };
    let writer = StateWriter::start(
        conveyor_schema::pool::pool(&db.url, 2),
        batching,
        &metrics,
        stop.clone(),
    );
    let succeeded = |envelope: &Envelope| {
        let mut change = StateChange::of(envelope, "default", 5, JobState::Succeeded);
        change.finished_at = Some(Utc::now());
        change
    };
    // After a first commit the writer lingers, so the next changes share a batch.
    let first = Envelope::new("diag.noop", json!({}));
    assert!(writer.commit(succeeded(&first)).await.is_committed());
    let batch = futures::future::join_all(envelopes.iter().map(|e| writer.commit(succeeded(e))));
    let outcomes = tokio::time::timeout(WAIT, batch)
        .await
        .expect("the batch is still not committed");
    for (envelope, outcome) in envelopes.iter().zip(outcomes) {
        if !poison.contains(&envelope.id) {
            assert!(outcome.is_committed(), "{outcome:?}");
            continue;
        }
        let Commit::Refused(refused) = outcome else {
            panic!("{} was not refused: {outcome:?}", envelope.id);
        };
        assert!(
            refused
                .error
                .contains("violates check constraint \"test_poison\""),
            "{}",
            refused.error
        );
        assert_eq!(refused.change.map(|change| change.id), Some(envelope.id));
    }
    assert_eq!(metrics.state_rows_refused.get(), 2);
    let last = Envelope::new("diag.noop", json!({}));
    assert!(writer.commit(succeeded(&last)).await.is_committed());
    let url = db.url.clone();
    let ids: Vec<Uuid> = tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        jobs::table
            .filter(jobs::state.eq("succeeded"))
            .select(jobs::id)
            .load(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(ids.len(), 12, "{ids:?}");
    assert!(ids.iter().all(|id| !poison.contains(id)));
    stop.cancel();
}

/// A producer header holding U+0000 (which no text column stores) is kept
/// with U+FFFD in its place, so the job's `running` change is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_header_holding_nul_is_recorded_with_a_replacement() {
    let app = TestApp::spawn().await;
    let envelope = Envelope::new("diag.noop", json!({}));
    let message = raw_message(&app, envelope.encode()).by(Some("shop\u{0}2"));
    publish_raw(&app, &[message]).await;
    wait_succeeded(&app, envelope.id).await;
    let recorded = format!(
        "SELECT count(*) AS n FROM jobs WHERE id = '{}' AND producer = 'shop' || chr(65533) || '2'",
        envelope.id
    );
    assert_eq!(app.count(&recorded).await, 1);
    assert!(
        app.worker_metrics()
            .await
            .contains("conveyor_worker_state_rows_refused_total 0")
    );
}
