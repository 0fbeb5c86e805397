//! How a recipient's send ends when the SMTP server misbehaves, through the
//! real path (API, planner, sender, ledger) against a real TCP server that
//! refuses or stops answering: `mail.smtp_timeout_ms` bounds the conversation,
//! a stall before the message was written is deferred and retried, one after
//! it is `unknown` and never sent again; the rollups count every final state.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_schema::stats::Granularity;
use conveyor_tasks::stats::rollup;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamptz};
use serde_json::{Value, json};

use crate::harness::{TestApp, wait_until};
use crate::mail::{mail_config_for, start_campaign_to, wait_completed};
use crate::smtp::{Stall, Stalled, StallingSmtp};

const TIMEOUT: Duration = Duration::from_millis(1_000);

/// One worker whose SMTP conversations time out after [`TIMEOUT`]; claims are
/// trusted for a minute, so only that timeout can end a stalled conversation.
async fn spawn(server: &StallingSmtp, max_smtp_attempts: u32) -> TestApp {
    let url = server.url.clone();
    TestApp::spawn_with(1, move |config| {
        mail_config_for(config, &url);
        config.mail.smtp_timeout_ms = TIMEOUT.as_millis() as u64;
        config.mail.claim_ttl_ms = 60_000;
        config.mail.max_smtp_attempts = max_smtp_attempts;
    })
    .await
}

/// Waits until the client has closed every stalled conversation; returns them.
async fn closed_stalls(server: &StallingSmtp, expected: usize) -> Vec<Stalled> {
    wait_until(Duration::from_secs(5), || async {
        let stalls = server.stalls();
        stalls.len() == expected && stalls.iter().all(|s| s.closed.is_some())
    })
    .await;
    server.stalls()
}

/// The client gave up on `stall` about [`TIMEOUT`] after the server stopped
/// answering (a little less: the deadline covers the whole send).
fn assert_ended_by_the_timeout(stall: &Stalled) {
    let waited = stall.closed.unwrap().duration_since(stall.since);
    assert!(
        waited >= TIMEOUT / 2 && waited <= TIMEOUT + Duration::from_millis(750),
        "the conversation stalled at {:?} ended after {waited:?}, not about {TIMEOUT:?}",
        stall.at
    );
}

/// The recipients of campaign `id` in `state`, as the API lists them.
async fn recipients(app: &TestApp, id: &str, state: &str) -> Vec<Value> {
    let page: Value = app
        .get_json(&format!("/v1/campaigns/{id}/recipients?state={state}"))
        .await;
    page["items"].as_array().unwrap().clone()
}

fn counts(status: &Value) -> [i64; 4] {
    ["sent", "failed", "unknown", "pending"].map(|state| status["counts"][state].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_stall_after_the_message_was_written_ends_in_the_timeout_as_unknown_never_resent() {
    let server = StallingSmtp::start().await;
    let hung = "hung@example.com";
    server.stall(hung, Stall::AtDataEnd);
    let app = spawn(&server, 5).await;
    let started = Instant::now();
    let id = start_campaign_to(&app, vec![hung.into(), "fine@example.com".into()], None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(15)).await;
    assert_eq!(counts(&status), [1, 0, 1, 0], "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let stalls = closed_stalls(&server, 1).await;
    assert_eq!(
        (stalls[0].address.as_str(), stalls[0].at),
        (hung, Stall::AtDataEnd)
    );
    assert_ended_by_the_timeout(&stalls[0]);

    let unknown = recipients(&app, &id, "unknown").await;
    assert_eq!(unknown.len(), 1);
    assert_eq!(
        (
            unknown[0]["email"].as_str(),
            unknown[0]["attempts"].as_i64()
        ),
        (Some(hung), Some(1))
    );
    let reply = unknown[0]["last_reply"].as_str().unwrap();
    assert!(
        reply.contains("in doubt") && reply.contains("after the message was sent"),
        "{reply}"
    );
    // The server has the message once; the campaign is complete, so nothing
    // is left that could send it again.
    let to_hung = server
        .received()
        .iter()
        .filter(|to| to.iter().any(|a| a == hung))
        .count();
    assert_eq!(to_hung, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_stall_before_the_message_is_deferred_in_the_timeout_and_retried() {
    let server = StallingSmtp::start().await;
    let hung = "hung@example.com";
    server.stall(hung, Stall::AtRcpt);
    let app = spawn(&server, 2).await;
    let id = start_campaign_to(&app, vec![hung.into()], None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(20)).await;
    assert_eq!(counts(&status), [0, 1, 0, 0], "{status}");

    // Tried twice (deferred once), each conversation ended by the timeout.
    let stalls = closed_stalls(&server, 2).await;
    for stall in &stalls {
        assert_eq!(stall.at, Stall::AtRcpt);
        assert_ended_by_the_timeout(stall);
    }
    assert!(server.received().is_empty());
    let failed = recipients(&app, &id, "failed").await;
    assert_eq!(failed[0]["attempts"], 2);
    let reply = failed[0]["last_reply"].as_str().unwrap();
    assert!(
        reply.contains("gave up after 2 attempts") && reply.contains("before the message was sent"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_recipients_do_not_cost_the_connection() {
    let server = StallingSmtp::start().await;
    let address = |i: usize| format!("reader{i}@example.com");
    for bad in [1, 4, 6] {
        server.reject(&address(bad));
    }
    let url = server.url.clone();
    let app = TestApp::spawn_with(1, move |config| {
        mail_config_for(config, &url);
        config.mail.smtp_pool_size = 1;
    })
    .await;
    let id = start_campaign_to(&app, (0..8).map(address).collect(), None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(15)).await;
    assert_eq!(counts(&status), [5, 3, 0, 0], "{status}");
    // Each refusal was answered with `RSET` on the same connection, and each
    // accepted message still went to its own recipient alone.
    assert_eq!(server.connections(), 1, "connections opened");
    let mut received = server.received();
    received.sort();
    let expected: Vec<Vec<String>> = [0, 2, 3, 5, 7].map(|i| vec![address(i)]).into();
    assert_eq!(received, expected);
}

/// A line of `EXPLAIN`'s output.
#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    line: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_rollup_counts_sent_failed_and_unknown_recipients_as_the_ledger_records_them() {
    let server = StallingSmtp::start().await;
    let address = |i: usize| format!("guest{i}@example.com");
    server.reject(&address(1));
    server.reject(&address(2));
    server.stall(&address(3), Stall::AtDataEnd);
    let app = spawn(&server, 5).await;
    let id = start_campaign_to(&app, (0..8).map(address).collect(), None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(15)).await;
    assert_eq!(counts(&status), [5, 2, 1, 0], "{status}");

    let rollup = app.enqueue("stats.rollup_hourly", json!({})).await;
    app.wait_for_state(rollup, "succeeded", Duration::from_secs(30))
        .await;
    let mut totals = Vec::new();
    for column in ["sent", "failed", "unknown"] {
        let sql = format!(
            "SELECT coalesce(sum({column}), 0)::bigint AS n FROM mail_stats_hourly \
             WHERE campaign_id = '{id}'"
        );
        totals.push(app.count(&sql).await);
    }
    assert_eq!(
        totals,
        [5, 2, 1],
        "sent, failed, unknown in the hourly rollup"
    );

    // The rollup's window is a range of `campaign_recipients_finished`: with
    // sequential scans priced out, its plan reads that index (a statement the
    // index does not match would still scan the table).
    let mut conn = app.db.conn();
    let plan = tokio::task::spawn_blocking(move || {
        conn.batch_execute("SET enable_seqscan = off").unwrap();
        let to: DateTime<Utc> = Utc::now();
        diesel::sql_query(format!(
            "EXPLAIN {}",
            rollup::mail_statement(Granularity::Hour)
        ))
        .bind::<Timestamptz, _>(to - chrono::Duration::hours(3))
        .bind::<Timestamptz, _>(to)
        .load::<PlanLine>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|row| row.line)
        .collect::<Vec<_>>()
        .join("\n")
    })
    .await
    .unwrap();
    assert!(plan.contains("campaign_recipients_finished"), "{plan}");
}
