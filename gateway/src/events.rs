//! Data-plane events leave the request path through a bounded queue; one writer task batches
//! them onto the log. Requests never wait on disk. When the queue is full the configured policy
//! applies at the start of a request (default: 503), so no admitted request loses an event.

use std::sync::Arc;
use std::time::Duration;

use loom_schemas::codec::Registry;
use loom_schemas::event::Event;
use loom_schemas::log::{Log, Topic};
use tokio::sync::mpsc;

use crate::config::WhenEventsFull;

/// Events per append, at most.
const BATCH: usize = 512;
/// How long the writer lets a small batch grow before appending it: fewer, larger appends cost
/// far less CPU than one per request, and nobody waits on them.
const LINGER: Duration = Duration::from_millis(5);

/// The request path's handle on the event queue.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Event>,
    when_full: WhenEventsFull,
}

/// The queue was full and the policy is to refuse the request.
#[derive(Debug)]
pub struct QueueFull;

impl Emitter {
    /// Creates the queue; run the returned writer until the emitter and its clones are dropped.
    pub fn new(
        capacity: usize,
        when_full: WhenEventsFull,
        log: Arc<dyn Log>,
    ) -> (Emitter, EventWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        (Emitter { tx, when_full }, EventWriter { rx, log })
    }

    /// Queues the first event of a request, applying the full-queue policy.
    pub async fn admit(&self, event: Event) -> Result<(), QueueFull> {
        match self.when_full {
            WhenEventsFull::Wait => {
                self.emit(event).await;
                Ok(())
            }
            WhenEventsFull::Reject => self.tx.try_send(event).map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!("loom_events_rejected_requests_total").increment(1);
                    QueueFull
                }
                mpsc::error::TrySendError::Closed(_) => QueueFull,
            }),
        }
    }

    /// Queues an event of an admitted request, waiting for room if needed.
    pub async fn emit(&self, event: Event) {
        if self.tx.send(event).await.is_err() {
            tracing::error!("event writer is gone; an event was lost");
            metrics::counter!("loom_events_lost_total").increment(1);
        }
    }

    /// Queues an event without waiting (for code that cannot wait, such as a drop handler).
    /// Hands the event back if the queue is full.
    pub fn try_emit(&self, event: Event) -> Result<(), Box<Event>> {
        self.tx.try_send(event).map_err(|error| match error {
            mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event) => {
                Box::new(event)
            }
        })
    }
}

/// Drains the queue onto the log in batches.
pub struct EventWriter {
    rx: mpsc::Receiver<Event>,
    log: Arc<dyn Log>,
}

impl EventWriter {
    /// Runs until every [`Emitter`] is dropped and the queue is empty. A failed append is
    /// retried (the queue fills up meanwhile, and new requests are refused): nothing is dropped.
    pub async fn run(mut self) {
        let Ok(registry) = Registry::builtin() else {
            tracing::error!("the event schemas do not load; events cannot be written");
            return;
        };
        let mut events = Vec::with_capacity(BATCH);
        while self.rx.recv_many(&mut events, BATCH).await > 0 {
            if events.len() < BATCH {
                tokio::time::sleep(LINGER).await;
                while events.len() < BATCH {
                    match self.rx.try_recv() {
                        Ok(event) => events.push(event),
                        Err(_) => break,
                    }
                }
            }
            let mut backoff = Duration::from_millis(50);
            // The events stay in hand until the log has them; a retry encodes them again.
            let count = loop {
                let records: Vec<_> = events
                    .iter()
                    .filter_map(|event| match registry.encode_record(event) {
                        Ok(record) => Some(record),
                        Err(error) => {
                            metrics::counter!("loom_events_unencodable_total").increment(1);
                            tracing::error!(%error, event_type = event.payload.event_type(), "an event could not be encoded");
                            None
                        }
                    })
                    .collect();
                let count = records.len();
                match self.log.append(Topic::Data, records).await {
                    Ok(_) => break count,
                    Err(error) => {
                        metrics::counter!("loom_events_append_failures_total").increment(1);
                        tracing::error!(%error, count, "appending events failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            events.clear();
            metrics::counter!("loom_events_written_total").increment(count as u64);
            metrics::gauge!("loom_events_queued").set(self.rx.len() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use loom_schemas::event::{Envelope, TenantCreated};
    use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig};
    use uuid::Uuid;

    use super::*;

    fn event() -> Event {
        Event {
            envelope: Envelope::new(Uuid::now_v7(), Some("t".into()), "test"),
            payload: TenantCreated { name: "x".into() }.into(),
        }
    }

    async fn log() -> (tempfile::TempDir, Arc<dyn Log>) {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir.path()))
            .await
            .unwrap();
        (dir, Arc::new(log))
    }

    #[tokio::test]
    async fn a_full_queue_refuses_new_requests_or_makes_them_wait() {
        let (_dir, log) = log().await;
        let (emitter, writer) = Emitter::new(2, WhenEventsFull::Reject, Arc::clone(&log));
        emitter.admit(event()).await.unwrap();
        emitter.emit(event()).await;
        assert!(
            emitter.admit(event()).await.is_err(),
            "the third event finds the queue full"
        );
        assert!(emitter.try_emit(event()).is_err());
        // Once the writer drains the queue, requests are admitted again and nothing was lost.
        let writing = tokio::spawn(writer.run());
        tokio::time::timeout(Duration::from_secs(10), async {
            while emitter.admit(event()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        drop(emitter);
        writing.await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 3);

        let (emitter, writer) = Emitter::new(1, WhenEventsFull::Wait, Arc::clone(&log));
        emitter.admit(event()).await.unwrap();
        let waiting = {
            let emitter = emitter.clone();
            tokio::spawn(async move { emitter.admit(event()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "with `wait`, the request waits for room"
        );
        let writing = tokio::spawn(writer.run());
        waiting.await.unwrap().unwrap();
        drop(emitter);
        writing.await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 5);
    }
}
