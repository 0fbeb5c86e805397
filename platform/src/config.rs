//! Typed configuration, loaded once at start-up and validated before anything runs.
//!
//! Layers, later wins: built-in defaults, then `conveyor.toml` (or the file given
//! with `--config`), then `CONVEYOR_*` environment variables, where the first `_`
//! after the prefix separates the section from the key (`CONVEYOR_DATABASE_URL`
//! is `database.url`, `CONVEYOR_WORKER_METRICS_ADDR` is `worker.metrics_addr`).
//! Nothing else in Conveyor reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use crate::schedule::{ScheduleConfig, SchedulerConfig, StatsConfig};

pub mod webhooks;
pub use webhooks::{HeadshotConfig, HeadshotStorage, WebhookSource, WebhooksConfig};

/// The whole configuration tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Prefix of every queue and exchange name; lets several deployments (or
    /// tests) share one broker vhost without touching each other.
    pub namespace: String,
    /// Logging.
    pub log: LogConfig,
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// RabbitMQ.
    pub amqp: AmqpConfig,
    /// The HTTP ingress.
    pub ingress: IngressConfig,
    /// The worker runtime.
    pub worker: WorkerConfig,
    /// Mail fan-out.
    pub mail: MailConfig,
    /// Periodic jobs (`[[schedules]]`), see [`crate::schedule`].
    pub schedules: Vec<ScheduleConfig>,
    /// The scheduler loop every worker runs.
    pub scheduler: SchedulerConfig,
    /// Statistics rollups and retention.
    pub stats: StatsConfig,
    /// API keys, rate limits and idempotency keys.
    pub auth: AuthConfig,
    /// Heartbeats and the broker poller.
    pub monitor: MonitorConfig,
    /// Signed inbound webhooks (sources, keys, headshot downloads).
    pub webhooks: WebhooksConfig,
}

/// Logging output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive, e.g. `info` or `conveyor_worker=debug,info`.
    pub level: String,
    /// `pretty` for people, `json` for log shippers.
    pub format: LogFormat,
    /// When set, logs also go to a daily-rolling file in this directory.
    pub file_dir: Option<PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// PostgreSQL connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user[:password]@host:port/database`.
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    /// Connections in the pool of each process.
    pub pool_size: u32,
    /// How long a migration waits for a table lock before failing.
    pub lock_timeout_ms: u64,
    /// Start even when the database has migrations this binary does not know
    /// (a newer release expanded the schema). Off by default, so a stale binary
    /// is refused; turn it on for release N−1 during a rolling deploy or a rollback.
    pub allow_newer_schema: bool,
}

/// RabbitMQ connection and topology settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// One `amqp://` URL, or several separated by commas (cluster nodes, tried in order).
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    /// With several nodes, start each process at a random one of them (the list is
    /// rotated, not reordered), so the connections of many processes spread over
    /// the cluster; `false` always starts with the first listed node.
    pub shuffle_nodes: bool,
    /// Deliveries of one message before the broker dead-letters it (a crash-loop guard;
    /// ordinary retries are new messages and do not count).
    pub delivery_limit: u32,
    /// How often a message the broker dead-lettered for `delivery_limit` goes
    /// back to its work queue (a fresh message, its count at zero) when its
    /// job's record shows the attempt never started (workers stopped or killed
    /// holding it); 0 dead-letters it at once, as a crash loop.
    pub delivery_limit_resets: u32,
    /// Replicas of each quorum queue. Unset: the broker's `quorum_cluster_size`,
    /// which is 3 on RabbitMQ 3.10, i.e. every node of a one- to three-node cluster
    /// and three nodes of a larger one. It applies when a queue is first declared;
    /// a different value later makes every redeclaration fail with
    /// PRECONDITION_FAILED, so change replicas with `rabbitmq-queues grow|shrink`.
    pub quorum_initial_group_size: Option<u32>,
    /// How long to wait for a publisher confirm.
    pub publish_timeout_ms: u64,
}

/// Ingress settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
    /// Largest body of campaign creation and recipient appends, in bytes.
    pub recipients_body_limit_bytes: usize,
    /// Confirm-mode channels used to publish.
    pub publisher_channels: usize,
    /// Most jobs recorded and published together in one group commit.
    pub batch_max: usize,
    /// Group commits in flight at once (each holds one database connection).
    pub batches_in_flight: usize,
    /// While other group commits are in flight, a new one waits up to this
    /// long to fill to the size of recent ones (0: never waits).
    pub batch_linger_ms: u64,
    /// A request still unanswered after this gets a 503 problem.
    pub request_timeout_ms: u64,
    /// When a group commit's transaction fails after its messages were
    /// confirmed, their records are written again for up to this long, while
    /// their submitters wait: a 202 once written, else an in-doubt 503 (0:
    /// a single attempt). At least 5 000 less than `request_timeout_ms`; unset,
    /// half of it, which must keep the same margin (so `request_timeout_ms` is
    /// then at least 10 000). See [`IngressConfig::rerecord_within`].
    pub rerecord_within_ms: Option<u64>,
    /// Requests served at once; beyond this new ones are shed with 503 and `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Largest total size of a request's headers (431 beyond).
    pub max_header_bytes: usize,
}

/// Worker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// How long in-flight jobs may run after SIGTERM before the rest are returned.
    pub grace_period_ms: u64,
    /// Unacknowledged deliveries per queue (the prefetch window). Unset: each
    /// queue's window is `prefetch_per_slot` times the concurrency of the tasks on it.
    pub prefetch: Option<u16>,
    /// Deliveries a worker may hold per concurrency slot of a queue's tasks,
    /// when `prefetch` is unset: the jobs running, the next ones ready to start
    /// and the finished ones whose state commit (and so whose ack) is pending.
    /// Fewer for a task too slow for this many to fit in the broker's
    /// `consumer_timeout` (see the worker's `prefetch`).
    pub prefetch_per_slot: u16,
    /// Logical queues to consume; empty means every queue in the catalogue.
    pub queues: Vec<String>,
    /// Most job-state changes committed in one transaction.
    pub state_batch_max: usize,
    /// Least time between the starts of two job-state commits (0: no limit),
    /// unless 128 changes are already waiting. Changes arriving meanwhile share
    /// the next commit; at a low rate each would otherwise be a commit, and a
    /// disk flush, of its own.
    pub state_linger_ms: u64,
}

/// Mail fan-out settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// SMTP server: `smtp://[user:pass@]host[:port][?tls=required|opportunistic|none]`, or `smtps://…` for implicit TLS.
    #[serde(serialize_with = "expose")]
    pub smtp_url: SecretString,
    /// Pooled SMTP connections per worker.
    pub smtp_pool_size: u32,
    /// The most one message's send may take (connection, MAIL, RCPT, DATA).
    /// Keep it below `worker.grace_period_ms`, so that a drain waits out a
    /// send stalled at SIGTERM and records it, rather than leaving its
    /// recipient claimed, to turn `unknown` when the claim expires.
    pub smtp_timeout_ms: u64,
    /// Recipients one chunk job talks to at once (the most that can be in doubt per killed worker).
    pub smtp_concurrency: usize,
    /// Recipients per chunk job.
    pub chunk_size: usize,
    /// How long a recipient's claim is trusted; must exceed `smtp_timeout_ms`.
    pub claim_ttl_ms: u64,
    /// Send-rate ceiling over all campaigns and workers together.
    pub global_rate_per_sec: Option<f64>,
    /// SMTP attempts per recipient before a temporary (4xx) failure becomes permanent.
    pub max_smtp_attempts: u32,
    /// Delay after a 4xx reply; doubles per attempt.
    pub retry_backoff_ms: u64,
    /// Directory whose `<name>/{subject.txt,body.txt,body.html}` override the embedded templates.
    pub templates_dir: Option<PathBuf>,
    /// Unsubscribe link put in every message; `{campaign}` and `{recipient}` are replaced.
    pub unsubscribe_url: String,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_url: "smtp://127.0.0.1:2525?tls=none".into(),
            smtp_pool_size: 16,
            smtp_timeout_ms: 20_000,
            smtp_concurrency: 8,
            chunk_size: 100,
            claim_ttl_ms: 120_000,
            global_rate_per_sec: None,
            max_smtp_attempts: 5,
            retry_backoff_ms: 30_000,
            templates_dir: None,
            unsubscribe_url: "https://example.invalid/unsubscribe?c={campaign}&r={recipient}"
                .into(),
        }
    }
}

/// API keys, rate limits and idempotency (see `conveyor_ingress::auth`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Requests per second a key may make when it has no rate of its own.
    pub default_rate_per_sec: f64,
    /// Requests a key may make at once (bucket size) when it has no burst of its own.
    pub default_burst: u32,
    /// Ingress replicas behind the load balancer: each enforces `rate / replicas` and
    /// `burst / replicas` in memory, so the limit is exact with one replica and holds
    /// within what the balancer's spread allows with several.
    pub ingress_replicas: u32,
    /// How long a key looked up in Postgres is trusted; a revocation takes effect within this.
    pub cache_ttl_ms: u64,
    /// How long an `Idempotency-Key` and its stored response are kept.
    pub idempotency_retention_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            default_rate_per_sec: 100.0,
            default_burst: 200,
            ingress_replicas: 1,
            cache_ttl_ms: 2_000,
            idempotency_retention_secs: 24 * 3600,
        }
    }
}

/// Worker heartbeats and the ingress's broker poller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How often each worker writes its heartbeat row.
    pub heartbeat_ms: u64,
    /// A worker silent for this long is shown as gone (and not counted as live).
    pub worker_gone_after_ms: u64,
    /// A worker silent (or stopped) for this long is deleted from `workers`.
    pub worker_prune_after_ms: u64,
    /// How often the ingress polls the broker and the jobs table for the queue metrics.
    pub queue_poll_ms: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 5_000,
            worker_gone_after_ms: 30_000,
            worker_prune_after_ms: 24 * 3600 * 1000,
            queue_poll_ms: 5_000,
        }
    }
}

fn expose<S: serde::Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose_secret())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: "conveyor".into(),
            log: LogConfig::default(),
            database: DatabaseConfig::default(),
            amqp: AmqpConfig::default(),
            ingress: IngressConfig::default(),
            worker: WorkerConfig::default(),
            mail: MailConfig::default(),
            schedules: Vec::new(),
            scheduler: SchedulerConfig::default(),
            stats: StatsConfig::default(),
            auth: AuthConfig::default(),
            monitor: MonitorConfig::default(),
            webhooks: WebhooksConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Pretty,
            file_dir: None,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/conveyor".into(),
            pool_size: 16,
            lock_timeout_ms: 5_000,
            allow_newer_schema: false,
        }
    }
}

/// The most `amqp.delivery_limit_resets` accepted: each lets a message that
/// crashes its worker before its start is committed crash `delivery_limit` more.
pub const MAX_DELIVERY_LIMIT_RESETS: u32 = 100;

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            shuffle_nodes: true,
            delivery_limit: 20,
            delivery_limit_resets: 4,
            quorum_initial_group_size: None,
            publish_timeout_ms: 5_000,
        }
    }
}

impl IngressConfig {
    /// How long records are written again after a failed group commit:
    /// `rerecord_within_ms`, or half of `request_timeout_ms` when unset.
    pub fn rerecord_within(&self) -> Duration {
        Duration::from_millis(
            self.rerecord_within_ms
                .unwrap_or(self.request_timeout_ms / 2),
        )
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            recipients_body_limit_bytes: 64 * 1024 * 1024,
            publisher_channels: 4,
            batch_max: 512,
            batches_in_flight: 4,
            batch_linger_ms: 1,
            request_timeout_ms: 30_000,
            rerecord_within_ms: None,
            max_concurrent_requests: 1024,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            grace_period_ms: 25_000,
            prefetch: None,
            prefetch_per_slot: 4,
            queues: Vec::new(),
            state_batch_max: 1000,
            state_linger_ms: 10,
        }
    }
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value parsed but makes no sense.
    #[error("invalid configuration: `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `database.url`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A value in an array entry (e.g. `schedules[2].cron`) makes no sense.
    #[error("invalid configuration: `{key}`: {problem}")]
    InvalidEntry {
        /// Dotted key with the entry's index.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Loads defaults, then `file` (or `conveyor.toml` when present), then the
    /// `CONVEYOR_*` variables, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new("conveyor.toml").exists() => {
                figment = figment.merge(Toml::file_exact("conveyor.toml"));
            }
            None => {}
        }
        let env = Env::prefixed("CONVEYOR_").map(|key| {
            key.as_str()
                .to_ascii_lowercase()
                .replacen('_', ".", 1)
                .into()
        });
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|err| ConfigError::Load(one_line(&err)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that parse but are unusable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: String| Err(ConfigError::Invalid { key, problem });
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(
                "namespace",
                "must be non-empty ASCII letters, digits, `-`, `_` or `.`".into(),
            );
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", err.to_string());
        }
        let db = self.database.url.expose_secret();
        match url::Url::parse(db) {
            Ok(url)
                if matches!(url.scheme(), "postgres" | "postgresql") && url.path().len() > 1 => {}
            Ok(_) => return invalid("database.url", "must be postgres://host/database".into()),
            Err(err) => return invalid("database.url", err.to_string()),
        }
        if self.database.pool_size == 0 {
            return invalid("database.pool_size", "must be at least 1".into());
        }
        for node in self.amqp_urls() {
            match url::Url::parse(node) {
                Ok(url) if matches!(url.scheme(), "amqp" | "amqps") => {}
                Ok(url) => {
                    return invalid(
                        "amqp.url",
                        format!("scheme `{}` is not amqp or amqps", url.scheme()),
                    );
                }
                Err(err) => return invalid("amqp.url", format!("`{node}`: {err}")),
            }
        }
        if self.amqp_urls().is_empty() {
            return invalid("amqp.url", "is empty".into());
        }
        if self.amqp.delivery_limit == 0 {
            return invalid("amqp.delivery_limit", "must be at least 1".into());
        }
        if self.amqp.delivery_limit_resets > MAX_DELIVERY_LIMIT_RESETS {
            return invalid(
                "amqp.delivery_limit_resets",
                format!(
                    "must be at most {MAX_DELIVERY_LIMIT_RESETS}: a job that crashes its worker before its start is committed is dead-lettered only after (resets + 1) x delivery_limit deliveries"
                ),
            );
        }
        if self.amqp.quorum_initial_group_size == Some(0) {
            return invalid(
                "amqp.quorum_initial_group_size",
                "must be at least 1 (or unset for the broker's default)".into(),
            );
        }
        if self.amqp.publish_timeout_ms == 0 {
            return invalid("amqp.publish_timeout_ms", "must be at least 1".into());
        }
        if self.ingress.publisher_channels == 0 {
            return invalid("ingress.publisher_channels", "must be at least 1".into());
        }
        if self.ingress.batch_max == 0 || self.ingress.batches_in_flight == 0 {
            return invalid(
                "ingress.batch_max",
                "batch_max and batches_in_flight must be at least 1".into(),
            );
        }
        if self.worker.prefetch == Some(0) {
            return invalid("worker.prefetch", "must be at least 1".into());
        }
        if self.worker.prefetch_per_slot == 0 {
            return invalid("worker.prefetch_per_slot", "must be at least 1".into());
        }
        match url::Url::parse(self.mail.smtp_url.expose_secret()) {
            Ok(url) if matches!(url.scheme(), "smtp" | "smtps") => {}
            Ok(url) => {
                return invalid(
                    "mail.smtp_url",
                    format!("scheme `{}` is not smtp or smtps", url.scheme()),
                );
            }
            Err(err) => return invalid("mail.smtp_url", err.to_string()),
        }
        if self.mail.chunk_size == 0
            || self.mail.smtp_concurrency == 0
            || self.mail.smtp_pool_size == 0
        {
            return invalid(
                "mail.chunk_size",
                "chunk_size, smtp_concurrency and smtp_pool_size must be at least 1".into(),
            );
        }
        if self.mail.claim_ttl_ms <= self.mail.smtp_timeout_ms {
            return invalid(
                "mail.claim_ttl_ms",
                "must exceed mail.smtp_timeout_ms, or live conversations would be judged dead"
                    .into(),
            );
        }
        if self
            .mail
            .global_rate_per_sec
            .is_some_and(|r| !(r > 0.0 && r.is_finite()))
        {
            return invalid(
                "mail.global_rate_per_sec",
                "must be a positive number".into(),
            );
        }
        if self.mail.max_smtp_attempts == 0 {
            return invalid("mail.max_smtp_attempts", "must be at least 1".into());
        }
        if self.worker.state_batch_max == 0 {
            return invalid("worker.state_batch_max", "must be at least 1".into());
        }
        if self.worker.state_linger_ms > 1_000 {
            return invalid(
                "worker.state_linger_ms",
                "must be at most 1000: acks and job states wait for it".into(),
            );
        }
        if self.monitor.heartbeat_ms == 0 || self.monitor.queue_poll_ms == 0 {
            return invalid(
                "monitor.heartbeat_ms",
                "heartbeat_ms and queue_poll_ms must be at least 1".into(),
            );
        }
        if self.monitor.worker_gone_after_ms <= self.monitor.heartbeat_ms {
            return invalid(
                "monitor.worker_gone_after_ms",
                "must be longer than monitor.heartbeat_ms".into(),
            );
        }
        if !(self.auth.default_rate_per_sec > 0.0 && self.auth.default_rate_per_sec.is_finite()) {
            return invalid(
                "auth.default_rate_per_sec",
                "must be a positive number".into(),
            );
        }
        if self.auth.default_burst == 0 || self.auth.ingress_replicas == 0 {
            return invalid(
                "auth.default_burst",
                "default_burst and ingress_replicas must be at least 1".into(),
            );
        }
        if self.auth.cache_ttl_ms > 3_000 {
            return invalid(
                "auth.cache_ttl_ms",
                "must be at most 3000, so a revoked key stops within 5 seconds".into(),
            );
        }
        if self.ingress.max_concurrent_requests == 0 || self.ingress.request_timeout_ms == 0 {
            return invalid(
                "ingress.max_concurrent_requests",
                "max_concurrent_requests and request_timeout_ms must be at least 1".into(),
            );
        }
        // The check applies to the window in force, set or not: unset, it is
        // half of the request timeout, which leaves too little under 10 s.
        let connect_ms = conveyor_schema::pool::CHECKOUT_TIMEOUT.as_millis() as u64;
        let timeout_ms = self.ingress.request_timeout_ms;
        if timeout_ms < connect_ms {
            return invalid(
                "ingress.request_timeout_ms",
                format!(
                    "must be at least {connect_ms}: writing a failed group commit's records again may take {connect_ms} ms to connect, and the request must not time out before the answer says whether its job was recorded"
                ),
            );
        }
        let within_ms = self.ingress.rerecord_within().as_millis() as u64;
        if within_ms + connect_ms > timeout_ms {
            let problem = match self.ingress.rerecord_within_ms {
                Some(_) => format!(
                    "must be at least {connect_ms} less than ingress.request_timeout_ms ({timeout_ms}): its last attempt may take {connect_ms} ms to connect, and the request must not time out before the answer says whether its job was recorded"
                ),
                None => format!(
                    "unset, it is half of ingress.request_timeout_ms ({within_ms} of {timeout_ms}), which leaves less than the {connect_ms} ms its last attempt may take to connect: set it to at most {}, or ingress.request_timeout_ms to at least {}",
                    timeout_ms - connect_ms,
                    2 * connect_ms
                ),
            };
            return invalid("ingress.rerecord_within_ms", problem);
        }
        // An admin replay of dead jobs starts no record in the last
        // `amqp.publish_timeout_ms` of the time its request works in (the
        // request timeout less a tenth, at most 2 s, kept to answer: the
        // ingress's `Budget::within`), so that a publish under way is confirmed
        // or given up before the request must answer.
        let publish_ms = self.amqp.publish_timeout_ms;
        let work_ms = timeout_ms - (timeout_ms / 10).min(2_000);
        if work_ms <= publish_ms {
            return invalid(
                "ingress.request_timeout_ms",
                format!(
                    "leaves {work_ms} ms to work in (less the {} ms kept to answer), no more than amqp.publish_timeout_ms ({publish_ms}): a dead-job replay starts no record in the last amqp.publish_timeout_ms of a request, so it could never start one; raise ingress.request_timeout_ms or lower amqp.publish_timeout_ms",
                    timeout_ms - work_ms
                ),
            );
        }
        crate::schedule::validate(self)?;
        self.webhooks.validate()?;
        Ok(())
    }

    /// The broker node URLs, in the order this process tries them first: as
    /// listed, rotated by a per-process random offset when `amqp.shuffle_nodes`.
    pub fn amqp_urls(&self) -> Vec<&str> {
        let mut urls: Vec<&str> = self
            .amqp
            .url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if self.amqp.shuffle_nodes && urls.len() > 1 {
            static OFFSET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
            let offset = *OFFSET.get_or_init(|| uuid::Uuid::new_v4().as_u128() as usize);
            let len = urls.len();
            urls.rotate_left(offset % len);
        }
        urls
    }

    /// The drain deadline after SIGTERM.
    pub fn grace_period(&self) -> Duration {
        Duration::from_millis(self.worker.grace_period_ms)
    }

    /// The publisher-confirm deadline.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.amqp.publish_timeout_ms)
    }
}

/// Each figment error as "`dotted.key`: problem (source)", joined on one line.
fn one_line(err: &figment::Error) -> String {
    err.clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_ascii_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            if key.is_empty() {
                format!("{}{source}", e.kind)
            } else {
                format!("`{key}`: {}{source}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The database URL, exposed for the one place each process builds its pool.
///
/// A URL naming a loopback host (`localhost`, `127.0.0.0/8`, `::1`) and no
/// `sslmode` gets `sslmode=disable`, unless `PGSSLMODE` is set: libpq's
/// default (`prefer`) would encrypt traffic that never leaves the machine,
/// which cost about 5 % of the enqueue rate (benches/RESULTS.md, "Session
/// 10"). Name an `sslmode` in the URL to choose otherwise.
pub fn database_url(config: &Config) -> String {
    plain_on_loopback(
        config.database.url.expose_secret(),
        std::env::var_os("PGSSLMODE").is_some(),
    )
}

/// `raw` with `sslmode=disable` added when it names a loopback host and neither
/// it nor the environment (`sslmode_in_env`) chooses a mode.
fn plain_on_loopback(raw: &str, sslmode_in_env: bool) -> String {
    let Ok(url) = url::Url::parse(raw) else {
        return raw.to_owned();
    };
    // A `host` or `hostaddr` parameter overrides the URL's host (a Unix socket, say).
    let chooses = url
        .query_pairs()
        .any(|(key, _)| matches!(&*key, "sslmode" | "host" | "hostaddr"));
    let loopback = match url.host() {
        // `postgres:` is not a scheme `url` knows, so an IPv4 host arrives as a name.
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        _ => false,
    };
    if chooses || sslmode_in_env || !loopback || url.fragment().is_some() {
        return raw.to_owned();
    }
    let separator = if url.query().is_some() { '&' } else { '?' };
    format!("{raw}{separator}sslmode=disable")
}

/// The SMTP URL (it may carry credentials), exposed for the one place the pool is built.
pub fn smtp_url(config: &Config) -> String {
    config.mail.smtp_url.expose_secret().to_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// `config`'s validation error, which must be one line.
    pub(crate) fn one_line_error(config: &Config) -> String {
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }

    #[test]
    fn a_loopback_database_is_reached_without_tls_unless_a_mode_is_chosen() {
        for (raw, expected) in [
            (
                "postgres://postgres@127.0.0.1:5432/conveyor",
                "postgres://postgres@127.0.0.1:5432/conveyor?sslmode=disable",
            ),
            (
                "postgres://u:p@localhost/db?application_name=x",
                "postgres://u:p@localhost/db?application_name=x&sslmode=disable",
            ),
            ("postgres://[::1]/db", "postgres://[::1]/db?sslmode=disable"),
            (
                "postgres://127.0.0.1/db?sslmode=require",
                "postgres://127.0.0.1/db?sslmode=require",
            ),
            (
                "postgres://127.0.0.1/db?host=/run/postgresql",
                "postgres://127.0.0.1/db?host=/run/postgresql",
            ),
            ("postgres://db.internal/db", "postgres://db.internal/db"),
            ("postgres://10.0.0.7/db", "postgres://10.0.0.7/db"),
        ] {
            assert_eq!(plain_on_loopback(raw, false), expected, "{raw}");
        }
        let chosen_by_env = "postgres://127.0.0.1/db";
        assert_eq!(plain_on_loopback(chosen_by_env, true), chosen_by_env);
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn by_default_a_drain_waits_out_a_stalled_smtp_send() {
        let config = Config::default();
        assert!(
            config.worker.grace_period_ms > config.mail.smtp_timeout_ms,
            "grace period {} ms, SMTP send timeout {} ms",
            config.worker.grace_period_ms,
            config.mail.smtp_timeout_ms
        );
    }

    #[test]
    fn bad_file_value_names_the_key() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[worker]\nprefetch = \"lots\"").unwrap();
        let err = Config::load(Some(file.path())).unwrap_err().to_string();
        assert!(err.contains("worker.prefetch"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[ingress]\nadress = \"x\"").unwrap();
        let err = Config::load(Some(file.path())).unwrap_err().to_string();
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let mut config = Config::default();
        config.amqp.url = "http://x".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`amqp.url`")
        );
        let mut config = Config::default();
        config.log.level = "[[[".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`log.level`")
        );
    }

    #[test]
    fn a_quorum_group_size_of_zero_is_rejected_by_name() {
        let mut config = Config::default();
        config.amqp.quorum_initial_group_size = Some(0);
        let err = one_line_error(&config);
        assert!(err.contains("`amqp.quorum_initial_group_size`"), "{err}");
        config.amqp.quorum_initial_group_size = Some(1);
        config.validate().unwrap();
        config.amqp.quorum_initial_group_size = None;
        config.validate().unwrap();
    }

    #[test]
    fn a_rerecord_window_that_could_outlast_the_request_timeout_is_rejected_by_name() {
        let mut config = Config::default();
        config.ingress.request_timeout_ms = 10_000;
        config.validate().unwrap();
        assert_eq!(config.ingress.rerecord_within(), Duration::from_secs(5));
        config.ingress.rerecord_within_ms = Some(5_001);
        let err = one_line_error(&config);
        assert!(err.contains("`ingress.rerecord_within_ms`"), "{err}");
        config.ingress.rerecord_within_ms = Some(5_000);
        config.validate().unwrap();
    }

    #[test]
    fn an_unset_rerecord_window_keeps_the_same_margin_as_a_set_one() {
        let mut config = Config::default();
        // Unset, the window is half the timeout: 4 500 + 5 000 > 9 000.
        config.ingress.request_timeout_ms = 9_000;
        let err = one_line_error(&config);
        assert!(
            err.contains("`ingress.rerecord_within_ms`") && err.contains("unset"),
            "{err}"
        );
        assert!(
            err.contains("at most 4000") && err.contains("at least 10000"),
            "{err}"
        );
        config.ingress.rerecord_within_ms = Some(4_000);
        config.validate().unwrap();
        config.ingress.rerecord_within_ms = None;
        config.ingress.request_timeout_ms = 10_000;
        config.validate().unwrap();
        // Under the connect time, no window fits: the timeout is at fault.
        for within in [None, Some(0)] {
            config.ingress.request_timeout_ms = 1_500;
            config.ingress.rerecord_within_ms = within;
            let err = one_line_error(&config);
            assert!(err.contains("`ingress.request_timeout_ms`"), "{err}");
            assert!(err.contains("at least 5000"), "{err}");
        }
    }

    #[test]
    fn a_request_timeout_that_leaves_no_time_to_start_a_replay_is_rejected_by_name() {
        let mut config = Config::default();
        config.ingress.rerecord_within_ms = Some(0);
        // 6 000 less 600 to answer: 5 400 ms, no more than a 5 400 ms publish timeout.
        config.ingress.request_timeout_ms = 6_000;
        config.amqp.publish_timeout_ms = 5_400;
        let err = one_line_error(&config);
        assert!(
            err.contains("`ingress.request_timeout_ms`")
                && err.contains("amqp.publish_timeout_ms (5400)"),
            "{err}"
        );
        config.amqp.publish_timeout_ms = 5_399;
        config.validate().unwrap();
        // Past 20 s the time kept to answer is 2 s.
        config.scheduler.republish_after_ms = 60_000;
        config.ingress.request_timeout_ms = 30_000;
        config.amqp.publish_timeout_ms = 28_000;
        assert!(one_line_error(&config).contains("`ingress.request_timeout_ms`"));
        config.amqp.publish_timeout_ms = 27_999;
        config.validate().unwrap();
    }

    #[test]
    fn too_many_delivery_limit_resets_are_rejected_by_name() {
        let mut config = Config::default();
        config.amqp.delivery_limit_resets = MAX_DELIVERY_LIMIT_RESETS + 1;
        assert!(one_line_error(&config).contains("`amqp.delivery_limit_resets`"));
        config.amqp.delivery_limit_resets = MAX_DELIVERY_LIMIT_RESETS;
        config.validate().unwrap();
        config.amqp.delivery_limit_resets = 0;
        config.validate().unwrap();
    }

    #[test]
    fn a_prefetch_of_zero_is_rejected_by_name() {
        let mut config = Config::default();
        config.worker.prefetch = Some(0);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`worker.prefetch`"), "{err}");
        config.worker.prefetch = Some(1);
        config.validate().unwrap();
        config.worker.prefetch_per_slot = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`worker.prefetch_per_slot`"), "{err}");
    }

    #[test]
    fn a_state_linger_over_a_second_is_rejected_by_name() {
        let mut config = Config::default();
        config.worker.state_linger_ms = 1_001;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`worker.state_linger_ms`"), "{err}");
        config.worker.state_linger_ms = 0;
        config.validate().unwrap();
    }

    #[test]
    fn schedules_load_from_a_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[[schedules]]\nname = \"tick\"\ncron = \"*/2 * * * * *\"\ntask = \"diag.sleep\"\nargs = {{ ms = 5 }}\ncatch_up = \"once\"\n\n[[schedules]]\nname = \"bad\"\ncron = \"* * * * *\"\ntask = \"diag.noop\"\ntimezone = \"Nowhere/Land\""
        )
        .unwrap();
        let err = Config::load(Some(file.path())).unwrap_err().to_string();
        assert!(err.contains("`schedules[1].timezone`"), "{err}");
    }

    #[test]
    fn several_broker_nodes() {
        let mut config = Config::default();
        config.amqp.url = "amqp://a:5672/%2f, amqp://b:5672/%2f".into();
        config.amqp.shuffle_nodes = false;
        assert_eq!(
            config.amqp_urls(),
            ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
        );
        config.validate().unwrap();
    }

    #[test]
    fn shuffled_nodes_are_a_rotation() {
        let mut config = Config::default();
        config.amqp.url = "amqp://a/%2f,amqp://b/%2f,amqp://c/%2f".into();
        let urls = config.amqp_urls();
        let start = ["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"]
            .iter()
            .position(|u| *u == urls[0])
            .unwrap();
        let mut expected = vec!["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"];
        expected.rotate_left(start);
        assert_eq!(urls, expected);
        assert_eq!(config.amqp_urls(), urls, "stable within a process");
    }
}
