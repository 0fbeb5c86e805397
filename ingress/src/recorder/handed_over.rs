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
//! anything along.

use std::cell::RefCell;
use std::future::Future;

use uuid::Uuid;

tokio::task_local! {
    static HANDED_OVER: RefCell<Vec<Uuid>>;
}

/// Runs `request` (one request's whole handling) with its own, empty list.
pub async fn scope<F: Future>(request: F) -> F::Output {
    HANDED_OVER.scope(RefCell::default(), request).await
}

/// The jobs of the current request that may run although it got no answer
/// from the recorder; empty outside a [`scope`].
pub fn pending() -> Vec<Uuid> {
    HANDED_OVER
        .try_with(|jobs| jobs.borrow().clone())
        .unwrap_or_default()
}

/// Notes that `id` is in the recorder's hands.
pub(super) fn note(id: Uuid) {
    let _ = HANDED_OVER.try_with(|jobs| jobs.borrow_mut().push(id));
}

/// Forgets `id`: the recorder answered that it will not run.
pub(super) fn forget(id: Uuid) {
    let _ = HANDED_OVER.try_with(|jobs| jobs.borrow_mut().retain(|noted| *noted != id));
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
}
