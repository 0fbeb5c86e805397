//! One logging set-up for every subcommand.
//!
//! Output goes to stderr (pretty, coloured only on a terminal, or JSON) and,
//! when `log.file_dir` is set, also to a daily-rolling file through
//! tracing-appender's non-blocking writer. Keep the returned guard alive for
//! the life of the process so buffered lines are flushed on exit.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::{LogConfig, LogFormat};

/// Flushes the log file on drop.
pub struct TelemetryGuard {
    _file: Option<WorkerGuard>,
}

/// Installs the global subscriber. Fails if one is already installed.
pub fn init(config: &LogConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&config.level)?;
    let stderr = match config.format {
        LogFormat::Pretty => fmt::layer()
            .with_ansi(colour_on_stderr())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let (file_layer, guard) = match &config.file_dir {
        Some(dir) => {
            let appender = tracing_appender::rolling::daily(dir, "conveyor.log");
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let layer = match config.format {
                LogFormat::Pretty => fmt::layer().with_ansi(false).with_writer(writer).boxed(),
                LogFormat::Json => fmt::layer().json().with_writer(writer).boxed(),
            };
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file_layer)
        .try_init()?;
    Ok(TelemetryGuard { _file: guard })
}

/// Colour only for a person at a terminal, and not if `NO_COLOR` is set
/// (<https://no-color.org>): stderr sent to a file, journald or a container
/// log would otherwise carry escape codes.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
