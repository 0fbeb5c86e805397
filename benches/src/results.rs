//! One measured number per JSON line, appended to the results file.

use std::io::Write;

use serde::Serialize;

use crate::Common;

/// One number of one repetition of one scenario.
#[derive(Debug, Serialize)]
pub struct Measurement<'a> {
    /// Scenario key, e.g. `http_enqueue`.
    pub scenario: &'a str,
    /// Who was measured: `conveyor`, `dramatiq`, `ceiling`, …
    pub system: &'a str,
    /// What, e.g. `rate`, `p99_ms`.
    pub metric: &'a str,
    /// The number.
    pub value: f64,
    /// Its unit, for the table.
    pub unit: &'a str,
    /// Repetition index.
    pub run: u32,
}

/// Appends measurements to the results file and echoes them to stdout.
pub struct Recorder<'a> {
    common: &'a Common,
    scenario: &'a str,
    system: &'a str,
}

impl<'a> Recorder<'a> {
    /// Records for `scenario` measured on `system`.
    pub fn new(common: &'a Common, scenario: &'a str, system: &'a str) -> Self {
        Self {
            common,
            scenario,
            system,
        }
    }

    /// Appends one number.
    pub fn put(&self, metric: &str, value: f64, unit: &str) -> anyhow::Result<()> {
        let line = serde_json::to_string(&Measurement {
            scenario: self.scenario,
            system: self.system,
            metric,
            value,
            unit,
            run: self.common.run,
        })?;
        println!("{line}");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.common.results)?;
        writeln!(file, "{line}")?;
        Ok(())
    }
}
