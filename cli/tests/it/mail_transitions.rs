//! Campaign state changes that go wrong half-way: a planner publish that is
//! confirmed but not recorded while the planner runs, a resend-unknown whose
//! recipient update fails, and a campaign left `sending` with no planner. In
//! each, every recipient is mailed once, and the answer says what was left.

use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::gate::Gate;
use crate::harness::{TestApp, run_sql, wait_until};
use crate::mail::{address, assert_no_duplicates, mail_config_for, sent_so_far, wait_completed};
use crate::mail_api::{campaign, campaign_state, post};
use crate::publish_failures::{nacking_every_publish, replace_queue};
use crate::smtp::{Behaviour, TestSmtp};

/// Creates a draft campaign to `n` addresses ([`address`]); returns its id.
async fn create_draft(app: &TestApp, n: usize) -> String {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": address(i), "vars": {"name": format!("Guest {i}")}}))
        .collect();
    let (status, created) = post(app, "/v1/campaigns", &campaign(json!(recipients))).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// Ingress and one worker mailing `smtp`; a deferred recipient is retried every 100 ms.
async fn spawn(smtp: &TestSmtp, rerecord_within_ms: Option<u64>) -> TestApp {
    let url = smtp.url.clone();
    TestApp::spawn_with(1, move |config| {
        mail_config_for(config, &url);
        config.mail.max_smtp_attempts = 1_000;
        config.mail.retry_backoff_ms = 100;
        config.ingress.rerecord_within_ms = rerecord_within_ms;
    })
    .await
}

const PLANNERS: &str = "SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign'";

/// A campaign left `sending` with no planner (the ingress died between the
/// commit and the publish, or an undo failed): `send` again, with the key of
/// the call whose answer was lost, enqueues the planner, and every recipient
/// is mailed once. It used to be a 409 (`send` took only a draft).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_again_plans_a_campaign_left_sending_with_no_planner() {
    let smtp = TestSmtp::start();
    let app = spawn(&smtp, None).await;
    let id = create_draft(&app, 30).await;
    let left = format!(
        "WITH c AS (UPDATE campaigns SET state = 'sending', send_started_at = now() \
                    WHERE id = '{id}' RETURNING 1) \
         SELECT count(*) AS n FROM c"
    );
    assert_eq!(app.count(&left).await, 1);

    let response = app
        .client
        .post(app.url(&format!("/v1/campaigns/{id}/send")))
        .header("Idempotency-Key", "lost-answer")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "sending", "{body}");
    assert!(body["planner_job_id"].is_string(), "{body}");
    assert_eq!(app.count(PLANNERS).await, 1);

    let done = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["sent"], 30, "{done}");
    assert_eq!(assert_no_duplicates(&smtp), 30);

    // A completed campaign is still not sent again.
    let (status, problem) = post(&app, &format!("/v1/campaigns/{id}/send"), &json!({})).await;
    assert_eq!(status, 409, "{problem}");
}

/// The planner's publish is confirmed but its record cannot be written, and
/// the planner runs (makes its chunk, mails all but a deferred recipient)
/// before the ingress gives up and answers 503. Undoing the send then would
/// leave the chunk's sender to find a draft and stop, with the deferred
/// recipient assigned to a published chunk: never mailed, and the campaign
/// never completed by any later `send`. So the send stands, and the 503 says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_whose_planner_ran_before_its_publish_failed_is_not_undone() {
    let smtp = TestSmtp::start();
    smtp.behave(&address(0), Behaviour::DeferTimes(u32::MAX));
    let app = spawn(&smtp, Some(0)).await;
    let id = create_draft(&app, 3).await;
    // The recorder's commits of the planner's record fail (at COMMIT, after
    // the confirm), and so does every attempt to write it again. The worker
    // writes the row first, so the recorder's insert is an update of it.
    let recorder = conveyor_ingress::recorder::LANE_APPLICATION_NAME;
    run_sql(
        &app,
        format!(
            "CREATE FUNCTION fail_planner_record() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'injected commit failure';
             END $$;
             CREATE CONSTRAINT TRIGGER fail_planner_record AFTER INSERT OR UPDATE ON jobs
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 WHEN (NEW.task = 'mail.plan_campaign'
                       AND current_setting('application_name') = '{recorder}')
                 EXECUTE FUNCTION fail_planner_record();"
        ),
    )
    .await;
    // The recorder's first insert of it waits at the gate, while its message
    // is confirmed and the worker runs the planner.
    let gate = Gate::close(
        &app,
        "jobs",
        "INSERT",
        &format!(
            "NEW.task = 'mail.plan_campaign' AND current_setting('application_name') = '{recorder}'"
        ),
    );
    let deferred = format!(
        "SELECT count(*) AS n FROM campaign_recipients
          WHERE email = '{}' AND state = 'pending' AND attempts >= 1 AND chunk_id IS NOT NULL",
        address(0)
    );
    let send_path = format!("/v1/campaigns/{id}/send");
    let empty = json!({});
    let send = post(&app, &send_path, &empty);
    let planner_ran = async {
        wait_until(Duration::from_secs(30), || async {
            sent_so_far(&app).await == 2 && app.count(&deferred).await == 1
        })
        .await;
        gate.open();
    };
    let ((status, problem), ()) = tokio::join!(send, planner_ran);
    assert_eq!(status, 503, "{problem}");
    assert_eq!(campaign_state(&app, &id).await, "sending", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("injected commit failure"), "{detail}");
    assert!(
        detail.contains("a planner has planned the campaign since"),
        "{detail}"
    );

    // `send` again is a 200 (the campaign is sending), and the deferred
    // recipient's sender, still at work, mails it once it is let through.
    run_sql(&app, "DROP TRIGGER fail_planner_record ON jobs".into()).await;
    let (status, again) = post(&app, &send_path, &empty).await;
    assert_eq!(status, 200, "{again}");
    smtp.behave(&address(0), Behaviour::DeferTimes(0));
    let done = wait_completed(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["sent"], 3, "{done}");
    assert_eq!(assert_no_duplicates(&smtp), 3);
}

/// A completed campaign with two recipients in doubt (`unknown`).
async fn completed_with_two_unknown(app: &TestApp) -> String {
    let id = create_draft(app, 3).await;
    let finish = format!(
        "WITH c AS (UPDATE campaigns SET state = 'completed', completed_at = now(), \
                    send_started_at = now() WHERE id = '{id}' RETURNING 1), \
              r AS (UPDATE campaign_recipients \
                       SET state = CASE WHEN email = '{}' THEN 'sent' ELSE 'unknown' END \
                     WHERE campaign_id = '{id}' RETURNING 1) \
         SELECT (SELECT count(*) FROM c) + (SELECT count(*) FROM r) AS n",
        address(0)
    );
    assert_eq!(app.count(&finish).await, 4);
    id
}

/// How many of the campaign's recipients are in `state`.
async fn recipients_in(app: &TestApp, id: &str, state: &str) -> i64 {
    app.count(&format!(
        "SELECT count(*) AS n FROM campaign_recipients WHERE campaign_id = '{id}' AND state = '{state}'"
    ))
    .await
}

/// resend-unknown moves its recipients back to `pending` in the transaction
/// of its state change: when that update fails, the campaign stays
/// `completed` (it used to be left `sending`, with no planner, behind the
/// 503). And an undone resend-unknown puts its recipients back to `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_unknown_changes_its_recipients_and_state_together() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let id = completed_with_two_unknown(&app).await;
    run_sql(
        &app,
        "CREATE SEQUENCE reopen_faults;
         CREATE FUNCTION fail_reopen() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('reopen_faults') = 1 THEN
                 RAISE EXCEPTION 'injected recipient update failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_reopen BEFORE UPDATE ON campaign_recipients FOR EACH ROW
             WHEN (OLD.state = 'unknown' AND NEW.state = 'pending')
             EXECUTE FUNCTION fail_reopen();"
            .into(),
    )
    .await;
    let resend = format!("/v1/campaigns/{id}/resend-unknown");
    let (status, problem) = post(&app, &resend, &json!({})).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(campaign_state(&app, &id).await, "completed", "{problem}");
    assert_eq!(recipients_in(&app, &id, "unknown").await, 2);

    // Its planner's publish fails: undone, recipients and all.
    let mail = app.topology().work_queue("mail");
    replace_queue(&mail, Some(nacking_every_publish())).await;
    let (status, problem) = post(&app, &resend, &json!({})).await;
    assert_eq!(status, 503, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .ends_with("nothing changed"),
        "{problem}"
    );
    assert_eq!(campaign_state(&app, &id).await, "completed", "{problem}");
    assert_eq!(recipients_in(&app, &id, "unknown").await, 2);

    replace_queue(&mail, Some(FieldTable::default())).await;
    let (status, done) = post(&app, &resend, &json!({})).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["recipients"], 2, "{done}");
    assert_eq!(campaign_state(&app, &id).await, "sending");
    assert_eq!(recipients_in(&app, &id, "pending").await, 2);
    assert_eq!(app.count(PLANNERS).await, 1);
}
