//! `verify`: reads every record of every partition of an embedded log, checks checksums, offsets
//! and the hash chain, and checks that the chain leads to authenticated heads — each partition's
//! checkpoint, the latest head anchored in the control topic, and any head the operator expects.
//! Read-only: it can run while a server appends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::checkpoint::{self, CHECKPOINT_FILE, ChainKey, Checkpoint, anchor_mac};
use super::segment::{Boundary, Chain, ScanStop, Step, list_segments, scan_segment};
use super::{LogError, Record, Topic};
use crate::codec::Registry;
use crate::event::Payload;

/// A chain head the log must have: after the first `offset` records of a partition, `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedHead {
    pub topic: Topic,
    pub partition: u32,
    pub offset: u64,
    pub head: Chain,
}

impl ExpectedHead {
    /// Reads `TOPIC/PARTITION:OFFSET:HEX`, the form `loom verify --print-head` prints.
    pub fn parse(text: &str) -> Result<ExpectedHead, String> {
        let bad = || {
            format!("expected TOPIC/PARTITION:OFFSET:HEAD (as --print-head prints), not {text:?}")
        };
        let mut parts = text.trim().split(':');
        let (Some(place), Some(offset), Some(head), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (topic, partition) = place.split_once('/').ok_or_else(bad)?;
        let topic = Topic::from_name(topic).ok_or_else(bad)?;
        let head: Chain = hex::decode(head)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(bad)?;
        Ok(ExpectedHead {
            topic,
            partition: partition.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
            head,
        })
    }
}

impl std::fmt::Display for ExpectedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}:{}:{}",
            self.topic.name(),
            self.partition,
            self.offset,
            hex::encode(self.head)
        )
    }
}

/// A problem `verify` found: the first damaged or altered spot of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The segment (or the checkpoint file) where it is.
    pub segment: PathBuf,
    pub byte: u64,
    pub offset: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.segment.display(), self.byte)?;
        if let Some(offset) = self.offset {
            write!(f, ", record offset {offset}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl From<Problem> for LogError {
    fn from(problem: Problem) -> LogError {
        LogError::Corrupt {
            segment: problem.segment,
            byte: problem.byte,
            offset: problem.offset,
            reason: problem.reason,
        }
    }
}

/// What `verify` found in one partition.
#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub topic: &'static str,
    pub partition: u32,
    pub segments: usize,
    /// Intact records (up to the first problem).
    pub records: u64,
    pub bytes: u64,
    /// The offset after the last intact record: where `loom repair --truncate-at` would cut to
    /// leave only intact records.
    pub end: u64,
    /// Chain hash after the last intact record.
    pub head: Chain,
    /// The authenticated checkpoint the chain leads to.
    pub checkpoint: Option<Checkpoint>,
    /// The offset of the latest head anchored in the control topic, found on the chain.
    pub anchored: Option<u64>,
    /// An unfinished write at the very end, after the checkpoint (a crash); the next start
    /// moves it to the quarantine directory.
    pub torn_tail: Option<String>,
    pub problem: Option<Problem>,
    /// Things worth knowing that are not damage.
    pub notes: Vec<String>,
}

impl PartitionReport {
    /// Records after the checkpoint: appended since the last fsync, not yet authenticated.
    pub fn unanchored(&self) -> u64 {
        self.end
            .saturating_sub(self.checkpoint.map_or(0, |c| c.offset))
    }

    /// The head after the last intact record, in `--expect-head` form.
    pub fn head(&self) -> ExpectedHead {
        ExpectedHead {
            topic: Topic::from_name(self.topic).unwrap_or(Topic::Data),
            partition: self.partition,
            offset: self.end,
            head: self.head,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub partitions: Vec<PartitionReport>,
}

impl VerifyReport {
    pub fn first_problem(&self) -> Option<&Problem> {
        self.partitions.iter().find_map(|p| p.problem.as_ref())
    }

    pub fn partition(&self, topic: Topic, partition: u32) -> Option<&PartitionReport> {
        self.partitions
            .iter()
            .find(|p| p.topic == topic.name() && p.partition == partition)
    }
}

/// Verifies every partition under `log_dir` with `key`, and checks `expected` heads besides.
pub fn verify(
    log_dir: &Path,
    key: &ChainKey,
    expected: &[ExpectedHead],
) -> Result<VerifyReport, LogError> {
    let mut report = VerifyReport::default();
    // The control topic first: it carries the anchored heads of the data topic.
    let mut anchors: BTreeMap<(&'static str, u32), ExpectedHead> = BTreeMap::new();
    let mut forged: Option<Problem> = None;
    let mut control = Vec::new();
    for partition in partitions(log_dir, Topic::Control)? {
        let dir = log_dir
            .join(Topic::Control.name())
            .join(partition.to_string());
        let heads = expected_for(expected, Topic::Control, partition);
        let mut partition_report = verify_partition(
            Topic::Control,
            partition,
            &dir,
            key,
            &heads,
            |offset, record| {
                if forged.is_none()
                    && let Err(reason) = note_anchor(key, record, &mut anchors)
                {
                    forged = Some(Problem {
                        segment: dir.clone(),
                        byte: 0,
                        offset: Some(offset),
                        reason,
                    });
                }
            },
        )?;
        if partition_report.problem.is_none() {
            partition_report.problem = forged.take();
        }
        control.push(partition_report);
    }
    for partition in partitions(log_dir, Topic::Data)? {
        let dir = log_dir.join(Topic::Data.name()).join(partition.to_string());
        let anchor = anchors.get(&(Topic::Data.name(), partition)).cloned();
        let mut heads = expected_for(expected, Topic::Data, partition);
        heads.extend(anchor.clone());
        let mut partition_report =
            verify_partition(Topic::Data, partition, &dir, key, &heads, |_, _| {})?;
        if partition_report.problem.is_none() {
            partition_report.anchored = anchor.map(|a| a.offset);
        }
        report.partitions.push(partition_report);
    }
    report.partitions.extend(control);
    for partition in partitions(log_dir, Topic::Quota)? {
        let dir = log_dir
            .join(Topic::Quota.name())
            .join(partition.to_string());
        let heads = expected_for(expected, Topic::Quota, partition);
        let partition_report =
            verify_partition(Topic::Quota, partition, &dir, key, &heads, |_, _| {})?;
        report.partitions.push(partition_report);
    }
    for head in expected {
        if report.partition(head.topic, head.partition).is_none() {
            return Err(LogError::UnknownPartition {
                topic: head.topic.name(),
                partition: head.partition,
            });
        }
    }
    Ok(report)
}

fn expected_for(expected: &[ExpectedHead], topic: Topic, partition: u32) -> Vec<ExpectedHead> {
    expected
        .iter()
        .filter(|e| e.topic == topic && e.partition == partition)
        .cloned()
        .collect()
}

/// Partition numbers of a topic's directory.
fn partitions(log_dir: &Path, topic: Topic) -> Result<Vec<u32>, LogError> {
    let topic_dir = log_dir.join(topic.name());
    if !topic_dir.exists() {
        return Ok(Vec::new());
    }
    let mut partitions: Vec<u32> = std::fs::read_dir(&topic_dir)
        .map_err(LogError::io(format!("listing {}", topic_dir.display())))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Keeps the latest authenticated anchor per partition; `Err` for an anchor whose MAC fails.
fn note_anchor(
    key: &ChainKey,
    record: &Record,
    anchors: &mut BTreeMap<(&'static str, u32), ExpectedHead>,
) -> Result<(), String> {
    if record.header(crate::codec::HEADER_EVENT_TYPE) != Some(b"log.anchored".as_slice()) {
        return Ok(());
    }
    let registry = Registry::builtin().map_err(|e| e.to_string())?;
    let event = registry
        .decode(&record.value)
        .map_err(|e| format!("an anchored head does not decode: {e}"))?;
    let Payload::LogAnchored(anchor) = event.payload else {
        return Err("a record says it is an anchored head but is not".into());
    };
    let (Some(topic), Ok(head), Ok(partition), Ok(offset)) = (
        Topic::from_name(&anchor.topic),
        Chain::try_from(anchor.head.as_slice()),
        u32::try_from(anchor.partition),
        u64::try_from(anchor.offset),
    ) else {
        return Err("an anchored head is malformed".into());
    };
    if anchor_mac(key, topic, partition, offset, &head)[..] != anchor.mac[..] {
        return Err(
            "an anchored head is not authenticated by this master key (forged or altered)".into(),
        );
    }
    anchors.insert(
        (topic.name(), partition),
        ExpectedHead {
            topic,
            partition,
            offset,
            head,
        },
    );
    Ok(())
}

/// Verifies one partition; `on_record` sees every intact record.
fn verify_partition(
    topic: Topic,
    partition: u32,
    dir: &Path,
    key: &ChainKey,
    expected: &[ExpectedHead],
    mut on_record: impl FnMut(u64, &Record),
) -> Result<PartitionReport, LogError> {
    // The checkpoint before the segments: it only ever claims what is already written, so the
    // segments read after it hold at least that much even while a server appends.
    let loaded = checkpoint::load(dir, key, topic)?;
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    let checkpoint = loaded.checkpoint;
    let mut segments = list_segments(dir)?;
    let mut report = PartitionReport {
        topic: topic.name(),
        partition,
        segments: segments.len(),
        records: 0,
        bytes: 0,
        end: segments.first().map_or(0, |(base, _)| *base),
        head: [0u8; 32],
        checkpoint: None,
        anchored: None,
        torn_tail: None,
        problem: None,
        notes: loaded.note.into_iter().collect(),
    };
    if let Some(c) = &checkpoint {
        let leftovers = leftovers(&segments, c);
        if leftovers > 0 {
            report.notes.push(format!(
                "{leftovers} segment(s) before the first one the checkpoint counts (left by an \
                 interrupted removal; the next start removes them)"
            ));
            segments.drain(..leftovers);
            report.end = c.first_segment;
        }
        report.problem = count_problem(&segments, c, &checkpoint_path);
    }
    if report.problem.is_some() {
        return Ok(report);
    }
    let mut met_heads = vec![None; expected.len()];
    let walked = walk(&segments, checkpoint.as_ref(), |step| match step {
        Step::Boundary(b) => {
            for (head, met) in expected.iter().zip(met_heads.iter_mut()) {
                if head.offset == b.offset && met.is_none() {
                    *met = Some(b.head);
                }
            }
        }
        Step::Record { offset, record } => on_record(offset, record),
    })?;
    report.records = walked.records;
    report.bytes = walked.bytes;
    report.end = walked.end;
    report.head = walked.head;
    report.torn_tail = walked.torn.as_ref().map(|torn| {
        format!(
            "{} at byte {} of {} ({} bytes after the last complete record)",
            torn.reason,
            torn.at,
            torn.path.display(),
            torn.file_len - torn.at
        )
    });
    report.problem = walked
        .problem
        .or_else(|| {
            loaded
                .problem
                .map(|reason| at_checkpoint(&checkpoint_path, None, reason))
        })
        .or_else(|| match (&checkpoint, report.records) {
            (None, 0) => None,
            (None, _) => Some(at_checkpoint(
                &checkpoint_path,
                None,
                "no checkpoint: the chain does not lead to an authenticated head (the checkpoint \
                 was deleted, or the log was written before checkpoints existed)"
                    .into(),
            )),
            (Some(c), _) => checkpoint_problem(c, walked.met_checkpoint, &checkpoint_path),
        })
        .or_else(|| heads_problem(expected, &met_heads, report.end, dir));
    if report.problem.is_none() {
        report.checkpoint = checkpoint;
    }
    Ok(report)
}

fn at_checkpoint(path: &Path, offset: Option<u64>, reason: String) -> Problem {
    Problem {
        segment: path.to_owned(),
        byte: 0,
        offset,
        reason,
    }
}

/// How many of the first segments come before the first one `checkpoint` counts: left by a
/// removal that was interrupted after the checkpoint stopped counting them.
pub(crate) fn leftovers(segments: &[(u64, PathBuf)], checkpoint: &Checkpoint) -> usize {
    segments
        .iter()
        .take_while(|(base, _)| *base < checkpoint.first_segment)
        .count()
}

/// Whether the segments up to the checkpoint's are the ones it counts (none missing).
pub(crate) fn count_problem(
    segments: &[(u64, PathBuf)],
    checkpoint: &Checkpoint,
    checkpoint_path: &Path,
) -> Option<Problem> {
    let counted: Vec<u64> = segments
        .iter()
        .map(|(base, _)| *base)
        .take_while(|base| *base <= checkpoint.segment)
        .collect();
    let whole = counted.len() as u64 == checkpoint.segments
        && counted.first() == Some(&checkpoint.first_segment)
        && counted.last() == Some(&checkpoint.segment);
    (!whole).then(|| {
        at_checkpoint(
            checkpoint_path,
            None,
            format!(
                "segments missing: the checkpoint counts {} segment(s) from base {} to {}, the \
                 directory has {} ({counted:?})",
                checkpoint.segments,
                checkpoint.first_segment,
                checkpoint.segment,
                counted.len()
            ),
        )
    })
}

/// Whether the chain met `checkpoint` where it says, with its head.
pub(crate) fn checkpoint_problem(
    checkpoint: &Checkpoint,
    met: Option<Boundary>,
    checkpoint_path: &Path,
) -> Option<Problem> {
    let reason = match met {
        None => format!(
            "the records do not reach the checkpoint (segment {}, byte {}, offset {}): the log \
             is shorter than what was synced",
            checkpoint.segment, checkpoint.position, checkpoint.offset
        ),
        Some(b) if b.offset != checkpoint.offset || b.head != checkpoint.head => {
            "the chain does not lead to the checkpoint's head: records before it were rewritten"
                .into()
        }
        Some(_) => return None,
    };
    Some(at_checkpoint(
        checkpoint_path,
        Some(checkpoint.offset),
        reason,
    ))
}

/// Whether the chain had every expected head (`met`: the chain at each one's offset).
fn heads_problem(
    expected: &[ExpectedHead],
    met: &[Option<Chain>],
    end: u64,
    dir: &Path,
) -> Option<Problem> {
    expected.iter().zip(met).find_map(|(head, met)| {
        let reason = match met {
            None => format!("expected head {head}, but the partition has only {end} records"),
            Some(found) if *found != head.head => format!(
                "expected head {head}, but the chain there is {}: records before it were \
                 rewritten",
                hex::encode(found)
            ),
            Some(_) => return None,
        };
        Some(Problem {
            segment: dir.to_owned(),
            byte: 0,
            offset: Some(head.offset),
            reason,
        })
    })
}

/// An unfinished write at the very end of a partition, after its checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Torn {
    pub path: PathBuf,
    pub at: u64,
    pub reason: &'static str,
    pub file_len: u64,
}

/// What reading a run of segments whole found.
#[derive(Debug)]
pub(crate) struct Walk {
    pub records: u64,
    pub bytes: u64,
    /// The offset after the last intact record.
    pub end: u64,
    /// The chain after the last intact record.
    pub head: Chain,
    /// The last segment with an intact header, and the byte after its last intact record.
    pub active: Option<(u64, PathBuf, u64)>,
    /// The boundary at the checkpoint's position, if the walk met it.
    pub met_checkpoint: Option<Boundary>,
    pub torn: Option<Torn>,
    /// The first damaged spot; the walk stops there.
    pub problem: Option<Problem>,
}

/// Reads `segments` (consecutive, the first one read from its start) whole: each starts where
/// the previous ended and links to its chain, every checksum, offset and chain hash inside holds.
/// An unfinished write at the very end, after `checkpoint`, is a torn tail; anything else wrong
/// is the problem, where the walk stops. `visit` sees every record and boundary.
pub(crate) fn walk(
    segments: &[(u64, PathBuf)],
    checkpoint: Option<&Checkpoint>,
    mut visit: impl FnMut(Step<'_>),
) -> Result<Walk, LogError> {
    let mut walked = Walk {
        records: 0,
        bytes: 0,
        end: segments.first().map_or(0, |(base, _)| *base),
        head: [0u8; 32],
        active: None,
        met_checkpoint: None,
        torn: None,
        problem: None,
    };
    let last = segments.len().saturating_sub(1);
    for (index, (base, path)) in segments.iter().enumerate() {
        let problem = |byte: u64, offset: Option<u64>, reason: &str| Problem {
            segment: path.clone(),
            byte,
            offset,
            reason: reason.to_owned(),
        };
        if index > 0 && *base != walked.end {
            walked.problem = Some(problem(
                0,
                None,
                "segment does not start where the previous one ended (records missing)",
            ));
            break;
        }
        let scan = scan_segment(path, *base, |step| {
            if let Step::Boundary(b) = &step
                && checkpoint.is_some_and(|c| c.segment == *base && c.position == b.position)
            {
                walked.met_checkpoint = Some(*b);
            }
            visit(step);
        })?;
        walked.bytes += scan.file_len;
        if index > 0 && scan.end > 0 && scan.prev_chain != walked.head {
            walked.problem = Some(problem(
                0,
                None,
                "segment's chain link does not match the previous segment (altered or replaced)",
            ));
            break;
        }
        walked.records += scan.records;
        walked.end = base + scan.records;
        if scan.end > 0 {
            walked.head = scan.head;
            walked.active = Some((*base, path.clone(), scan.end));
        }
        let after_checkpoint =
            |at: u64| checkpoint.is_none_or(|c| (*base, at) >= (c.segment, c.position));
        match scan.stop {
            ScanStop::End => {}
            ScanStop::Torn { at, reason } if index == last && after_checkpoint(at) => {
                walked.torn = Some(Torn {
                    path: path.clone(),
                    at,
                    reason,
                    file_len: scan.file_len,
                });
            }
            ScanStop::Torn { at, reason } => {
                let why = if index == last {
                    "before the checkpoint: written and synced, now missing"
                } else {
                    "in a segment that is followed by another"
                };
                walked.problem = Some(problem(at, Some(walked.end), &format!("{reason}, {why}")));
                break;
            }
            ScanStop::Damaged { at, offset, reason } => {
                walked.problem = Some(problem(at, offset, &reason));
                break;
            }
        }
    }
    Ok(walked)
}
