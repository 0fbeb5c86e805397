//! The state writer's upsert: a batch's changes planned into rounds in which
//! each job appears once ([`plan`]), each round written as one multi-row
//! `INSERT … ON CONFLICT DO UPDATE` of arrays ([`upsert`]), prepared once per
//! connection.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use conveyor_schema::JobState;
use conveyor_schema::nul::without_nul;
use conveyor_schema::prepared::walk_sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use super::StateChange;

/// One row of an upsert: a job's latest change in the batch, with the start
/// time and producer of an earlier change of its attempt and the number of
/// attempt starts (`running` changes) folded into it.
#[derive(Debug)]
pub(super) struct Row<'a> {
    change: &'a StateChange,
    started_at: Option<DateTime<Utc>>,
    producer: Option<&'a str>,
    runner: Option<&'a str>,
    runs: i32,
}

impl<'a> Row<'a> {
    fn of(change: &'a StateChange) -> Self {
        Self {
            change,
            started_at: change.started_at,
            producer: change.producer.as_deref(),
            runner: change.runner.as_deref(),
            runs: i32::from(change.state == JobState::Running),
        }
    }
}

/// Orders `changes` (at most `count`) into upsert rounds in which each job
/// appears once (an upsert cannot touch one row twice).
///
/// Changes of the same attempt are folded into one row: the usual `running`
/// then `succeeded` of a fast job become a single `succeeded` row that keeps
/// the start time and counts the run, which is what applying both in order
/// gives. A final change stays final whatever of its attempt follows it. Only
/// when folding would lose something (an earlier change carries an error, or
/// the attempts differ) does a new round start.
pub(super) fn plan<'a>(
    changes: impl Iterator<Item = &'a StateChange>,
    count: usize,
) -> Vec<Vec<Row<'a>>> {
    let mut rounds = Vec::new();
    let mut round: Vec<Row> = Vec::with_capacity(count);
    let mut index = std::collections::HashMap::with_capacity(count);
    for change in changes {
        match index.get(&change.id) {
            Some(&at) => {
                let row: &mut Row = &mut round[at];
                let runs = i32::from(change.state == JobState::Running);
                if row.change.error.is_none()
                    && row.change.attempt == change.attempt
                    && row.change.state.is_final()
                {
                    // A final state is never undone: a later change of the same
                    // attempt (the start of a second copy of a keyed job) only
                    // counts its run, as the upsert would refuse it.
                    row.runs += runs;
                } else if row.change.error.is_none() && row.change.attempt == change.attempt {
                    row.started_at = change.started_at.or(row.started_at);
                    row.producer = change.producer.as_deref().or(row.producer);
                    row.runner = change.runner.as_deref().or(row.runner);
                    row.change = change;
                    row.runs += runs;
                } else {
                    rounds.push(std::mem::take(&mut round));
                    index.clear();
                    index.insert(change.id, 0);
                    round.push(Row::of(change));
                }
            }
            None => {
                index.insert(change.id, round.len());
                round.push(Row::of(change));
            }
        }
    }
    if !round.is_empty() {
        rounds.push(round);
    }
    // Rows in id order, as the ingress inserts them, so that two transactions
    // never wait on each other's rows in a cycle.
    for round in &mut rounds {
        round.sort_unstable_by_key(|row| row.change.id);
    }
    rounds
}

const UPSERT: &str = "
INSERT INTO jobs (id, task, queue, state, args, attempts, runs, max_attempts, enqueued_at,
                  started_at, finished_at, last_error, errors, next_attempt_at, updated_at, producer,
                  runner)
SELECT d.id, d.task, d.queue, d.state, d.args, d.attempt, d.runs, d.max_attempts, d.enqueued_at,
       d.started_at, d.finished_at, d.error,
       CASE WHEN d.error IS NULL THEN '[]'::jsonb
            ELSE jsonb_build_array(jsonb_build_object('attempt', d.attempt, 'at', d.at, 'error', d.error)) END,
       d.next_attempt_at, now(), d.producer, d.runner
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[], $7::int4[],
            $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::timestamptz[],
            $13::int4[], $14::timestamptz[], $15::text[], $16::text[])
     AS d(id, task, queue, state, args, attempt, max_attempts, enqueued_at,
          started_at, finished_at, error, next_attempt_at, runs, at, producer, runner)
ON CONFLICT (id) DO UPDATE SET
    state = EXCLUDED.state,
    attempts = EXCLUDED.attempts,
    runs = jobs.runs + EXCLUDED.runs,
    started_at = COALESCE(EXCLUDED.started_at, jobs.started_at),
    finished_at = EXCLUDED.finished_at,
    last_error = COALESCE(EXCLUDED.last_error, jobs.last_error),
    errors = jobs.errors || EXCLUDED.errors,
    next_attempt_at = EXCLUDED.next_attempt_at,
    runner = COALESCE(EXCLUDED.runner, jobs.runner),
    updated_at = now()
WHERE jobs.state NOT IN ('succeeded', 'dead') AND EXCLUDED.attempts >= jobs.attempts";

/// [`UPSERT`]'s parameters, one array per column: prepared once per connection
/// (see `conveyor_schema::prepared`).
struct UpsertStates<'a> {
    ids: Vec<Uuid>,
    tasks: Vec<&'a str>,
    queues: Vec<&'a str>,
    states: Vec<&'a str>,
    args: Vec<&'a serde_json::Value>,
    attempts: Vec<i32>,
    max_attempts: Vec<i32>,
    enqueued_at: Vec<DateTime<Utc>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    errors: Vec<Option<Cow<'a, str>>>,
    next_attempt_at: Vec<Option<DateTime<Utc>>>,
    runs: Vec<i32>,
    at: Vec<DateTime<Utc>>,
    producers: Vec<Option<&'a str>>,
    runners: Vec<Option<&'a str>>,
}

impl QueryFragment<Pg> for UpsertStates<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(UPSERT, out, |n, out| match n {
            1 => out.push_bind_param::<Array<SqlUuid>, _>(&self.ids),
            2 => out.push_bind_param::<Array<Text>, _>(&self.tasks),
            3 => out.push_bind_param::<Array<Text>, _>(&self.queues),
            4 => out.push_bind_param::<Array<Text>, _>(&self.states),
            5 => out.push_bind_param::<Array<Jsonb>, _>(&self.args),
            6 => out.push_bind_param::<Array<Int4>, _>(&self.attempts),
            7 => out.push_bind_param::<Array<Int4>, _>(&self.max_attempts),
            8 => out.push_bind_param::<Array<Timestamptz>, _>(&self.enqueued_at),
            9 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.started_at),
            10 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.finished_at),
            11 => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.errors),
            12 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.next_attempt_at),
            13 => out.push_bind_param::<Array<Int4>, _>(&self.runs),
            14 => out.push_bind_param::<Array<Timestamptz>, _>(&self.at),
            15 => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.producers),
            _ => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.runners),
        })
    }
}
conveyor_schema::prepared_statement!(UpsertStates);

pub(super) fn upsert(conn: &mut PgConnection, rows: &[Row]) -> QueryResult<()> {
    fn column<'a, T>(rows: &[Row<'a>], field: impl Fn(&'a StateChange) -> T) -> Vec<T> {
        rows.iter().map(|row| field(row.change)).collect()
    }
    if rows.is_empty() {
        return Ok(());
    }
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    UpsertStates {
        ids: column(rows, |c| c.id),
        tasks: column(rows, |c| c.task.as_str()),
        queues: column(rows, |c| c.queue.as_str()),
        states: column(rows, |c| c.state.as_str()),
        args: column(rows, |c| &c.args),
        attempts: column(rows, |c| int(c.attempt)),
        max_attempts: column(rows, |c| int(c.max_attempts)),
        enqueued_at: column(rows, |c| c.enqueued_at),
        started_at: rows.iter().map(|row| row.started_at).collect(),
        finished_at: column(rows, |c| c.finished_at),
        // A task's error may quote anything, U+0000 included, which PostgreSQL refuses.
        errors: column(rows, |c| c.error.as_deref().map(without_nul)),
        next_attempt_at: column(rows, |c| c.next_attempt_at),
        runs: rows.iter().map(|row| row.runs).collect(),
        at: column(rows, |c| c.at),
        producers: rows.iter().map(|row| row.producer).collect(),
        runners: rows.iter().map(|row| row.runner).collect(),
    }
    .execute(conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_schema::Envelope;
    use serde_json::json;

    fn change(envelope: &Envelope, state: JobState) -> StateChange {
        StateChange::of(envelope, "default", 5, state)
    }

    #[test]
    fn running_then_final_folds_into_one_row() {
        let a = Envelope::new("diag.noop", json!({}));
        let b = Envelope::new("diag.noop", json!({}));
        let mut running_a = change(&a, JobState::Running);
        running_a.started_at = Some(Utc::now());
        running_a.producer = Some("shop".into());
        let mut done_a = change(&a, JobState::Succeeded);
        done_a.finished_at = Some(Utc::now());
        let changes = [
            running_a.clone(),
            change(&b, JobState::Running),
            done_a,
            change(&b, JobState::Succeeded),
        ];
        let rounds = plan(changes.iter(), changes.len());
        assert_eq!(rounds.len(), 1);
        let rows = &rounds[0];
        assert_eq!(rows.len(), 2);
        let row_a = rows.iter().find(|row| row.change.id == a.id).unwrap();
        assert_eq!(row_a.change.state, JobState::Succeeded);
        assert_eq!(row_a.started_at, running_a.started_at);
        assert_eq!(row_a.producer, Some("shop"));
        assert!(row_a.change.finished_at.is_some());
        assert!(rows.iter().all(|row| row.runs == 1));
    }

    #[test]
    fn each_round_is_in_id_order() {
        let mut envelopes: Vec<Envelope> = (0..50)
            .map(|_| Envelope::new("diag.noop", json!({})))
            .collect();
        envelopes.reverse();
        let changes: Vec<StateChange> = envelopes
            .iter()
            .map(|e| change(e, JobState::Running))
            .collect();
        let rounds = plan(changes.iter(), changes.len());
        let ids: Vec<Uuid> = rounds[0].iter().map(|row| row.change.id).collect();
        assert!(ids.is_sorted());
        assert_eq!(ids.len(), 50);
    }

    #[test]
    fn a_final_change_stays_final_when_a_second_copy_starts_after_it() {
        let a = Envelope::new("diag.noop", json!({}));
        let changes = [
            change(&a, JobState::Running),
            change(&a, JobState::Succeeded),
            change(&a, JobState::Running),
        ];
        let rounds = plan(changes.iter(), changes.len());
        assert_eq!(rounds.len(), 1);
        assert_eq!(rounds[0][0].change.state, JobState::Succeeded);
        assert_eq!(rounds[0][0].runs, 2);
    }

    #[test]
    fn a_change_after_an_error_or_of_another_attempt_starts_a_new_round() {
        let a = Envelope::new("diag.fail", json!({}));
        let mut retrying = change(&a, JobState::Retrying);
        retrying.error = Some("boom".into());
        let changes = [retrying, change(&a, JobState::Dead)];
        let rounds = plan(changes.iter(), changes.len());
        assert_eq!(rounds.len(), 2);
        let next = a.next_attempt();
        let changes = [
            change(&a, JobState::Running),
            change(&next, JobState::Running),
        ];
        let rounds = plan(changes.iter(), changes.len());
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[1][0].change.attempt, 2);
    }
}
