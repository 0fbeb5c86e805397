//! How many unacknowledged deliveries a worker holds per queue.
//!
//! A delivery stays unacked while its job waits for a task slot, while it runs,
//! and after it finished until the commit of its state: acks follow commits.
//! The window therefore follows the concurrency of the queue's tasks, as
//! Celery's prefetch multiplier does: a queue of slow tasks with two slots
//! holds a handful of jobs, so a worker started to help with a backlog finds it
//! still in the queue, while a queue of quick tasks with hundreds of slots holds
//! enough finished jobs to keep the state commits full. `worker.prefetch` sets
//! one window for every queue instead.

use conveyor_platform::config::WorkerConfig;
use conveyor_tasks::Registry;

/// The window for `queue`: `worker.prefetch` when set, otherwise
/// `worker.prefetch_per_slot` times the concurrency of the tasks on `queue`
/// (at least 1, at most what AMQP can express).
pub fn window(config: &WorkerConfig, registry: &Registry, queue: &str) -> u16 {
    if let Some(fixed) = config.prefetch {
        return fixed;
    }
    let slots: usize = registry
        .tasks()
        .map(|task| &task.descriptor().options)
        .filter(|options| options.queue == queue)
        .map(|options| options.concurrency)
        .sum();
    let window = slots.saturating_mul(usize::from(config.prefetch_per_slot));
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
