//! Shared plumbing of the `make bench` binaries.
//!
//! Each scenario is a small binary in `src/bin/` that measures one thing and
//! appends its numbers as JSON lines to one results file; `report.py` turns
//! that file into `RESULTS.md`. Keeping the measuring code here (rather than in
//! shell) lets the binaries reuse Conveyor's own types: the same envelope, the
//! same confirmed publisher and the same group-commit recorder as the ingress.

pub mod broker;
pub mod db;
pub mod http;
pub mod preload;
pub mod procs;
pub mod results;
pub mod stats;

use clap::Args;
use conveyor_platform::Config;

/// Where a scenario finds the services, and where its numbers go.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The private bench database.
    #[arg(long, env = "CONVEYOR_DATABASE_URL")]
    pub database_url: String,
    /// The broker.
    #[arg(
        long,
        env = "CONVEYOR_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The private broker namespace (queue-name prefix).
    #[arg(long, env = "CONVEYOR_NAMESPACE")]
    pub namespace: String,
    /// The JSON-lines file results are appended to.
    #[arg(long, env = "BENCH_RESULTS")]
    pub results: std::path::PathBuf,
    /// Which repetition this is (1-based), copied into each result line.
    #[arg(long, default_value_t = 1)]
    pub run: u32,
}

impl Common {
    /// A Conveyor configuration pointing at the bench database and namespace.
    pub fn config(&self) -> Config {
        let mut config = Config {
            namespace: self.namespace.clone(),
            ..Config::default()
        };
        config.database.url = self.database_url.clone().into();
        config.amqp.url = self.amqp_url.clone().into();
        config
    }
}

/// Where a scenario against Conveyor's `default` queue starts: the topology
/// declared, the work queue empty and the jobs table empty.
pub struct Fresh {
    /// The bench database.
    pub db: conveyor_schema::pool::PgPool,
    /// Housekeeping on the broker.
    pub admin: broker::Admin,
    /// The `default` work queue's name.
    pub work_queue: String,
}

impl Fresh {
    /// Declares the topology, then empties the `default` work queue and the jobs table.
    pub async fn start(common: &Common) -> anyhow::Result<Self> {
        let db = db::pool(&common.database_url);
        let topology = conveyor_platform::amqp::Topology::for_config(&common.config());
        let work_queue = topology.work_queue("default");
        let admin = broker::Admin::connect(&common.amqp_url).await?;
        admin.declare(&topology).await?;
        admin.purge(&work_queue).await?;
        db::truncate_jobs(&db).await?;
        Ok(Self {
            db,
            admin,
            work_queue,
        })
    }
}
