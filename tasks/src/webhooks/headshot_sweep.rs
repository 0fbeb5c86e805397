//! `webhook.headshot_sweep`: removes stored headshots nothing uses any more:
//! `headshots` rows no profile names, and (with directory storage) files no
//! row names.
//!
//! An image goes when its last profile lets go of it (`profile_sync`), but an
//! IMPORT_HEADSHOT stores its download (`headshot::store` commits the row)
//! before the locked decision that uses it or releases it again: if that
//! decision's transaction keeps failing until the job dies, or the worker dies
//! in between and the job is never retried, the row stays with no profile
//! naming it, bytes or file, for good. With directory storage a file can also
//! outlive every row naming it: a crash between the commit that removed its
//! row (a DELETE's, an import's that replaced the image or did not use it, or
//! this sweep's) and the file's removal, or a `store` that wrote the file and
//! then failed to commit its row, leaves it behind (and a crash mid-write
//! leaves a temporary file). Nothing else ever removes those, so this task,
//! fired hourly by a built-in schedule whatever the storage, does.
//!
//! Rows first: those no profile names and created at least
//! [`HEADSHOT_SWEEP_MIN_AGE`] ago (an import uses the row it stored within one
//! `webhook.profile_sync` attempt, far shorter), found [`ROW_BATCH`] at a time
//! in checksum order, each released in its own transaction through
//! `profile_sync::release`, the path a DELETE or an import takes: the row
//! locked `FOR UPDATE` (and its age checked again under the lock), the
//! profiles counted in a new statement, the row deleted if still unnamed. An import that found the row before it went
//! notices under its `FOR SHARE` lock and stores the image anew, as when a
//! DELETE wins that race. A released row's file is then removed after the
//! commit, as after a DELETE.
//!
//! Then files: only those older than [`HEADSHOT_SWEEP_MIN_AGE`] are
//! candidates, and each one goes through [`headshot::remove_unreferenced`],
//! the removal that follows a DELETE or an import: under the exclusive lock on
//! its checksum that `store` takes shared, it re-checks that no row names the
//! file. So a `store` reusing an old orphan either commits its row first (the
//! file stays) or finds it gone and writes it anew. Temporary files are not
//! locked by anyone; the age alone keeps the sweep off one being written (a
//! `store` writes and renames it within one `webhook.profile_sync` attempt,
//! far shorter than the age).
//! Names that are neither `<sha256>` nor `.<sha256>.<uuid>` are left alone.
//!
//! The row query reads `headshots` whole (no index on `created_at`: one row per
//! distinct image, its bytes stored out of line, read once an hour) and checks
//! each candidate against the partial index `profiles_headshot_sha256`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use conveyor_schema::args::webhooks::{self as spec, HEADSHOT_SWEEP_MIN_AGE, HeadshotSweepArgs};
use conveyor_schema::db::headshots;
use conveyor_schema::pool::PgPool;
use diesel::prelude::*;

use crate::webhooks::headshot::{self, TEMP_PREFIX};
use crate::webhooks::profile_sync::release;
use crate::{JobContext, Task, TaskError};

/// Removes unreferenced headshot rows and files.
pub struct HeadshotSweep;

/// Checksums looked up in `headshots` per query.
const LOOKUP_BATCH: usize = 1_000;

/// Unnamed `headshots` rows found per query (each then released in its own
/// transaction).
const ROW_BATCH: i64 = 100;

impl Task for HeadshotSweep {
    type Spec = spec::HeadshotSweep;
    async fn run(&self, _args: HeadshotSweepArgs, ctx: JobContext) -> Result<(), TaskError> {
        let dir = ctx.services.headshots.dir.clone();
        let rows = sweep_rows(&ctx.services.db, dir.as_deref()).await?;
        let Some(dir) = dir else {
            tracing::info!(
                rows.removed = rows,
                min_age_s = HEADSHOT_SWEEP_MIN_AGE.as_secs(),
                "headshot sweep done (database storage)"
            );
            return Ok(());
        };
        let listed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || old_files(&dir, HEADSHOT_SWEEP_MIN_AGE))
        };
        let found = listed
            .await
            .map_err(anyhow::Error::from)?
            .map_err(|err| anyhow::anyhow!("listing {}: {err}", dir.display()))?;
        let mut unnamed = Vec::new();
        for batch in found.checksums.chunks(LOOKUP_BATCH) {
            let lookup = batch.to_vec();
            let named: HashSet<String> =
                conveyor_schema::pool::run(&ctx.services.db, move |conn| {
                    headshots::table
                        .filter(headshots::sha256.eq_any(&lookup))
                        .select(headshots::sha256)
                        .load::<String>(conn)
                })
                .await?
                .into_iter()
                .collect();
            unnamed.extend(batch.iter().filter(|sha| !named.contains(*sha)).cloned());
        }
        let mut removed = 0usize;
        for sha256 in unnamed {
            if headshot::remove_unreferenced(&ctx.services.db, &dir, sha256).await? {
                removed += 1;
            }
        }
        let temporaries = tokio::task::spawn_blocking(move || remove_all(&found.temporaries))
            .await
            .map_err(anyhow::Error::from)??;
        tracing::info!(
            dir = %dir.display(),
            rows.removed = rows,
            files.removed = removed,
            temporaries.removed = temporaries,
            min_age_s = HEADSHOT_SWEEP_MIN_AGE.as_secs(),
            "headshot sweep done"
        );
        Ok(())
    }
}

/// Releases every `headshots` row no profile names that was created at least
/// [`HEADSHOT_SWEEP_MIN_AGE`] ago, and with directory storage (`dir`) removes
/// its file after the commit; returns how many rows went. Fails if the
/// database or a file's removal does (a file left then is unnamed, and the
/// next sweep takes it).
async fn sweep_rows(db: &PgPool, dir: Option<&Path>) -> Result<usize, TaskError> {
    #[derive(QueryableByName)]
    struct Candidate {
        #[diesel(sql_type = diesel::sql_types::Text)]
        sha256: String,
    }
    let min_age =
        chrono::Duration::from_std(HEADSHOT_SWEEP_MIN_AGE).map_err(anyhow::Error::from)?;
    let cutoff = chrono::Utc::now() - min_age;
    let mut after = String::new();
    let mut removed = 0usize;
    loop {
        let from = after.clone();
        let batch: Vec<Candidate> = conveyor_schema::pool::run(db, move |conn| {
            // In checksum order from where the last batch ended, so a row kept
            // (named meanwhile) is not looked at again.
            diesel::sql_query(
                "SELECT h.sha256 FROM headshots h \
                 WHERE h.created_at < $1 AND h.sha256 > $2 \
                   AND NOT EXISTS (SELECT 1 FROM profiles p WHERE p.headshot_sha256 = h.sha256) \
                 ORDER BY h.sha256 LIMIT $3",
            )
            .bind::<diesel::sql_types::Timestamptz, _>(cutoff)
            .bind::<diesel::sql_types::Text, _>(from)
            .bind::<diesel::sql_types::BigInt, _>(ROW_BATCH)
            .load(conn)
        })
        .await?;
        let Some(last) = batch.last() else {
            return Ok(removed);
        };
        after = last.sha256.clone();
        for Candidate { sha256 } in batch {
            let released = conveyor_schema::pool::run(db, move |conn| {
                conn.transaction(|conn| {
                    // Still the old row found: not one a DELETE removed since
                    // and an import stored anew, about to use it.
                    let old = headshots::table
                        .find(&sha256)
                        .filter(headshots::created_at.lt(cutoff))
                        .select(headshots::sha256)
                        .for_update()
                        .first::<String>(conn)
                        .optional()?;
                    match old {
                        Some(_) => release(conn, sha256),
                        None => Ok(None),
                    }
                })
            })
            .await?;
            let Some(sha256) = released else {
                continue;
            };
            removed += 1;
            if let Some(dir) = dir {
                headshot::remove_unreferenced(db, dir, sha256).await?;
            }
        }
    }
}

/// Files of the headshot directory old enough to sweep.
#[derive(Debug, Default)]
struct OldFiles {
    /// Checksums of `<sha256>` files.
    checksums: Vec<String>,
    /// Paths of `.<sha256>.<uuid>` files.
    temporaries: Vec<PathBuf>,
}

/// The headshot files of `dir` last modified at least `min_age` ago (a
/// missing directory has none). A file's age is its modification time: set
/// when its bytes were written, kept by the rename into place.
fn old_files(dir: &Path, min_age: Duration) -> std::io::Result<OldFiles> {
    let mut found = OldFiles::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(err),
    };
    let now = SystemTime::now();
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let kind = if is_checksum(&name) {
            Kind::Final
        } else if is_temporary(&name) {
            Kind::Temporary
        } else {
            continue;
        };
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            // Removed since the listing (by a DELETE, or a store's rename).
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let age = now.duration_since(metadata.modified()?).unwrap_or_default();
        if !metadata.is_file() || age < min_age {
            continue;
        }
        match kind {
            Kind::Final => found.checksums.push(name),
            Kind::Temporary => found.temporaries.push(entry.path()),
        }
    }
    Ok(found)
}

enum Kind {
    Final,
    Temporary,
}

/// Whether `name` is a lowercase hex SHA-256, the name `store` gives a file.
fn is_checksum(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `name` is `.<sha256>.<uuid>`, a file `store` writes before renaming it.
fn is_temporary(name: &str) -> bool {
    name.strip_prefix(TEMP_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(sha, id)| {
            is_checksum(sha) && id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// Removes every file of `paths`; returns how many it removed (one already
/// gone is no failure).
fn remove_all(paths: &[PathBuf]) -> std::io::Result<usize> {
    let mut removed = 0;
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_store_names_are_swept() {
        let sha = "a".repeat(64);
        assert!(is_checksum(&sha));
        assert!(!is_checksum(&"A".repeat(64)));
        assert!(!is_checksum(&"a".repeat(63)));
        assert!(is_temporary(&format!(".{sha}.{}", "0f".repeat(16))));
        assert!(!is_temporary(&format!(".{sha}.tmp")));
        assert!(!is_temporary(&format!("{sha}.{}", "0f".repeat(16))));
        assert!(!is_temporary(".gitkeep"));
    }
}
