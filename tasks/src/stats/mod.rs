//! Statistics tasks: hourly and daily rollups, and retention of raw job
//! records (see `conveyor_schema::args::stats` for their arguments).

mod retention;
pub mod rollup;
mod rollup_tasks;

pub use retention::{Retention, days_to_seal_statement};
pub use rollup_tasks::{RollupDaily, RollupHourly};
