//! IMPORT_HEADSHOT: find the image (the profile's own, one already stored
//! under the announced checksum, or a download), then apply it under the
//! profile's lock like any other change. An image found before the transaction
//! may be removed before it commits, because the last other profile using it
//! was deleted or moved to another image, or because the import that stored it
//! ended up not using it; the transaction notices ([`Applied::ImageGone`]) and
//! the image is fetched anew.
//!
//! The image a profile had before goes in the same transaction when no profile
//! names it any more, and so does an image this import downloaded when the
//! locked decision does not use it (a DELETE or a newer import committed
//! during the download: `skipped_deleted`, `skipped_stale`). Both go as a
//! DELETE's image does: row in the transaction, file after the commit.

use conveyor_schema::args::webhooks::{HeadshotRef, ProfileChange, ProfileSyncArgs};
use conveyor_schema::db::headshots;
use diesel::prelude::*;

use super::{Applied, Decision, Stored, apply, decide, failed, load};
use crate::webhooks::headshot::{self, DownloadError, Image};
use crate::{JobContext, TaskError};

/// Stores (or reuses) the image of `headshot` and applies it; returns the recorded outcome.
pub(super) async fn import_headshot(
    args: &ProfileSyncArgs,
    headshot: &HeadshotRef,
    ctx: &JobContext,
) -> Result<&'static str, TaskError> {
    let db = &ctx.services.db;
    let policy = &ctx.services.headshots;
    let current = load(db, &args.event.profile_id).await?;
    let change = ProfileChange::ImportHeadshot(headshot.clone());
    let decision = current.as_ref().map_or(Decision::Apply, |row| {
        decide(row, &change, args.event.occurred_at)
    });
    if decision != Decision::Apply {
        // Nothing to fetch; record the skip under the lock like any other decision.
        return apply(ctx, args, change, None).await?.outcome();
    }
    let known = headshot.sha256.as_deref();
    let stored = match (
        known,
        current.as_ref().and_then(|r| r.headshot_sha256.clone()),
    ) {
        (Some(sha), Some(current_sha)) if sha == current_sha => Stored {
            sha256: current_sha,
            content_type: current
                .as_ref()
                .and_then(|r| r.headshot_content_type.clone())
                .unwrap_or_default(),
            size_bytes: current
                .as_ref()
                .and_then(|r| r.headshot_size_bytes)
                .unwrap_or_default(),
            detail: Some("checksum unchanged; download skipped"),
            downloaded: false,
        },
        _ => match stored_blob(db, known).await? {
            Some(blob) => blob,
            None => fetch(ctx, args, policy, &headshot.url, known).await?,
        },
    };
    let sha256 = stored.sha256.clone();
    if let Applied::Done(outcome) = apply(ctx, args, change.clone(), Some(stored)).await? {
        return Ok(outcome);
    }
    // The image was looked up (or stored) before the transaction and a DELETE of
    // the last other profile using it removed it since: fetch and store it anew.
    tracing::info!(
        sha256,
        "a reused headshot was deleted meanwhile; downloading it again"
    );
    let stored = fetch(ctx, args, policy, &headshot.url, known).await?;
    apply(ctx, args, change, Some(stored)).await?.outcome()
}

/// The already stored image with checksum `sha256`, if any.
async fn stored_blob(
    db: &conveyor_schema::pool::PgPool,
    sha256: Option<&str>,
) -> Result<Option<Stored>, TaskError> {
    let Some(sha) = sha256.map(str::to_owned) else {
        return Ok(None);
    };
    let row = conveyor_schema::pool::run(db, move |conn| {
        headshots::table
            .find(sha)
            .select((
                headshots::sha256,
                headshots::content_type,
                headshots::size_bytes,
            ))
            .first::<(String, String, i32)>(conn)
            .optional()
    })
    .await?;
    Ok(row.map(|(sha256, content_type, size_bytes)| Stored {
        sha256,
        content_type,
        size_bytes,
        detail: Some("image already stored; download skipped"),
        downloaded: false,
    }))
}

async fn fetch(
    ctx: &JobContext,
    args: &ProfileSyncArgs,
    policy: &headshot::HeadshotPolicy,
    url: &str,
    expected: Option<&str>,
) -> Result<Stored, TaskError> {
    let image: Image = match headshot::download(policy, url).await {
        Ok(image) => image,
        Err(DownloadError::Transient(reason)) => return Err(anyhow::anyhow!(reason).into()),
        Err(DownloadError::Permanent(reason)) => return Err(failed(ctx, args, reason).await),
    };
    if expected.is_some_and(|sha| sha != image.sha256) {
        let reason = format!(
            "the image's SHA-256 is {}, not the {} announced",
            image.sha256,
            expected.unwrap_or_default()
        );
        return Err(failed(ctx, args, reason).await);
    }
    let stored = Stored {
        sha256: image.sha256.clone(),
        content_type: image.content_type.clone(),
        size_bytes: i32::try_from(image.bytes.len()).unwrap_or(i32::MAX),
        detail: None,
        downloaded: true,
    };
    headshot::store(&ctx.services.db, policy, image).await?;
    Ok(stored)
}
