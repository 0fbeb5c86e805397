//! `conveyor`: the one operator binary. Parses the command line, loads and
//! validates configuration, starts telemetry, and hands over to `cli::run`.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod dlq;
mod keys;
mod webhook;

/// jemalloc instead of the system allocator: an enqueue or a delivery makes
/// many small short-lived allocations across threads, where glibc's malloc
/// showed as ~13 % of the ingress's CPU under load (benches/RESULTS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let config = match cli::load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("conveyor: {}", one_line(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    let _telemetry = match conveyor_platform::telemetry::init(&config.log) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!(
                "conveyor: cannot start logging: {}",
                one_line(&err.to_string())
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("conveyor: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let message = one_line(&format!("{err:#}"));
            tracing::error!(error = message, "conveyor failed");
            eprintln!("conveyor: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `text` on one line: each run of whitespace (a library's message may hold
/// newlines and tabs, as libpq's "…refused\n\tIs the server running…" does)
/// becomes one space, so every failure is the one line the CLI promises.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
