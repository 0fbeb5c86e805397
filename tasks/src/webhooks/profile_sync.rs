//! `webhook.profile_sync`: applies one verified profile event, idempotently and in order.
//!
//! Ordering is by the producer's `occurred_at`, per aspect: the fields keep the
//! time of the UPDATE they came from, the headshot the time of its
//! IMPORT_HEADSHOT. An older event is skipped (`skipped_stale`), the same one
//! again changes nothing (`unchanged`), so any delivery order and any number of
//! redeliveries end in the row that applying the events in order gives. A
//! DELETE clears the profile and leaves a tombstone that every other event
//! respects (`skipped_deleted`): deletion is final, so a late UPDATE never
//! resurrects the profile. Each decision is taken under the row's lock and
//! recorded in `webhook_events` in the same transaction. An event that cannot
//! be applied is recorded `failed` with its reason: at once when no retry can
//! help, and on the last attempt when retries could not (a headshot host
//! that kept failing), so every dead event shows in the webhook statistics.
//! (An attempt cut off by its timeout records nothing.)
//!
//! Images are stored once per checksum and shared; one goes as soon as no
//! profile names it: in the transaction of the DELETE that clears it, of the
//! IMPORT_HEADSHOT that replaces it, or of the import that downloaded it and
//! then decided not to use it (its profile deleted, or a newer image applied,
//! meanwhile). Its file goes after that commit (see [`apply_locked`] and
//! `headshot`). An image an import stored and then never decided about (its
//! locked transaction kept failing until the job died, or the worker died in
//! between) is released by `headshot_sweep` once an hour old, through the
//! same [`release`].

use chrono::{DateTime, SubsecRound, Utc};
use conveyor_schema::args::webhooks::{
    self as spec, ProfileChange, ProfileFields, ProfileSyncArgs,
};
use conveyor_schema::db::{headshots, profiles, webhook_events};
use conveyor_schema::models::Profile;
use diesel::prelude::*;

use self::import::import_headshot;
use crate::webhooks::headshot;
use crate::{JobContext, Task, TaskError};

mod import;

/// Applies profile webhooks.
pub struct ProfileSync;

/// What to do with an event given the stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Newer than what is stored: apply it.
    Apply,
    /// Exactly what is stored already (a redelivery).
    Unchanged,
    /// Older than what is stored.
    Stale,
    /// The profile is deleted; only an earlier DELETE still matters.
    Deleted,
}

impl Decision {
    fn outcome(self) -> &'static str {
        match self {
            Self::Apply => "applied",
            Self::Unchanged => "unchanged",
            Self::Stale => "skipped_stale",
            Self::Deleted => "skipped_deleted",
        }
    }
}

fn by_time(stored: Option<DateTime<Utc>>, at: DateTime<Utc>) -> Decision {
    match stored {
        Some(s) if s == at => Decision::Unchanged,
        Some(s) if s > at => Decision::Stale,
        _ => Decision::Apply,
    }
}

/// The decision for `change` at `at` against `row` (a blank row when new).
/// `at` is compared as stored, to the microsecond: an event redelivered with a
/// finer `occurred_at` is the same event, not a newer one.
pub fn decide(row: &Profile, change: &ProfileChange, at: DateTime<Utc>) -> Decision {
    let at = at.trunc_subsecs(6);
    match (change, row.deleted_at) {
        // An earlier DELETE moves the tombstone back; a later or equal one changes nothing.
        (ProfileChange::Delete, Some(deleted)) if deleted <= at => Decision::Unchanged,
        (ProfileChange::Delete, _) => Decision::Apply,
        (_, Some(_)) => Decision::Deleted,
        (ProfileChange::Update(_), None) => by_time(row.fields_updated_at, at),
        (ProfileChange::ImportHeadshot(_), None) => by_time(row.headshot_updated_at, at),
    }
}

impl Task for ProfileSync {
    type Spec = spec::ProfileSync;

    async fn run(&self, args: ProfileSyncArgs, ctx: JobContext) -> Result<(), TaskError> {
        match sync(&args, &ctx).await {
            // The worker dead-letters it with this same reason.
            Err(TaskError::Retry { error, after }) if ctx.attempt >= ctx.max_attempts => {
                let reason = format!("gave up after {} attempts: {error}", ctx.attempt);
                record_failed(&ctx, &args, reason).await;
                Err(TaskError::Retry { error, after })
            }
            result => result,
        }
    }
}

/// Applies the event once: the outcome is recorded, or the error says whether
/// to try again.
async fn sync(args: &ProfileSyncArgs, ctx: &JobContext) -> Result<(), TaskError> {
    let change = args
        .event
        .change()
        .map_err(|e| TaskError::permanent(anyhow::anyhow!("invalid event: {e}")))?;
    let outcome = match &change {
        ProfileChange::ImportHeadshot(headshot) => import_headshot(args, headshot, ctx).await?,
        _ => apply(ctx, args, change.clone(), None).await?.outcome()?,
    };
    tracing::info!(
        profile.id = %args.event.profile_id,
        action = args.event.action.as_str(),
        outcome,
        "profile event handled"
    );
    Ok(())
}

/// What an IMPORT_HEADSHOT stores: the image's checksum, type and size.
#[derive(Debug, Clone)]
struct Stored {
    sha256: String,
    content_type: String,
    size_bytes: i32,
    detail: Option<&'static str>,
    /// Downloaded and stored by this import (not found stored): if the
    /// decision leaves it to no profile, the import removes it again.
    downloaded: bool,
}

/// Records a permanent failure and returns the error that dead-letters the job.
async fn failed(ctx: &JobContext, args: &ProfileSyncArgs, reason: String) -> TaskError {
    record_failed(ctx, args, reason.clone()).await;
    TaskError::permanent(anyhow::anyhow!(reason))
}

/// Records the event `failed` for `reason`; a failure to record is logged.
async fn record_failed(ctx: &JobContext, args: &ProfileSyncArgs, reason: String) {
    let row = event_row(args, "failed", Some(reason));
    let recorded = conveyor_schema::pool::run(&ctx.services.db, move |conn| {
        diesel::insert_into(webhook_events::table)
            .values(row)
            .execute(conn)
    })
    .await;
    if let Err(err) = recorded {
        tracing::warn!(error = %err, "could not record a failed webhook event");
    }
}

type EventRow = (
    diesel::dsl::Eq<webhook_events::source, String>,
    diesel::dsl::Eq<webhook_events::webhook_id, String>,
    diesel::dsl::Eq<webhook_events::profile_id, Option<String>>,
    diesel::dsl::Eq<webhook_events::action, Option<String>>,
    diesel::dsl::Eq<webhook_events::outcome, &'static str>,
    diesel::dsl::Eq<webhook_events::detail, Option<String>>,
);

fn event_row(args: &ProfileSyncArgs, outcome: &'static str, detail: Option<String>) -> EventRow {
    (
        webhook_events::source.eq(args.source.clone()),
        webhook_events::webhook_id.eq(args.webhook_id.clone()),
        webhook_events::profile_id.eq(Some(args.event.profile_id.clone())),
        webhook_events::action.eq(Some(args.event.action.as_str().to_owned())),
        webhook_events::outcome.eq(outcome),
        webhook_events::detail.eq(detail),
    )
}

async fn load(db: &conveyor_schema::pool::PgPool, id: &str) -> Result<Option<Profile>, TaskError> {
    let id = id.to_owned();
    Ok(conveyor_schema::pool::run(db, move |conn| {
        profiles::table
            .find(id)
            .select(Profile::as_select())
            .first(conn)
            .optional()
    })
    .await?)
}

/// What one application transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Decided and recorded, with this outcome.
    Done(&'static str),
    /// The image an IMPORT_HEADSHOT was to reference is no longer stored (a
    /// DELETE of the last profile using it removed it after it was looked up);
    /// nothing was recorded.
    ImageGone,
}

impl Applied {
    /// The recorded outcome; an image deleted (again) under an import is an error worth a retry.
    fn outcome(self) -> Result<&'static str, TaskError> {
        match self {
            Self::Done(outcome) => Ok(outcome),
            Self::ImageGone => Err(anyhow::anyhow!(
                "the stored headshot was deleted while being imported; retrying"
            )
            .into()),
        }
    }
}

/// Decides and applies `change` under the row lock, recording the outcome.
async fn apply(
    ctx: &JobContext,
    args: &ProfileSyncArgs,
    change: ProfileChange,
    image: Option<Stored>,
) -> Result<Applied, TaskError> {
    let args = args.clone();
    let dir = ctx.services.headshots.dir.clone();
    let (applied, orphan) = conveyor_schema::pool::run(&ctx.services.db, move |conn| {
        conn.transaction(|conn| apply_locked(conn, &args, &change, image))
    })
    .await?;
    if let (Some(dir), Some(sha)) = (dir, orphan) {
        // The last reference went with this transaction, now committed: remove
        // the file too, unless an import stored the image again meanwhile (best
        // effort; why after the commit: `headshot`'s module doc).
        let removed = headshot::remove_unreferenced(&ctx.services.db, &dir, sha.clone()).await;
        if let Err(err) = removed {
            tracing::warn!(error = %err, sha256 = sha, "could not remove an unreferenced headshot file");
        }
    }
    Ok(applied)
}

/// Returns what was done and the checksum of a headshot this transaction
/// removed because no profile uses it any more: the one a DELETE cleared, the
/// one an import replaced, or the one an import downloaded for a decision
/// that did not use it (`skipped_stale`, `skipped_deleted`, `unchanged`).
///
/// A stored image is shared by every profile with its checksum, so an import
/// and whatever drops another profile's reference may race for it. Both take
/// the image's row lock: the import `FOR SHARE` before pointing the profile at
/// it (and finds it gone if the other side won), the other side `FOR UPDATE`
/// before counting the references in a new statement ([`release`]), which
/// under READ COMMITTED sees every import that committed first. So a profile
/// never points at a deleted image. A file is removed only after this
/// transaction commits ([`headshot::remove_unreferenced`]).
fn apply_locked(
    conn: &mut PgConnection,
    args: &ProfileSyncArgs,
    change: &ProfileChange,
    image: Option<Stored>,
) -> QueryResult<(Applied, Option<String>)> {
    let id = &args.event.profile_id;
    let at = args.event.occurred_at;
    diesel::insert_into(profiles::table)
        .values((profiles::id.eq(id), profiles::source.eq(&args.source)))
        .on_conflict_do_nothing()
        .execute(conn)?;
    let row: Profile = profiles::table
        .find(id)
        .select(Profile::as_select())
        .for_update()
        .first(conn)?;
    let decision = decide(&row, change, at);
    let newest = row.source_updated_at.map_or(at, |s| s.max(at));
    let target = profiles::table.find(id);
    let mut detail = None;
    let mut orphan = None;
    if decision == Decision::Apply {
        match change {
            ProfileChange::Update(ProfileFields {
                email,
                display_name,
                locale,
            }) => {
                diesel::update(target)
                    .set((
                        profiles::source.eq(&args.source),
                        profiles::email.eq(email),
                        profiles::display_name.eq(display_name),
                        profiles::locale.eq(locale),
                        profiles::fields_updated_at.eq(at),
                        profiles::source_updated_at.eq(newest),
                        profiles::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)?;
            }
            ProfileChange::ImportHeadshot(headshot) => {
                let Some(image) = &image else {
                    return Err(diesel::result::Error::RollbackTransaction);
                };
                let replaced = row
                    .headshot_sha256
                    .clone()
                    .filter(|sha| *sha != image.sha256);
                if !lock_swap(conn, &image.sha256, replaced.as_deref())? {
                    return Ok((Applied::ImageGone, None));
                }
                detail = image.detail.map(str::to_owned);
                diesel::update(target)
                    .set((
                        profiles::source.eq(&args.source),
                        profiles::headshot_sha256.eq(&image.sha256),
                        profiles::headshot_content_type.eq(&image.content_type),
                        profiles::headshot_size_bytes.eq(image.size_bytes),
                        profiles::headshot_url.eq(&headshot.url),
                        profiles::headshot_updated_at.eq(at),
                        profiles::source_updated_at.eq(newest),
                        profiles::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)?;
                if let Some(replaced) = replaced {
                    orphan = release(conn, replaced)?;
                }
            }
            ProfileChange::Delete => {
                diesel::update(target)
                    .set((
                        profiles::source.eq(&args.source),
                        profiles::email.eq(None::<String>),
                        profiles::display_name.eq(None::<String>),
                        profiles::locale.eq(None::<String>),
                        profiles::fields_updated_at.eq(None::<DateTime<Utc>>),
                        profiles::headshot_sha256.eq(None::<String>),
                        profiles::headshot_content_type.eq(None::<String>),
                        profiles::headshot_size_bytes.eq(None::<i32>),
                        profiles::headshot_url.eq(None::<String>),
                        profiles::headshot_updated_at.eq(None::<DateTime<Utc>>),
                        profiles::source_updated_at.eq(at),
                        profiles::deleted_at.eq(at),
                        profiles::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)?;
                if let Some(sha) = row.headshot_sha256 {
                    orphan = release(conn, sha)?;
                }
            }
        }
    } else if let Some(image) = image.filter(|image| image.downloaded) {
        // Downloaded for nothing (the profile was deleted, or a newer import
        // applied, during the download): not kept unless a profile has it.
        orphan = release(conn, image.sha256)?;
    }
    let mut outcome = decision.outcome();
    if decision == Decision::Apply
        && matches!(change, ProfileChange::ImportHeadshot(_))
        && detail.as_deref() == Some("checksum unchanged; download skipped")
    {
        outcome = "unchanged";
    }
    diesel::insert_into(webhook_events::table)
        .values(event_row(args, outcome, detail))
        .execute(conn)?;
    Ok((Applied::Done(outcome), orphan))
}

/// Takes the image row locks of an import pointing its profile at `new`
/// instead of `replaced`: `new` `FOR SHARE`, `replaced` `FOR UPDATE` (for
/// [`release`] after the update), in checksum order, so that two imports
/// swapping the same two images in opposite directions cannot deadlock.
/// Returns whether `new` is still stored.
fn lock_swap(conn: &mut PgConnection, new: &str, replaced: Option<&str>) -> QueryResult<bool> {
    let lock_replaced = |conn: &mut PgConnection, sha: &str| {
        headshots::table
            .find(sha)
            .select(headshots::sha256)
            .for_update()
            .first::<String>(conn)
            .optional()
    };
    if let Some(sha) = replaced.filter(|sha| *sha < new) {
        lock_replaced(conn, sha)?;
    }
    let still_stored = headshots::table
        .find(new)
        .select(headshots::sha256)
        .for_share()
        .first::<String>(conn)
        .optional()?
        .is_some();
    if still_stored && let Some(sha) = replaced.filter(|sha| *sha > new) {
        lock_replaced(conn, sha)?;
    }
    Ok(still_stored)
}

/// Deletes the `headshots` row of `sha` if no profile names it any more (this
/// transaction's own change included); returns `sha` if so, for its file to be
/// removed after the commit. Also what `headshot_sweep` runs, in a
/// transaction of its own, on an old row no profile names.
///
/// Lock first, count after: the row is locked `FOR UPDATE` (which waits for
/// every import holding it `FOR SHARE`) before the profiles are counted in a
/// new statement, so the count sees every import that pointed a profile at it
/// first, and an import that comes later finds the row gone and stores the
/// image anew (see [`apply_locked`]).
pub(crate) fn release(conn: &mut PgConnection, sha: String) -> QueryResult<Option<String>> {
    headshots::table
        .find(&sha)
        .select(headshots::sha256)
        .for_update()
        .first::<String>(conn)
        .optional()?;
    let still_used: i64 = profiles::table
        .filter(profiles::headshot_sha256.eq(&sha))
        .count()
        .get_result(conn)?;
    if still_used > 0 {
        return Ok(None);
    }
    diesel::delete(headshots::table.find(&sha)).execute(conn)?;
    Ok(Some(sha))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use conveyor_schema::args::webhooks::HeadshotRef;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn blank() -> Profile {
        Profile {
            id: "p".into(),
            source: "s".into(),
            email: None,
            display_name: None,
            locale: None,
            fields_updated_at: None,
            headshot_sha256: None,
            headshot_content_type: None,
            headshot_size_bytes: None,
            headshot_url: None,
            headshot_updated_at: None,
            source_updated_at: None,
            deleted_at: None,
            created_at: t(0),
            updated_at: t(0),
        }
    }

    #[test]
    fn older_equal_and_newer_events() {
        let update = ProfileChange::Update(ProfileFields {
            email: "a@b".into(),
            display_name: "A".into(),
            locale: None,
        });
        let mut row = blank();
        assert_eq!(decide(&row, &update, t(2)), Decision::Apply);
        row.fields_updated_at = Some(t(2));
        assert_eq!(decide(&row, &update, t(1)), Decision::Stale);
        assert_eq!(decide(&row, &update, t(2)), Decision::Unchanged);
        assert_eq!(decide(&row, &update, t(3)), Decision::Apply);
        // PostgreSQL keeps microseconds: what it stored of a nanosecond time is the same time.
        let fine = t(2) + chrono::Duration::nanoseconds(700);
        assert_eq!(decide(&row, &update, fine), Decision::Unchanged);
        // The headshot is ordered on its own clock.
        let headshot = ProfileChange::ImportHeadshot(HeadshotRef {
            url: "https://x".into(),
            sha256: None,
        });
        assert_eq!(decide(&row, &headshot, t(1)), Decision::Apply);
    }

    #[test]
    fn a_tombstone_is_final() {
        let mut row = blank();
        row.deleted_at = Some(t(3));
        let update = ProfileChange::Update(ProfileFields {
            email: "a@b".into(),
            display_name: "A".into(),
            locale: None,
        });
        assert_eq!(decide(&row, &update, t(2)), Decision::Deleted);
        assert_eq!(decide(&row, &update, t(9)), Decision::Deleted);
        assert_eq!(
            decide(&row, &ProfileChange::Delete, t(3)),
            Decision::Unchanged
        );
        assert_eq!(
            decide(&row, &ProfileChange::Delete, t(4)),
            Decision::Unchanged
        );
        assert_eq!(decide(&row, &ProfileChange::Delete, t(1)), Decision::Apply);
    }
}
