//! The one shutdown path: SIGTERM or SIGINT cancels a single token that every
//! long-running part watches. A second signal exits the process at once.
//!
//! Both signal listeners are registered before [`on_signal`] returns and stay
//! registered until the process exits: tokio delivers a signal only to
//! listeners that existed when it arrived, so re-registering after the first
//! signal would leave a window in which a second one is lost.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM/SIGINT; the second one exits with status 130.
///
/// Must be called inside a tokio runtime. If the listeners cannot be installed
/// the token is never cancelled by a signal (the default disposition, exit,
/// then applies) and the failure is logged.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let listeners = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    let (mut term, mut int) = match listeners {
        Ok(listeners) => listeners,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM/SIGINT");
            return token;
        }
    };
    let cancel = token.clone();
    tokio::spawn(async move {
        next_signal(&mut term, &mut int).await;
        tracing::info!("shutdown requested; draining (send the signal again to exit at once)");
        cancel.cancel();
        next_signal(&mut term, &mut int).await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    token
}

async fn next_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
