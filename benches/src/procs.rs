//! Starting and stopping `conveyor` processes for a scenario.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Common;

/// A running `conveyor worker`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// Starts `conveyor worker` on the bench database and namespace.
    pub fn spawn(bin: &Path, common: &Common) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, common, &[])
    }

    /// Like [`spawn`](Self::spawn), with extra `CONVEYOR_*` variables.
    pub fn spawn_with_env(
        bin: &Path,
        common: &Common,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("worker")
            .env("CONVEYOR_DATABASE_URL", &common.database_url)
            .env("CONVEYOR_AMQP_URL", &common.amqp_url)
            .env("CONVEYOR_NAMESPACE", &common.namespace)
            .env("CONVEYOR_WORKER_METRICS_ADDR", "127.0.0.1:0")
            .env("CONVEYOR_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to 10 s for the drain before SIGKILL.
    pub fn stop(mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
