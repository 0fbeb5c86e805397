//! How a task says it failed: retry later, or give up now.
//!
//! The difference is a type, not a string. `?` on any error gives
//! [`TaskError::Retry`]; a task returns [`TaskError::Permanent`] (via
//! [`TaskError::permanent`]) when trying again cannot help.

use std::fmt;
use std::time::Duration;

/// The longest a retry may be put off: a longer `after` is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// A failed attempt.
pub enum TaskError {
    /// Transient: retry after the task's backoff (or `after`, when given).
    Retry {
        /// The cause.
        error: anyhow::Error,
        /// Overrides the computed backoff for the next attempt (at most
        /// [`MAX_RETRY_AFTER`]).
        after: Option<Duration>,
    },
    /// Trying again cannot help: dead-letter now.
    Permanent(anyhow::Error),
    /// The task stopped early at a safe point because the worker is draining;
    /// the delivery goes back to its queue unchanged (no attempt is used).
    Interrupted,
}

impl TaskError {
    /// A failure that skips the remaining attempts.
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        Self::Permanent(error.into())
    }

    /// A transient failure with a specific delay before the next attempt.
    pub fn retry_after(after: Duration, error: impl Into<anyhow::Error>) -> Self {
        Self::Retry {
            error: error.into(),
            after: Some(after),
        }
    }

    /// True when the job must not be retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }
}

impl<E: Into<anyhow::Error>> From<E> for TaskError {
    fn from(error: E) -> Self {
        Self::Retry {
            error: error.into(),
            after: None,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:#}` prints the whole cause chain on one line.
        match self {
            Self::Retry { error, .. } => write!(f, "{error:#}"),
            Self::Permanent(error) => write!(f, "permanent: {error:#}"),
            Self::Interrupted => f.write_str("interrupted by shutdown"),
        }
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
