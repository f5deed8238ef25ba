//! Opening a partition for appending after a crash, and `loom repair`.
//!
//! The partition's checkpoint says how far the log was durable. On open, every segment from the
//! checkpoint's on is read whole:
//!
//! - an unfinished record after the checkpoint, at the very end, is a torn write: its bytes move
//!   to `<log dir>/quarantine/` and the segment is cut before it;
//! - a complete record that fails its checksum (anywhere), anything wrong before the checkpoint,
//!   a chain that does not lead to the checkpoint's head, or segments missing, is damage: the
//!   open fails with an error naming segment, byte and offset, and nothing is changed.
//!
//! Only [`truncate_at`] (`loom repair --truncate-at`), asked explicitly, cuts intact or damaged
//! records; it quarantines what it cuts too.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::checkpoint::{self, CHECKPOINT_FILE, ChainKey, Checkpoint, CheckpointFile};
use super::segment::{
    Boundary, Chain, SEGMENT_HEADER_LEN, ScanStop, Step, decode_segment_header,
    encode_segment_header, list_segments, scan_segment, segment_name,
};
use super::verify::{Torn, checkpoint_problem, count_problem, leftovers, walk};
use super::{LogError, Topic};

/// The directory cut bytes are kept in.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Where a recovered partition's appends continue.
#[derive(Debug)]
pub struct Recovered {
    /// The active (last) segment, open for appending at `size`.
    pub file: File,
    pub path: PathBuf,
    pub base: u64,
    pub size: u64,
    pub next_offset: u64,
    pub chain: Chain,
    pub first_segment: u64,
    /// Segments from the first to the active one.
    pub segments: u64,
    /// The sequence of the checkpoint found (0: none).
    pub sequence: u64,
}

fn damage(segment: &Path, byte: u64, offset: Option<u64>, reason: impl Into<String>) -> LogError {
    LogError::Corrupt {
        segment: segment.to_owned(),
        byte,
        offset,
        reason: reason.into(),
    }
}

/// Recovers the partition of `topic` under `log_dir` (see the module docs).
pub fn recover(log_dir: &Path, topic: Topic, key: &ChainKey) -> Result<Recovered, LogError> {
    let dir = log_dir.join(topic.name()).join("0");
    std::fs::create_dir_all(&dir).map_err(LogError::io(format!("creating {}", dir.display())))?;
    let loaded = checkpoint::load(&dir, key, topic)?;
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    if let Some(problem) = loaded.problem {
        return Err(damage(&checkpoint_path, 0, None, problem));
    }
    if let Some(note) = &loaded.note {
        tracing::warn!(topic = topic.name(), "{note}");
    }
    let mut segments = list_segments(&dir)?;
    let Some(c) = loaded.checkpoint else {
        return recover_without_checkpoint(log_dir, topic, &dir, segments);
    };
    // Segments older than the first one counted: an interrupted removal (the checkpoint that
    // stopped counting them was synced before any was deleted).
    for (base, path) in segments.drain(..leftovers(&segments, &c)) {
        tracing::warn!(segment = %path.display(), base, "removing a segment an interrupted removal left behind");
        std::fs::remove_file(&path)
            .map_err(LogError::io(format!("removing {}", path.display())))?;
    }
    if let Some(problem) = count_problem(&segments, &c, &checkpoint_path) {
        return Err(problem.into());
    }
    // The sealed segments before the checkpoint's: their headers (`loom verify` reads them whole).
    let first_scanned = segments.partition_point(|(base, _)| *base < c.segment);
    for (base, path) in &segments[..first_scanned] {
        check_header(path, *base)?;
    }
    let walked = walk(&segments[first_scanned..], Some(&c), |_| {})?;
    if let Some(problem) = walked.problem {
        return Err(problem.into());
    }
    if let Some(problem) = checkpoint_problem(&c, walked.met_checkpoint, &checkpoint_path) {
        return Err(problem.into());
    }
    if let Some(Torn {
        path,
        at,
        reason,
        file_len,
    }) = walked.torn
    {
        if at < SEGMENT_HEADER_LEN {
            // A crash while rolling: the new segment's header never fully reached the disk.
            let kept = quarantine_file(log_dir, topic, &path)?;
            tracing::warn!(segment = %path.display(), quarantined = %kept.display(), reason, "moved a segment whose header was never completely written to quarantine");
            segments.pop();
        } else {
            let kept = quarantine_tail(log_dir, topic, &path, at)?;
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(LogError::io(format!("opening {}", path.display())))?;
            file.set_len(at)
                .and_then(|()| file.sync_all())
                .map_err(LogError::io(format!("truncating {}", path.display())))?;
            tracing::warn!(
                segment = %path.display(),
                at,
                bytes = file_len - at,
                quarantined = %kept.display(),
                reason,
                "cut an unfinished write off the end of the log (after its checkpoint); the bytes are kept in quarantine"
            );
        }
    }
    let Some((base, path, size)) = walked.active else {
        return Err(damage(&dir, 0, None, "no segment with an intact header"));
    };
    let file = open_for_append(&path, size)?;
    Ok(Recovered {
        file,
        path,
        base,
        size,
        next_offset: walked.end,
        chain: walked.head,
        first_segment: c.first_segment,
        segments: segments.len() as u64,
        sequence: c.sequence,
    })
}

/// A partition with no checkpoint is new — or was damaged, if it holds records.
fn recover_without_checkpoint(
    log_dir: &Path,
    topic: Topic,
    dir: &Path,
    segments: Vec<(u64, PathBuf)>,
) -> Result<Recovered, LogError> {
    let mut kept = Vec::new();
    for (base, path) in segments {
        let len = std::fs::metadata(&path)
            .map_err(LogError::io(format!("reading {}", path.display())))?
            .len();
        if len > SEGMENT_HEADER_LEN {
            return Err(damage(
                &dir.join(CHECKPOINT_FILE),
                0,
                None,
                "no checkpoint, but the partition holds records: its durable end cannot be told \
                 apart from damage (the checkpoint was deleted, or the log was written before \
                 checkpoints existed). Check it with `loom verify`; to accept it as it is, run \
                 `loom repair --truncate-at TOPIC/0:END` with the end `loom verify` prints",
            ));
        }
        if len < SEGMENT_HEADER_LEN {
            // Created by a crash before its header was written.
            quarantine_file(log_dir, topic, &path)?;
        } else {
            kept.push((base, path));
        }
    }
    let (base, path, chain) = match kept.as_slice() {
        [] => {
            let chain = [0u8; 32];
            let (_, path) = create_segment_file(dir, 0, &chain)?;
            (0, path, chain)
        }
        [(base, path)] => {
            let (_, chain) = check_header(path, *base)?;
            (*base, path.clone(), chain)
        }
        _ => {
            return Err(damage(
                dir,
                0,
                None,
                "several segments and no checkpoint: damaged",
            ));
        }
    };
    Ok(Recovered {
        file: open_for_append(&path, SEGMENT_HEADER_LEN)?,
        path,
        base,
        size: SEGMENT_HEADER_LEN,
        next_offset: base,
        chain,
        first_segment: base,
        segments: 1,
        sequence: 0,
    })
}

/// Reads and checks a segment's header; returns its base offset and previous chain.
fn check_header(path: &Path, base: u64) -> Result<(u64, Chain), LogError> {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(LogError::io(format!("reading {}", path.display())))?;
    let (header_base, chain) =
        decode_segment_header(&header).map_err(|reason| damage(path, 0, None, reason))?;
    if header_base != base {
        return Err(damage(
            path,
            0,
            None,
            "segment header's base offset does not match its file name",
        ));
    }
    Ok((header_base, chain))
}

fn open_for_append(path: &Path, size: u64) -> Result<File, LogError> {
    use std::io::{Seek, SeekFrom};
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(LogError::io(format!("opening {}", path.display())))?;
    file.seek(SeekFrom::Start(size))
        .map_err(LogError::io(format!("seeking {}", path.display())))?;
    Ok(file)
}

/// Creates a segment file with its header, durably (file and directory synced).
pub(crate) fn create_segment_file(
    dir: &Path,
    base: u64,
    chain: &Chain,
) -> Result<(File, PathBuf), LogError> {
    let path = dir.join(segment_name(base));
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(LogError::io(format!("creating {}", path.display())))?;
    file.write_all(&encode_segment_header(base, chain))
        .map_err(LogError::io(format!("writing {}", path.display())))?;
    file.sync_all()
        .map_err(LogError::io(format!("syncing {}", path.display())))?;
    sync_dir(dir)?;
    Ok((file, path))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LogError::io(format!("syncing {}", dir.display())))
}

fn quarantine_dir(log_dir: &Path) -> Result<PathBuf, LogError> {
    let dir = log_dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&dir).map_err(LogError::io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

fn quarantine_name(topic: Topic, path: &Path, what: &str) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("unknown");
    format!(
        "{}-0-{name}-{what}-{}.bin",
        topic.name(),
        crate::event::now_micros()
    )
}

/// Copies bytes `from..` of `path` into the quarantine directory, durably; returns the copy.
fn quarantine_tail(
    log_dir: &Path,
    topic: Topic,
    path: &Path,
    from: u64,
) -> Result<PathBuf, LogError> {
    use std::io::{Seek, SeekFrom};
    let dir = quarantine_dir(log_dir)?;
    let target = dir.join(quarantine_name(topic, path, &format!("from-byte-{from}")));
    let mut source =
        File::open(path).map_err(LogError::io(format!("opening {}", path.display())))?;
    source
        .seek(SeekFrom::Start(from))
        .map_err(LogError::io(format!("seeking {}", path.display())))?;
    let mut copy =
        File::create(&target).map_err(LogError::io(format!("creating {}", target.display())))?;
    std::io::copy(&mut source, &mut copy)
        .and_then(|_| copy.sync_all())
        .map_err(LogError::io(format!("writing {}", target.display())))?;
    sync_dir(&dir)?;
    Ok(target)
}

/// Moves a whole file into the quarantine directory, durably; returns where it went.
fn quarantine_file(log_dir: &Path, topic: Topic, path: &Path) -> Result<PathBuf, LogError> {
    let dir = quarantine_dir(log_dir)?;
    let target = dir.join(quarantine_name(topic, path, "whole"));
    std::fs::rename(path, &target).map_err(LogError::io(format!(
        "moving {} to {}",
        path.display(),
        target.display()
    )))?;
    sync_dir(&dir)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(target)
}

/// What [`truncate_at`] did.
#[derive(Debug, Clone)]
pub struct Truncated {
    /// Records kept: the partition now ends at this offset.
    pub end: u64,
    /// The chain head at the new end.
    pub head: Chain,
    /// Where the cut bytes (and the old checkpoint) went.
    pub quarantined: Vec<PathBuf>,
}

/// Cuts the partition of `topic` so that it ends before record `offset`: the rest of its segment
/// and every later segment move to the quarantine directory, and a new checkpoint is written at
/// the new end. The records kept must be intact up to `offset` in the segment that holds it
/// (earlier segments are `loom verify`'s to check). The caller holds the log's lock.
pub fn truncate_at(
    log_dir: &Path,
    topic: Topic,
    offset: u64,
    key: &ChainKey,
) -> Result<Truncated, LogError> {
    let dir = log_dir.join(topic.name()).join("0");
    let segments = list_segments(&dir)?;
    let Some(index) = segments.iter().rposition(|(base, _)| *base <= offset) else {
        return Err(LogError::OffsetOutOfRange {
            requested: offset,
            end: segments.first().map_or(0, |(base, _)| *base),
        });
    };
    let (base, path) = &segments[index];
    let mut cut: Option<Boundary> = None;
    let scan = scan_segment(path, *base, |step| {
        if let Step::Boundary(b) = step
            && b.offset == offset
        {
            cut = Some(b);
        }
    })?;
    let Some(cut) = cut else {
        let end = base + scan.records;
        return Err(match scan.stop {
            ScanStop::End if index == segments.len() - 1 => LogError::OffsetOutOfRange {
                requested: offset,
                end,
            },
            ScanStop::Damaged { reason, .. } => damage(
                path,
                scan.end,
                Some(end),
                format!(
                    "cannot reach offset {offset}: the records from offset {end} on are damaged ({reason}); cut at {end} or earlier"
                ),
            ),
            _ => damage(
                path,
                scan.end,
                Some(end),
                format!(
                    "cannot reach offset {offset}: the segment ends at offset {end}; cut at {end} or earlier"
                ),
            ),
        });
    };
    let mut quarantined = Vec::new();
    if scan.file_len > cut.position {
        quarantined.push(quarantine_tail(log_dir, topic, path, cut.position)?);
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(LogError::io(format!("opening {}", path.display())))?;
        file.set_len(cut.position)
            .and_then(|()| file.sync_all())
            .map_err(LogError::io(format!("truncating {}", path.display())))?;
    }
    for (_, later) in &segments[index + 1..] {
        quarantined.push(quarantine_file(log_dir, topic, later)?);
    }
    // A fresh checkpoint file: the old one (kept as evidence) may claim more than is left.
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    if checkpoint_path.exists() {
        quarantined.push(quarantine_file(log_dir, topic, &checkpoint_path)?);
    }
    let checkpoints = CheckpointFile::open(&dir, key.clone(), topic)?;
    checkpoints.write_durably(&Checkpoint {
        sequence: 1,
        first_segment: segments[0].0,
        segments: index as u64 + 1,
        segment: *base,
        position: cut.position,
        offset,
        head: cut.head,
    })?;
    Ok(Truncated {
        end: offset,
        head: cut.head,
        quarantined,
    })
}
