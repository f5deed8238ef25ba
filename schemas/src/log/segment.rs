//! The on-disk format of the embedded log, and `verify`.
//!
//! A partition is a directory of segment files named by the offset of their first record
//! (`00000000000000000000.seg`). A segment is a header followed by frames:
//!
//! ```text
//! segment header (52 bytes):
//!   magic "LOOMSEG1" | base offset u64 | previous segment's last chain hash [32] | crc32c u32
//! frame:
//!   body length u32 | crc32c(body length) u32 | crc32c(body) u32 | body
//! body:
//!   offset u64 | timestamp µs i64 | key length u32 | key | header count u16
//!   | (name length u16 | name | value length u32 | value)* | value length u32 | value
//!   | chain [32] = SHA-256(previous chain | body without the chain)
//! ```
//!
//! All integers are little-endian. The length has its own checksum, so a damaged length is told
//! apart from a torn write; the hash chain runs across segments, so altering, removing or
//! reordering records breaks it from that point on.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Header, LogError, Record, Topic};

pub const SEGMENT_MAGIC: &[u8; 8] = b"LOOMSEG1";
pub const SEGMENT_HEADER_LEN: u64 = 52;
pub const FRAME_HEADER_LEN: u64 = 12;
/// The largest body a frame may have.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;
const CHAIN_LEN: usize = 32;
/// offset + timestamp + key length + header count + value length + chain.
const MIN_BODY_LEN: usize = 8 + 8 + 4 + 2 + 4 + CHAIN_LEN;

pub type Chain = [u8; CHAIN_LEN];

pub fn segment_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

/// Segment files of a partition directory, sorted by base offset.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut segments = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(LogError::io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(LogError::io(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        segments.push((base, entry.path()));
    }
    segments.sort();
    Ok(segments)
}

pub fn encode_segment_header(
    base_offset: u64,
    prev_chain: &Chain,
) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..16].copy_from_slice(&base_offset.to_le_bytes());
    header[16..48].copy_from_slice(prev_chain);
    let crc = crc32c::crc32c(&header[..48]);
    header[48..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Parses a segment header into (base offset, previous chain).
pub fn decode_segment_header(header: &[u8]) -> Result<(u64, Chain), &'static str> {
    if header.len() < SEGMENT_HEADER_LEN as usize {
        return Err("segment header is incomplete");
    }
    if &header[..8] != SEGMENT_MAGIC {
        return Err("not a Loom log segment (bad magic)");
    }
    if crc32c::crc32c(&header[..48]).to_le_bytes() != header[48..52] {
        return Err("segment header checksum mismatch");
    }
    let base = u64::from_le_bytes(le8(&header[8..16]));
    let mut chain = [0u8; CHAIN_LEN];
    chain.copy_from_slice(&header[16..48]);
    Ok((base, chain))
}

fn le8(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    out
}

fn le4(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[..4]);
    out
}

/// The chain hash that follows `prev` over a body (without its trailing chain).
pub fn next_chain(prev: &Chain, body_without_chain: &[u8]) -> Chain {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(body_without_chain);
    hasher.finalize().into()
}

/// Appends one frame for `record` at `offset` to `buf`, advancing `chain`.
pub fn encode_frame(
    buf: &mut Vec<u8>,
    offset: u64,
    record: &Record,
    chain: &mut Chain,
) -> Result<(), LogError> {
    let body_len = MIN_BODY_LEN
        + record.key.len()
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|h| 2 + h.name.len() + 4 + h.value.len())
            .sum::<usize>();
    let too_large = body_len > MAX_BODY_LEN
        || record.headers.len() > usize::from(u16::MAX)
        || record
            .headers
            .iter()
            .any(|h| h.name.len() > usize::from(u16::MAX));
    if too_large {
        return Err(LogError::RecordTooLarge {
            size: body_len,
            max: MAX_BODY_LEN,
        });
    }
    let start = buf.len();
    buf.reserve(FRAME_HEADER_LEN as usize + body_len);
    buf.extend_from_slice(&[0u8; FRAME_HEADER_LEN as usize]);
    let body_start = buf.len();
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&record.timestamp_us.to_le_bytes());
    // Lengths below are bounded by MAX_BODY_LEN and u16::MAX, checked above.
    buf.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.key);
    buf.extend_from_slice(&(record.headers.len() as u16).to_le_bytes());
    for header in &record.headers {
        buf.extend_from_slice(&(header.name.len() as u16).to_le_bytes());
        buf.extend_from_slice(header.name.as_bytes());
        buf.extend_from_slice(&(header.value.len() as u32).to_le_bytes());
        buf.extend_from_slice(&header.value);
    }
    buf.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.value);
    *chain = next_chain(chain, &buf[body_start..]);
    buf.extend_from_slice(chain);
    let len_bytes = (body_len as u32).to_le_bytes();
    let body_crc = crc32c::crc32c(&buf[body_start..]);
    buf[start..start + 4].copy_from_slice(&len_bytes);
    buf[start + 4..start + 8].copy_from_slice(&crc32c::crc32c(&len_bytes).to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&body_crc.to_le_bytes());
    Ok(())
}

/// A frame header, checked: the body length is trustworthy.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    pub body_len: u32,
    pub body_crc: u32,
}

pub fn decode_frame_header(bytes: &[u8; FRAME_HEADER_LEN as usize]) -> Option<FrameHeader> {
    let len_bytes = le4(&bytes[..4]);
    if crc32c::crc32c(&len_bytes).to_le_bytes() != bytes[4..8] {
        return None;
    }
    let body_len = u32::from_le_bytes(len_bytes);
    if (body_len as usize) < MIN_BODY_LEN || body_len as usize > MAX_BODY_LEN {
        return None;
    }
    Some(FrameHeader {
        body_len,
        body_crc: u32::from_le_bytes(le4(&bytes[8..12])),
    })
}

/// A decoded body: the record, its offset and its stored chain hash.
pub struct DecodedBody {
    pub offset: u64,
    pub record: Record,
    pub chain: Chain,
}

/// Decodes a body whose checksum already matched. The body's buffer becomes the record's value.
pub fn decode_body(mut body: Vec<u8>) -> Result<DecodedBody, &'static str> {
    let mut cursor = Cursor {
        bytes: &body,
        pos: 0,
    };
    let offset = u64::from_le_bytes(le8(cursor.take(8)?));
    let timestamp_us = i64::from_le_bytes(le8(cursor.take(8)?));
    let key_len = u32::from_le_bytes(le4(cursor.take(4)?)) as usize;
    let key = cursor.take(key_len)?.to_vec();
    let header_count = u16::from_le_bytes([cursor.byte()?, cursor.byte()?]);
    let mut headers = Vec::with_capacity(usize::from(header_count));
    for _ in 0..header_count {
        let name_len = usize::from(u16::from_le_bytes([cursor.byte()?, cursor.byte()?]));
        let name = std::str::from_utf8(cursor.take(name_len)?)
            .map_err(|_| "header name is not UTF-8")?
            .to_owned();
        let value_len = u32::from_le_bytes(le4(cursor.take(4)?)) as usize;
        let value = cursor.take(value_len)?.to_vec();
        headers.push(Header { name, value });
    }
    let value_len = u32::from_le_bytes(le4(cursor.take(4)?)) as usize;
    let value_start = cursor.pos;
    cursor.take(value_len)?;
    let mut chain = [0u8; CHAIN_LEN];
    chain.copy_from_slice(cursor.take(CHAIN_LEN)?);
    if cursor.pos != body.len() {
        return Err("record body has trailing bytes");
    }
    body.truncate(value_start + value_len);
    body.drain(..value_start);
    let value = body;
    Ok(DecodedBody {
        offset,
        record: Record {
            key,
            headers,
            value,
            timestamp_us,
        },
        chain,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or("record body is truncated")?;
        self.pos = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
}

/// What reading the next frame of a segment found.
pub enum FrameRead {
    /// A complete frame whose checksums match.
    Frame { header: FrameHeader, body: Vec<u8> },
    /// Clean end of the segment.
    End,
    /// The segment ends inside a frame (a write that did not finish).
    Torn(&'static str),
    /// The bytes are damaged. `skippable` when the frame's length is intact, so reading can go on
    /// after it.
    Corrupt {
        reason: &'static str,
        skippable: Option<u64>,
    },
}

/// Reads the frame at `pos` of a segment of `file_len` bytes; the file is positioned at `pos`.
pub fn read_frame(
    file: &mut impl Read,
    pos: u64,
    file_len: u64,
) -> Result<FrameRead, std::io::Error> {
    let remaining = file_len.saturating_sub(pos);
    if remaining == 0 {
        return Ok(FrameRead::End);
    }
    if remaining < FRAME_HEADER_LEN {
        return Ok(FrameRead::Torn("segment ends inside a frame header"));
    }
    let mut header_bytes = [0u8; FRAME_HEADER_LEN as usize];
    file.read_exact(&mut header_bytes)?;
    let Some(header) = decode_frame_header(&header_bytes) else {
        let mut rest = Vec::new();
        file.take(remaining - FRAME_HEADER_LEN)
            .read_to_end(&mut rest)?;
        if header_bytes.iter().chain(rest.iter()).all(|b| *b == 0) {
            return Ok(FrameRead::Torn("segment ends in zeroed space"));
        }
        return Ok(FrameRead::Corrupt {
            reason: "frame length checksum mismatch",
            skippable: None,
        });
    };
    let frame_len = FRAME_HEADER_LEN + u64::from(header.body_len);
    if frame_len > remaining {
        return Ok(FrameRead::Torn("segment ends inside a record"));
    }
    let mut body = vec![0u8; header.body_len as usize];
    file.read_exact(&mut body)?;
    if crc32c::crc32c(&body) != header.body_crc {
        if frame_len == remaining {
            return Ok(FrameRead::Torn("last record's checksum does not match"));
        }
        return Ok(FrameRead::Corrupt {
            reason: "record checksum mismatch",
            skippable: Some(frame_len),
        });
    }
    Ok(FrameRead::Frame { header, body })
}

/// A problem `verify` found: the first damaged or altered spot of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub segment: PathBuf,
    pub byte: u64,
    pub offset: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "segment {} at byte {}",
            self.segment.display(),
            self.byte
        )?;
        if let Some(offset) = self.offset {
            write!(f, ", record offset {offset}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What `verify` found in one partition.
#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub topic: &'static str,
    pub partition: u32,
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Chain hash after the last intact record: record it elsewhere to anchor the chain.
    pub head: Chain,
    /// An unfinished write at the very end (a crash); the next open truncates it.
    pub torn_tail: Option<String>,
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub partitions: Vec<PartitionReport>,
}

impl VerifyReport {
    pub fn first_problem(&self) -> Option<&Problem> {
        self.partitions.iter().find_map(|p| p.problem.as_ref())
    }
}

/// Walks every segment of every partition under `log_dir`, checking checksums, offsets and the
/// hash chain, and reports the first damaged or altered record of each partition. Read-only: it
/// can run while a server appends.
pub fn verify(log_dir: &Path) -> Result<VerifyReport, LogError> {
    let mut report = VerifyReport::default();
    for topic in Topic::ALL {
        let topic_dir = log_dir.join(topic.name());
        if !topic_dir.exists() {
            continue;
        }
        let mut partitions: Vec<u32> = std::fs::read_dir(&topic_dir)
            .map_err(LogError::io(format!("listing {}", topic_dir.display())))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        partitions.sort_unstable();
        for partition in partitions {
            report.partitions.push(verify_partition(
                topic,
                partition,
                &topic_dir.join(partition.to_string()),
            )?);
        }
    }
    Ok(report)
}

fn verify_partition(topic: Topic, partition: u32, dir: &Path) -> Result<PartitionReport, LogError> {
    let segments = list_segments(dir)?;
    let mut report = PartitionReport {
        topic: topic.name(),
        partition,
        segments: segments.len(),
        records: 0,
        bytes: 0,
        head: [0u8; CHAIN_LEN],
        torn_tail: None,
        problem: None,
    };
    let mut expected_offset: Option<u64> = None;
    let last_index = segments.len().saturating_sub(1);
    for (index, (base, path)) in segments.iter().enumerate() {
        let problem = |byte: u64, offset: Option<u64>, reason: &str| Problem {
            segment: path.clone(),
            byte,
            offset,
            reason: reason.to_owned(),
        };
        let mut file =
            File::open(path).map_err(LogError::io(format!("opening {}", path.display())))?;
        let file_len = file
            .metadata()
            .map_err(LogError::io(format!("reading {}", path.display())))?
            .len();
        report.bytes += file_len;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        if file_len < SEGMENT_HEADER_LEN {
            if index == last_index {
                report.torn_tail = Some("segment header was not completely written".into());
            } else {
                report.problem = Some(problem(0, None, "segment header is incomplete"));
            }
            return Ok(report);
        }
        file.read_exact(&mut header)
            .map_err(LogError::io(format!("reading {}", path.display())))?;
        let (header_base, prev_chain) = match decode_segment_header(&header) {
            Ok(parsed) => parsed,
            Err(reason) => {
                report.problem = Some(problem(0, None, reason));
                return Ok(report);
            }
        };
        if header_base != *base {
            report.problem = Some(problem(
                0,
                None,
                "segment header's base offset does not match its file name",
            ));
            return Ok(report);
        }
        if expected_offset.is_some_and(|expected| expected != header_base) {
            report.problem = Some(problem(
                0,
                None,
                "segment does not start where the previous one ended (records missing)",
            ));
            return Ok(report);
        }
        if index > 0 && prev_chain != report.head {
            report.problem = Some(problem(
                0,
                None,
                "segment's chain link does not match the previous segment (altered or replaced)",
            ));
            return Ok(report);
        }
        report.head = prev_chain;
        let mut offset = header_base;
        let mut pos = SEGMENT_HEADER_LEN;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        loop {
            let frame = read_frame(&mut reader, pos, file_len)
                .map_err(LogError::io(format!("reading {}", path.display())))?;
            match frame {
                FrameRead::End => break,
                FrameRead::Torn(reason) if index == last_index => {
                    report.torn_tail = Some(format!("{reason} at byte {pos}"));
                    break;
                }
                FrameRead::Torn(reason) => {
                    report.problem = Some(problem(pos, Some(offset), reason));
                    return Ok(report);
                }
                FrameRead::Corrupt { reason, .. } => {
                    report.problem = Some(problem(pos, Some(offset), reason));
                    return Ok(report);
                }
                FrameRead::Frame { header, body } => {
                    let chain = next_chain(&report.head, &body[..body.len() - CHAIN_LEN]);
                    let decoded = match decode_body(body) {
                        Ok(decoded) => decoded,
                        Err(reason) => {
                            report.problem = Some(problem(pos, Some(offset), reason));
                            return Ok(report);
                        }
                    };
                    if decoded.offset != offset {
                        report.problem = Some(problem(
                            pos,
                            Some(offset),
                            "record offset out of sequence (records removed or reordered)",
                        ));
                        return Ok(report);
                    }
                    if chain != decoded.chain {
                        report.problem = Some(problem(
                            pos,
                            Some(offset),
                            "hash chain mismatch (record altered, or an earlier record was)",
                        ));
                        return Ok(report);
                    }
                    report.head = chain;
                    report.records += 1;
                    offset += 1;
                    pos += FRAME_HEADER_LEN + u64::from(header.body_len);
                }
            }
        }
        expected_offset = Some(offset);
    }
    Ok(report)
}
