//! The ledger's SQL: planning chunks, claiming recipients, recording results.
//!
//! Every function takes a connection and runs on a blocking thread (callers
//! use `pool::run`). Each state change is committed before the next step acts
//! on it: a claim before its SMTP conversations, an outcome after them.
//! Planning a chunk and handing a paused chunk back both hold the campaign row
//! `FOR SHARE`, so neither interleaves with a pause, resume or cancel.

use chrono::{DateTime, Utc};
use conveyor_schema::db::{campaign_chunks, campaign_recipients, campaigns};
use conveyor_schema::models::{Campaign, CampaignState};
use conveyor_schema::prepared::walk_sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{
    Array, BigInt, Double, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use uuid::Uuid;

/// The campaign row.
pub fn campaign(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Campaign>> {
    campaigns::table
        .find(id)
        .select(Campaign::as_select())
        .first(conn)
        .optional()
}

/// The deterministic id of the chunk starting at `first_recipient` in `generation`.
pub fn chunk_id(campaign_id: Uuid, generation: i32, first_recipient: i64) -> Uuid {
    Uuid::new_v5(
        &campaign_id,
        format!("chunk/{generation}/{first_recipient}").as_bytes(),
    )
}

/// What [`plan_next_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Recorded this chunk and assigned its recipients to it.
    Chunk(Uuid),
    /// No unplanned pending recipient is left.
    Nothing,
    /// The campaign is no longer sending at the planner's generation (paused,
    /// cancelled, or re-planned since the planner read it): the planner stops.
    Stale,
    /// This chunk id is recorded already, so the recipients it would take were
    /// handed back after a chunk of this generation began with the same one.
    /// Nothing was changed: reassigning them to that chunk, which may have been
    /// published and finished, would leave them unsent for good.
    Exists(Uuid),
}

/// Plans one chunk of up to `size` unplanned pending recipients, if the
/// campaign is still sending at `campaign`'s plan generation.
///
/// The campaign row is locked `FOR SHARE` while the chunk is made, so a pause,
/// resume or cancel (which lock it `FOR UPDATE`) waits for the chunk, and a
/// planner working from an older read of the campaign makes none after one.
/// The ingress's undo of a transition whose planner publish failed locks it
/// too, and undoes nothing once a chunk of the generation exists.
/// Senders hand recipients back only while the campaign is paused
/// ([`release_pending`]), so a planner never sees the recipients of a chunk of
/// its own generation come back.
pub fn plan_next_chunk(
    conn: &mut PgConnection,
    campaign: &Campaign,
    size: usize,
) -> QueryResult<Planned> {
    conn.transaction(|conn| {
        let current: Option<(String, i32)> = campaigns::table
            .find(campaign.id)
            .select((campaigns::state, campaigns::plan_generation))
            .for_share()
            .first(conn)
            .optional()?;
        let still_sending = matches!(current, Some((state, generation))
            if state == CampaignState::Sending.as_str() && generation == campaign.plan_generation);
        if !still_sending {
            return Ok(Planned::Stale);
        }
        let ids: Vec<i64> = campaign_recipients::table
            .filter(campaign_recipients::campaign_id.eq(campaign.id))
            .filter(campaign_recipients::state.eq("pending"))
            .filter(campaign_recipients::chunk_id.is_null())
            .order(campaign_recipients::id)
            .limit(i64::try_from(size).unwrap_or(i64::MAX))
            .select(campaign_recipients::id)
            .for_update()
            .skip_locked()
            .load(conn)?;
        let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
            return Ok(Planned::Nothing);
        };
        let id = chunk_id(campaign.id, campaign.plan_generation, first);
        let inserted = diesel::insert_into(campaign_chunks::table)
            .values((
                campaign_chunks::id.eq(id),
                campaign_chunks::campaign_id.eq(campaign.id),
                campaign_chunks::plan_generation.eq(campaign.plan_generation),
                campaign_chunks::first_recipient.eq(first),
                campaign_chunks::last_recipient.eq(last),
                campaign_chunks::recipients.eq(i32::try_from(ids.len()).unwrap_or(i32::MAX)),
            ))
            .on_conflict_do_nothing()
            .execute(conn)?;
        if inserted == 0 {
            return Ok(Planned::Exists(id));
        }
        diesel::update(campaign_recipients::table.filter(campaign_recipients::id.eq_any(&ids)))
            .set(campaign_recipients::chunk_id.eq(id))
            .execute(conn)?;
        Ok(Planned::Chunk(id))
    })
}

/// Chunks recorded but not yet handed to a sender job.
pub fn unpublished_chunks(conn: &mut PgConnection, campaign_id: Uuid) -> QueryResult<Vec<Uuid>> {
    campaign_chunks::table
        .filter(campaign_chunks::campaign_id.eq(campaign_id))
        .filter(campaign_chunks::published_at.is_null())
        .order(campaign_chunks::first_recipient)
        .select(campaign_chunks::id)
        .load(conn)
}

/// Records that sender jobs for `ids` were confirmed by the broker.
pub fn mark_published(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<usize> {
    diesel::update(campaign_chunks::table.filter(campaign_chunks::id.eq_any(ids)))
        .set(campaign_chunks::published_at.eq(diesel::dsl::now))
        .execute(conn)
}

/// Turns `sending` rows of the chunk whose claim expired into `unknown` (in doubt).
pub fn expire_claims(conn: &mut PgConnection, chunk: Uuid) -> QueryResult<usize> {
    diesel::sql_query(
        "UPDATE campaign_recipients
            SET state = 'unknown', updated_at = now(),
                last_reply = 'in doubt: claim by ' || coalesce(claimed_by, '?') || ' expired mid-conversation'
          WHERE chunk_id = $1 AND state = 'sending' AND claim_expires_at < now()",
    )
    .bind::<SqlUuid, _>(chunk)
    .execute(conn)
}

/// A recipient claimed for sending.
#[derive(Debug, Clone, QueryableByName)]
pub struct Claimed {
    /// Ledger id.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Address.
    #[diesel(sql_type = Text)]
    pub email: String,
    /// Variables.
    #[diesel(sql_type = Jsonb)]
    pub vars: serde_json::Value,
    /// SMTP attempts including this one.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
}

/// One recipient's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Ledger id.
    pub id: i64,
    /// `sent`, `failed`, `unknown` (in doubt) or `pending` (deferred).
    pub state: &'static str,
    /// The server's reply (or why it was not sent).
    pub reply: String,
    /// When a deferred recipient may be tried again.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Records outcomes of recipients claimed by `worker`. A row whose claim
/// expired meanwhile (now `unknown`) still takes this worker's outcome: it
/// knows what happened.
pub fn record(conn: &mut PgConnection, worker: &str, outcomes: &[Outcome]) -> QueryResult<usize> {
    RecordOutcomes::of(worker, outcomes).execute(conn)
}

/// [`record`]'s statement, for a throttled group: prepared once per connection
/// (see `conveyor_schema::prepared`). A macro, so that [`STEP`] can begin with it.
macro_rules! record_sql {
    () => {
        "
UPDATE campaign_recipients r
   SET state = d.state, last_reply = d.reply, next_attempt_at = d.next_at,
       sent_at = CASE WHEN d.state = 'sent' THEN now() ELSE r.sent_at END,
       updated_at = now()
  FROM unnest($1::int8[], $2::text[], $3::text[], $4::timestamptz[]) AS d(id, state, reply, next_at)
 WHERE r.id = d.id AND r.claimed_by = $5 AND r.state IN ('sending', 'unknown')"
    };
}
const RECORD: &str = record_sql!();

struct RecordOutcomes<'a> {
    ids: Vec<i64>,
    states: Vec<&'a str>,
    replies: Vec<&'a str>,
    next_attempts: Vec<Option<DateTime<Utc>>>,
    worker: &'a str,
}

impl<'a> RecordOutcomes<'a> {
    fn of(worker: &'a str, outcomes: &'a [Outcome]) -> Self {
        Self {
            ids: outcomes.iter().map(|o| o.id).collect(),
            states: outcomes.iter().map(|o| o.state).collect(),
            replies: outcomes.iter().map(|o| o.reply.as_str()).collect(),
            next_attempts: outcomes.iter().map(|o| o.next_attempt_at).collect(),
            worker,
        }
    }

    /// Pushes parameter `n` (1 to 5) of [`RECORD`].
    fn bind<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        match n {
            1 => out.push_bind_param::<Array<BigInt>, _>(&self.ids),
            2 => out.push_bind_param::<Array<Text>, _>(&self.states),
            3 => out.push_bind_param::<Array<Text>, _>(&self.replies),
            4 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.next_attempts),
            _ => out.push_bind_param::<Text, _>(&self.worker),
        }
    }
}

impl QueryFragment<Pg> for RecordOutcomes<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(RECORD, out, |n, out| self.bind(n, out))
    }
}
conveyor_schema::prepared_statement!(RecordOutcomes);

/// One step of a chunk's send loop, in one statement (so one round trip and
/// one commit): records the outcomes of the group just sent, reads the
/// campaign's state and, when `next` is set and the campaign is still sending,
/// claims the next group (up to `next.1` due pending recipients, claims
/// trusted for `next.0` seconds). No recipient is in doubt for longer than a
/// group: the sent group leaves doubt in the same commit in which the next one
/// enters it. The statement sees the ledger as it was when it began, so a
/// recipient it defers is claimed again by a later step at the earliest.
///
/// A step may be run again after an error (see `send_chunk`), and that
/// repeat changes nothing twice: an outcome is written only over a row still
/// claimed (`sending`, or `unknown` after its claim expired), and the claim is
/// stamped with `token` (its `claimed_at`, unique to the step), so if the
/// failed run did commit (its answer was lost with the connection) the repeat
/// returns that claim, with its expiry renewed, instead of claiming another group.
pub fn record_and_claim(
    conn: &mut PgConnection,
    worker: &str,
    outcomes: &[Outcome],
    campaign_id: Uuid,
    chunk: Uuid,
    next: Option<(f64, usize)>,
    token: DateTime<Utc>,
) -> QueryResult<(Option<CampaignState>, Vec<Claimed>)> {
    let (ttl_secs, limit) = next.unwrap_or((0.0, 0));
    let rows: Vec<StepRow> = Step {
        record: RecordOutcomes::of(worker, outcomes),
        campaign_id,
        ttl_secs,
        chunk,
        limit: i64::try_from(limit).unwrap_or(i64::MAX),
        token,
    }
    .load(conn)?;
    let state = rows
        .first()
        .and_then(|row| CampaignState::parse(&row.state));
    let claimed = rows
        .into_iter()
        .filter_map(|row| {
            Some(Claimed {
                id: row.id?,
                email: row.email?,
                vars: row.vars?,
                attempts: row.attempts?,
            })
        })
        .collect();
    Ok((state, claimed))
}

/// [`record_and_claim`]'s statement, run once per group: prepared once per
/// connection. Its claim runs only while the campaign is sending; every part
/// of it sees the same snapshot, so the claim never meets the rows recorded.
/// `again` is the claim an earlier run of this same step committed (stamped
/// with its token): found, it is renewed and returned, and nobody else is claimed.
const STEP: &str = concat!(
    "WITH recorded AS (",
    record_sql!(),
    "
), campaign AS (
    SELECT state FROM campaigns WHERE id = $6
), again AS (
    UPDATE campaign_recipients r
       SET claim_expires_at = now() + make_interval(secs => $7), updated_at = now()
     WHERE r.chunk_id = $8 AND r.claimed_by = $9 AND r.claimed_at = $10 AND r.state = 'sending'
    RETURNING r.id, r.email, r.vars, r.attempts
), claimed AS (
    UPDATE campaign_recipients r
       SET state = 'sending', claimed_by = $11, claimed_at = $12,
           claim_expires_at = now() + make_interval(secs => $13),
           attempts = r.attempts + 1, updated_at = now()
     WHERE r.id IN (SELECT id FROM campaign_recipients
                     WHERE chunk_id = $14 AND state = 'pending'
                       AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                       AND EXISTS (SELECT 1 FROM campaign WHERE state = 'sending')
                       AND NOT EXISTS (SELECT 1 FROM again)
                     ORDER BY id LIMIT $15 FOR UPDATE SKIP LOCKED)
    RETURNING r.id, r.email, r.vars, r.attempts
), taken AS (
    SELECT * FROM again UNION ALL SELECT * FROM claimed
)
SELECT campaign.state, taken.id, taken.email, taken.vars, taken.attempts
  FROM campaign LEFT JOIN taken ON true"
);

struct Step<'a> {
    record: RecordOutcomes<'a>,
    campaign_id: Uuid,
    ttl_secs: f64,
    chunk: Uuid,
    limit: i64,
    /// The step's claims' `claimed_at`.
    token: DateTime<Utc>,
}

impl QueryFragment<Pg> for Step<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(STEP, out, |n, out| match n {
            1..=5 => self.record.bind(n, out),
            6 => out.push_bind_param::<SqlUuid, _>(&self.campaign_id),
            8 | 14 => out.push_bind_param::<SqlUuid, _>(&self.chunk),
            7 | 13 => out.push_bind_param::<Double, _>(&self.ttl_secs),
            9 | 11 => out.push_bind_param::<Text, _>(&self.record.worker),
            10 | 12 => out.push_bind_param::<Timestamptz, _>(&self.token),
            _ => out.push_bind_param::<BigInt, _>(&self.limit),
        })
    }
}
conveyor_schema::prepared_statement!(Step, returning rows);

/// A row of [`STEP`]: the campaign's state, with one claimed recipient or none.
#[derive(QueryableByName)]
struct StepRow {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    email: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    vars: Option<serde_json::Value>,
    #[diesel(sql_type = Nullable<Integer>)]
    attempts: Option<i32>,
}

/// What is left in a chunk after a pass.
#[derive(Debug, Clone, QueryableByName)]
pub struct Leftovers {
    /// Recipients still pending (deferred, or skipped because locked).
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    /// The earliest time a deferred one is due.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub next_due: Option<DateTime<Utc>>,
    /// Recipients claimed by someone else whose claim has not expired.
    #[diesel(sql_type = BigInt)]
    pub sending: i64,
    /// When the last of those claims expires.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub claims_expire: Option<DateTime<Utc>>,
}

/// What remains to do in the chunk.
pub fn leftovers(conn: &mut PgConnection, chunk: Uuid) -> QueryResult<Leftovers> {
    diesel::sql_query(
        "SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                min(next_attempt_at) FILTER (WHERE state = 'pending') AS next_due,
                count(*) FILTER (WHERE state = 'sending') AS sending,
                max(claim_expires_at) FILTER (WHERE state = 'sending') AS claims_expire
           FROM campaign_recipients WHERE chunk_id = $1",
    )
    .bind::<SqlUuid, _>(chunk)
    .get_result(conn)
}

/// Gives the chunk's pending recipients back to the planner, if the campaign
/// is still paused; `None` (nothing changed) when it is not, because it was
/// resumed or cancelled since the sender read its state.
///
/// The campaign row is locked `FOR SHARE` meanwhile, so a resume waits for the
/// hand-back and its planner finds the recipients; a hand-back that landed
/// after the resumed planner's run would leave them with no planner to take them.
pub fn release_pending(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    chunk: Uuid,
) -> QueryResult<Option<usize>> {
    conn.transaction(|conn| {
        let state: Option<String> = campaigns::table
            .find(campaign_id)
            .select(campaigns::state)
            .for_share()
            .first(conn)
            .optional()?;
        if state.as_deref() != Some(CampaignState::Paused.as_str()) {
            return Ok(None);
        }
        diesel::update(
            campaign_recipients::table
                .filter(campaign_recipients::chunk_id.eq(chunk))
                .filter(campaign_recipients::state.eq("pending")),
        )
        .set(campaign_recipients::chunk_id.eq(None::<Uuid>))
        .execute(conn)
        .map(Some)
    })
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many of the chunk's pending recipients are due now, counting up to `most`.
pub fn due(conn: &mut PgConnection, chunk: Uuid, most: usize) -> QueryResult<usize> {
    let count: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM (
             SELECT 1 FROM campaign_recipients
              WHERE chunk_id = $1 AND state = 'pending'
                AND (next_attempt_at IS NULL OR next_attempt_at <= now())
              LIMIT $2) due",
    )
    .bind::<SqlUuid, _>(chunk)
    .bind::<BigInt, _>(i64::try_from(most).unwrap_or(i64::MAX))
    .get_result(conn)?;
    Ok(usize::try_from(count.n).unwrap_or(0))
}

/// Gives recipients that `worker` claimed in `chunk` but never handed to the
/// SMTP server (it stopped first) back to `pending`, and takes back the attempt
/// their claim counted.
pub fn give_back(
    conn: &mut PgConnection,
    worker: &str,
    chunk: Uuid,
    ids: &[i64],
) -> QueryResult<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    diesel::sql_query(
        "UPDATE campaign_recipients
            SET state = 'pending', attempts = attempts - 1, updated_at = now()
          WHERE id = ANY($1) AND chunk_id = $2 AND claimed_by = $3 AND state = 'sending'",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<SqlUuid, _>(chunk)
    .bind::<Text, _>(worker)
    .execute(conn)
}

/// Marks the chunk finished.
pub fn finish_chunk(conn: &mut PgConnection, chunk: Uuid) -> QueryResult<usize> {
    diesel::update(campaign_chunks::table.find(chunk))
        .set(campaign_chunks::finished_at.eq(diesel::dsl::now))
        .execute(conn)
}

/// Marks a sending campaign `completed` when no recipient is pending or sending.
pub fn complete_if_done(conn: &mut PgConnection, campaign_id: Uuid) -> QueryResult<bool> {
    let updated = diesel::sql_query(
        "UPDATE campaigns SET state = 'completed', completed_at = now(), updated_at = now()
          WHERE id = $1 AND state = 'sending'
            AND NOT EXISTS (SELECT 1 FROM campaign_recipients
                             WHERE campaign_id = $1 AND state IN ('pending', 'sending'))",
    )
    .bind::<SqlUuid, _>(campaign_id)
    .execute(conn)?;
    Ok(updated > 0)
}
