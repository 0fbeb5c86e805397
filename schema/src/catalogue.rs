//! Which tasks exist, what arguments they take and how they run.
//!
//! A task's name is a constant, never derived from a Rust type name, so that
//! renaming code never orphans messages already in a queue. The ingress uses
//! this list to reject unknown tasks and bad arguments before anything is
//! published; the worker pairs each entry with an implementation (and a test
//! proves the two lists match).

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::args;

/// The longest task name, in bytes, anything accepts: the ingress for
/// `POST /v1/jobs`, and the worker for a message ([`crate::Envelope::decode`]).
/// Every catalogue name is far shorter; the bound keeps a foreign producer's
/// name from reaching `jobs` and `dead_jobs`, whose `(task, …)` btree indexes
/// refuse an entry over 2 704 bytes (and a refused row used to stall the
/// worker's state commits).
pub const MAX_TASK_NAME_LEN: usize = 200;

/// The static description of one task: its name, argument type and options.
pub trait TaskSpec {
    /// Stable wire name, e.g. `diag.noop`.
    const NAME: &'static str;
    /// The argument type; should reject unknown fields.
    type Args: DeserializeOwned + Serialize + Send + 'static;
    /// How the task is queued, retried and bounded.
    fn options() -> TaskOptions;
    /// False for tasks that only other tasks may enqueue (not `POST /v1/jobs`).
    const PUBLIC: bool = true;
    /// Checks what the argument type cannot say (a range, a relation between
    /// fields) on decoded arguments. Runs wherever arguments are validated
    /// (enqueue, replay, `[[schedules]]` at start-up) so bad ones are refused
    /// there, and the worker applies it before it runs the task (a message
    /// published without that validation fails permanently), so both apply the
    /// same rules.
    fn check_args(_args: &Self::Args) -> Result<(), ArgsError> {
        Ok(())
    }
}

/// How a task is queued, retried and bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Logical queue name (the broker queue is `<namespace>.<queue>`).
    pub queue: &'static str,
    /// Attempts in all, first run included; after the last failure the job is dead.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each attempt.
    pub backoff_base: Duration,
    /// The largest delay between attempts.
    pub backoff_cap: Duration,
    /// Longest a single attempt may run before it counts as failed.
    pub timeout: Duration,
    /// Most attempts of this task one worker process runs at once.
    pub concurrency: usize,
}

impl TaskOptions {
    /// Defaults for a task on `queue`: 10 attempts, backoff 1 s doubling to 10 min,
    /// 5 min timeout, concurrency 16.
    pub const fn on_queue(queue: &'static str) -> Self {
        Self {
            queue,
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(600),
            timeout: Duration::from_secs(300),
            concurrency: 16,
        }
    }

    /// The delay before attempt `next_attempt` (2 or more), before jitter:
    /// `base * 2^(next_attempt - 2)`, capped.
    pub fn backoff(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(30);
        self.backoff_base
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_cap)
    }
}

/// A bad `args` object: where (a JSON pointer) and what.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (at {pointer})")]
pub struct ArgsError {
    /// JSON pointer into the request body, e.g. `/args/ms`.
    pub pointer: String,
    /// What is wrong there.
    pub message: String,
}

/// One catalogue entry, with its argument validator erased to a function pointer.
#[derive(Debug, Clone)]
pub struct TaskDescriptor {
    /// Stable wire name.
    pub name: &'static str,
    /// Queueing, retry and concurrency options.
    pub options: TaskOptions,
    /// Whether producers may enqueue it directly over HTTP.
    pub public: bool,
    validate: fn(&Value) -> Result<(), ArgsError>,
}

impl TaskDescriptor {
    /// The descriptor of `T`.
    pub fn of<T: TaskSpec>() -> Self {
        Self {
            name: T::NAME,
            options: T::options(),
            public: T::PUBLIC,
            validate: |value| decode_args::<T::Args>(value).and_then(|args| T::check_args(&args)),
        }
    }

    /// Checks that `args` deserializes into the task's argument type and
    /// passes its [`TaskSpec::check_args`].
    pub fn validate(&self, args: &Value) -> Result<(), ArgsError> {
        (self.validate)(args)
    }
}

/// Deserializes `value` into `A`, reporting the failing spot as a JSON pointer
/// below `/args`.
pub fn decode_args<A: DeserializeOwned>(value: &Value) -> Result<A, ArgsError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let message = err.inner().to_string();
        let pointer = format!("/args{}", crate::json_pointer::pointer_to(err.path()));
        ArgsError { pointer, message }
    })
}

/// Every task this build knows, in one list.
pub fn catalogue() -> &'static [TaskDescriptor] {
    static CATALOGUE: OnceLock<Vec<TaskDescriptor>> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        vec![
            TaskDescriptor::of::<args::diag::Noop>(),
            TaskDescriptor::of::<args::diag::Sleep>(),
            TaskDescriptor::of::<args::diag::Fail>(),
            TaskDescriptor::of::<args::diag::Panic>(),
            TaskDescriptor::of::<args::mail::PlanCampaign>(),
            TaskDescriptor::of::<args::mail::SendChunk>(),
            TaskDescriptor::of::<args::stats::RollupHourly>(),
            TaskDescriptor::of::<args::stats::RollupDaily>(),
            TaskDescriptor::of::<args::stats::Retention>(),
            TaskDescriptor::of::<args::webhooks::ProfileSync>(),
            TaskDescriptor::of::<args::webhooks::HeadshotSweep>(),
        ]
    })
}

/// The catalogue entry named `name`.
pub fn find_task(name: &str) -> Option<&'static TaskDescriptor> {
    catalogue().iter().find(|task| task.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashSet;

    #[test]
    fn task_names_are_unique() {
        let names: HashSet<_> = catalogue().iter().map(|t| t.name).collect();
        assert_eq!(names.len(), catalogue().len());
    }

    #[test]
    fn task_names_fit_the_bound() {
        for task in catalogue() {
            assert!(task.name.len() <= MAX_TASK_NAME_LEN, "{}", task.name);
        }
    }

    #[test]
    fn pointers_name_the_bad_field() {
        let sleep = find_task("diag.sleep").unwrap();
        assert!(sleep.validate(&json!({"ms": 5})).is_ok());
        let err = sleep.validate(&json!({"ms": "soon"})).unwrap_err();
        assert_eq!(err.pointer, "/args/ms");
        let err = sleep.validate(&json!({"ms": 5, "extra": 1})).unwrap_err();
        assert_eq!(err.pointer, "/args/extra");
        let err = sleep.validate(&json!({})).unwrap_err();
        assert!(err.message.contains("missing field `ms`"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut options = TaskOptions::on_queue("q");
        options.backoff_base = Duration::from_millis(100);
        options.backoff_cap = Duration::from_secs(1);
        let delays: Vec<_> = (2..=7).map(|a| options.backoff(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }
}
