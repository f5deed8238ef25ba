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

use super::{Header, LogError, Record};

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
        // A length written but no body: pages the file was extended by but that never reached
        // the disk read back as zeros. Anything else that fails its checksum was damaged.
        if body.iter().all(|b| *b == 0) {
            return Ok(FrameRead::Torn("record ends in zeroed space"));
        }
        return Ok(FrameRead::Corrupt {
            reason: "record checksum mismatch",
            skippable: Some(frame_len),
        });
    }
    Ok(FrameRead::Frame { header, body })
}

/// A frame boundary met while scanning a segment: the next record would be `offset`, at byte
/// `position`, and the chain so far is `head`.
#[derive(Debug, Clone, Copy)]
pub struct Boundary {
    pub position: u64,
    pub offset: u64,
    pub head: Chain,
}

/// What a scan meets, in order: a boundary before every record and after the last.
pub enum Step<'a> {
    Boundary(Boundary),
    Record { offset: u64, record: &'a Record },
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// The segment ends after its last record.
    End,
    /// The segment ends inside a frame (or its header), or in zeroed space: a write that did not
    /// finish.
    Torn { at: u64, reason: &'static str },
    /// Bytes that are not what was written: a checksum, an offset or the chain does not match.
    Damaged {
        at: u64,
        offset: Option<u64>,
        reason: String,
    },
}

/// What reading a segment whole found.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// The previous segment's last chain hash, from the header (zeros if it is unreadable).
    pub prev_chain: Chain,
    /// Intact records.
    pub records: u64,
    /// The byte after the last intact record.
    pub end: u64,
    /// The chain hash after the last intact record.
    pub head: Chain,
    pub file_len: u64,
    pub stop: ScanStop,
}

/// Reads the segment at `path` (whose name says it starts at `base`) whole, checking every
/// checksum, offset and chain link inside it, and shows `visit` every intact record and every
/// frame boundary (the first is right after the header). Links to the previous segment are the
/// caller's to check.
pub fn scan_segment(
    path: &Path,
    base: u64,
    mut visit: impl FnMut(Step<'_>),
) -> Result<SegmentScan, LogError> {
    let io = |what: &str| LogError::io(format!("{what} {}", path.display()));
    let file = File::open(path).map_err(io("opening"))?;
    let file_len = file.metadata().map_err(io("reading"))?.len();
    let mut scan = SegmentScan {
        prev_chain: [0u8; CHAIN_LEN],
        records: 0,
        end: 0,
        head: [0u8; CHAIN_LEN],
        file_len,
        stop: ScanStop::End,
    };
    if file_len < SEGMENT_HEADER_LEN {
        scan.stop = ScanStop::Torn {
            at: 0,
            reason: "segment header was not completely written",
        };
        return Ok(scan);
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    reader.read_exact(&mut header).map_err(io("reading"))?;
    let damaged = |at: u64, offset: Option<u64>, reason: &str| ScanStop::Damaged {
        at,
        offset,
        reason: reason.to_owned(),
    };
    let (header_base, prev_chain) = match decode_segment_header(&header) {
        Ok(parsed) => parsed,
        Err(reason) => {
            scan.stop = damaged(0, None, reason);
            return Ok(scan);
        }
    };
    if header_base != base {
        scan.stop = damaged(
            0,
            None,
            "segment header's base offset does not match its file name",
        );
        return Ok(scan);
    }
    scan.prev_chain = prev_chain;
    scan.head = prev_chain;
    scan.end = SEGMENT_HEADER_LEN;
    let mut offset = base;
    loop {
        visit(Step::Boundary(Boundary {
            position: scan.end,
            offset,
            head: scan.head,
        }));
        let frame = read_frame(&mut reader, scan.end, file_len).map_err(io("reading"))?;
        let (header, body) = match frame {
            FrameRead::End => return Ok(scan),
            FrameRead::Torn(reason) => {
                scan.stop = ScanStop::Torn {
                    at: scan.end,
                    reason,
                };
                return Ok(scan);
            }
            FrameRead::Corrupt { reason, .. } => {
                scan.stop = damaged(scan.end, Some(offset), reason);
                return Ok(scan);
            }
            FrameRead::Frame { header, body } => (header, body),
        };
        let chain = next_chain(&scan.head, &body[..body.len() - CHAIN_LEN]);
        let decoded = match decode_body(body) {
            Ok(decoded) => decoded,
            Err(reason) => {
                scan.stop = damaged(scan.end, Some(offset), reason);
                return Ok(scan);
            }
        };
        if decoded.offset != offset {
            scan.stop = damaged(
                scan.end,
                Some(offset),
                "record offset out of sequence (records removed or reordered)",
            );
            return Ok(scan);
        }
        if chain != decoded.chain {
            scan.stop = damaged(
                scan.end,
                Some(offset),
                "hash chain mismatch (record altered, or an earlier record was)",
            );
            return Ok(scan);
        }
        visit(Step::Record {
            offset,
            record: &decoded.record,
        });
        scan.head = chain;
        scan.records += 1;
        scan.end += FRAME_HEADER_LEN + u64::from(header.body_len);
        offset += 1;
    }
}
