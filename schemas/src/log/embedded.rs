//! The embedded log: segment files in the data directory, one partition per topic.
//!
//! One process holds the log at a time (an advisory lock on `LOCK`). File I/O runs on tokio's
//! blocking pool, never on the async threads. Readers are woken through a watch channel when the
//! writer publishes a new end offset.

use std::borrow::Borrow;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use super::checkpoint::{ChainKey, Checkpoint, CheckpointFile};
use super::recovery::{self, Truncated, create_segment_file};
use super::segment::{
    Chain, FRAME_HEADER_LEN, FrameRead, SEGMENT_HEADER_LEN, decode_body, decode_frame_header,
    decode_segment_header, encode_frame, list_segments, read_frame,
};
use super::{Entry, GroupEvent, GroupReader, Log, LogError, LogReader, Position, Record, Topic};

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every appended batch: nothing acknowledged is lost on power failure.
    Always,
    /// At most this long after a write: up to one interval of records at risk on power failure
    /// (never on a process crash).
    Interval(Duration),
    /// Left to the operating system.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval(Duration::from_millis(200))
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// `always`, `never`, or an interval such as `200ms` / `1s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "fsync policy must be `always`, `never` or an interval like `200ms` or `1s`, not {s:?}"
            )
        };
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let (number, unit) =
                    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
                let n: u64 = number.parse().map_err(|_| bad())?;
                let interval = match unit {
                    "ms" => Duration::from_millis(n),
                    "s" => Duration::from_secs(n),
                    _ => return Err(bad()),
                };
                Ok(FsyncPolicy::Interval(interval))
            }
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbeddedLogConfig {
    /// The log's directory (`<data dir>/log`).
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Authenticates the partitions' checkpoints (derived from the master key).
    pub chain_key: ChainKey,
}

impl EmbeddedLogConfig {
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

    pub fn new(dir: impl Into<PathBuf>, chain_key: ChainKey) -> Self {
        Self {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            chain_key,
        }
    }
}

/// The embedded, single-process log.
pub struct EmbeddedLog {
    dir: PathBuf,
    data: Arc<Partition>,
    control: Arc<Partition>,
    quota: Arc<Partition>,
    /// Held while the log is open for writing; `None` when open read-only.
    lock: Option<File>,
}

struct Partition {
    dir: PathBuf,
    /// `None` when the log is open read-only.
    writer: Option<Mutex<Writer>>,
    /// The offset the next record will get; published after each append.
    end: watch::Sender<u64>,
}

/// Takes the advisory lock that keeps a second writer out of the log directory `dir`.
fn lock(dir: &Path) -> Result<File, LogError> {
    std::fs::create_dir_all(dir).map_err(LogError::io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(LogError::io(format!("opening {}", lock_path.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(LogError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(LogError::io(format!("locking {}", lock_path.display()))(e))
        }
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log, locks it for this process, and recovers from a crash: an
    /// unfinished write after a partition's checkpoint is cut off (its bytes kept in
    /// `quarantine/`); damage stops the open with an error naming segment, byte and offset.
    pub async fn open(config: EmbeddedLogConfig) -> Result<EmbeddedLog, LogError> {
        tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|e| LogError::Task(e.to_string()))?
    }

    fn open_blocking(config: EmbeddedLogConfig) -> Result<EmbeddedLog, LogError> {
        let dir = config.dir.clone();
        let lock = lock(&dir)?;
        let open = |topic: Topic| -> Result<Arc<Partition>, LogError> {
            let partition_dir = dir.join(topic.name()).join("0");
            let writer = Writer::recover(&dir, &config, topic)?;
            let (end, _) = watch::channel(writer.next_offset);
            Ok(Arc::new(Partition {
                dir: partition_dir,
                writer: Some(Mutex::new(writer)),
                end,
            }))
        };
        let (data, control, quota) = (
            open(Topic::Data)?,
            open(Topic::Control)?,
            open(Topic::Quota)?,
        );
        if let FsyncPolicy::Interval(interval) = config.fsync {
            let partitions = [&data, &control, &quota].map(Arc::downgrade);
            sync_periodically(partitions, interval);
        }
        Ok(EmbeddedLog {
            data,
            control,
            quota,
            dir,
            lock: Some(lock),
        })
    }

    /// Opens the log for reading only, beside the process that holds it: no lock, nothing
    /// written. Readers see the records complete at this moment (an append under way is left
    /// out); appends and segment removal are refused. For `loom replay` next to a running server.
    pub async fn open_read_only(
        dir: impl Into<PathBuf>,
        chain_key: ChainKey,
    ) -> Result<EmbeddedLog, LogError> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || {
            let report = super::verify::verify(&dir, &chain_key, &[])?;
            if let Some(problem) = report.first_problem() {
                return Err(problem.clone().into());
            }
            let open = |topic: Topic| -> Result<Arc<Partition>, LogError> {
                let partition_dir = dir.join(topic.name()).join("0");
                let end = report.partition(topic, 0).map_or(0, |p| p.end);
                let (end, _) = watch::channel(end);
                Ok(Arc::new(Partition {
                    dir: partition_dir,
                    writer: None,
                    end,
                }))
            };
            Ok(EmbeddedLog {
                data: open(Topic::Data)?,
                control: open(Topic::Control)?,
                quota: open(Topic::Quota)?,
                dir,
                lock: None,
            })
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` on the calling thread, which may block (a thread of its own, or the
    /// blocking pool — never an async worker); returns the first record's offset. A writer with
    /// a thread of its own saves the hand-off to the blocking pool that `append` makes.
    pub fn append_blocking<R: Borrow<Record>>(
        &self,
        topic: Topic,
        records: &[R],
    ) -> Result<u64, LogError> {
        self.partition(topic, 0)?.append(topic, records)
    }

    /// [`Log::sync`] on the calling thread, which may block (as for [`Self::append_blocking`]).
    pub fn sync_blocking(&self) -> Result<(), LogError> {
        if self.lock.is_none() {
            return Ok(()); // Read-only: nothing written here.
        }
        self.data.sync()?;
        self.control.sync()?;
        self.quota.sync()
    }

    /// The durable end of a partition as its last checkpoint has it: (records, chain head).
    /// `None` when open read-only.
    pub fn durable_head(&self, topic: Topic) -> Option<(u64, Chain)> {
        self.partition(topic, 0)
            .ok()?
            .with_writer(|writer| Ok((writer.durable.offset, writer.durable.head)))
            .ok()
    }

    /// `loom repair --truncate-at`: cuts `topic` so that it ends before record `offset`, moving
    /// what it cuts to `<dir>/quarantine/`, and writes a new checkpoint there. Takes the lock:
    /// no server may hold the log.
    pub async fn truncate_at(
        config: EmbeddedLogConfig,
        topic: Topic,
        offset: u64,
    ) -> Result<Truncated, LogError> {
        tokio::task::spawn_blocking(move || {
            let _lock = lock(&config.dir)?;
            recovery::truncate_at(&config.dir, topic, offset, &config.chain_key)
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
    }

    /// Deletes the segments of a partition that hold only records before `offset` (never the
    /// segment being written); returns how many went. Readers can then start at `offset` or later.
    pub async fn remove_before(&self, topic: Topic, offset: u64) -> Result<usize, LogError> {
        if self.lock.is_none() {
            return Err(LogError::ReadOnly);
        }
        let partition = Arc::clone(self.partition(topic, 0)?);
        tokio::task::spawn_blocking(move || {
            partition.with_writer(|writer| {
                let segments = list_segments(&partition.dir)?;
                // A segment ends where the next begins; the last one is being written.
                let doomed: Vec<&PathBuf> = segments
                    .windows(2)
                    .take_while(|pair| pair[1].0 <= offset)
                    .map(|pair| &pair[0].1)
                    .collect();
                let Some(first) = segments.get(doomed.len()) else {
                    return Ok(0);
                };
                if doomed.is_empty() {
                    return Ok(0);
                }
                // The checkpoint stops counting them before any goes: a crash in between
                // leaves segments the next open knows to remove.
                writer.first_segment = first.0;
                writer.segments -= doomed.len() as u64;
                writer.checkpoint(true)?;
                for path in &doomed {
                    std::fs::remove_file(path)
                        .map_err(LogError::io(format!("removing {}", path.display())))?;
                }
                Ok(doomed.len())
            })
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
    }

    fn partition(&self, topic: Topic, partition: u32) -> Result<&Arc<Partition>, LogError> {
        if partition != 0 {
            return Err(LogError::UnknownPartition {
                topic: topic.name(),
                partition,
            });
        }
        Ok(match topic {
            Topic::Data => &self.data,
            Topic::Control => &self.control,
            Topic::Quota => &self.quota,
        })
    }
}

impl Partition {
    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let mut writer = self
            .writer
            .as_ref()
            .ok_or(LogError::ReadOnly)?
            .lock()
            .map_err(|_| LogError::WriterFailed("writer lock poisoned".into()))?;
        f(&mut writer)
    }

    /// Appends `records` (blocking); returns the first one's offset.
    fn append<R: Borrow<Record>>(&self, topic: Topic, records: &[R]) -> Result<u64, LogError> {
        if records.is_empty() {
            return Ok(*self.end.borrow());
        }
        let first = self.with_writer(|writer| {
            let first = writer.append(records)?;
            self.end.send_replace(writer.next_offset);
            Ok(first)
        })?;
        let bytes: usize = records.iter().map(|r| r.borrow().value.len()).sum();
        metrics::counter!("loom_log_appended_records_total", "topic" => topic.name())
            .increment(records.len() as u64);
        metrics::counter!("loom_log_appended_bytes_total", "topic" => topic.name())
            .increment(bytes as u64);
        Ok(first)
    }

    /// Forces what was appended so far to disk and checkpoints it, without holding appends up
    /// for the fsync: the file is synced through a second handle, outside the writer's lock.
    fn sync(&self) -> Result<(), LogError> {
        let captured = self.with_writer(|writer| {
            if !writer.unsynced {
                return Ok(None);
            }
            let file = writer.file.try_clone().map_err(LogError::io(format!(
                "opening {}",
                writer.segment.display()
            )))?;
            Ok(Some((
                file,
                writer.segment.clone(),
                writer.next_checkpoint(),
            )))
        })?;
        let Some((file, segment, checkpoint)) = captured else {
            return Ok(());
        };
        let started = Instant::now();
        file.sync_data()
            .map_err(LogError::io(format!("syncing {}", segment.display())))?;
        metrics::histogram!("loom_log_fsync_seconds").record(started.elapsed().as_secs_f64());
        self.with_writer(|writer| {
            // Another checkpoint since (a roll, an append's own sync) is at least as far.
            if writer.durable.sequence + 1 != checkpoint.sequence {
                return Ok(());
            }
            writer.checkpoints.write(&checkpoint)?;
            writer.durable = checkpoint;
            writer.unsynced =
                (writer.base, writer.size) != (checkpoint.segment, checkpoint.position);
            Ok(())
        })
    }
}

/// Syncs the partitions every `interval` (`--fsync 200ms`) until they are dropped, on a thread
/// of its own so that no append waits for the fsync.
fn sync_periodically(partitions: [std::sync::Weak<Partition>; 3], interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("loom-log-sync".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                for partition in &partitions {
                    let Some(partition) = partition.upgrade() else {
                        return;
                    };
                    if let Err(error) = partition.sync() {
                        tracing::error!(%error, "periodic log sync failed");
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start the log's sync thread; syncing on appends only");
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    fn partitions(&self, _topic: Topic) -> u32 {
        1
    }

    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let partition = Arc::clone(self.partition(topic, 0)?);
        let count = records.len() as u64;
        let first = tokio::task::spawn_blocking(move || partition.append(topic, &records))
            .await
            .map_err(|e| LogError::Task(e.to_string()))??;
        Ok((first..first + count)
            .map(|offset| Position {
                partition: 0,
                offset,
            })
            .collect())
    }

    async fn end_offset(&self, topic: Topic, partition: u32) -> Result<u64, LogError> {
        Ok(*self.partition(topic, partition)?.end.borrow())
    }

    async fn read_from(
        &self,
        topic: Topic,
        partition: u32,
        offset: u64,
    ) -> Result<Box<dyn LogReader>, LogError> {
        Ok(Box::new(EmbeddedReader::new(
            Arc::clone(self.partition(topic, partition)?),
            offset,
        )?))
    }

    /// The embedded log lives in one process, so a group has one member: it gets the topic's
    /// only partition.
    async fn join_group(
        &self,
        _group: &str,
        topic: Topic,
    ) -> Result<Box<dyn GroupReader>, LogError> {
        Ok(Box::new(EmbeddedGroupReader {
            partition: Arc::clone(self.partition(topic, 0)?),
            state: GroupState::Joining,
        }))
    }

    async fn sync(&self) -> Result<(), LogError> {
        if self.lock.is_none() {
            return Ok(()); // Read-only: nothing written here.
        }
        let partitions = [&self.data, &self.control, &self.quota].map(Arc::clone);
        tokio::task::spawn_blocking(move || partitions.iter().try_for_each(|p| p.sync()))
            .await
            .map_err(|e| LogError::Task(e.to_string()))?
    }
}

/// The appending side of a partition. All methods block: call them on the blocking pool.
struct Writer {
    dir: PathBuf,
    topic: Topic,
    file: File,
    segment: PathBuf,
    /// Base offset of the current segment.
    base: u64,
    /// Bytes in the current segment.
    size: u64,
    next_offset: u64,
    chain: Chain,
    /// Base offset of the partition's first segment, and how many segments it has.
    first_segment: u64,
    segments: u64,
    checkpoints: CheckpointFile,
    /// The last checkpoint written.
    durable: Checkpoint,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    unsynced: bool,
    failed: Option<String>,
    buf: Vec<u8>,
}

impl Writer {
    /// Recovers the partition (see `recovery`) and checkpoints where it now ends.
    fn recover(
        log_dir: &Path,
        config: &EmbeddedLogConfig,
        topic: Topic,
    ) -> Result<Writer, LogError> {
        let recovered = recovery::recover(log_dir, topic, &config.chain_key)?;
        let dir = log_dir.join(topic.name()).join("0");
        let checkpoints = CheckpointFile::open(&dir, config.chain_key.clone(), topic)?;
        let mut writer = Writer {
            dir,
            topic,
            file: recovered.file,
            segment: recovered.path,
            base: recovered.base,
            size: recovered.size,
            next_offset: recovered.next_offset,
            chain: recovered.chain,
            first_segment: recovered.first_segment,
            segments: recovered.segments,
            checkpoints,
            durable: Checkpoint {
                sequence: recovered.sequence,
                first_segment: recovered.first_segment,
                segments: recovered.segments,
                segment: recovered.base,
                position: recovered.size,
                offset: recovered.next_offset,
                head: recovered.chain,
            },
            fsync: config.fsync,
            segment_bytes: config.segment_bytes,
            // Records after the old checkpoint are synced and checkpointed now.
            unsynced: true,
            failed: None,
            buf: Vec::new(),
        };
        writer.sync()?;
        Ok(writer)
    }

    /// Seals the current segment and starts the next one.
    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        let (file, segment) = create_segment_file(&self.dir, self.next_offset, &self.chain)?;
        tracing::debug!(topic = self.topic.name(), segment = %segment.display(), "rolled log segment");
        self.file = file;
        self.segment = segment;
        self.base = self.next_offset;
        self.size = SEGMENT_HEADER_LEN;
        self.segments += 1;
        self.checkpoint(false)
    }

    /// Appends `records`, returning the offset of the first.
    fn append<R: Borrow<Record>>(&mut self, records: &[R]) -> Result<u64, LogError> {
        if let Some(reason) = &self.failed {
            return Err(LogError::WriterFailed(reason.clone()));
        }
        if self.size >= self.segment_bytes && self.size > SEGMENT_HEADER_LEN {
            self.roll()?;
        }
        let first = self.next_offset;
        let mut chain = self.chain;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for (i, record) in records.iter().enumerate() {
            encode_frame(&mut buf, first + i as u64, record.borrow(), &mut chain)?;
        }
        let written = self.file.write_all(&buf);
        let len = buf.len() as u64;
        // Keep the buffer for the next batch unless one huge batch blew it up.
        if buf.capacity() <= 8 * 1024 * 1024 {
            self.buf = buf;
        }
        if let Err(error) = written {
            // Cut off whatever part of the batch reached the file, so the log stays well-formed.
            let restored = self
                .file
                .set_len(self.size)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.size)).map(|_| ()));
            if let Err(restore_error) = restored {
                self.failed = Some(format!(
                    "{error}; then could not truncate the partial write: {restore_error}"
                ));
            }
            return Err(LogError::io(format!(
                "appending to {}",
                self.segment.display()
            ))(error));
        }
        self.size += len;
        self.next_offset += records.len() as u64;
        self.chain = chain;
        self.unsynced = true;
        // An interval is kept by the sync thread, off the append path (see `sync_periodically`).
        if self.fsync == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(first)
    }

    /// Forces the segment to disk, then checkpoints the new durable end.
    fn sync(&mut self) -> Result<(), LogError> {
        if !self.unsynced {
            return Ok(());
        }
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(LogError::io(format!("syncing {}", self.segment.display())))?;
        metrics::histogram!("loom_log_fsync_seconds").record(started.elapsed().as_secs_f64());
        self.unsynced = false;
        self.checkpoint(false)
    }

    /// The checkpoint of the current end.
    fn next_checkpoint(&self) -> Checkpoint {
        Checkpoint {
            sequence: self.durable.sequence + 1,
            first_segment: self.first_segment,
            segments: self.segments,
            segment: self.base,
            position: self.size,
            offset: self.next_offset,
            head: self.chain,
        }
    }

    /// Writes a checkpoint at the current end, which must be durable already; `durably` waits
    /// for the checkpoint itself to reach the disk.
    fn checkpoint(&mut self, durably: bool) -> Result<(), LogError> {
        let checkpoint = self.next_checkpoint();
        if durably {
            self.checkpoints.write_durably(&checkpoint)?;
        } else {
            self.checkpoints.write(&checkpoint)?;
        }
        self.durable = checkpoint;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(error) = self.sync() {
            tracing::error!(%error, "could not sync the log on close");
        }
    }
}

/// Reads one partition of the embedded log.
struct EmbeddedReader {
    partition: Arc<Partition>,
    end: watch::Receiver<u64>,
    cursor: Option<SegmentCursor>,
    next_offset: u64,
    pending_error: Option<LogError>,
}

/// An open segment and where in it the next frame starts.
struct SegmentCursor {
    path: PathBuf,
    file: BufReader<File>,
    pos: u64,
    /// The file's length when last looked at; refreshed when a read reaches it.
    len: u64,
}

impl SegmentCursor {
    /// Reads the frame at `pos`. The length is looked up again before concluding that the
    /// segment ends here, since the writer may have appended since it was last read.
    fn next_frame(&mut self) -> std::io::Result<FrameRead> {
        let mut refreshed = false;
        loop {
            if self.pos + FRAME_HEADER_LEN > self.len && !refreshed {
                self.len = self.file.get_ref().metadata()?.len();
                refreshed = true;
            }
            let frame = read_frame(&mut self.file, self.pos, self.len)?;
            if refreshed || !matches!(frame, FrameRead::End | FrameRead::Torn(_)) {
                return Ok(frame);
            }
            self.file.seek(SeekFrom::Start(self.pos))?;
            self.len = self.file.get_ref().metadata()?.len();
            refreshed = true;
        }
    }
}

impl EmbeddedReader {
    async fn read_available(&mut self, max: usize) -> Result<Vec<Entry>, LogError> {
        if let Some(error) = self.pending_error.take() {
            return Err(error);
        }
        let end = *self.end.borrow_and_update();
        if self.next_offset >= end || max == 0 {
            return Ok(Vec::new());
        }
        let dir = self.partition.dir.clone();
        let mut state = ReadState {
            cursor: self.cursor.take(),
            offset: self.next_offset,
        };
        let want = max.min(usize::try_from(end - state.offset).unwrap_or(usize::MAX));
        let (state, entries, result) = tokio::task::spawn_blocking(move || {
            let mut entries = Vec::with_capacity(want.min(1024));
            let result = read_frames(&dir, &mut state, want, &mut entries);
            (state, entries, result)
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?;
        self.cursor = state.cursor;
        self.next_offset = state.offset;
        match result {
            Err(error) if entries.is_empty() => Err(error),
            result => {
                // Hand out what was read; the error comes with the next call.
                self.pending_error = result.err();
                Ok(entries)
            }
        }
    }
}

impl EmbeddedReader {
    fn new(partition: Arc<Partition>, offset: u64) -> Result<EmbeddedReader, LogError> {
        let end = *partition.end.borrow();
        if offset > end {
            return Err(LogError::OffsetOutOfRange {
                requested: offset,
                end,
            });
        }
        Ok(EmbeddedReader {
            end: partition.end.subscribe(),
            partition,
            cursor: None,
            next_offset: offset,
            pending_error: None,
        })
    }
}

/// The only member of a group on the embedded log.
struct EmbeddedGroupReader {
    partition: Arc<Partition>,
    state: GroupState,
}

enum GroupState {
    /// The partition is still to be announced.
    Joining,
    /// Waiting for the member to say where to start.
    Starting(oneshot::Receiver<Vec<Position>>),
    Reading(EmbeddedReader),
}

#[async_trait]
impl GroupReader for EmbeddedGroupReader {
    async fn next(&mut self, max: usize) -> Result<GroupEvent, LogError> {
        loop {
            match &mut self.state {
                GroupState::Joining => {
                    let (start, answer) = oneshot::channel();
                    self.state = GroupState::Starting(answer);
                    return Ok(GroupEvent::Assigned {
                        partitions: vec![0],
                        start,
                    });
                }
                GroupState::Starting(answer) => {
                    let offset = answer
                        .await
                        .map_err(|_| {
                            LogError::Task("the group member did not say where to start".into())
                        })?
                        .iter()
                        .find(|p| p.partition == 0)
                        .map_or(0, |p| p.offset);
                    let reader = EmbeddedReader::new(Arc::clone(&self.partition), offset)?;
                    self.state = GroupState::Reading(reader);
                }
                GroupState::Reading(reader) => {
                    return Ok(GroupEvent::Entries(reader.next(max).await?));
                }
            }
        }
    }

    /// Nothing to record: the member's own store is the only place positions live.
    async fn commit(&mut self, _positions: &[Position]) -> Result<(), LogError> {
        Ok(())
    }
}

#[async_trait]
impl LogReader for EmbeddedReader {
    async fn poll(&mut self, max: usize) -> Result<Vec<Entry>, LogError> {
        self.read_available(max).await
    }

    async fn next(&mut self, max: usize) -> Result<Vec<Entry>, LogError> {
        loop {
            let entries = self.read_available(max).await?;
            if !entries.is_empty() {
                return Ok(entries);
            }
            let next = self.next_offset;
            // The sender lives as long as the log; if it is gone, nothing more will come.
            if self.end.wait_for(|end| *end > next).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn position(&self) -> Position {
        Position {
            partition: 0,
            offset: self.next_offset,
        }
    }
}

/// Where a reader is: the next offset, and the open segment positioned at it (if any).
struct ReadState {
    cursor: Option<SegmentCursor>,
    offset: u64,
}

/// Reads up to `want` records (all known to be written) into `entries`, advancing `state`. On a
/// damaged record it returns the error with `state` past the record when its length was intact,
/// so that the next read goes on after it.
fn read_frames(
    dir: &Path,
    state: &mut ReadState,
    want: usize,
    entries: &mut Vec<Entry>,
) -> Result<(), LogError> {
    while entries.len() < want {
        let mut current = match state.cursor.take() {
            Some(current) => current,
            None => seek_to(dir, state.offset)?,
        };
        let offset = state.offset;
        let corrupt = |current: &SegmentCursor, reason: &str| LogError::Corrupt {
            segment: current.path.clone(),
            byte: current.pos,
            offset: Some(offset),
            reason: reason.to_owned(),
        };
        let io =
            |current: &SegmentCursor| LogError::io(format!("reading {}", current.path.display()));
        match current.next_frame().map_err(io(&current))? {
            // This segment is done; the next record starts the next segment.
            FrameRead::End => {}
            FrameRead::Torn(reason) => return Err(corrupt(&current, reason)),
            FrameRead::Corrupt { reason, skippable } => {
                let error = corrupt(&current, reason);
                if let Some(frame_len) = skippable {
                    current.pos += frame_len;
                    state.offset += 1;
                    state.cursor = Some(current);
                }
                return Err(error);
            }
            FrameRead::Frame { header, body } => {
                let frame_len = FRAME_HEADER_LEN + u64::from(header.body_len);
                let decoded = match decode_body(body) {
                    Ok(decoded) => decoded,
                    Err(reason) => {
                        let error = corrupt(&current, reason);
                        current.pos += frame_len;
                        state.offset += 1;
                        state.cursor = Some(current);
                        return Err(error);
                    }
                };
                if decoded.offset != offset {
                    return Err(corrupt(&current, "record offset out of sequence"));
                }
                current.pos += frame_len;
                entries.push(Entry {
                    position: Position {
                        partition: 0,
                        offset,
                    },
                    record: decoded.record,
                });
                state.offset += 1;
                state.cursor = Some(current);
            }
        }
    }
    Ok(())
}

/// Opens the segment holding `offset` and positions it at that record.
fn seek_to(dir: &Path, offset: u64) -> Result<SegmentCursor, LogError> {
    let segments = list_segments(dir)?;
    let Some((_, path)) = segments.iter().rev().find(|(base, _)| *base <= offset) else {
        return Err(LogError::OffsetOutOfRange {
            requested: offset,
            end: 0,
        });
    };
    let file = File::open(path).map_err(LogError::io(format!("opening {}", path.display())))?;
    let mut file = BufReader::with_capacity(256 * 1024, file);
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact(&mut header)
        .map_err(LogError::io(format!("reading {}", path.display())))?;
    let corrupt = |byte: u64, reason: &str| LogError::Corrupt {
        segment: path.clone(),
        byte,
        offset: Some(offset),
        reason: reason.to_owned(),
    };
    let (mut at, _) = decode_segment_header(&header).map_err(|reason| corrupt(0, reason))?;
    let mut pos = SEGMENT_HEADER_LEN;
    while at < offset {
        let mut frame_header = [0u8; FRAME_HEADER_LEN as usize];
        file.read_exact(&mut frame_header)
            .map_err(LogError::io(format!("reading {}", path.display())))?;
        let header = decode_frame_header(&frame_header)
            .ok_or_else(|| corrupt(pos, "frame length checksum mismatch"))?;
        file.seek_relative(i64::from(header.body_len))
            .map_err(LogError::io(format!("seeking {}", path.display())))?;
        pos += FRAME_HEADER_LEN + u64::from(header.body_len);
        at += 1;
    }
    Ok(SegmentCursor {
        path: path.clone(),
        file,
        pos,
        len: 0,
    })
}
