//! How many unacknowledged deliveries a worker holds per queue.
//!
//! A delivery stays unacked while its job waits for a task slot, while it runs,
//! and after it finished until the commit of its state: acks follow commits.
//! The window therefore follows the concurrency of the queue's tasks, as
//! Celery's prefetch multiplier does: a queue of slow tasks with two slots
//! holds a handful of jobs, so a worker started to help with a backlog finds it
//! still in the queue, while a queue of quick tasks with hundreds of slots holds
//! enough finished jobs to keep the state commits full. A queue of tasks that
//! may run for minutes gets fewer per slot, so that no delivery waits past the
//! broker's `consumer_timeout`. `worker.prefetch` sets one window for every
//! queue instead.

use std::time::Duration;

use conveyor_platform::config::WorkerConfig;
use conveyor_tasks::Registry;

/// RabbitMQ 3.10's `consumer_timeout` (node-wide): a delivery held unacked
/// longer makes the broker close its channel, and every delivery on it is
/// redelivered, the running ones included.
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The window for `queue`: `worker.prefetch` when set, otherwise the sum over
/// the tasks on `queue` of their concurrency times `worker.prefetch_per_slot`,
/// or times fewer for a task so slow that, with that many deliveries per slot
/// each taking its whole timeout, the last would wait past
/// [`BROKER_CONSUMER_TIMEOUT`] (at least 1, at most what AMQP can express).
/// On a queue shared with quicker tasks this bounds the slow task's share, not
/// its every delivery: the window is one for the queue.
pub fn window(config: &WorkerConfig, registry: &Registry, queue: &str) -> u16 {
    if let Some(fixed) = config.prefetch {
        return fixed;
    }
    let per_slot = usize::from(config.prefetch_per_slot);
    let window: usize = registry
        .tasks()
        .map(|task| &task.descriptor().options)
        .filter(|options| options.queue == queue)
        .map(|options| {
            // With `n` deliveries of a task per slot, the last waits for n - 1
            // runs and then runs: n × timeout should stay under the broker's limit.
            let turns =
                (BROKER_CONSUMER_TIMEOUT.as_millis() - 1) / options.timeout.as_millis().max(1);
            let turns = usize::try_from(turns)
                .unwrap_or(usize::MAX)
                .min(per_slot)
                .max(1);
            options.concurrency.saturating_mul(turns)
        })
        .fold(0, usize::saturating_add);
    u16::try_from(window.max(1)).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::window;
    use conveyor_platform::config::WorkerConfig;

    fn default_window_with_noop_slots(slots: usize, config: &WorkerConfig) -> i64 {
        let mut registry = conveyor_tasks::registry();
        assert!(registry.tune("diag.noop", |o| o.concurrency = slots));
        i64::from(window(config, &registry, "default"))
    }

    #[test]
    fn each_slot_of_a_queue_adds_the_multiplier_to_its_window() {
        let config = WorkerConfig::default();
        assert_eq!(
            default_window_with_noop_slots(11, &config)
                - default_window_with_noop_slots(1, &config),
            4 * 10
        );
        let one_per_slot = WorkerConfig {
            prefetch_per_slot: 1,
            ..WorkerConfig::default()
        };
        assert_eq!(
            default_window_with_noop_slots(11, &one_per_slot)
                - default_window_with_noop_slots(1, &one_per_slot),
            10
        );
    }

    #[test]
    fn slow_tasks_get_fewer_deliveries_per_slot_than_the_consumer_timeout_allows() {
        let config = WorkerConfig::default();
        let window_with_timeout = |minutes: u64| {
            let mut registry = conveyor_tasks::registry();
            assert!(registry.tune("diag.noop", |o| {
                o.concurrency = 3;
                o.timeout = std::time::Duration::from_secs(minutes * 60);
            }));
            window(&config, &registry, "default")
        };
        // Default, 4 per slot: 4 × 5 min is under 30 min.
        let quick = window_with_timeout(5);
        // 20-minute runs: one each; 10-minute ones: two each (three would reach 30).
        assert_eq!(quick - window_with_timeout(20), 3 * (4 - 1));
        assert_eq!(quick - window_with_timeout(10), 3 * (4 - 2));
        // The mail queue: 2 planners of 10 min (two each), 4 senders of 20 min (one each).
        let mail = window(&config, &conveyor_tasks::registry(), "mail");
        assert_eq!(mail, 2 * 2 + 4);
    }

    #[test]
    fn a_set_prefetch_wins_and_the_window_stays_within_amqp() {
        let fixed = WorkerConfig {
            prefetch: Some(7),
            ..WorkerConfig::default()
        };
        assert_eq!(default_window_with_noop_slots(1, &fixed), 7);
        let config = WorkerConfig::default();
        assert_eq!(
            default_window_with_noop_slots(100_000, &config),
            i64::from(u16::MAX)
        );
        let registry = conveyor_tasks::registry();
        assert_eq!(window(&config, &registry, "no-such-queue"), 1);
    }
}
