//! `diag.sleep {ms}`: a job that takes a while, for drain and timeout tests.

use std::time::Duration;

use conveyor_schema::args::diag::{self, SleepArgs};

use crate::{JobContext, Task, TaskError};

/// Sleeps `ms`, then succeeds.
pub struct Sleep;

impl Task for Sleep {
    type Spec = diag::Sleep;
    async fn run(&self, args: SleepArgs, _: JobContext) -> Result<(), TaskError> {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok(())
    }
}
