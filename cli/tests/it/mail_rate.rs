//! A throttled sender waits for its send slots before it claims recipients:
//! a reservation that fails, or a shutdown while it waits, leaves nobody
//! claimed who was never handed to the SMTP server, so nobody ends `unknown`
//! without cause. And a campaign whose groups the global ceiling holds back
//! still keeps its own rate.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{TestApp, wait_until};
use crate::mail::{
    assert_no_duplicates, mail_config_for, process_env, sent_so_far, start_campaign, wait_completed,
};
use crate::smtp::TestSmtp;

/// Runs `sql` on the test database.
fn execute(app: &TestApp, sql: &str) {
    tokio::task::block_in_place(|| app.db.conn().batch_execute(sql)).expect(sql);
}

/// Recipients that are neither pending nor sent.
async fn claimed_or_in_doubt(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) AS n FROM campaign_recipients WHERE state NOT IN ('pending', 'sent')",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_rate_reservation_leaves_no_recipient_claimed() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(1, |c| mail_config_for(c, &smtp.url)).await;
    execute(
        &app,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'send slots refused (test)'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON send_rate_slots
             FOR EACH ROW EXECUTE FUNCTION refuse();",
    );
    let id = start_campaign(&app, 8, Some(50.0)).await;
    wait_until(Duration::from_secs(30), || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE task = 'mail.send_chunk' AND attempts >= 2")
            .await
            == 1
    })
    .await;
    assert_eq!(
        claimed_or_in_doubt(&app).await,
        0,
        "recipients claimed by a sender that could not reserve send slots"
    );

    execute(&app, "DROP TRIGGER refuse ON send_rate_slots");
    let status = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], 8, "{status}");
    assert_eq!(status["counts"]["unknown"], 0, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_a_throttled_sender_waits_leaves_no_recipient_claimed() {
    let smtp = TestSmtp::start();
    let mut app = TestApp::spawn_with(0, |c| mail_config_for(c, &smtp.url)).await;
    process_env(&mut app, &smtp);
    // A grace period far shorter than the chunk's 3 s at 2 recipients a second.
    let pid = app.spawn_worker_process(300);
    let id = start_campaign(&app, 6, Some(2.0)).await;
    wait_until(Duration::from_secs(30), || async {
        sent_so_far(&app).await >= 1
    })
    .await;
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| app.processes[0].wait().unwrap());
    assert!(status.success(), "drained worker exited with {status}");
    assert!(
        sent_so_far(&app).await < 6,
        "the chunk should have been mid-way"
    );
    assert_eq!(
        claimed_or_in_doubt(&app).await,
        0,
        "recipients left claimed by a drained worker"
    );

    app.spawn_worker_process(10_000);
    let status = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], 6, "{status}");
    assert_eq!(status["counts"]["unknown"], 0, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 6);
}

/// A campaign's groups held back by the global ceiling keep the campaign's own
/// rate: each group's campaign slots start when it really sends, so the next
/// group cannot send beside it. Here the global slot is booked 5 s ahead and
/// four chunks of a 4/s campaign reserve together; before, all eight mails
/// left within a third of a second once the global slot came.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_campaign_held_back_by_the_global_rate_keeps_its_own_rate() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(1, |c| {
        mail_config_for(c, &smtp.url);
        c.mail.global_rate_per_sec = Some(100.0);
        c.mail.chunk_size = 2;
    })
    .await;
    execute(
        &app,
        "INSERT INTO send_rate_slots (key, next_slot_at) VALUES ('global', now() + interval '5 s')",
    );
    let id = start_campaign(&app, 8, Some(4.0)).await;
    wait_completed(&app, &id, Duration::from_secs(60)).await;
    assert_eq!(assert_no_duplicates(&smtp), 8);
    let mut arrivals: Vec<_> = smtp.received().iter().map(|mail| mail.at).collect();
    arrivals.sort();
    // At 4/s, five sends span a second; allow for the sink's and the host's jitter.
    let tightest = arrivals
        .windows(5)
        .map(|five| five[4] - five[0])
        .min()
        .unwrap();
    assert!(
        tightest >= Duration::from_millis(750),
        "five of a 4/s campaign's mails arrived within {tightest:?}"
    );
}
