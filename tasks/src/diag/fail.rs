//! `diag.fail {until_attempt?, permanent?}`: fails on purpose, to exercise
//! retries, permanent failures and dead letters.

use conveyor_schema::args::diag::{self, FailArgs};

use crate::{JobContext, Task, TaskError};

/// Fails before `until_attempt`, succeeds on it; fails always without it.
/// The failure is permanent (no retries) when `permanent` is set.
pub struct Fail;

impl Task for Fail {
    type Spec = diag::Fail;
    async fn run(&self, args: FailArgs, ctx: JobContext) -> Result<(), TaskError> {
        match args.until_attempt {
            Some(until) if ctx.attempt >= until => Ok(()),
            _ => {
                let error =
                    anyhow::anyhow!("diag.fail: failing attempt {} on purpose", ctx.attempt);
                Err(if args.permanent {
                    TaskError::permanent(error)
                } else {
                    error.into()
                })
            }
        }
    }
}
