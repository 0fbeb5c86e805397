//! `diag.panic {until_attempt?}`: panics on purpose, to prove a panic is
//! contained and counted as a failed attempt.

use conveyor_schema::args::diag::{self, PanicArgs};

use crate::{JobContext, Task, TaskError};

/// Panics before `until_attempt`, succeeds on it; panics always without it.
pub struct Panic;

impl Task for Panic {
    type Spec = diag::Panic;
    async fn run(&self, args: PanicArgs, ctx: JobContext) -> Result<(), TaskError> {
        match args.until_attempt {
            Some(until) if ctx.attempt >= until => Ok(()),
            _ => panic!(
                "diag.panic: panicking on attempt {} on purpose",
                ctx.attempt
            ),
        }
    }
}
