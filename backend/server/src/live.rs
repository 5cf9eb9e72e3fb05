//! Live fan-out of job events to the open SSE streams. The database (`job_events`) is the
//! record; this only wakes the streams up without them polling. A stream that falls behind
//! (the channel overflows) catches up from the database, so nothing is lost.
//!
//! With PostgreSQL the events also cross processes: every event published is sent with
//! `NOTIFY` (in publishing order, by one task), and each process `LISTEN`s and publishes the
//! events of the other processes to its own streams. A stored event only prompts a stream to
//! read the database after the last id it sent, so one that arrives twice or late changes
//! nothing; a viewer that reconnects elsewhere resumes from `Last-Event-ID` in the database.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::AnyPool;
use tokio::sync::{broadcast, mpsc};

use crate::store::job_events::{self, JobEvent};

/// How many events the channel holds for a slow stream before it has to catch up from the
/// database instead.
const CAPACITY: usize = 1024;
/// The PostgreSQL channel job events travel on.
pub const EVENTS_CHANNEL: &str = "storygpt_events";
/// The channel that says a job was queued (workers in other processes look at the queue).
pub const JOBS_CHANNEL: &str = "storygpt_jobs";
/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;

/// Publishes job events to every subscriber. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    sender: broadcast::Sender<Arc<JobEvent>>,
    relay: Option<mpsc::UnboundedSender<Relayed>>,
    /// Tells this process's notifications from the others'.
    origin: Arc<str>,
}

enum Relayed {
    Event(String),
    JobQueued,
}

/// An event as it travels between processes.
#[derive(Serialize, Deserialize)]
struct Wire {
    origin: String,
    id: Option<i64>,
    job_id: i64,
    story_id: i64,
    kind: String,
    data: Value,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// A hub for this process alone.
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            relay: None,
            origin: Arc::from(format!(
                "{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            )),
        }
    }

    /// A hub that also sends what it publishes to the other processes sharing the
    /// PostgreSQL database behind `pool` (see [`listen`] for the receiving side).
    pub fn relayed(pool: AnyPool) -> Self {
        let (relay, mut queue) = mpsc::unbounded_channel::<Relayed>();
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                let (channel, payload) = match item {
                    Relayed::Event(payload) => (EVENTS_CHANNEL, payload),
                    Relayed::JobQueued => (JOBS_CHANNEL, String::new()),
                };
                // pg_notify returns `void`, which the Any driver cannot read: count it.
                let sent = sqlx::query("SELECT COUNT(*) FROM (SELECT pg_notify($1, $2)) AS sent")
                    .bind(channel)
                    .bind(payload)
                    .execute(&pool)
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "cannot send an event to the other processes");
                }
            }
        });
        Self {
            relay: Some(relay),
            ..Self::new()
        }
    }

    /// Sends an event to the current subscribers (none listening is fine), and to the other
    /// processes when relayed.
    pub fn publish(&self, event: JobEvent) {
        if let Some(relay) = &self.relay {
            let mut wire = Wire {
                origin: self.origin.to_string(),
                id: event.id,
                job_id: event.job_id,
                story_id: event.story_id,
                kind: event.kind.to_string(),
                data: event.data.clone(),
            };
            let mut payload = serde_json::to_string(&wire).unwrap_or_default();
            if payload.len() > MAX_PAYLOAD && wire.id.is_some() {
                // A stored event only prompts a read of the database: its data can stay home.
                wire.data = Value::Null;
                payload = serde_json::to_string(&wire).unwrap_or_default();
            }
            // A live-only event too large to send (a big preview) is not seen elsewhere.
            if payload.len() <= MAX_PAYLOAD {
                let _ = relay.send(Relayed::Event(payload));
            }
        }
        self.publish_here(event);
    }

    fn publish_here(&self, event: JobEvent) {
        let _ = self.sender.send(Arc::new(event));
    }

    /// Tells workers in other processes that a job was queued (relayed hubs only).
    pub fn job_queued(&self) {
        if let Some(relay) = &self.relay {
            let _ = relay.send(Relayed::JobQueued);
        }
    }

    /// Subscribes to the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.sender.subscribe()
    }
}

/// Listens on the PostgreSQL database at `url`: the other processes' events go to `hub`'s
/// subscribers, and `on_job_queued` runs when some process queued a job. Reconnects by
/// itself after a lost connection (sqlx's listener does); runs until the process ends.
pub async fn listen(
    url: &str,
    hub: Hub,
    on_job_queued: impl Fn() + Send + 'static,
) -> anyhow::Result<()> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen_all([EVENTS_CHANNEL, JOBS_CHANNEL]).await?;
    tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(note) if note.channel() == JOBS_CHANNEL => on_job_queued(),
                Ok(note) => {
                    let Ok(wire) = serde_json::from_str::<Wire>(note.payload()) else {
                        tracing::warn!("an event from another process could not be read");
                        continue;
                    };
                    if *wire.origin == *hub.origin {
                        continue;
                    }
                    hub.publish_here(JobEvent {
                        id: wire.id,
                        job_id: wire.job_id,
                        story_id: wire.story_id,
                        kind: job_events::known_kind(&wire.kind),
                        data: wire.data,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the event listener's connection; reconnecting");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}
