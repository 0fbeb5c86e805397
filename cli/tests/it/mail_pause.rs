//! Pause and resume racing the planner and the senders: a pause that lands in
//! the middle of a planner's round, and a resume that lands while a sender is
//! handing its chunk back, still mail every recipient exactly once. A trigger
//! holds the planner or the sender at the racy point ([`Gate`]), so each order
//! of events is forced rather than hoped for.

use std::time::Duration;

use crate::gate::{Gate, advisory_waits};
use crate::harness::{TestApp, wait_until};
use crate::mail::{
    address, assert_no_duplicates, control, mail_config_for, sent_so_far, start_campaign,
    wait_completed,
};
use crate::smtp::{Behaviour, TestSmtp};

/// Whether a campaign state change (`pause`, `resume`) waits for a lock on the campaign row.
async fn transition_waits(app: &TestApp) -> bool {
    app.count(
        r#"SELECT count(*) AS n FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'
              AND query LIKE '%FROM "campaigns"%FOR UPDATE%'"#,
    )
    .await
        > 0
}

/// Finished planner jobs.
async fn planners_done(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign' AND state = 'succeeded'",
    )
    .await
}

/// Whether the first recipient is deferred (pending after an attempt) and
/// `in_chunk` says whether it still belongs to a chunk.
async fn first_deferred(app: &TestApp, in_chunk: bool) -> bool {
    let chunk = if in_chunk { "IS NOT NULL" } else { "IS NULL" };
    app.count(&format!(
        "SELECT count(*) AS n FROM campaign_recipients
          WHERE email = '{}' AND state = 'pending' AND attempts >= 1 AND chunk_id {chunk}",
        address(0)
    ))
    .await
        == 1
}

/// Ingress and one worker sending chunks of 5; the first recipient is
/// deferred (451) until the test lets it through, so its chunk's sender keeps
/// coming back for it and hands it back on a pause.
async fn spawn(smtp: &TestSmtp) -> TestApp {
    smtp.behave(&address(0), Behaviour::DeferTimes(u32::MAX));
    let url = smtp.url.clone();
    TestApp::spawn_with(1, move |config| {
        mail_config_for(config, &url);
        config.mail.chunk_size = 5;
        config.mail.max_smtp_attempts = 100;
        config.mail.retry_backoff_ms = 100;
    })
    .await
}

/// The planner reads the campaign once per round of 16 chunks. A pause in the
/// middle of a round, after which the first chunk's sender hands its deferred
/// recipient back, must not let the planner put that recipient back into the
/// first chunk (same generation, same first recipient, so the same chunk id),
/// which was published and finished already: it would never be sent again,
/// and the campaign never complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_in_the_middle_of_a_planner_round_strands_no_recipient() {
    let smtp = TestSmtp::start();
    let app = spawn(&smtp).await;
    // The planner's second round waits at its first chunk.
    let gate = Gate::close(
        &app,
        "campaign_chunks",
        "INSERT",
        "(SELECT count(*) FROM campaign_chunks c WHERE c.campaign_id = NEW.campaign_id) >= 16",
    );
    let id = start_campaign(&app, 100, None).await;
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 1
            && sent_so_far(&app).await == 79
            && first_deferred(&app, true).await
    })
    .await;

    let waited_or_released = async {
        // Either the pause waits for the planner, or it took effect and the
        // first chunk's sender handed its recipient back.
        wait_until(Duration::from_secs(30), || async {
            transition_waits(&app).await || first_deferred(&app, false).await
        })
        .await;
        gate.open();
    };
    let (paused, ()) = tokio::join!(control(&app, &id, "pause"), waited_or_released);
    assert_eq!(paused, 200);
    wait_until(Duration::from_secs(30), || async {
        planners_done(&app).await == 1
    })
    .await;

    assert_eq!(control(&app, &id, "resume").await, 200);
    smtp.behave(&address(0), Behaviour::DeferTimes(0));
    let status = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], 100, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 100);
}

/// A sender that saw the pause hands its chunk's pending recipients back to
/// the planner. If that lands after a resume and the resumed planner's whole
/// run, no planner is left to take them: a hand-back happens only while the
/// campaign is still paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_back_racing_a_resume_strands_no_recipient() {
    let smtp = TestSmtp::start();
    let app = spawn(&smtp).await;
    let id = start_campaign(&app, 10, None).await;
    wait_until(Duration::from_secs(30), || async {
        sent_so_far(&app).await == 9 && first_deferred(&app, true).await
    })
    .await;
    // A recipient leaving its chunk (the hand-back) waits at the gate.
    let gate = Gate::close(
        &app,
        "campaign_recipients",
        "UPDATE",
        "OLD.chunk_id IS NOT NULL AND NEW.chunk_id IS NULL",
    );
    assert_eq!(control(&app, &id, "pause").await, 200);
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 1
    })
    .await;

    let waited_or_replanned = async {
        // Either the resume waits for the hand-back, or it took effect and
        // its planner has finished.
        wait_until(Duration::from_secs(30), || async {
            transition_waits(&app).await || planners_done(&app).await == 2
        })
        .await;
        gate.open();
    };
    let (resumed, ()) = tokio::join!(control(&app, &id, "resume"), waited_or_replanned);
    assert_eq!(resumed, 200);
    smtp.behave(&address(0), Behaviour::DeferTimes(0));
    let status = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], 10, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 10);
}
