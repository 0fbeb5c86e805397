//! The ledger's SQL: planning chunks, claiming recipients, recording results.
//!
//! Every function takes a connection and runs on a blocking thread (callers
//! use `pool::run`). Each state change is committed before the next step acts
//! on it: a claim before its SMTP conversations, an outcome after them.

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

/// The campaign's state name.
pub fn campaign_state(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<String>> {
    campaigns::table
        .find(id)
        .select(campaigns::state)
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

/// Plans one chunk of up to `size` unplanned pending recipients; `None` when none is left.
pub fn plan_next_chunk(
    conn: &mut PgConnection,
    campaign: &Campaign,
    size: usize,
) -> QueryResult<Option<Uuid>> {
    conn.transaction(|conn| {
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
            return Ok(None);
        };
        let id = chunk_id(campaign.id, campaign.plan_generation, first);
        diesel::insert_into(campaign_chunks::table)
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
        diesel::update(campaign_recipients::table.filter(campaign_recipients::id.eq_any(&ids)))
            .set(campaign_recipients::chunk_id.eq(id))
            .execute(conn)?;
        Ok(Some(id))
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

/// Claims up to `limit` due pending recipients of the chunk for `worker`; the
/// claim is committed when this returns.
pub fn claim(
    conn: &mut PgConnection,
    chunk: Uuid,
    worker: &str,
    ttl_secs: f64,
    limit: usize,
) -> QueryResult<Vec<Claimed>> {
    ClaimRecipients {
        chunk,
        worker,
        ttl_secs,
        limit: i64::try_from(limit).unwrap_or(i64::MAX),
    }
    .load(conn)
}

/// [`claim`]'s statement, run once per group: prepared once per connection
/// (see `conveyor_schema::prepared`).
const CLAIM: &str = "
UPDATE campaign_recipients r
   SET state = 'sending', claimed_by = $1, claimed_at = now(),
       claim_expires_at = now() + make_interval(secs => $2),
       attempts = r.attempts + 1, updated_at = now()
 WHERE r.id IN (SELECT id FROM campaign_recipients
                 WHERE chunk_id = $3 AND state = 'pending'
                   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                 ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
RETURNING r.id, r.email, r.vars, r.attempts";

struct ClaimRecipients<'a> {
    worker: &'a str,
    ttl_secs: f64,
    chunk: Uuid,
    limit: i64,
}

impl QueryFragment<Pg> for ClaimRecipients<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(CLAIM, out, |n, out| match n {
            1 => out.push_bind_param::<Text, _>(&self.worker),
            2 => out.push_bind_param::<Double, _>(&self.ttl_secs),
            3 => out.push_bind_param::<SqlUuid, _>(&self.chunk),
            _ => out.push_bind_param::<BigInt, _>(&self.limit),
        })
    }
}
conveyor_schema::prepared_statement!(ClaimRecipients, returning rows);

/// One recipient's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Ledger id.
    pub id: i64,
    /// `sent`, `failed` or `pending` (deferred).
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
    RecordOutcomes {
        ids: outcomes.iter().map(|o| o.id).collect(),
        states: outcomes.iter().map(|o| o.state).collect(),
        replies: outcomes.iter().map(|o| o.reply.as_str()).collect(),
        next_attempts: outcomes.iter().map(|o| o.next_attempt_at).collect(),
        worker,
    }
    .execute(conn)
}

/// [`record`]'s statement, run once per group: prepared once per connection.
const RECORD: &str = "
UPDATE campaign_recipients r
   SET state = d.state, last_reply = d.reply, next_attempt_at = d.next_at,
       sent_at = CASE WHEN d.state = 'sent' THEN now() ELSE r.sent_at END,
       updated_at = now()
  FROM unnest($1::int8[], $2::text[], $3::text[], $4::timestamptz[]) AS d(id, state, reply, next_at)
 WHERE r.id = d.id AND r.claimed_by = $5 AND r.state IN ('sending', 'unknown')";

struct RecordOutcomes<'a> {
    ids: Vec<i64>,
    states: Vec<&'a str>,
    replies: Vec<&'a str>,
    next_attempts: Vec<Option<DateTime<Utc>>>,
    worker: &'a str,
}

impl QueryFragment<Pg> for RecordOutcomes<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(RECORD, out, |n, out| match n {
            1 => out.push_bind_param::<Array<BigInt>, _>(&self.ids),
            2 => out.push_bind_param::<Array<Text>, _>(&self.states),
            3 => out.push_bind_param::<Array<Text>, _>(&self.replies),
            4 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.next_attempts),
            _ => out.push_bind_param::<Text, _>(&self.worker),
        })
    }
}
conveyor_schema::prepared_statement!(RecordOutcomes);

/// One step of a chunk's send loop, in one transaction: records the outcomes
/// of the group just sent, reads the campaign's state and, when `next` is set
/// and the campaign is still sending, claims the next group (up to `next.1`
/// recipients, claims trusted for `next.0` seconds). Doing this in one commit
/// rather than two halves a group's waits for the database's flush, and no
/// recipient is in doubt for longer: the sent group leaves doubt in the same
/// commit in which the next one enters it.
pub fn record_and_claim(
    conn: &mut PgConnection,
    worker: &str,
    outcomes: &[Outcome],
    campaign_id: Uuid,
    chunk: Uuid,
    next: Option<(f64, usize)>,
) -> QueryResult<(Option<CampaignState>, Vec<Claimed>)> {
    conn.transaction(|conn| {
        if !outcomes.is_empty() {
            record(conn, worker, outcomes)?;
        }
        let state = campaign_state(conn, campaign_id)?
            .as_deref()
            .and_then(CampaignState::parse);
        let claimed = match next {
            Some((ttl_secs, limit)) if state == Some(CampaignState::Sending) => {
                claim(conn, chunk, worker, ttl_secs, limit)?
            }
            _ => Vec::new(),
        };
        Ok((state, claimed))
    })
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

/// Gives the chunk's pending recipients back to the planner (on pause).
pub fn release_pending(conn: &mut PgConnection, chunk: Uuid) -> QueryResult<usize> {
    diesel::update(
        campaign_recipients::table
            .filter(campaign_recipients::chunk_id.eq(chunk))
            .filter(campaign_recipients::state.eq("pending")),
    )
    .set(campaign_recipients::chunk_id.eq(None::<Uuid>))
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
