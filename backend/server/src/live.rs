//! Live fan-out of job events to the open SSE streams. The database (`job_events`) is the
//! record; this only wakes the streams up without them polling. A stream that falls behind
//! (the channel overflows) catches up from the database, so nothing is lost.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::store::job_events::JobEvent;

/// How many events the channel holds for a slow stream before it has to catch up from the
/// database instead.
const CAPACITY: usize = 1024;

/// Publishes job events to every subscriber. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    sender: broadcast::Sender<Arc<JobEvent>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// A hub with no subscribers.
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    /// Sends an event to the current subscribers (none listening is fine).
    pub fn publish(&self, event: JobEvent) {
        let _ = self.sender.send(Arc::new(event));
    }

    /// Subscribes to the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.sender.subscribe()
    }
}
