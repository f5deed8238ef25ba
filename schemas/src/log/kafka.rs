//! The log on Kafka (any Kafka-protocol broker): the production transport.
//!
//! Topics are `<prefix>data` (keyed by trace id, several partitions) and `<prefix>control` (one
//! partition: a total order). The producer is idempotent with `acks=all`, batches (`linger.ms`)
//! and compresses. Readers are assigned one partition at an offset, outside any consumer group;
//! group members (`join_group`, in `kafka_group`) share a topic's partitions. Either way the
//! positions belong to whoever reads: projections store theirs with their writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::kafka_group::KafkaGroupReader;
use super::{Entry, GroupReader, Header, Log, LogError, LogReader, Position, Record, Topic};

/// How to reach and use the cluster. `Debug` leaves out the values of `properties` (they carry
/// SASL passwords and key passphrases).
#[derive(Clone)]
pub struct KafkaLogConfig {
    /// `host:port,…`
    pub brokers: String,
    /// Prepended to the topic names (`loom.` gives `loom.data` and `loom.control`).
    pub topic_prefix: String,
    /// Partitions of the data topic when Loom creates it.
    pub data_partitions: i32,
    /// Replication factor of the topics Loom creates.
    pub replication: i32,
    /// Create the topics if they are missing.
    pub create_topics: bool,
    pub linger: Duration,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd` (if librdkafka was built with it).
    pub compression: String,
    /// Any other librdkafka property (`security.protocol`, `sasl.mechanism`, …), as given.
    pub properties: BTreeMap<String, String>,
    /// Limit on metadata look-ups and on waiting for a delivery.
    pub timeout: Duration,
}

impl std::fmt::Debug for KafkaLogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLogConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("data_partitions", &self.data_partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("linger", &self.linger)
            .field("compression", &self.compression)
            .field(
                "properties",
                &self
                    .properties
                    .keys()
                    .map(|k| (k, "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl KafkaLogConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaLogConfig {
            brokers: brokers.into(),
            topic_prefix: "loom.".into(),
            data_partitions: 6,
            replication: 1,
            create_topics: true,
            linger: Duration::from_millis(5),
            compression: "lz4".into(),
            properties: BTreeMap::new(),
            timeout: Duration::from_secs(10),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

fn kafka_error(context: &str) -> impl FnOnce(KafkaError) -> LogError + '_ {
    move |error| LogError::Kafka(format!("{context}: {error}"))
}

/// Whether librdkafka has said that every broker is down; cleared by the next delivery.
#[derive(Clone)]
struct BrokersDown(Arc<watch::Sender<bool>>);

/// The producer's context: hears librdkafka's error events, so that an outage is known at once
/// rather than after appends time out.
struct ProducerContext(BrokersDown);

impl ClientContext for ProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.0.0.send_replace(true);
        }
        tracing::error!("librdkafka: {error}: {reason}");
    }
}

/// The log on a Kafka cluster.
pub struct KafkaLog {
    config: KafkaLogConfig,
    producer: FutureProducer<ProducerContext>,
    brokers_down: BrokersDown,
    data_topic: String,
    control_topic: String,
    quota_topic: String,
    data_partitions: u32,
}

/// How long the quota topic keeps its records: the gateways rebuild today's ledger from it, so
/// it needs the current quota day (in any time zone) plus a reservation's lifetime.
const QUOTA_RETENTION_MS: &str = "259200000";

impl KafkaLog {
    /// Connects, creates the topics when allowed, and reads how many partitions they have.
    pub async fn connect(config: KafkaLogConfig) -> Result<KafkaLog, LogError> {
        let data_topic = format!("{}data", config.topic_prefix);
        let control_topic = format!("{}control", config.topic_prefix);
        let quota_topic = format!("{}quota", config.topic_prefix);
        if config.create_topics {
            let admin: AdminClient<DefaultClientContext> = config
                .client()
                .create()
                .map_err(kafka_error("creating the admin client"))?;
            let topics = [
                NewTopic::new(
                    &data_topic,
                    config.data_partitions,
                    TopicReplication::Fixed(config.replication),
                ),
                NewTopic::new(
                    &control_topic,
                    1,
                    TopicReplication::Fixed(config.replication),
                ),
                NewTopic::new(&quota_topic, 1, TopicReplication::Fixed(config.replication))
                    .set("retention.ms", QUOTA_RETENTION_MS),
            ];
            let options =
                AdminOptions::new().operation_timeout(Some(Timeout::After(config.timeout)));
            for result in admin
                .create_topics(&topics, &options)
                .await
                .map_err(kafka_error("creating topics"))?
            {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        return Err(LogError::Kafka(format!("creating topic {topic}: {code}")));
                    }
                }
            }
        }
        let brokers_down = BrokersDown(Arc::new(watch::channel(false).0));
        let producer: FutureProducer<ProducerContext> = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("compression.type", &config.compression)
            // Give up on a delivery when the caller does, so that a spooled batch is not also
            // delivered later by librdkafka's own retries.
            .set("message.timeout.ms", config.timeout.as_millis().to_string())
            .create_with_context(ProducerContext(brokers_down.clone()))
            .map_err(kafka_error("creating the producer"))?;
        let log = KafkaLog {
            data_partitions: 0,
            producer,
            brokers_down,
            data_topic,
            control_topic,
            quota_topic,
            config,
        };
        let data_partitions = log.partition_count(Topic::Data).await?;
        log.warm_up().await;
        Ok(KafkaLog {
            data_partitions,
            ..log
        })
    }

    /// Has the producer connect and learn the topics' leaders now, so that the first append
    /// does not wait for that (and spool for nothing).
    async fn warm_up(&self) {
        let producer = self.producer.clone();
        let topics = [
            self.data_topic.clone(),
            self.control_topic.clone(),
            self.quota_topic.clone(),
        ];
        let timeout = self.config.timeout;
        let warmed = tokio::task::spawn_blocking(move || {
            topics.iter().try_for_each(|topic| {
                producer
                    .client()
                    .fetch_metadata(Some(topic), timeout)
                    .map(drop)
            })
        })
        .await;
        if let Ok(Err(error)) = warmed {
            tracing::warn!(%error, "the producer could not fetch the topics' metadata yet");
        }
    }

    /// librdkafka has reported every broker down, and nothing was delivered since.
    pub fn brokers_down(&self) -> bool {
        *self.brokers_down.0.borrow()
    }

    /// Resolves once librdkafka reports every broker down (at once if it has already).
    pub async fn until_brokers_down(&self) {
        let mut down = self.brokers_down.0.subscribe();
        let _ = down.wait_for(|down| *down).await;
    }

    fn topic_name(&self, topic: Topic) -> &str {
        match topic {
            Topic::Data => &self.data_topic,
            Topic::Control => &self.control_topic,
            Topic::Quota => &self.quota_topic,
        }
    }

    /// Partitions of a topic, from the cluster's metadata (waiting for a topic created here to
    /// appear).
    async fn partition_count(&self, topic: Topic) -> Result<u32, LogError> {
        let name = self.topic_name(topic).to_owned();
        let consumer = self.consumer()?;
        let timeout = self.config.timeout;
        let wait = self.config.create_topics;
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let metadata = consumer
                    .fetch_metadata(Some(&name), timeout)
                    .map_err(kafka_error("reading metadata"))?;
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                if partitions > 0 {
                    return Ok(u32::try_from(partitions).unwrap_or(u32::MAX));
                }
                // A topic just created takes a moment to show; one not created here will not.
                if !wait || std::time::Instant::now() > deadline {
                    return Err(LogError::Kafka(format!(
                        "topic {name} does not exist (create the topics with `loom migrate \
                         --kafka-brokers …`, or let Loom create them on start)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
    }

    fn consumer(&self) -> Result<StreamConsumer, LogError> {
        self.config
            .client()
            .set("group.id", "loom-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // An offset the broker no longer holds (retention) reads from the oldest it does:
            // a reader sees the first offset it gets is past the one it asked for, and says so
            // (never the default, which jumps to the end and skips silently).
            .set("auto.offset.reset", "earliest")
            // Readers follow the log closely (control changes, fresh projections): ask the broker
            // not to sit on an empty fetch for long.
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(kafka_error("creating a consumer"))
    }

    fn check_partition(&self, topic: Topic, partition: u32) -> Result<(), LogError> {
        if partition >= self.partitions(topic) {
            return Err(LogError::UnknownPartition {
                topic: topic.name(),
                partition,
            });
        }
        Ok(())
    }

    /// Low and high watermarks of a partition.
    async fn watermarks(&self, topic: Topic, partition: u32) -> Result<(u64, u64), LogError> {
        // The producer's client asks: a consumer made for each question would connect anew.
        let producer = self.producer.clone();
        let name = self.topic_name(topic).to_owned();
        let timeout = self.config.timeout;
        let (low, high) = tokio::task::spawn_blocking(move || {
            let partition = i32::try_from(partition).unwrap_or(i32::MAX);
            producer
                .client()
                .fetch_watermarks(&name, partition, timeout)
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
        .map_err(kafka_error("reading watermarks"))?;
        Ok((
            u64::try_from(low).unwrap_or(0),
            u64::try_from(high).unwrap_or(0),
        ))
    }
}

#[async_trait]
impl Log for KafkaLog {
    fn partitions(&self, topic: Topic) -> u32 {
        match topic {
            Topic::Data => self.data_partitions,
            Topic::Control | Topic::Quota => 1,
        }
    }

    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let started = std::time::Instant::now();
        let name = self.topic_name(topic);
        let sends = records.iter().map(|record| {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for header in &record.headers {
                headers = headers.insert(KafkaHeader {
                    key: &header.name,
                    value: Some(&header.value),
                });
            }
            let mut message = FutureRecord::to(name)
                .payload(&record.value)
                .headers(headers)
                .timestamp(record.timestamp_us / 1000);
            if !record.key.is_empty() {
                message = message.key(&record.key);
            }
            // The control and quota topics have one partition: their order is the order of
            // appends.
            if topic != Topic::Data {
                message = message.partition(0);
            }
            self.producer
                .send(message, Timeout::After(self.config.timeout))
        });
        let mut positions = Vec::with_capacity(records.len());
        for delivered in join_all(sends).await {
            let delivery = delivered
                .map_err(|(error, _)| LogError::Kafka(format!("delivering to {name}: {error}")))?;
            positions.push(Position {
                partition: u32::try_from(delivery.partition).unwrap_or(0),
                offset: u64::try_from(delivery.offset).unwrap_or(0),
            });
        }
        metrics::counter!("loom_log_appended_records_total", "topic" => topic.name())
            .increment(records.len() as u64);
        // Until the last record of the batch was acknowledged.
        metrics::histogram!("loom_kafka_delivery_seconds", "topic" => topic.name())
            .record(started.elapsed().as_secs_f64());
        self.brokers_down
            .0
            .send_if_modified(|down| std::mem::replace(down, false));
        Ok(positions)
    }

    async fn end_offset(&self, topic: Topic, partition: u32) -> Result<u64, LogError> {
        self.check_partition(topic, partition)?;
        Ok(self.watermarks(topic, partition).await?.1)
    }

    async fn read_from(
        &self,
        topic: Topic,
        partition: u32,
        offset: u64,
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.check_partition(topic, partition)?;
        let consumer = self.consumer()?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(
                self.topic_name(topic),
                i32::try_from(partition).unwrap_or(i32::MAX),
                Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX)),
            )
            .map_err(kafka_error("assigning a partition"))?;
        consumer
            .assign(&assignment)
            .map_err(kafka_error("assigning a partition"))?;
        Ok(Box::new(KafkaReader {
            consumer: Arc::new(consumer),
            topic: self.topic_name(topic).to_owned(),
            partition,
            next_offset: offset,
            known_end: 0,
            timeout: self.config.timeout,
        }))
    }

    async fn join_group(
        &self,
        group: &str,
        topic: Topic,
    ) -> Result<Box<dyn GroupReader>, LogError> {
        let reader = KafkaGroupReader::join(self.config.client(), group, self.topic_name(topic))?;
        Ok(Box::new(reader))
    }

    async fn sync(&self) -> Result<(), LogError> {
        let producer = self.producer.clone();
        let timeout = self.config.timeout;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| LogError::Task(e.to_string()))?
            .map_err(kafka_error("flushing the producer"))
    }
}

/// A consumed message as a log entry.
pub(super) fn entry_of(message: &impl Message) -> Entry {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| Header {
                    name: h.key.to_owned(),
                    value: h.value.unwrap_or_default().to_vec(),
                })
                .collect()
        })
        .unwrap_or_default();
    Entry {
        position: Position {
            partition: u32::try_from(message.partition()).unwrap_or(0),
            offset: u64::try_from(message.offset()).unwrap_or(0),
        },
        record: Record {
            key: message.key().unwrap_or_default().to_vec(),
            headers,
            value: message.payload().unwrap_or_default().to_vec(),
            timestamp_us: message
                .timestamp()
                .to_millis()
                .unwrap_or(0)
                .saturating_mul(1000),
        },
    }
}

/// Reads one assigned partition.
struct KafkaReader {
    consumer: Arc<StreamConsumer>,
    topic: String,
    partition: u32,
    next_offset: u64,
    /// The partition's end as last seen: `poll` reads up to it without waiting.
    known_end: u64,
    timeout: Duration,
}

impl KafkaReader {
    /// The partition's high watermark: the offset the next record will get.
    async fn end(&self) -> Result<u64, LogError> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let partition = i32::try_from(self.partition).unwrap_or(i32::MAX);
        let timeout = self.timeout;
        let (_, high) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, timeout)
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
        .map_err(kafka_error("reading watermarks"))?;
        Ok(u64::try_from(high).unwrap_or(0))
    }

    /// Receives one message; `None` if none came within `wait`.
    async fn receive(&mut self, wait: Option<Duration>) -> Result<Option<Entry>, LogError> {
        let received = match wait {
            Some(wait) => match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(received) => received,
                Err(_) => return Ok(None),
            },
            None => self.consumer.recv().await,
        };
        let message = received.map_err(kafka_error("reading"))?;
        let entry = entry_of(&message);
        let offset = entry.position.offset;
        self.next_offset = offset + 1;
        self.known_end = self.known_end.max(self.next_offset);
        Ok(Some(entry))
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    async fn poll(&mut self, max: usize) -> Result<Vec<Entry>, LogError> {
        if self.next_offset >= self.known_end {
            self.known_end = self.end().await?;
        }
        let mut entries = Vec::new();
        while entries.len() < max && self.next_offset < self.known_end {
            match self.receive(Some(self.timeout)).await? {
                Some(entry) => entries.push(entry),
                None => break,
            }
        }
        Ok(entries)
    }

    async fn next(&mut self, max: usize) -> Result<Vec<Entry>, LogError> {
        let mut entries = Vec::new();
        if let Some(first) = self.receive(None).await? {
            entries.push(first);
        }
        // Then whatever else arrives right away.
        while entries.len() < max {
            match self.receive(Some(Duration::from_millis(1))).await? {
                Some(entry) => entries.push(entry),
                None => break,
            }
        }
        Ok(entries)
    }

    fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.next_offset,
        }
    }
}
