//! `diag.noop`: the smallest possible job, for benchmarks and smoke tests.

use conveyor_schema::args::diag::{self, NoopArgs};

use crate::{JobContext, Task, TaskError};

/// Does nothing.
pub struct Noop;

impl Task for Noop {
    type Spec = diag::Noop;
    async fn run(&self, _: NoopArgs, _: JobContext) -> Result<(), TaskError> {
        Ok(())
    }
}
