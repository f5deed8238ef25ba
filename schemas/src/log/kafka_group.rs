//! Consumer-group membership on Kafka.
//!
//! librdkafka runs rebalances inside `poll`, so each member polls on a thread of its own and hands
//! what it reads to the async side through a bounded channel. A rebalance is handed over the same
//! channel, in order with the records: on assignment the thread waits for the member to say where
//! each partition starts (its projection's stored positions) and assigns them at those offsets;
//! on revocation it waits until the member has stored what it read from them, and only then lets
//! the partitions go. Kafka's committed group offsets are written too, but only for monitoring.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::kafka::entry_of;
use super::{Entry, GroupEvent, GroupReader, LogError, Position};

/// What the polling thread hands over. Entries go one by one; the reader batches them.
enum Delivery {
    Entry(Entry),
    Event(GroupEvent),
}

/// Records the polling thread may read ahead of the member. Records already handed over are
/// handled before a revocation is, so this also bounds how long a rebalance waits on a member.
const READ_AHEAD: usize = 1024;

/// The group session's timeout unless `--kafka-property session.timeout.ms=…` says otherwise.
const SESSION_TIMEOUT_MS: &str = "10000";

/// How long one `poll` blocks before the thread checks whether the member is gone.
const POLL_WAIT: Duration = Duration::from_millis(100);

struct GroupContext {
    topic: String,
    deliveries: mpsc::Sender<Delivery>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<u32> = tpl
            .elements()
            .iter()
            .filter_map(|e| u32::try_from(e.partition()).ok())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                let (start, answer) = oneshot::channel();
                let event = GroupEvent::Assigned {
                    partitions: partitions.clone(),
                    start,
                };
                if self
                    .deliveries
                    .blocking_send(Delivery::Event(event))
                    .is_err()
                {
                    return; // The member is gone; the thread is stopping.
                }
                let Ok(starts) = answer.blocking_recv() else {
                    tracing::warn!(topic = %self.topic, "the member did not say where to start; not reading");
                    return;
                };
                for partition in partitions {
                    let offset = starts
                        .iter()
                        .find(|p| p.partition == partition)
                        .map_or(Offset::Beginning, |p| {
                            Offset::Offset(i64::try_from(p.offset).unwrap_or(i64::MAX))
                        });
                    let partition = i32::try_from(partition).unwrap_or(i32::MAX);
                    if let Err(error) = tpl.set_partition_offset(&self.topic, partition, offset) {
                        tracing::error!(%error, partition, "could not set a start offset");
                    }
                }
                if let Err(error) = consumer.assign(tpl) {
                    tracing::error!(%error, topic = %self.topic, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(topic = %self.topic, ?partitions, "partitions revoked");
                let (done, finished) = oneshot::channel();
                let event = GroupEvent::Revoked { partitions, done };
                if self
                    .deliveries
                    .blocking_send(Delivery::Event(event))
                    .is_ok()
                {
                    // Answered or dropped: either way the member is done with them.
                    let _ = finished.blocking_recv();
                }
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, topic = %self.topic, "releasing partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, topic = %self.topic, "rebalance failed; releasing partitions");
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::debug!(%error, topic = %self.topic, "committing advisory group offsets failed");
        }
    }
}

/// A member of a consumer group on a Kafka topic.
pub(super) struct KafkaGroupReader {
    deliveries: mpsc::Receiver<Delivery>,
    /// An event that arrived while entries were being batched; it is handed out next.
    held: Option<GroupEvent>,
    commits: std_mpsc::Sender<TopicPartitionList>,
    topic: String,
}

impl KafkaGroupReader {
    /// Joins `group` on `topic` with a consumer made from `config`.
    pub(super) fn join(
        mut config: ClientConfig,
        group: &str,
        topic: &str,
    ) -> Result<KafkaGroupReader, LogError> {
        // A member that dies without leaving holds its partitions until its session times out:
        // 10 s rather than librdkafka's 45 s, unless the operator set it. Heartbeats come from
        // librdkafka's own thread, so a busy member does not miss them.
        if config.get("session.timeout.ms").is_none() {
            config.set("session.timeout.ms", SESSION_TIMEOUT_MS);
        }
        let (deliveries_tx, deliveries) = mpsc::channel(READ_AHEAD);
        let (commits, commits_rx) = std_mpsc::channel();
        let context = GroupContext {
            topic: topic.to_owned(),
            deliveries: deliveries_tx,
        };
        let consumer: BaseConsumer<GroupContext> = config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(context)
            .map_err(|e| LogError::Kafka(format!("creating a group consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| LogError::Kafka(format!("subscribing to {topic}: {e}")))?;
        std::thread::Builder::new()
            .name(format!("loom-group-{group}"))
            .spawn(move || poll_until_dropped(consumer, commits_rx))
            .map_err(|e| LogError::Task(format!("starting the group consumer thread: {e}")))?;
        Ok(KafkaGroupReader {
            deliveries,
            held: None,
            commits,
            topic: topic.to_owned(),
        })
    }
}

/// The polling thread: forwards records until the reader is dropped, then leaves the group (the
/// consumer is dropped here, off the async threads, since leaving runs a rebalance callback).
fn poll_until_dropped(
    consumer: BaseConsumer<GroupContext>,
    commits: std_mpsc::Receiver<TopicPartitionList>,
) {
    let deliveries = consumer.context().deliveries.clone();
    while !deliveries.is_closed() {
        while let Ok(offsets) = commits.try_recv() {
            if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
                tracing::debug!(%error, "committing advisory group offsets failed");
            }
        }
        let handed_over = match consumer.poll(POLL_WAIT) {
            Some(Ok(message)) => deliveries.blocking_send(Delivery::Entry(entry_of(&message))),
            // Mostly transient (a broker restarting); librdkafka reconnects by itself.
            Some(Err(error)) => {
                tracing::warn!(%error, "reading from the group's topic");
                Ok(())
            }
            None => Ok(()),
        };
        if handed_over.is_err() {
            break; // The member is gone.
        }
    }
}

#[async_trait]
impl GroupReader for KafkaGroupReader {
    async fn next(&mut self, max: usize) -> Result<GroupEvent, LogError> {
        if let Some(event) = self.held.take() {
            return Ok(event);
        }
        let stopped = || LogError::Kafka("the group consumer stopped".into());
        let mut entries = match self.deliveries.recv().await.ok_or_else(stopped)? {
            Delivery::Event(event) => return Ok(event),
            Delivery::Entry(entry) => vec![entry],
        };
        while entries.len() < max {
            match self.deliveries.try_recv() {
                Ok(Delivery::Entry(entry)) => entries.push(entry),
                Ok(Delivery::Event(event)) => {
                    self.held = Some(event);
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(GroupEvent::Entries(entries))
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), LogError> {
        let mut offsets = TopicPartitionList::new();
        for position in positions {
            offsets
                .add_partition_offset(
                    &self.topic,
                    i32::try_from(position.partition).unwrap_or(i32::MAX),
                    Offset::Offset(i64::try_from(position.offset).unwrap_or(i64::MAX)),
                )
                .map_err(|e| LogError::Kafka(format!("recording group offsets: {e}")))?;
        }
        self.commits
            .send(offsets)
            .map_err(|_| LogError::Kafka("the group consumer stopped".into()))
    }
}
