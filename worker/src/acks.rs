//! Batched acknowledgements: one `basic.ack multiple` for many deliveries.
//!
//! Acking each delivery on its own costs RabbitMQ about twice as much per
//! message as acking in batches (`bench-broker --ack-batch 1` against `250`,
//! benches/RESULTS.md), and the worker must still ack a delivery only after the
//! commit that records its outcome. Deliveries finish out of order, so each
//! consume channel keeps a watermark: every delivery is registered when it
//! arrives, marked *ready* once its outcome is committed, and the flusher acks
//! `multiple` up to the highest ready tag below the lowest delivery still
//! running. A ready delivery stuck above a long-running one is acked on its own
//! after [`STRAGGLER`], so a slow job never holds the prefetch window.
//!
//! A delivery that is returned to the queue (`nack`) stays registered until the
//! nack has been sent, so a `multiple` ack can never cover it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A ready delivery above a running one is acked on its own after this long.
pub const STRAGGLER: Duration = Duration::from_millis(50);
/// The flusher sends at most one batch per this interval, so acks coalesce under load.
const COALESCE: Duration = Duration::from_millis(1);

/// The acknowledgements of one consume channel.
pub struct ChannelAcks {
    channel: Channel,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Delivered and not yet settled (neither ready nor returned).
    running: BTreeSet<u64>,
    /// Settled for ack, not yet acked to the broker, with the time it became ready.
    ready: BTreeMap<u64, Instant>,
}

/// What one flush sends.
#[derive(Debug, Default, PartialEq, Eq)]
struct Batch {
    /// `basic.ack multiple` up to this tag.
    multiple: Option<u64>,
    /// Tags acked one by one (stragglers above a running delivery).
    singles: Vec<u64>,
}

impl State {
    /// Takes out what can be acked now: everything ready below the lowest
    /// running tag as one `multiple` ack, plus ready tags above it that have
    /// waited at least `straggler`.
    fn take(&mut self, now: Instant, straggler: Duration) -> Batch {
        let floor = self.running.first().copied().unwrap_or(u64::MAX);
        let above = self.ready.split_off(&floor);
        let multiple = self.ready.keys().next_back().copied();
        self.ready = above;
        let singles: Vec<u64> = self
            .ready
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= straggler)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in &singles {
            self.ready.remove(tag);
        }
        Batch { multiple, singles }
    }
}

impl ChannelAcks {
    /// Acks for `channel`; the flusher runs until `stop` is cancelled (it flushes once more then).
    pub fn start(channel: Channel, stop: CancellationToken) -> Arc<Self> {
        let acks = Arc::new(Self {
            channel,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        tokio::spawn(flusher(acks.clone(), stop));
        acks
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a delivery as it arrives, before anything can settle it.
    pub fn delivered(&self, tag: u64) {
        self.state().running.insert(tag);
    }

    /// The delivery's outcome is committed: ack it with the next batch.
    pub fn ack(&self, tag: u64) {
        {
            let mut state = self.state();
            state.running.remove(&tag);
            state.ready.insert(tag, Instant::now());
        }
        self.wake.notify_one();
    }

    /// Returns the delivery to its queue now, then forgets it.
    pub async fn requeue(&self, tag: u64) {
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        if let Err(err) = self.channel.basic_nack(tag, options).await {
            tracing::debug!(error = %err, "nack failed");
        }
        self.state().running.remove(&tag);
        self.wake.notify_one();
    }

    /// Sends everything that can be acked now.
    pub async fn flush(&self) {
        let batch = self.state().take(Instant::now(), STRAGGLER);
        if let Some(tag) = batch.multiple {
            self.send(tag, true).await;
        }
        for tag in batch.singles {
            self.send(tag, false).await;
        }
    }

    /// True while some ready delivery waits behind a running one.
    fn has_stragglers(&self) -> bool {
        !self.state().ready.is_empty()
    }

    async fn send(&self, tag: u64, multiple: bool) {
        if let Err(err) = self
            .channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
        {
            // The channel is gone; the broker redelivers, and the redelivery check skips finished work.
            tracing::debug!(error = %err, tag, multiple, "ack failed");
        }
    }
}

async fn flusher(acks: Arc<ChannelAcks>, stop: CancellationToken) {
    loop {
        let stragglers = acks.has_stragglers();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = acks.wake.notified() => {}
            _ = tokio::time::sleep(STRAGGLER), if stragglers => {}
        }
        acks.flush().await;
        tokio::time::sleep(COALESCE).await;
    }
    acks.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(running: &[u64], ready: &[u64], at: Instant) -> State {
        State {
            running: running.iter().copied().collect(),
            ready: ready.iter().map(|t| (*t, at)).collect(),
        }
    }

    #[test]
    fn everything_ready_goes_in_one_multiple_ack() {
        let now = Instant::now();
        let mut s = state(&[], &[1, 2, 3, 5], now);
        let batch = s.take(now, STRAGGLER);
        assert_eq!(batch.multiple, Some(5));
        assert!(batch.singles.is_empty());
        assert!(s.ready.is_empty());
    }

    #[test]
    fn a_running_delivery_caps_the_multiple_ack_below_it() {
        let now = Instant::now();
        let mut s = state(&[4], &[1, 2, 3, 5, 6], now);
        let batch = s.take(now, STRAGGLER);
        assert_eq!(batch.multiple, Some(3), "4 is still running");
        assert!(batch.singles.is_empty(), "5 and 6 have not waited long");
        assert_eq!(s.ready.keys().copied().collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn stragglers_above_a_running_delivery_are_acked_alone_after_waiting() {
        let then = Instant::now();
        let later = then + STRAGGLER;
        let mut s = state(&[1], &[2, 3], then);
        let batch = s.take(later, STRAGGLER);
        assert_eq!(batch.multiple, None, "nothing below the running delivery 1");
        assert_eq!(batch.singles, [2, 3]);
        assert!(s.ready.is_empty());
    }

    #[test]
    fn nothing_to_send_when_nothing_is_ready() {
        let now = Instant::now();
        let mut s = state(&[1, 2], &[], now);
        assert_eq!(s.take(now, STRAGGLER), Batch::default());
    }
}
