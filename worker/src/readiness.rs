//! Whether this worker is consuming: what `/readyz` reports.
//!
//! The consume loop hands over the channels of its consumers once every one of
//! them is attached, and takes them back when it gives the connection up (a
//! consumer cancelled by the broker, a channel or connection error). A probe
//! also asks each channel whether it is still open, so a connection that just
//! dropped fails readiness at once, before the consume loop has noticed it.

use std::sync::{Arc, Mutex, PoisonError};

use lapin::Channel;

/// The consumer channels of the current connection, shared with the probes.
#[derive(Clone, Default)]
pub struct Consuming {
    /// Empty while not consuming; set when every consumer is attached, cleared
    /// when the consume loop gives its connection up or drains.
    channels: Arc<Mutex<Vec<Channel>>>,
}

impl Consuming {
    /// Every consumer is attached, on these channels.
    pub fn attached(&self, channels: Vec<Channel>) {
        *self.lock() = channels;
    }

    /// The consumers are gone (or going). Returns whether they had all been
    /// attached, i.e. whether the connection was consuming before.
    pub fn detached(&self) -> bool {
        !std::mem::take(&mut *self.lock()).is_empty()
    }

    /// True while consumers are attached and every one of their channels is open.
    pub fn is_consuming(&self) -> bool {
        let channels = self.lock();
        !channels.is_empty() && channels.iter().all(|c| c.status().connected())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Channel>> {
        // A panic elsewhere cannot leave the list half-written: keep using it.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared development broker (`make services`).
    const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    #[tokio::test]
    async fn consuming_needs_attached_consumers_on_open_channels() {
        let consuming = Consuming::default();
        assert!(!consuming.is_consuming(), "nothing attached yet");
        assert!(!consuming.detached(), "was not consuming");

        let conn = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .expect("the development broker on 5672 (make services)");
        let (a, b) = (
            conn.create_channel().await.unwrap(),
            conn.create_channel().await.unwrap(),
        );
        consuming.attached(vec![a.clone(), b.clone()]);
        assert!(consuming.is_consuming());

        // One channel closed (as the broker does on a channel error): not ready.
        b.close(200, "test".into()).await.unwrap();
        assert!(
            !consuming.is_consuming(),
            "a closed channel is not consuming"
        );

        consuming.attached(vec![a.clone()]);
        assert!(consuming.is_consuming());
        assert!(consuming.detached(), "was consuming");
        assert!(!consuming.is_consuming(), "detached");

        // The whole connection gone: every channel reports it.
        consuming.attached(vec![a]);
        conn.close(200, "test".into()).await.unwrap();
        assert!(
            !consuming.is_consuming(),
            "a closed connection is not consuming"
        );
    }
}
