//! Data-plane events leave the request path through a bounded queue, already encoded; one writer,
//! on a thread of its own, appends them to the log with group commit: as soon as an event that an
//! answer waits for is queued, it appends it with everything queued before it, and whatever
//! arrives while an append is in flight goes into the next one. Events nobody waits for do not wake
//! the writer: they go with the next answer's, or within 5 ms (100 ms after the writer last found
//! the queue empty). A request's answer waits until its last event is recorded
//! ([`Emitter::record`], per [`EventsAck`]); the events queued before it are in the same append
//! or an earlier one, so they are recorded too. When the queue is full the configured policy
//! applies at the start of a request (default: 503), so no admitted request loses an event.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use loom_schemas::codec::{CodecError, Registry};
use loom_schemas::event::Event;
use loom_schemas::log::{EmbeddedLog, Log, LogError, Record, Topic};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::config::{EventsAck, LimitsConfig, WhenEventsFull};

/// Events per append, at most.
const BATCH: usize = 512;
/// How long events nobody waits for may wait for company: fewer, larger appends cost far less
/// CPU than one per event.
const LINGER: Duration = Duration::from_millis(5);
/// How long the writer sleeps when it found nothing to write (unless an answer rings for it).
const IDLE: Duration = Duration::from_millis(100);

/// An event in the queue, encoded (on the request's task, so that the one writer only appends),
/// with whoever waits for it to be recorded.
struct Queued {
    /// The data topic, or the quota topic for the quota ledger's events.
    topic: Topic,
    record: Record,
    recorded: Option<oneshot::Sender<()>>,
}

/// Wakes the writer when an answer waits for its events (or the queue is filling up), and only
/// then: the writer sleeps through the events nobody waits for, which it takes with the next
/// answer's or after [`LINGER`] ([`IDLE`] when it last found nothing). One wake-up per answer,
/// not one per event.
#[derive(Default)]
struct Doorbell {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        if let Ok(mut rung) = self.rung.lock() {
            *rung = true;
        }
        self.bell.notify_one();
    }

    /// Blocks until rung or `timeout` has passed, and clears the bell.
    fn wait(&self, timeout: Duration) {
        let Ok(rung) = self.rung.lock() else {
            return;
        };
        if let Ok((mut rung, _)) = self.bell.wait_timeout_while(rung, timeout, |rung| !*rung) {
            *rung = false;
        }
    }
}

/// The request path's handle on the event queue.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Queued>,
    doorbell: Arc<Doorbell>,
    registry: &'static Registry,
    when_full: WhenEventsFull,
    ack: EventsAck,
    ack_timeout: Duration,
}

/// The queue was full and the policy is to refuse the request.
#[derive(Debug)]
pub struct QueueFull;

/// A request's events were not recorded in time (or the writer is gone): its answer must not go
/// out as if they were.
#[derive(Debug)]
pub struct Unrecorded;

impl Emitter {
    /// Creates the queue; run the returned writer until the emitter and its clones are dropped.
    /// `embedded` is `log` itself when it is the embedded log: the writer then appends to it on
    /// its own thread without a hand-off.
    pub fn new(
        limits: &LimitsConfig,
        log: Arc<dyn Log>,
        embedded: Option<Arc<EmbeddedLog>>,
    ) -> Result<(Emitter, EventWriter), CodecError> {
        let (tx, rx) = mpsc::channel(limits.events_capacity);
        let doorbell = Arc::new(Doorbell::default());
        let emitter = Emitter {
            tx,
            doorbell: Arc::clone(&doorbell),
            registry: Registry::builtin()?,
            when_full: limits.when_events_full,
            ack: limits.events_ack,
            ack_timeout: limits.events_ack_timeout,
        };
        let writer = EventWriter {
            rx,
            doorbell,
            log,
            embedded,
            ack: limits.events_ack,
        };
        Ok((emitter, writer))
    }

    /// The event as a log record; `None` (counted and logged) if it does not encode, which only
    /// a bug can cause.
    fn encode(&self, event: &Event, recorded: Option<oneshot::Sender<()>>) -> Option<Queued> {
        match self.registry.encode_record(event) {
            Ok(record) => Some(Queued {
                topic: Topic::for_plane(event.payload.plane()),
                record,
                recorded,
            }),
            Err(error) => {
                metrics::counter!("loom_events_unencodable_total").increment(1);
                tracing::error!(%error, event_type = event.payload.event_type(), "an event could not be encoded");
                None
            }
        }
    }

    /// Rings for the writer once the queue is three-quarters full, so that it never waits for
    /// [`LINGER`] with a full queue.
    fn ring_if_filling(&self) {
        if self.tx.capacity() < self.tx.max_capacity() / 4 {
            self.doorbell.ring();
        }
    }

    /// Queues the first event of a request, applying the full-queue policy.
    pub async fn admit(&self, event: Event) -> Result<(), QueueFull> {
        match self.when_full {
            WhenEventsFull::Wait => {
                self.emit(event).await;
                Ok(())
            }
            WhenEventsFull::Reject => {
                let Some(queued) = self.encode(&event, None) else {
                    return Ok(());
                };
                let sent = self.tx.try_send(queued).map_err(|error| match error {
                    mpsc::error::TrySendError::Full(_) => {
                        metrics::counter!("loom_events_rejected_requests_total").increment(1);
                        QueueFull
                    }
                    mpsc::error::TrySendError::Closed(_) => QueueFull,
                });
                self.ring_if_filling();
                sent
            }
        }
    }

    /// Queues an event of an admitted request, waiting for room if needed.
    pub async fn emit(&self, event: Event) {
        let Some(queued) = self.encode(&event, None) else {
            return;
        };
        if self.tx.send(queued).await.is_err() {
            tracing::error!("event writer is gone; an event was lost");
            metrics::counter!("loom_events_lost_total").increment(1);
        }
        self.ring_if_filling();
    }

    /// Queues the last event of a request and waits until it is recorded, with every event
    /// queued before it (at once with `--events-ack none`). The request's answer goes out only
    /// after this returns `Ok`.
    pub async fn record(&self, event: Event) -> Result<(), Unrecorded> {
        if self.ack == EventsAck::None {
            self.emit(event).await;
            return Ok(());
        }
        let started = Instant::now();
        let (recorded, done) = oneshot::channel();
        let queued = self.encode(&event, Some(recorded)).ok_or(Unrecorded)?;
        let waited = tokio::time::timeout(self.ack_timeout, async {
            self.tx.send(queued).await.map_err(|_| Unrecorded)?;
            self.doorbell.ring();
            done.await.map_err(|_| Unrecorded)
        })
        .await;
        metrics::histogram!("loom_events_ack_wait_seconds").record(started.elapsed().as_secs_f64());
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Unrecorded)) | Err(_) => {
                metrics::counter!("loom_events_unrecorded_answers_total").increment(1);
                tracing::error!(
                    timeout = ?self.ack_timeout,
                    "a request's events were not recorded in time; answering 503"
                );
                Err(Unrecorded)
            }
        }
    }

    /// Queues an event without waiting (for code that cannot wait, such as a drop handler).
    /// Hands the event back if the queue is full.
    pub fn try_emit(&self, event: Event) -> Result<(), Box<Event>> {
        let Some(queued) = self.encode(&event, None) else {
            return Ok(());
        };
        let sent = self.tx.try_send(queued).map_err(|_| Box::new(event));
        self.ring_if_filling();
        sent
    }
}

/// Drains the queue onto the log in batches.
pub struct EventWriter {
    rx: mpsc::Receiver<Queued>,
    doorbell: Arc<Doorbell>,
    log: Arc<dyn Log>,
    embedded: Option<Arc<EmbeddedLog>>,
    ack: EventsAck,
}

impl EventWriter {
    /// Runs the writer on a thread of its own (taken from tokio's blocking pool, tracked by
    /// `tasks`) until every [`Emitter`] is dropped and the queue is empty. On its own thread it
    /// appends to the embedded log directly: an answer waits for one wake-up of the writer and
    /// the write, not for hand-offs between threads that compete for the cores. A failed append
    /// is retried (the queue fills up meanwhile, and new requests are refused): nothing is
    /// dropped.
    pub fn spawn(self, tasks: &TaskTracker) -> tokio::task::JoinHandle<()> {
        let runtime = tokio::runtime::Handle::current();
        tasks.spawn_blocking(move || runtime.block_on(self.run()))
    }

    /// The writer's loop; only ever on the thread `spawn` gives it, since it blocks.
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut wait = Some(IDLE);
        loop {
            if let Some(timeout) = wait {
                self.doorbell.wait(timeout);
            }
            let open = self.take(&mut batch);
            wait = match batch.len() {
                0 if !open => return,
                0 => Some(IDLE),
                // A full batch leaves more behind: take it at once.
                BATCH => None,
                _ => Some(LINGER),
            };
            if batch.is_empty() {
                continue;
            }
            self.append(&batch).await;
            let durable = match self.ack {
                EventsAck::Fsynced => self.sync().await.map_err(|error| {
                    metrics::counter!("loom_events_sync_failures_total").increment(1);
                    tracing::error!(%error, "syncing the log failed; the waiting answers get 503");
                }),
                EventsAck::Recorded | EventsAck::None => Ok(()),
            };
            metrics::counter!("loom_events_written_total").increment(batch.len() as u64);
            for queued in batch.drain(..) {
                if let (Some(recorded), Ok(())) = (queued.recorded, durable) {
                    let _ = recorded.send(());
                }
            }
            metrics::gauge!("loom_events_queued").set(self.rx.len() as f64);
        }
    }

    /// Takes what is queued, up to [`BATCH`]; `false` once the queue is empty and every
    /// [`Emitter`] is gone.
    fn take(&mut self, batch: &mut Vec<Queued>) -> bool {
        while batch.len() < BATCH {
            match self.rx.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    async fn sync(&self) -> Result<(), LogError> {
        match &self.embedded {
            Some(log) => log.sync_blocking(),
            None => self.log.sync().await,
        }
    }

    /// Appends a batch, each event to its topic, retrying until the log takes it (a topic
    /// appended is not appended again).
    async fn append(&self, batch: &[Queued]) {
        for topic in Topic::ALL {
            let records: Vec<&Record> = batch
                .iter()
                .filter(|queued| queued.topic == topic)
                .map(|queued| &queued.record)
                .collect();
            if !records.is_empty() {
                self.append_to(topic, &records).await;
            }
        }
    }

    async fn append_to(&self, topic: Topic, records: &[&Record]) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let appended = match &self.embedded {
                // On the writer's own thread (see `spawn`): blocking is fine here.
                Some(log) => log.append_blocking(topic, records).map(drop),
                None => {
                    let records = records.iter().map(|record| (*record).clone()).collect();
                    self.log.append(topic, records).await.map(drop)
                }
            };
            match appended {
                Ok(()) => return,
                Err(error) => {
                    metrics::counter!("loom_events_append_failures_total").increment(1);
                    tracing::error!(%error, topic = topic.name(), count = records.len(), "appending events failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use loom_schemas::event::{Envelope, PolicyAction, PolicyEvaluated};
    use loom_schemas::log::{
        EmbeddedLog, EmbeddedLogConfig, GroupReader, LogError, LogReader, Position,
    };
    use uuid::Uuid;

    use super::*;

    fn event() -> Event {
        Event {
            envelope: Envelope::new(Uuid::now_v7(), Some("t".into()), "test"),
            payload: PolicyEvaluated {
                project_id: None,
                action: PolicyAction::Allow,
                findings: Vec::new(),
                latency_us: 0,
                direction: "prompt".into(),
            }
            .into(),
        }
    }

    fn limits(capacity: usize, when_full: WhenEventsFull, ack: EventsAck) -> LimitsConfig {
        LimitsConfig {
            events_capacity: capacity,
            when_events_full: when_full,
            events_ack: ack,
            events_ack_timeout: Duration::from_secs(10),
            ..LimitsConfig::default()
        }
    }

    async fn log() -> (tempfile::TempDir, Arc<EmbeddedLog>) {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(
            dir.path(),
            loom_schemas::log::ChainKey::new([1; 32]),
        ))
        .await
        .unwrap();
        (dir, Arc::new(log))
    }

    #[tokio::test]
    async fn a_full_queue_refuses_new_requests_or_makes_them_wait() {
        let (_dir, log) = log().await;
        let config = limits(2, WhenEventsFull::Reject, EventsAck::Recorded);
        let (emitter, writer) = Emitter::new(
            &config,
            Arc::clone(&log) as Arc<dyn Log>,
            Some(Arc::clone(&log)),
        )
        .unwrap();
        emitter.admit(event()).await.unwrap();
        emitter.emit(event()).await;
        assert!(
            emitter.admit(event()).await.is_err(),
            "the third event finds the queue full"
        );
        assert!(emitter.try_emit(event()).is_err());
        // Once the writer drains the queue, requests are admitted again and nothing was lost.
        let writing = writer.spawn(&TaskTracker::new());
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

        let config = limits(1, WhenEventsFull::Wait, EventsAck::Recorded);
        let (emitter, writer) = Emitter::new(
            &config,
            Arc::clone(&log) as Arc<dyn Log>,
            Some(Arc::clone(&log)),
        )
        .unwrap();
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
        let writing = writer.spawn(&TaskTracker::new());
        waiting.await.unwrap().unwrap();
        drop(emitter);
        writing.await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 5);
    }

    /// A log that counts syncs and can hold appends back, around the real embedded log.
    struct Observed {
        inner: Arc<dyn Log>,
        syncs: AtomicUsize,
        hold: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl Log for Observed {
        fn partitions(&self, topic: Topic) -> u32 {
            self.inner.partitions(topic)
        }
        async fn append(
            &self,
            topic: Topic,
            records: Vec<Record>,
        ) -> Result<Vec<Position>, LogError> {
            let _permit = self.hold.acquire().await;
            self.inner.append(topic, records).await
        }
        async fn end_offset(&self, topic: Topic, partition: u32) -> Result<u64, LogError> {
            self.inner.end_offset(topic, partition).await
        }
        async fn read_from(
            &self,
            topic: Topic,
            partition: u32,
            offset: u64,
        ) -> Result<Box<dyn LogReader>, LogError> {
            self.inner.read_from(topic, partition, offset).await
        }
        async fn sync(&self) -> Result<(), LogError> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            self.inner.sync().await
        }
        async fn join_group(
            &self,
            group: &str,
            topic: Topic,
        ) -> Result<Box<dyn GroupReader>, LogError> {
            self.inner.join_group(group, topic).await
        }
    }

    async fn observed() -> (tempfile::TempDir, Arc<Observed>) {
        let (dir, inner) = log().await;
        let inner: Arc<dyn Log> = inner;
        let log = Arc::new(Observed {
            inner,
            syncs: AtomicUsize::new(0),
            hold: tokio::sync::Semaphore::new(0),
        });
        (dir, log)
    }

    #[tokio::test]
    async fn an_answer_waits_until_its_events_and_those_before_are_in_the_log() {
        for ack in [EventsAck::Recorded, EventsAck::Fsynced] {
            let (_dir, log) = observed().await;
            let (emitter, writer) = Emitter::new(
                &limits(64, WhenEventsFull::Reject, ack),
                Arc::clone(&log) as Arc<dyn Log>,
                None,
            )
            .unwrap();
            let writing = writer.spawn(&TaskTracker::new());
            emitter.admit(event()).await.unwrap();
            emitter.emit(event()).await;
            let answering = {
                let emitter = emitter.clone();
                tokio::spawn(async move { emitter.record(event()).await })
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !answering.is_finished(),
                "{ack}: the answer waits while the log holds the append back"
            );
            log.hold.add_permits(1000);
            answering.await.unwrap().unwrap();
            // Recorded means readable: all three events are in the log when the answer goes.
            assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 3, "{ack}");
            let syncs = log.syncs.load(Ordering::SeqCst);
            match ack {
                EventsAck::Fsynced => assert!(syncs >= 1, "fsynced answers wait for a sync"),
                _ => assert_eq!(syncs, 0, "recorded answers do not wait for a sync"),
            }
            drop(emitter);
            writing.await.unwrap();
        }
    }

    #[tokio::test]
    async fn events_nobody_waits_for_are_written_without_an_answer_and_all_before_the_writer_ends()
    {
        let (_dir, log) = log().await;
        let (emitter, writer) = Emitter::new(
            &limits(1024, WhenEventsFull::Wait, EventsAck::Recorded),
            Arc::clone(&log) as Arc<dyn Log>,
            Some(Arc::clone(&log)),
        )
        .unwrap();
        let writing = writer.spawn(&TaskTracker::new());
        emitter.emit(event()).await;
        // Nothing rings for it: the writer takes it on its own (the minute is only a bound on a
        // broken writer, not a measurement).
        tokio::time::timeout(Duration::from_secs(60), async {
            while log.end_offset(Topic::Data, 0).await.unwrap() < 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the event is written without an answer waiting for it");
        // More than a batch, then the emitter goes: every event is written before the writer ends.
        for _ in 0..(BATCH * 2 + 7) {
            emitter.emit(event()).await;
        }
        drop(emitter);
        writing.await.unwrap();
        let expected = 1 + BATCH as u64 * 2 + 7;
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), expected);
    }

    #[tokio::test]
    async fn an_answer_whose_events_cannot_be_recorded_in_time_is_refused() {
        let (_dir, log) = observed().await;
        let config = LimitsConfig {
            events_ack_timeout: Duration::from_millis(100),
            ..limits(64, WhenEventsFull::Reject, EventsAck::Recorded)
        };
        let (emitter, writer) =
            Emitter::new(&config, Arc::clone(&log) as Arc<dyn Log>, None).unwrap();
        let writing = writer.spawn(&TaskTracker::new());
        assert!(emitter.record(event()).await.is_err());
        // The event is not dropped: it is recorded once the log takes appends again.
        log.hold.add_permits(1000);
        drop(emitter);
        writing.await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn with_no_ack_an_answer_does_not_wait() {
        let (_dir, log) = observed().await;
        let config = limits(64, WhenEventsFull::Reject, EventsAck::None);
        let (emitter, writer) =
            Emitter::new(&config, Arc::clone(&log) as Arc<dyn Log>, None).unwrap();
        let writing = writer.spawn(&TaskTracker::new());
        emitter.record(event()).await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 0);
        log.hold.add_permits(1000);
        drop(emitter);
        writing.await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 1);
    }
}
