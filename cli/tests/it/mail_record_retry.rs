//! A database error while a sender records a group's outcomes (a failover, a
//! pool checkout that timed out) does not lose them: the sender retries the
//! recording while the group's claims hold, so recipients the SMTP server
//! accepted end `sent`, not `unknown`, and nobody is mailed twice.

use std::time::Duration;

use diesel::connection::SimpleConnection;

use crate::harness::TestApp;
use crate::mail::{assert_no_duplicates, mail_config_for, start_campaign, wait_completed};
use crate::smtp::TestSmtp;

/// Runs `sql` on the test database.
fn execute(app: &TestApp, sql: &str) {
    tokio::task::block_in_place(|| app.db.conn().batch_execute(sql)).expect(sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_recording_of_sent_mail_is_retried_not_left_unknown() {
    fail_one_recording(None).await;
}

/// A throttled group is recorded by a statement of its own: the same holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_recording_of_a_throttled_group_is_retried_not_left_unknown() {
    fail_one_recording(Some(50.0)).await;
}

/// Sends a campaign of 8 (at `rate` a second) while the first recording of a
/// `sent` outcome fails; all 8 must end `sent`, each mailed once, by the job's
/// first attempt.
async fn fail_one_recording(rate: Option<f64>) {
    let smtp = TestSmtp::start();
    // Claims trusted for 3 s (mail_config_for): without the retry, the group's
    // rows would be in doubt and turn `unknown` once their claims expire.
    let app = TestApp::spawn_with(1, |c| mail_config_for(c, &smtp.url)).await;
    // The first statement that marks a recipient `sent` fails; a sequence,
    // because its `nextval` survives the failed statement's rollback.
    execute(
        &app,
        "CREATE SEQUENCE record_failures;
         CREATE FUNCTION fail_first_record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('record_failures') = 1 THEN
                 RAISE EXCEPTION 'recording outcomes refused once (test)';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_first_record BEFORE UPDATE ON campaign_recipients
             FOR EACH ROW WHEN (NEW.state = 'sent') EXECUTE FUNCTION fail_first_record();",
    );
    let id = start_campaign(&app, 8, rate).await;
    let status = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert!(
        app.count("SELECT count(*) AS n FROM record_failures WHERE is_called")
            .await
            == 1,
        "the recording never failed, so this test proved nothing"
    );
    assert_eq!(status["counts"]["sent"], 8, "{status}");
    assert_eq!(status["counts"]["unknown"], 0, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 8);
    assert_eq!(
        app.count("SELECT max(attempts)::int8 AS n FROM jobs WHERE task = 'mail.send_chunk'")
            .await,
        1,
        "the sender's job failed over the recording instead of retrying it"
    );
}
