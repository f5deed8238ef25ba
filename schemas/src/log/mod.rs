//! The append-only log: Loom's system of record.
//!
//! Shaped like Kafka so that both transports fit behind it: named topics split into partitions,
//! records with a key, headers, a value and a timestamp, and per-partition offsets. Writers append
//! batches; readers start at a position and either poll (replay until caught up) or tail (wait
//! for new records, woken by the writer rather than by polling).

pub mod checkpoint;
pub mod embedded;
pub mod kafka;
mod kafka_group;
pub mod recovery;
pub mod segment;
pub mod spool;
pub mod verify;

use std::path::PathBuf;

use async_trait::async_trait;

pub use checkpoint::ChainKey;
pub use embedded::{EmbeddedLog, EmbeddedLogConfig, FsyncPolicy};
pub use kafka::{KafkaLog, KafkaLogConfig};
pub use spool::{SpoolConfig, SpooledLog};
pub use verify::{ExpectedHead, PartitionReport, Problem, VerifyReport, verify};

/// The topics Loom writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    /// Data-plane events, keyed by trace id.
    Data,
    /// Control-plane events, one partition, totally ordered.
    Control,
    /// The quota ledger (`quota.reserved`, `quota.consumed`, `quota.released`), one partition,
    /// totally ordered: every gateway folds every gateway's reservations from it.
    Quota,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Data, Topic::Control, Topic::Quota];

    pub fn name(self) -> &'static str {
        match self {
            Topic::Data => "data",
            Topic::Control => "control",
            Topic::Quota => "quota",
        }
    }

    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn for_plane(plane: crate::event::Plane) -> Topic {
        match plane {
            crate::event::Plane::Data => Topic::Data,
            crate::event::Plane::Control => Topic::Control,
            crate::event::Plane::Quota => Topic::Quota,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

impl Header {
    pub fn new(name: &str, value: &[u8]) -> Self {
        Self {
            name: name.to_owned(),
            value: value.to_vec(),
        }
    }
}

/// One record as appended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Vec<u8>,
    pub headers: Vec<Header>,
    pub value: Vec<u8>,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: i64,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_slice())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// One record as read back, with where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub position: Position,
    pub record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("damaged: {} at byte {byte}{}: {reason}. Nothing was repaired; `loom verify` \
        names every damaged spot, and `loom repair --truncate-at` cuts the log there, keeping \
        what it cuts in the quarantine directory",
        segment.display(),
        offset.map(|o| format!(" (record offset {o})")).unwrap_or_default())]
    Corrupt {
        segment: PathBuf,
        byte: u64,
        offset: Option<u64>,
        reason: String,
    },
    #[error(
        "log directory {} is locked by another process (a running `loom serve`?)",
        .0.display()
    )]
    Locked(PathBuf),
    #[error("record of {size} bytes is larger than the {max}-byte limit")]
    RecordTooLarge { size: usize, max: usize },
    #[error("offset {requested} is beyond the end of the partition ({end})")]
    OffsetOutOfRange { requested: u64, end: u64 },
    #[error(
        "offsets {from}..{to} of {topic}/{partition} are no longer in the log (retention?) and \
         were never read"
    )]
    Missing {
        topic: &'static str,
        partition: u32,
        from: u64,
        to: u64,
    },
    #[error("topic {topic} has no partition {partition}")]
    UnknownPartition { topic: &'static str, partition: u32 },
    #[error("the log writer failed earlier and refuses further appends: {0}")]
    WriterFailed(String),
    #[error("log task failed: {0}")]
    Task(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("the spool is full ({records} records wait for Kafka)")]
    SpoolFull { records: u64 },
    #[error("the log is open read-only")]
    ReadOnly,
}

impl LogError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LogError {
        let context = context.into();
        move |source| LogError::Io { context, source }
    }
}

/// An append-only, partitioned log.
#[async_trait]
pub trait Log: Send + Sync {
    fn partitions(&self, topic: Topic) -> u32;

    /// Appends a batch, in order, returning each record's position. Records with the same key
    /// go to the same partition and keep their order.
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>, LogError>;

    /// The offset the next record appended to `partition` will get.
    async fn end_offset(&self, topic: Topic, partition: u32) -> Result<u64, LogError>;

    /// A reader starting at `offset` of `partition`.
    async fn read_from(
        &self,
        topic: Topic,
        partition: u32,
        offset: u64,
    ) -> Result<Box<dyn LogReader>, LogError>;

    /// Makes everything appended so far durable.
    async fn sync(&self) -> Result<(), LogError>;

    /// Joins the consumer group `group` on `topic`: the group's members share the topic's
    /// partitions, and a member's partitions move to the others when it leaves. Where a member
    /// starts in a partition is its own business (see [`GroupEvent::Assigned`]).
    async fn join_group(&self, group: &str, topic: Topic)
    -> Result<Box<dyn GroupReader>, LogError>;
}

/// What a member of a consumer group learns, in order.
#[derive(Debug)]
pub enum GroupEvent {
    /// These partitions are now the member's. It answers with the offset to start each one at
    /// (the positions its projection stored with its writes); a partition it leaves out starts at
    /// the beginning. Nothing is read from them until it answers.
    Assigned {
        partitions: Vec<u32>,
        start: tokio::sync::oneshot::Sender<Vec<Position>>,
    },
    /// Records from the member's partitions, in order within each partition.
    Entries(Vec<Entry>),
    /// These partitions go to another member once `done` is answered (or dropped). Entries from
    /// them handed out before this event are the last: store their positions first, so that the
    /// next owner starts right after them.
    Revoked {
        partitions: Vec<u32>,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// A member of a consumer group. Dropping it leaves the group.
#[async_trait]
pub trait GroupReader: Send {
    /// The next thing to handle, waiting for it.
    async fn next(&mut self, max: usize) -> Result<GroupEvent, LogError>;

    /// Records how far the member got with the log itself (Kafka's committed group offsets), so
    /// that standard tools can show the group's lag. Advisory: the positions a projection stores
    /// with its writes are the ones it starts from.
    async fn commit(&mut self, positions: &[Position]) -> Result<(), LogError>;
}

/// Reads one partition in order.
#[async_trait]
pub trait LogReader: Send {
    /// Up to `max` entries that are available now; empty once caught up.
    async fn poll(&mut self, max: usize) -> Result<Vec<Entry>, LogError>;

    /// Up to `max` entries, waiting until at least one is available.
    async fn next(&mut self, max: usize) -> Result<Vec<Entry>, LogError>;

    /// The position of the next entry this reader returns.
    fn position(&self) -> Position;
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod kafka_tests;

#[cfg(test)]
mod spool_tests;

#[cfg(test)]
mod group_tests;
