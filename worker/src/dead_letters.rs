//! Durable dead-letter records: every message that reaches a `.dlq` queue has a
//! row in `dead_jobs` that operators browse, replay and discard.
//!
//! Two roads lead to the dead-letter queue, and both record:
//! - the worker gives up on a job (attempts exhausted, permanent failure,
//!   unreadable message, unknown task). It publishes to `<q>.dlq` itself and
//!   commits the record in the same transaction as the job's `dead` state
//!   ([`DeadLetter`] rides along with the state change in the state writer);
//! - the broker gives up on a message (its delivery limit, e.g. a job that
//!   crashes its worker every time). The broker routes those to
//!   `<q>.dlq-inbox`; [`record_from_inbox`] commits the record and the job's
//!   `dead` state, then republishes the message with all its headers (RabbitMQ's
//!   `x-death` history included) to `<q>.dlq`, and only then acks the inbox copy.
//!
//! A message the broker dead-lettered for its delivery limit is not recorded
//! when the job's record (read first, again until it can be) shows that:
//! - the job already succeeded. The message is a stale copy (its delivery
//!   returned, not acked, after the commit), and a record would offer a
//!   succeeded job for a replay: [`succeeded`] acknowledges and counts it. A
//!   job already `dead` is recorded as before, a no-op when its record exists;
//! - its attempt never started (returned by workers stopped or killed before
//!   starting it): [`resets`] gives it back to its work queue, at most
//!   `amqp.delivery_limit_resets` times.
//!
//! Either way the record is committed before the dead-letter message can be
//! lost, and recording is idempotent (`ON CONFLICT DO NOTHING` on the job id),
//! so a redelivery never records twice.
//!
//! Should PostgreSQL refuse a record for what it holds (see the state writer),
//! [`commit`] writes it without the job's state, then in a fallback form that
//! holds nothing it could refuse ([`DeadLetter::fallback`]); should that be
//! refused too, the message is in the dead-letter queue all the same, and the
//! missing record is logged as an error. A record written without the job's
//! state (or for a job whose `succeeded` state was refused, see `execute`)
//! carries the refused state ([`DeadLetter::refused_state`]), and the state
//! writer brings the job's row to `dead` in a minimal form with it, so the job
//! is not shown `running` for ever. A fallback record's `body` is the envelope
//! as text: the ingress replays it from there when it is whole.

use std::sync::Arc;

use chrono::Utc;
use conveyor_platform::amqp::ERROR_HEADER;
use conveyor_schema::nul::without_nul;
use conveyor_schema::{Envelope, JobState, MAX_TASK_NAME_LEN, find_task};
use diesel::prelude::*;
use diesel::sql_types::{Int4, Jsonb, Nullable, Text, Uuid as SqlUuid};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Confirmation};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::runtime::Runtime;
use crate::state_writer::{Commit, StateChange};

pub(crate) mod resets;
mod succeeded;

/// Who dead-lettered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The worker gave up.
    Worker,
    /// The broker's delivery limit.
    Broker,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Broker => "broker",
        }
    }
}

/// One dead-job record about to be written.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The job id (a fresh id when the message had none).
    pub id: Uuid,
    /// Task name; empty when unreadable, at most [`MAX_TASK_NAME_LEN`] bytes
    /// otherwise (as `Envelope::decode` refuses longer ones).
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// The envelope, when readable.
    pub envelope: Option<Value>,
    /// The raw body, when the envelope was unreadable.
    pub body: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The final reason.
    pub reason: String,
    /// RabbitMQ's `x-death` header as JSON, when the broker dead-lettered it.
    pub x_death: Option<Value>,
    /// Who gave up.
    pub source: Source,
    /// The job's own state PostgreSQL refused, when this record stands in for
    /// it: the state writer then also brings the job's row to `dead` in a
    /// minimal form (see `state_writer`), so it is not left `running`.
    pub refused_state: Option<JobState>,
}

impl DeadLetter {
    /// The record of `envelope` given up by the worker for `reason`.
    pub fn of(envelope: &Envelope, queue: &str, reason: &str) -> Self {
        Self {
            id: envelope.id,
            task: envelope.task.clone(),
            queue: queue.to_owned(),
            envelope: serde_json::to_value(envelope).ok(),
            body: None,
            attempts: envelope.attempt,
            reason: reason.to_owned(),
            x_death: None,
            source: Source::Worker,
            refused_state: None,
        }
    }

    /// The record of a message that is not a readable envelope, named after
    /// its `message_id` or, without one, after its body, so that the same
    /// message handled twice (a redelivery) is recorded once.
    pub fn unreadable(id: Option<Uuid>, queue: &str, body: &[u8], reason: &str) -> Self {
        Self {
            id: id.unwrap_or_else(|| Uuid::new_v5(&UNREADABLE_NAMESPACE, body)),
            task: String::new(),
            queue: queue.to_owned(),
            envelope: None,
            body: Some(
                String::from_utf8_lossy(body)
                    .chars()
                    .take(MAX_BODY_CHARS)
                    .collect(),
            ),
            attempts: 0,
            reason: reason.to_owned(),
            x_death: None,
            source: Source::Worker,
            refused_state: None,
        }
    }

    /// This record in a form that holds nothing PostgreSQL could refuse, for
    /// when it refused the record itself with `error`: the task name cut to
    /// [`MAX_TASK_NAME_LEN`] bytes (its index entry stays small), the envelope
    /// as text in `body` (at most 64 Ki characters) instead of JSON, no
    /// `x_death`, and `error` added to the reason.
    pub fn fallback(self, error: &str) -> Self {
        let mut task = self.task;
        let mut cut = MAX_TASK_NAME_LEN.min(task.len());
        while !task.is_char_boundary(cut) {
            cut -= 1;
        }
        task.truncate(cut);
        let body = self
            .body
            .or_else(|| self.envelope.map(|envelope| envelope.to_string()))
            .map(|body| body.chars().take(MAX_BODY_CHARS).collect());
        Self {
            task,
            envelope: None,
            body,
            reason: format!(
                "{}; the database refused its full record: {error}",
                self.reason
            ),
            x_death: None,
            ..self
        }
    }
}

/// The most characters of a message's body a record keeps.
const MAX_BODY_CHARS: usize = 65_536;

/// Commits `change` (if any) and the record `dead` together; when PostgreSQL
/// refuses them, the record alone (the state may be what it refused) with the
/// job's row brought to `dead` in a minimal form, then the record's
/// [`fallback`](DeadLetter::fallback) form, the row likewise. A refusal of
/// that too is logged, and counts as done: by now the message is in the
/// dead-letter queue, and holding its delivery would not write the record.
/// `false` only when the state writer stopped first.
pub(crate) async fn commit(rt: &Runtime, change: Option<StateChange>, dead: DeadLetter) -> bool {
    let had_change = change.is_some();
    let mut refused = match rt.states.commit_dead(change, dead).await {
        Commit::Refused(refused) => refused,
        other => return other.is_committed(),
    };
    if had_change && let Some(mut dead) = refused.dead.take() {
        dead.refused_state = refused.change.as_ref().map(|change| change.state);
        refused = match rt.states.commit_dead(None, dead).await {
            Commit::Refused(refused) => refused,
            other => return other.is_committed(),
        };
    }
    let Some(dead) = refused.dead.take() else {
        return true;
    };
    let id = dead.id;
    match rt
        .states
        .commit_dead(None, dead.fallback(&refused.error))
        .await
    {
        Commit::Refused(again) => {
            tracing::error!(job.id = %id, error = again.error, "PostgreSQL refused even the fallback form of a dead job's record; the message is in the dead-letter queue, unrecorded");
            true
        }
        other => other.is_committed(),
    }
}

/// The namespace of the ids given to unreadable messages without a `message_id`.
const UNREADABLE_NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_8d2a_7b4f_4e0c_9a61_3f2d_c0ff_ee01);

/// Every failure comes from the job's record (written earlier in the same
/// transaction); a message without a record gets its final reason alone.
const INSERT: &str = "
INSERT INTO dead_jobs (id, task, queue, envelope, body, attempts, errors, reason, x_death, source)
SELECT $1, $2, $3, $4, $5, $6,
       COALESCE((SELECT j.errors FROM jobs j WHERE j.id = $1 AND j.errors <> '[]'::jsonb),
                jsonb_build_array(jsonb_build_object('attempt', $6, 'at', now(), 'error', $7))),
       $7, $8, $9
ON CONFLICT (id) DO NOTHING";

/// Writes `dead` unless a record for its id exists.
pub fn insert(conn: &mut PgConnection, dead: &DeadLetter) -> QueryResult<()> {
    diesel::sql_query(INSERT)
        .bind::<SqlUuid, _>(dead.id)
        .bind::<Text, _>(&dead.task)
        .bind::<Text, _>(&dead.queue)
        .bind::<Nullable<Jsonb>, _>(&dead.envelope)
        .bind::<Nullable<Text>, _>(dead.body.as_deref().map(without_nul))
        .bind::<Int4, _>(i32::try_from(dead.attempts).unwrap_or(i32::MAX))
        .bind::<Text, _>(without_nul(&dead.reason))
        .bind::<Nullable<Jsonb>, _>(&dead.x_death)
        .bind::<Text, _>(dead.source.as_str())
        .execute(conn)?;
    Ok(())
}

/// Records one message the broker dead-lettered from `queue`, moves it to the
/// dead-letter queue on `channel` (in confirm mode) and acks it.
pub async fn record_from_inbox(
    rt: Arc<Runtime>,
    queue: Arc<str>,
    channel: Channel,
    delivery: Delivery,
) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let x_death = headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "x-death")
        .map(|(_, v)| amqp_to_json(v));
    let why = x_death
        .as_ref()
        .and_then(|d| d.get(0))
        .and_then(|first| first["reason"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    if why == "delivery_limit"
        && let Ok(envelope) = Envelope::decode(&delivery.data)
    {
        let Some(recorded) = succeeded::read(&rt, envelope.id).await else {
            return_to_inbox(&delivery).await;
            return;
        };
        if succeeded::acked_if_succeeded(&rt, &queue, &delivery, &envelope, recorded).await
            || resets::return_unstarted(&rt, &queue, &channel, &delivery, &envelope, recorded).await
                == resets::Returned::Settled
        {
            return;
        }
    }
    // x-death's `count` is how often the message was dead-lettered for this
    // reason (once, for a delivery limit), not how often it was delivered.
    let reason = if why == "delivery_limit" {
        format!(
            "dead-lettered by the broker (delivery_limit): returned to its queue more than {} times without being settled",
            rt.topology.delivery_limit
        )
    } else {
        format!("dead-lettered by the broker ({why})")
    };
    let id = crate::execute::message_id(&delivery.properties);
    let (change, mut dead) = match Envelope::decode(&delivery.data) {
        Ok(envelope) => {
            let max_attempts = find_task(&envelope.task)
                .map_or(envelope.attempt, |task| task.options.max_attempts);
            let mut change = StateChange::of(&envelope, &queue, max_attempts, JobState::Dead);
            change.error = Some(reason.clone());
            change.finished_at = Some(Utc::now());
            (Some(change), DeadLetter::of(&envelope, &queue, &reason))
        }
        Err(err) => (
            None,
            DeadLetter::unreadable(id, &queue, &delivery.data, &format!("{reason}; {err}")),
        ),
    };
    dead.source = Source::Broker;
    dead.x_death = x_death;
    let labels = [dead.task.clone(), queue.to_string()];
    tracing::warn!(job.id = %dead.id, task = %dead.task, reason, "recording a message the broker dead-lettered");
    if !commit(&rt, change, dead).await {
        return;
    }
    rt.metrics.jobs_dead.with_label_values(&labels).inc();

    let mut forwarded = headers;
    forwarded.insert(
        ShortString::from(ERROR_HEADER),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let properties = delivery.properties.clone().with_headers(forwarded);
    let queue = rt.topology.dead_letter_queue(&queue);
    match publish_confirmed(&channel, queue, &delivery, properties).await {
        Ok(()) => {
            if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(error = %err, "inbox ack failed; the recorded copy will be recorded again as a no-op");
            }
        }
        Err(outcome) => {
            tracing::error!(%outcome, "could not move a dead letter to its queue; returning it to the inbox");
            return_to_inbox(&delivery).await;
        }
    }
}

/// Publishes `delivery`'s body with `properties` to `queue` (mandatory, so an
/// unroutable message is not an ack) and waits for the broker's confirm; `Err`
/// names what came instead.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    queue: String,
    delivery: &Delivery,
    properties: lapin::BasicProperties,
) -> Result<(), String> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let published = channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            options,
            &delivery.data,
            properties,
        )
        .await;
    match published {
        Ok(confirm) => match confirm.await {
            Ok(Confirmation::Ack(None)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
        Err(err) => Err(err.to_string()),
    }
}

/// Hands an inbox delivery back to the inbox, to be handled again.
pub(crate) async fn return_to_inbox(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    let _ = delivery.acker.nack(requeue).await;
}

/// An AMQP header value as JSON (tables become objects, timestamps seconds).
pub fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(without_nul(s.as_str())),
        AMQPValue::LongString(s) => json!(without_nul(&s.to_string())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => json!(without_nul(&String::from_utf8_lossy(b.as_slice()))),
        AMQPValue::Void => Value::Null,
    }
}

fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (without_nul(k.as_str()).into_owned(), amqp_to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn x_death_converts_to_json() {
        let mut entry = FieldTable::default();
        entry.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        entry.insert("count".into(), AMQPValue::LongLongInt(3));
        entry.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        let value = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(entry)]));
        assert_eq!(
            amqp_to_json(&value),
            json!([{"reason": "delivery_limit", "count": 3, "time": 1_700_000_000u64}])
        );
    }
}
