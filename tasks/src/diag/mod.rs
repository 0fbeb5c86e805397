//! Diagnostic tasks (see `conveyor_schema::args::diag` for what each does).

mod fail;
mod noop;
mod panic;
mod sleep;

pub use fail::Fail;
pub use noop::Noop;
pub use panic::Panic;
pub use sleep::Sleep;
