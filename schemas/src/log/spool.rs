//! A local spool in front of Kafka for data-plane and quota events: when the broker is unreachable
//! or too slow, appends go to embedded-log segments on disk, in order, and a drain task forwards
//! them to Kafka when it is back. Once anything is spooled, every later append is spooled too
//! until the spool is drained, so order is kept (within each topic). The spool is bounded: past
//! the bound, appends fail and the gateway's fail-closed policy applies. Control-plane appends
//! always go straight to Kafka.
//!
//! Forwarding is at least once: a batch whose delivery was not confirmed may reach Kafka twice.
//! Consumers deduplicate by event id. Segments are deleted once everything in them is forwarded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    ChainKey, EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, GroupReader, KafkaLog, Log, LogError,
    LogReader, Position, Record, Topic,
};

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the spool's segments (`<data dir>/spool`).
    pub dir: PathBuf,
    /// Records waiting in the spool at most; further appends fail.
    pub max_records: u64,
    /// How long an append waits for Kafka before it spools instead (it spools at once when
    /// librdkafka reports every broker down).
    pub kafka_timeout: Duration,
    /// How long forwarding a batch of the spool may take before it is tried again.
    pub forward_timeout: Duration,
    /// Authenticates the spool's checkpoints (derived from the master key).
    pub chain_key: ChainKey,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>, chain_key: ChainKey) -> Self {
        SpoolConfig {
            dir: dir.into(),
            max_records: 1_000_000,
            kafka_timeout: Duration::from_millis(250),
            forward_timeout: Duration::from_secs(10),
            chain_key,
        }
    }
}

/// The topics the spool holds.
const SPOOLED: [Topic; 2] = [Topic::Data, Topic::Quota];

struct State {
    /// Appends go to the spool (it holds records not yet in Kafka).
    spooling: bool,
    /// The next spool offset to forward, of each topic of [`SPOOLED`].
    drained: [u64; 2],
}

impl State {
    fn drained(&mut self, topic: Topic) -> &mut u64 {
        &mut self.drained[usize::from(topic == Topic::Quota)]
    }
}

/// Kafka with a local spool for the data and quota topics.
pub struct SpooledLog {
    kafka: Arc<KafkaLog>,
    spool: EmbeddedLog,
    config: SpoolConfig,
    state: Mutex<State>,
    wake: Notify,
}

fn drained_path(dir: &Path, topic: Topic) -> PathBuf {
    match topic {
        Topic::Data => dir.join("DRAINED"),
        other => dir.join(format!("DRAINED.{}", other.name())),
    }
}

impl SpooledLog {
    /// Opens the spool; records left in it by an earlier process are forwarded by [`drain`].
    ///
    /// [`drain`]: SpooledLog::drain
    pub async fn open(kafka: Arc<KafkaLog>, config: SpoolConfig) -> Result<SpooledLog, LogError> {
        let spool = EmbeddedLog::open(EmbeddedLogConfig {
            dir: config.dir.clone(),
            fsync: FsyncPolicy::Always,
            // Small segments, so that forwarded ones can be deleted soon.
            segment_bytes: 8 * 1024 * 1024,
            chain_key: config.chain_key.clone(),
        })
        .await?;
        let mut drained = [0; 2];
        let mut waiting = 0;
        for (slot, topic) in drained.iter_mut().zip(SPOOLED) {
            let path = drained_path(&config.dir, topic);
            *slot = match tokio::fs::read_to_string(&path).await {
                Ok(text) => text.trim().parse().map_err(|_| LogError::Corrupt {
                    segment: path.clone(),
                    byte: 0,
                    offset: None,
                    reason: "not an offset".into(),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(LogError::io("reading the spool position")(e)),
            };
            waiting += spool.end_offset(topic, 0).await?.saturating_sub(*slot);
        }
        if waiting > 0 {
            tracing::warn!(
                records = waiting,
                "the spool holds records not yet in Kafka; draining them"
            );
        }
        Ok(SpooledLog {
            kafka,
            spool,
            config,
            state: Mutex::new(State {
                spooling: waiting > 0,
                drained,
            }),
            wake: Notify::new(),
        })
    }

    /// Records in the spool not yet forwarded.
    pub async fn spooled(&self) -> Result<u64, LogError> {
        let mut state = self.state.lock().await;
        self.waiting(&mut state).await
    }

    /// Records of every spooled topic not yet forwarded.
    async fn waiting(&self, state: &mut State) -> Result<u64, LogError> {
        let mut waiting = 0;
        for topic in SPOOLED {
            let end = self.spool.end_offset(topic, 0).await?;
            waiting += end.saturating_sub(*state.drained(topic));
        }
        Ok(waiting)
    }

    async fn save_drained(&self, topic: Topic, drained: u64) -> Result<(), LogError> {
        let path = drained_path(&self.config.dir, topic);
        let tmp = path.with_extension("tmp");
        tokio::fs::write(&tmp, drained.to_string())
            .await
            .map_err(LogError::io("writing the spool position"))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(LogError::io("writing the spool position"))
    }

    /// Forwards spooled records to Kafka until `shutdown`; run it beside the log.
    pub async fn drain(&self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let wait = match self.forward_some().await {
                // More to forward: go on at once.
                Ok(true) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(false) => Duration::from_secs(1),
                Err(error) => {
                    tracing::warn!(%error, "forwarding the spool to Kafka failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Forwards one batch of each spooled topic; `true` while records remain.
    async fn forward_some(&self) -> Result<bool, LogError> {
        let drained = {
            let mut state = self.state.lock().await;
            if !state.spooling {
                return Ok(false);
            }
            SPOOLED.map(|topic| *state.drained(topic))
        };
        let mut forwarded = [0; 2];
        for ((topic, drained), count) in SPOOLED.into_iter().zip(drained).zip(&mut forwarded) {
            *count = self.forward(topic, drained).await?;
        }
        let mut state = self.state.lock().await;
        for ((topic, drained), count) in SPOOLED.into_iter().zip(drained).zip(forwarded) {
            *state.drained(topic) = drained + count;
        }
        let waiting = self.waiting(&mut state).await?;
        if waiting == 0 {
            // Appends wait on this lock, so none can slip into the spool after this check.
            state.spooling = false;
            metrics::gauge!("loom_spool_records").set(0.0);
            metrics::gauge!("loom_spool_oldest_age_seconds").set(0.0);
            tracing::info!("the spool is drained; appending to Kafka directly again");
        } else {
            metrics::gauge!("loom_spool_records").set(waiting as f64);
        }
        Ok(state.spooling)
    }

    /// Forwards up to 500 records of `topic` from spool offset `drained`; how many.
    async fn forward(&self, topic: Topic, drained: u64) -> Result<u64, LogError> {
        let mut reader = self.spool.read_from(topic, 0, drained).await?;
        let entries = reader.poll(500).await?;
        let count = entries.len() as u64;
        if let Some(oldest) = entries.first() {
            let age = (crate::event::now_micros() - oldest.record.timestamp_us).max(0) as f64 / 1e6;
            metrics::gauge!("loom_spool_oldest_age_seconds").set(age);
        }
        if count > 0 {
            let records = entries.into_iter().map(|e| e.record).collect();
            tokio::time::timeout(
                self.config.forward_timeout,
                self.kafka.append(topic, records),
            )
            .await
            .map_err(|_| LogError::Kafka("timed out forwarding the spool".into()))??;
            self.save_drained(topic, drained + count).await?;
            metrics::counter!("loom_spool_forwarded_total").increment(count);
            self.spool.remove_before(topic, drained + count).await?;
        }
        Ok(count)
    }
}

#[async_trait]
impl Log for SpooledLog {
    fn partitions(&self, topic: Topic) -> u32 {
        self.kafka.partitions(topic)
    }

    /// Data and quota records go to Kafka, or to the spool while Kafka is unreachable (then the
    /// positions are the spool's). Control records always go to Kafka.
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if topic == Topic::Control {
            return self.kafka.append(topic, records).await;
        }
        let mut state = self.state.lock().await;
        if !state.spooling {
            if self.kafka.brokers_down() {
                tracing::warn!("every Kafka broker is down; spooling");
            } else {
                tokio::select! {
                    direct = self.kafka.append(topic, records.clone()) => match direct {
                        Ok(positions) => return Ok(positions),
                        Err(error) => tracing::warn!(%error, "Kafka refused an append; spooling"),
                    },
                    () = tokio::time::sleep(self.config.kafka_timeout) => tracing::warn!(
                        timeout = ?self.config.kafka_timeout,
                        "Kafka did not confirm an append in time; spooling"
                    ),
                    () = self.kafka.until_brokers_down() => {
                        tracing::warn!("every Kafka broker went down during an append; spooling");
                    }
                }
            }
            metrics::counter!("loom_spool_switches_total").increment(1);
            state.spooling = true;
        }
        let waiting = self.waiting(&mut state).await?;
        if waiting + records.len() as u64 > self.config.max_records {
            metrics::counter!("loom_spool_full_total").increment(1);
            return Err(LogError::SpoolFull { records: waiting });
        }
        let positions = self.spool.append(topic, records).await?;
        metrics::gauge!("loom_spool_records").set((waiting + positions.len() as u64) as f64);
        drop(state);
        self.wake.notify_one();
        Ok(positions)
    }

    async fn end_offset(&self, topic: Topic, partition: u32) -> Result<u64, LogError> {
        self.kafka.end_offset(topic, partition).await
    }

    async fn read_from(
        &self,
        topic: Topic,
        partition: u32,
        offset: u64,
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.kafka.read_from(topic, partition, offset).await
    }

    async fn join_group(
        &self,
        group: &str,
        topic: Topic,
    ) -> Result<Box<dyn GroupReader>, LogError> {
        self.kafka.join_group(group, topic).await
    }

    async fn sync(&self) -> Result<(), LogError> {
        self.spool.sync().await?;
        self.kafka.sync().await
    }
}
