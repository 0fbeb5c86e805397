//! Diagnostic tasks: on by default, used by tests, benchmarks and operators
//! checking a deployment end to end.
//!
//! They use short retry settings (5 attempts, backoff 100 ms doubling to 1 s) so
//! that a failing one reaches the dead-letter queue within seconds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{TaskOptions, TaskSpec};

fn diag_options() -> TaskOptions {
    TaskOptions {
        max_attempts: 5,
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        concurrency: 256,
        ..TaskOptions::on_queue("default")
    }
}

/// `diag.noop`: does nothing. The benchmark workload.
pub struct Noop;
/// Arguments of `diag.noop`: none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopArgs {}
impl TaskSpec for Noop {
    const NAME: &'static str = "diag.noop";
    type Args = NoopArgs;
    fn options() -> TaskOptions {
        diag_options()
    }
}

/// `diag.sleep {ms}`: sleeps, then succeeds. For drain and timeout tests.
pub struct Sleep;
/// Arguments of `diag.sleep`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepArgs {
    /// How long to sleep, in milliseconds.
    pub ms: u64,
}
impl TaskSpec for Sleep {
    const NAME: &'static str = "diag.sleep";
    type Args = SleepArgs;
    fn options() -> TaskOptions {
        diag_options()
    }
}

/// `diag.fail {until_attempt?, permanent?}`: fails every attempt before
/// `until_attempt` and succeeds on it; fails always when it is absent. With
/// `permanent: true` a failure is permanent, so the job is dead after that one
/// attempt (its retries are skipped).
pub struct Fail;
/// Arguments of `diag.fail`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailArgs {
    /// The first attempt that succeeds; `None` fails forever.
    #[serde(default)]
    pub until_attempt: Option<u32>,
    /// Fail with "give up now" instead of "retry later".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
}
impl TaskSpec for Fail {
    const NAME: &'static str = "diag.fail";
    type Args = FailArgs;
    fn options() -> TaskOptions {
        diag_options()
    }
}

/// `diag.panic {until_attempt?}`: like `diag.fail` but panics instead of
/// returning an error, to prove a panic is contained and counted as a failure.
pub struct Panic;
/// Arguments of `diag.panic`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanicArgs {
    /// The first attempt that succeeds; `None` panics forever.
    #[serde(default)]
    pub until_attempt: Option<u32>,
}
impl TaskSpec for Panic {
    const NAME: &'static str = "diag.panic";
    type Args = PanicArgs;
    fn options() -> TaskOptions {
        diag_options()
    }
}
