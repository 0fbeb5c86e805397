//! Queue and exchange names and their arguments: the broker-side half of the contract.
//!
//! For each logical queue `q` in namespace `ns`:
//! - `ns.q`, the work queue: quorum, with a delivery limit (a crash-loop guard)
//!   and at-least-once dead-lettering to `ns.q.dlq-inbox`;
//! - `ns.q.dlq-inbox`, where the broker puts what it dead-letters itself (the
//!   delivery limit). Workers consume it, record each message in `dead_jobs`
//!   and only then move it on to `ns.q.dlq`, so that every message in the
//!   `.dlq` has its record in PostgreSQL. The inbox has the same delivery
//!   limit and at-least-once dead-lettering, straight to `ns.q.dlq`: a message
//!   that workers keep failing to move (the database down for its whole
//!   limit, a crash loop) ends in the `.dlq` without its record rather than
//!   looping in the inbox forever or being dropped;
//! - `ns.q.dlq`, where dead jobs wait for RabbitMQ-native tooling. Workers
//!   publish jobs they give up on straight here, committing the record with the
//!   job's `dead` state.
//!
//! Shared by all queues, the broker-side delay for retries:
//! - `ns.delay`, a headers exchange, routes a message by its `conveyor-delay`
//!   header to one of the fixed-TTL queues `ns.delay.<ms>`;
//! - when the TTL expires, the message is dead-lettered (at least once) to
//!   `ns.retry`, a direct exchange, with its original routing key, which is the
//!   work queue's name, and so lands back in its work queue.
//!
//! Nothing waits in worker memory, so a delayed retry survives every process
//! being killed. Declaring is idempotent; ingress and worker both do it at start-up.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::DELAY_HEADER;

/// The fixed delays available for retries, in milliseconds.
pub const DELAY_LEVELS_MS: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 900_000,
    1_800_000, 3_600_000,
];

/// The delay level used for a wanted delay: the largest level not above it
/// (never below the smallest level).
pub fn delay_level_for(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    DELAY_LEVELS_MS
        .iter()
        .copied()
        .rev()
        .find(|level| *level <= ms)
        .unwrap_or(DELAY_LEVELS_MS[0])
}

/// How long declaring the topology may take before a (re)connect gives up on it.
pub const DECLARE_TIMEOUT: Duration = Duration::from_secs(20);

/// Names and arguments of everything Conveyor declares on the broker.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Name prefix.
    pub namespace: String,
    /// Logical work queues.
    pub queues: Vec<String>,
    /// `x-delivery-limit` of the work queues.
    pub delivery_limit: u32,
    /// `x-quorum-initial-group-size`, when set.
    pub quorum_group_size: Option<u32>,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_owned()))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn key(s: &str) -> ShortString {
    ShortString::from(s.to_owned())
}

impl Topology {
    /// The topology of `config`: one work queue per queue named in the task catalogue.
    pub fn for_config(config: &crate::Config) -> Self {
        let queues: std::collections::BTreeSet<String> = conveyor_schema::catalogue()
            .iter()
            .map(|task| task.options.queue.to_owned())
            .collect();
        Self {
            namespace: config.namespace.clone(),
            queues: queues.into_iter().collect(),
            delivery_limit: config.amqp.delivery_limit,
            quorum_group_size: config.amqp.quorum_initial_group_size,
        }
    }

    /// The broker name of logical queue `queue`.
    pub fn work_queue(&self, queue: &str) -> String {
        format!("{}.{queue}", self.namespace)
    }

    /// The dead-letter queue of logical queue `queue`.
    pub fn dead_letter_queue(&self, queue: &str) -> String {
        format!("{}.{queue}.dlq", self.namespace)
    }

    /// Where the broker dead-letters messages of logical queue `queue` (delivery
    /// limit); a worker records each and moves it to the dead-letter queue.
    pub fn dead_letter_inbox(&self, queue: &str) -> String {
        format!("{}.{queue}.dlq-inbox", self.namespace)
    }

    /// The headers exchange that routes to delay queues.
    pub fn delay_exchange(&self) -> String {
        format!("{}.delay", self.namespace)
    }

    /// The direct exchange expired delays are dead-lettered to.
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.namespace)
    }

    /// The delay queue holding messages for `level_ms`.
    pub fn delay_queue(&self, level_ms: u64) -> String {
        format!("{}.delay.{level_ms}", self.namespace)
    }

    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(key("x-queue-type"), long("quorum"));
        if let Some(size) = self.quorum_group_size {
            args.insert(
                key("x-quorum-initial-group-size"),
                AMQPValue::LongInt(size.try_into().unwrap_or(i32::MAX)),
            );
        }
        args
    }

    fn at_least_once(args: &mut FieldTable) {
        args.insert(key("x-dead-letter-strategy"), long("at-least-once"));
        args.insert(key("x-overflow"), long("reject-publish"));
    }

    /// The arguments of a work queue (exposed for tests and tooling).
    pub fn work_queue_args(&self, queue: &str) -> FieldTable {
        self.limited_args(&self.dead_letter_inbox(queue))
    }

    /// The arguments of a dead-letter inbox: the work queue's delivery limit,
    /// then at-least-once dead-lettering straight to the dead-letter queue.
    pub fn dead_letter_inbox_args(&self, queue: &str) -> FieldTable {
        self.limited_args(&self.dead_letter_queue(queue))
    }

    /// A quorum queue with the delivery limit that dead-letters, at least
    /// once, to the queue `dead_letters_to`.
    fn limited_args(&self, dead_letters_to: &str) -> FieldTable {
        let mut args = self.quorum_args();
        args.insert(
            key("x-delivery-limit"),
            AMQPValue::LongInt(self.delivery_limit.try_into().unwrap_or(i32::MAX)),
        );
        args.insert(key("x-dead-letter-exchange"), long(""));
        args.insert(key("x-dead-letter-routing-key"), long(dead_letters_to));
        Self::at_least_once(&mut args);
        args
    }

    /// Declares the topology on a channel of its own on `connection`, the way
    /// a (re)connecting process needs it.
    ///
    /// On a process's first connection (`first`) it waits, up to
    /// `DECLARE_TIMEOUT`, and fails on any error, so a misconfiguration stops
    /// the start. On a reconnect the topology already exists unless the broker
    /// lost its definitions, and declaring can stall for seconds while quorum
    /// queues elect new leaders after a node loss (the broker asks each queue's
    /// leader for its counts to answer `declare-ok`), so it runs in the
    /// background and the caller resumes publishing or consuming at once. A
    /// caller that learnt the definitions are gone (the broker answered
    /// NOT_FOUND) passes `first` again to wait for them.
    ///
    /// Each dead-letter inbox is declared on a channel of its own and an inbox
    /// left by an older release is kept (see `declare_inbox_tolerantly`).
    pub async fn declare_on(&self, connection: &Connection, first: bool) -> anyhow::Result<()> {
        let channel = connection.create_channel().await?;
        let mut inbox_channels = Vec::with_capacity(self.queues.len());
        for _ in &self.queues {
            inbox_channels.push(connection.create_channel().await?);
        }
        let topology = self.clone();
        let declare = async move {
            let declared = tokio::time::timeout(DECLARE_TIMEOUT, async {
                topology.declare_except_inboxes(&channel).await?;
                for (queue, inbox_channel) in topology.queues.iter().zip(&inbox_channels) {
                    topology
                        .declare_inbox_tolerantly(inbox_channel, queue)
                        .await?;
                }
                anyhow::Ok(())
            })
            .await;
            super::close_channel_quietly(&channel, "topology declared").await;
            for inbox_channel in &inbox_channels {
                super::close_channel_quietly(inbox_channel, "topology declared").await;
            }
            match declared {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!(
                    "declaring the queues took longer than {DECLARE_TIMEOUT:?}"
                )),
            }
        };
        if first {
            return declare.await;
        }
        tokio::spawn(async move {
            if let Err(err) = declare.await {
                tracing::warn!(error = %err, "re-declaring the topology after a reconnect failed");
            }
        });
        Ok(())
    }

    /// Declares every exchange, queue and binding; idempotent. Strict: an
    /// existing queue with other arguments is an error (unlike [`Self::declare_on`]).
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_except_inboxes(channel).await?;
        for queue in &self.queues {
            channel
                .queue_declare(
                    key(&self.dead_letter_inbox(queue)),
                    durable(),
                    self.dead_letter_inbox_args(queue),
                )
                .await?;
        }
        Ok(())
    }

    /// Declares the dead-letter inbox of `queue` on `channel`, its own: a
    /// release before the inbox had a delivery limit declared it with other
    /// arguments, which the broker refuses to change (`PRECONDITION_FAILED`,
    /// closing the channel). Such an inbox is kept, with a warning, and keeps
    /// working without the limit, so that an upgrade does not stop every
    /// process from starting and a rollback still finds the inbox it knows.
    /// Deleting it when empty lets the next start declare it with the limit.
    async fn declare_inbox_tolerantly(&self, channel: &Channel, queue: &str) -> anyhow::Result<()> {
        let name = self.dead_letter_inbox(queue);
        let declared = channel
            .queue_declare(key(&name), durable(), self.dead_letter_inbox_args(queue))
            .await;
        match declared {
            Ok(_) => Ok(()),
            Err(err) if err.to_string().contains("inequivalent arg") => {
                tracing::warn!(
                    queue = %name,
                    error = %err,
                    "this dead-letter inbox was declared by an older release, without a delivery limit; \
                     it keeps working as it is. Delete it when empty (`rabbitmqctl delete_queue {name} --if-empty`) \
                     once no older release will run, and the next start declares it with the limit"
                );
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Everything but the dead-letter inboxes.
    async fn declare_except_inboxes(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = durable();
        let exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                key(&self.delay_exchange()),
                ExchangeKind::Headers,
                exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                key(&self.retry_exchange()),
                ExchangeKind::Direct,
                exchange,
                FieldTable::default(),
            )
            .await?;
        for level in DELAY_LEVELS_MS {
            let name = self.delay_queue(level);
            let mut args = self.quorum_args();
            args.insert(
                key("x-message-ttl"),
                AMQPValue::LongLongInt(level.try_into().unwrap_or(i64::MAX)),
            );
            args.insert(key("x-dead-letter-exchange"), long(&self.retry_exchange()));
            Self::at_least_once(&mut args);
            channel.queue_declare(key(&name), durable, args).await?;
            let mut binding = FieldTable::default();
            binding.insert(key("x-match"), long("all"));
            binding.insert(key(DELAY_HEADER), long(&level.to_string()));
            channel
                .queue_bind(
                    key(&name),
                    key(&self.delay_exchange()),
                    key(""),
                    QueueBindOptions::default(),
                    binding,
                )
                .await?;
        }
        for queue in &self.queues {
            // Before the inbox, which dead-letters to it.
            channel
                .queue_declare(
                    key(&self.dead_letter_queue(queue)),
                    durable,
                    self.quorum_args(),
                )
                .await?;
            let work = self.work_queue(queue);
            channel
                .queue_declare(key(&work), durable, self.work_queue_args(queue))
                .await?;
            channel
                .queue_bind(
                    key(&work),
                    key(&self.retry_exchange()),
                    key(&work),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Every queue [`declare`](Self::declare) creates: each logical queue's
    /// work queue, dead-letter queue and inbox, then the delay queues.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = Vec::with_capacity(self.queues.len() * 3 + DELAY_LEVELS_MS.len());
        for queue in &self.queues {
            names.push(self.work_queue(queue));
            names.push(self.dead_letter_queue(queue));
            names.push(self.dead_letter_inbox(queue));
        }
        names.extend(DELAY_LEVELS_MS.iter().map(|level| self.delay_queue(*level)));
        names
    }

    /// Every exchange [`declare`](Self::declare) creates.
    pub fn exchange_names(&self) -> [String; 2] {
        [self.delay_exchange(), self.retry_exchange()]
    }

    /// Deletes everything [`declare`](Self::declare) created (tests and teardown).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in self.queue_names() {
            channel
                .queue_delete(key(&queue), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in self.exchange_names() {
            channel
                .exchange_delete(key(&exchange), Default::default())
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_levels_round_down() {
        assert_eq!(delay_level_for(Duration::from_millis(10)), 100);
        assert_eq!(delay_level_for(Duration::from_millis(400)), 250);
        assert_eq!(delay_level_for(Duration::from_secs(1)), 1_000);
        assert_eq!(delay_level_for(Duration::from_secs(86_400)), 3_600_000);
    }

    fn topology(quorum_group_size: Option<u32>) -> Topology {
        Topology {
            namespace: "ns".into(),
            queues: vec!["default".into()],
            delivery_limit: 5,
            quorum_group_size,
        }
    }

    #[test]
    fn work_queue_args_carry_the_group_size_only_when_configured() {
        let group_size = key("x-quorum-initial-group-size");
        let configured = topology(Some(3)).work_queue_args("default");
        assert_eq!(
            configured.inner().get(&group_size),
            Some(&AMQPValue::LongInt(3))
        );
        assert_eq!(
            configured.inner().get(&key("x-queue-type")),
            Some(&long("quorum"))
        );
        let unset = topology(None).work_queue_args("default");
        assert_eq!(unset.inner().get(&group_size), None);
        assert_eq!(
            unset.inner().get(&key("x-queue-type")),
            Some(&long("quorum")),
            "still a quorum queue"
        );
    }
}
