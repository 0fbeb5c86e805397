//! Which jobs a request has handed to the recorder, for its timeout's answer.
//!
//! `ingress.request_timeout_ms` abandons a request wherever it waits. Once its
//! job is in a group commit, the job may be published and recorded all the
//! same, so that request's 503 must say in doubt and name the job, like any
//! other 503 whose job may run. The hardening layer opens a [`scope`] per
//! request; [`Recorder::submit`](super::Recorder::submit) notes each job it
//! takes and forgets it once the recorder says the job will not run; the
//! timeout's answer reads what is left with [`pending`].
//!
//! A task-local rather than a request extension: every route that submits
//! jobs (one job, a batch, a webhook, a campaign) gets this without passing
//! anything along. A request that goes on in a task of its own (an
//! `Idempotency-Key`'s first request) takes its list along with [`carried`].

use std::future::Future;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

/// One request's list, shared with any task it goes on in.
type Jobs = Arc<Mutex<Vec<Uuid>>>;

tokio::task_local! {
    static HANDED_OVER: Jobs;
}

/// Runs `request` (one request's whole handling) with its own, empty list.
pub async fn scope<F: Future>(request: F) -> F::Output {
    HANDED_OVER.scope(Jobs::default(), request).await
}

/// `work`, to be spawned, noting its jobs in the current request's list.
pub fn carried<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let jobs = HANDED_OVER.try_with(Jobs::clone).unwrap_or_default();
    HANDED_OVER.scope(jobs, work)
}

/// The jobs of the current request that may run although it got no answer
/// from the recorder; empty outside a [`scope`].
pub fn pending() -> Vec<Uuid> {
    with_jobs(|jobs| jobs.clone()).unwrap_or_default()
}

/// Notes that `id` is in the recorder's hands.
pub(super) fn note(id: Uuid) {
    with_jobs(|jobs| jobs.push(id));
}

/// Forgets `id`: the recorder answered that it will not run.
pub(super) fn forget(id: Uuid) {
    with_jobs(|jobs| jobs.retain(|noted| *noted != id));
}

fn with_jobs<T>(f: impl FnOnce(&mut Vec<Uuid>) -> T) -> Option<T> {
    HANDED_OVER
        .try_with(|jobs| jobs.lock().ok().map(|mut jobs| f(&mut jobs)))
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scope_keeps_what_was_noted_and_not_forgotten() {
        let (kept, forgotten) = (Uuid::now_v7(), Uuid::now_v7());
        let left = scope(async {
            note(kept);
            note(forgotten);
            forget(forgotten);
            pending()
        })
        .await;
        assert_eq!(left, vec![kept]);
        note(kept);
        assert!(pending().is_empty(), "outside a scope nothing is noted");
    }

    #[tokio::test]
    async fn a_spawned_task_notes_in_its_requests_list() {
        let id = Uuid::now_v7();
        let left = scope(async {
            tokio::spawn(carried(async move { note(id) }))
                .await
                .unwrap();
            pending()
        })
        .await;
        assert_eq!(left, vec![id]);
    }
}
