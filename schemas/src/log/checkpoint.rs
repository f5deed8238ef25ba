//! The checkpoint of an embedded-log partition: where its durable end is, authenticated.
//!
//! Written after every fsync of the partition (and on every segment roll), it says "everything up
//! to record `offset`, byte `position` of segment `segment`, reached the disk, and the hash chain
//! there is `head`". On open, an unfinished record after the checkpoint is a torn write; anything
//! wrong before it — or a complete record that fails its checksum anywhere — is damage.
//!
//! The file `checkpoint` holds two 128-byte slots written alternately (slot = sequence % 2), so a
//! write torn by a power failure leaves the other, older one readable. A slot is:
//!
//! ```text
//! magic "LOOMCKP1" | sequence u64 | first segment u64 | segments u64 | segment u64
//! | position u64 | offset u64 | head [32] | HMAC-SHA256 [32] | crc32c u32 | zero padding
//! ```
//!
//! The HMAC is keyed with the [`ChainKey`] (derived from the master key) over the topic, the
//! partition and every field, so that whoever can rewrite the files but lacks the master key
//! cannot produce a checkpoint for a rewritten chain. The same key authenticates the heads the
//! node appends to the control topic ([`anchor_mac`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::segment::Chain;
use super::{LogError, Topic};
use crate::crypto::KeyBytes;

pub const CHECKPOINT_FILE: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"LOOMCKP1";
const SLOT_LEN: usize = 128;
const MAC_START: usize = 88;
const CRC_START: usize = 120;

/// The key that authenticates chain heads. Derived from the master key; never printed.
#[derive(Clone)]
pub struct ChainKey(KeyBytes);

impl ChainKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        ChainKey(KeyBytes::new(bytes))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // HMAC takes keys of any length: this cannot fail for 32 bytes.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.expose()) {
            Ok(mac) => mac,
            Err(_) => return [0u8; 32],
        };
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(<redacted>)")
    }
}

/// The MAC of a chain head appended to the control topic (`log.anchored`): `head` is the chain
/// hash after the first `offset` records of `topic`'s `partition`.
pub fn anchor_mac(
    key: &ChainKey,
    topic: Topic,
    partition: u32,
    offset: u64,
    head: &Chain,
) -> [u8; 32] {
    key.mac(&[
        b"loom.log.anchor.v1",
        topic.name().as_bytes(),
        &partition.to_le_bytes(),
        &offset.to_le_bytes(),
        head,
    ])
}

/// The `log.anchored` event for a head: what a node appends to the control topic.
pub fn anchor_event(
    key: &ChainKey,
    topic: Topic,
    partition: u32,
    offset: u64,
    head: &Chain,
    producer: &str,
) -> crate::event::Event {
    crate::event::Event {
        envelope: crate::event::Envelope::new(uuid::Uuid::nil(), None, producer),
        payload: crate::event::LogAnchored {
            topic: topic.name().to_owned(),
            partition: i32::try_from(partition).unwrap_or(i32::MAX),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            head: head.to_vec(),
            mac: anchor_mac(key, topic, partition, offset, head).to_vec(),
        }
        .into(),
    }
}

/// The durable end of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// How many checkpoints the partition has had; the newest readable slot wins.
    pub sequence: u64,
    /// Base offset of the partition's first segment.
    pub first_segment: u64,
    /// Segments from the first up to and including `segment`.
    pub segments: u64,
    /// Base offset of the segment the durable end is in.
    pub segment: u64,
    /// Byte position of the durable end in that segment (a frame boundary).
    pub position: u64,
    /// Records before the durable end: the offset of the first record after it.
    pub offset: u64,
    /// The chain hash after the last durable record.
    pub head: Chain,
}

impl Checkpoint {
    fn fields(&self) -> [u8; MAC_START - 8] {
        let mut bytes = [0u8; MAC_START - 8];
        let numbers = [
            self.sequence,
            self.first_segment,
            self.segments,
            self.segment,
            self.position,
            self.offset,
        ];
        for (i, n) in numbers.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&n.to_le_bytes());
        }
        bytes[48..80].copy_from_slice(&self.head);
        bytes
    }

    fn mac(&self, key: &ChainKey, topic: Topic) -> [u8; 32] {
        key.mac(&[
            b"loom.log.checkpoint.v1",
            topic.name().as_bytes(),
            &0u32.to_le_bytes(),
            &self.fields(),
        ])
    }

    fn encode(&self, key: &ChainKey, topic: Topic) -> [u8; SLOT_LEN] {
        let mut slot = [0u8; SLOT_LEN];
        slot[..8].copy_from_slice(MAGIC);
        slot[8..MAC_START].copy_from_slice(&self.fields());
        slot[MAC_START..CRC_START].copy_from_slice(&self.mac(key, topic));
        let crc = crc32c::crc32c(&slot[..CRC_START]);
        slot[CRC_START..CRC_START + 4].copy_from_slice(&crc.to_le_bytes());
        slot
    }
}

/// What one slot holds.
enum Slot {
    /// Never written.
    Empty,
    /// Its checksum fails: a torn checkpoint write, or damage.
    Unreadable,
    /// Intact, but its MAC is not this key's.
    Unauthenticated(u64),
    Valid(Checkpoint),
}

fn decode_slot(slot: &[u8], key: &ChainKey, topic: Topic) -> Slot {
    if slot.iter().all(|b| *b == 0) {
        return Slot::Empty;
    }
    if slot.len() < SLOT_LEN
        || &slot[..8] != MAGIC
        || crc32c::crc32c(&slot[..CRC_START]).to_le_bytes() != slot[CRC_START..CRC_START + 4]
    {
        return Slot::Unreadable;
    }
    let number = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&slot[8 + i * 8..16 + i * 8]);
        u64::from_le_bytes(bytes)
    };
    let mut head = [0u8; 32];
    head.copy_from_slice(&slot[56..MAC_START]);
    let checkpoint = Checkpoint {
        sequence: number(0),
        first_segment: number(1),
        segments: number(2),
        segment: number(3),
        position: number(4),
        offset: number(5),
        head,
    };
    if checkpoint.mac(key, topic)[..] != slot[MAC_START..CRC_START] {
        return Slot::Unauthenticated(checkpoint.sequence);
    }
    Slot::Valid(checkpoint)
}

/// A partition's checkpoint as read.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The newest authenticated checkpoint; `None` when the file is missing or has none.
    pub checkpoint: Option<Checkpoint>,
    /// The file exists.
    pub exists: bool,
    /// Why the checkpoint cannot be trusted (damage or tampering), if it cannot. `None` with no
    /// checkpoint: the file is missing or was never written.
    pub problem: Option<String>,
    /// Something worth telling that is not damage (an older slot was used).
    pub note: Option<String>,
}

/// Reads the checkpoint of the partition in `dir`.
pub fn load(dir: &Path, key: &ChainKey, topic: Topic) -> Result<Loaded, LogError> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(LogError::io(format!("reading {}", path.display()))(e)),
    };
    let mut loaded = Loaded {
        exists: true,
        ..Loaded::default()
    };
    if bytes.len() != 2 * SLOT_LEN {
        loaded.problem = Some(format!(
            "checkpoint file {} has {} bytes, not {}",
            path.display(),
            bytes.len(),
            2 * SLOT_LEN
        ));
        return Ok(loaded);
    }
    let slots = [
        decode_slot(&bytes[..SLOT_LEN], key, topic),
        decode_slot(&bytes[SLOT_LEN..], key, topic),
    ];
    let mut unreadable = Vec::new();
    for (index, slot) in slots.iter().enumerate() {
        match slot {
            Slot::Empty => {}
            Slot::Unreadable => unreadable.push(index),
            Slot::Unauthenticated(sequence) => {
                loaded.problem = Some(format!(
                    "checkpoint {sequence} in {} is not authenticated by this master key \
                     (altered, or written under another master key)",
                    path.display()
                ));
            }
            Slot::Valid(checkpoint) => {
                if loaded
                    .checkpoint
                    .is_none_or(|newest| newest.sequence < checkpoint.sequence)
                {
                    loaded.checkpoint = Some(*checkpoint);
                }
            }
        }
    }
    if loaded.problem.is_some() {
        loaded.checkpoint = None;
        return Ok(loaded);
    }
    match (loaded.checkpoint, unreadable.as_slice()) {
        // Created, never written: a crash right after creating the partition.
        (None, []) => {}
        (None, _) => {
            loaded.problem = Some(format!(
                "no slot of checkpoint file {} is readable (damaged)",
                path.display()
            ));
        }
        (Some(_), [slot]) => {
            loaded.note = Some(format!(
                "slot {slot} of checkpoint file {} is unreadable (a torn checkpoint write, or \
                 damage); the other, older one is used",
                path.display()
            ));
        }
        (Some(_), _) => {}
    }
    Ok(loaded)
}

/// The writable checkpoint file of a partition.
pub struct CheckpointFile {
    path: PathBuf,
    file: File,
    key: ChainKey,
    topic: Topic,
}

impl CheckpointFile {
    /// Opens the checkpoint file in `dir`, creating it durably if missing.
    pub fn open(dir: &Path, key: ChainKey, topic: Topic) -> Result<CheckpointFile, LogError> {
        let path = dir.join(CHECKPOINT_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(LogError::io(format!("opening {}", path.display())))?;
        if created {
            file.set_len(2 * SLOT_LEN as u64)
                .and_then(|()| file.sync_all())
                .map_err(LogError::io(format!("creating {}", path.display())))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(LogError::io(format!("syncing {}", dir.display())))?;
        }
        Ok(CheckpointFile {
            path,
            file,
            key,
            topic,
        })
    }

    /// Writes `checkpoint` into its slot. Not synced by itself: it only ever claims what an
    /// fsync already made durable, so losing it to a power failure leaves an older, still true
    /// one.
    pub fn write(&self, checkpoint: &Checkpoint) -> Result<(), LogError> {
        let slot = checkpoint.encode(&self.key, self.topic);
        let at = (checkpoint.sequence % 2) * SLOT_LEN as u64;
        self.file
            .write_all_at(&slot, at)
            .map_err(LogError::io(format!("writing {}", self.path.display())))
    }

    /// Writes `checkpoint` and waits until it is on disk (before removing segments it no longer
    /// counts).
    pub fn write_durably(&self, checkpoint: &Checkpoint) -> Result<(), LogError> {
        self.write(checkpoint)?;
        self.file
            .sync_data()
            .map_err(LogError::io(format!("syncing {}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(sequence: u64) -> Checkpoint {
        Checkpoint {
            sequence,
            first_segment: 0,
            segments: 1,
            segment: 0,
            position: 52 + sequence * 100,
            offset: sequence,
            head: [sequence as u8; 32],
        }
    }

    #[test]
    fn the_newest_readable_slot_wins_and_a_torn_one_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let key = ChainKey::new([3; 32]);
        let file = CheckpointFile::open(dir.path(), key.clone(), Topic::Data).unwrap();
        let fresh = load(dir.path(), &key, Topic::Data).unwrap();
        assert!(fresh.exists && fresh.checkpoint.is_none() && fresh.problem.is_none());
        file.write(&checkpoint(1)).unwrap();
        file.write(&checkpoint(2)).unwrap();
        let loaded = load(dir.path(), &key, Topic::Data).unwrap();
        assert_eq!(loaded.checkpoint, Some(checkpoint(2)));
        assert!(loaded.problem.is_none() && loaded.note.is_none());

        // Damage slot 0 (sequence 2): sequence 1 is used, and that is said.
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(dir.path(), &key, Topic::Data).unwrap();
        assert_eq!(loaded.checkpoint, Some(checkpoint(1)));
        assert!(loaded.note.is_some() && loaded.problem.is_none());

        // Both damaged: no checkpoint, and a problem.
        bytes[SLOT_LEN + 40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(dir.path(), &key, Topic::Data).unwrap();
        assert!(loaded.checkpoint.is_none() && loaded.problem.is_some());
    }

    #[test]
    fn a_checkpoint_under_another_key_or_for_another_topic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = ChainKey::new([3; 32]);
        let file = CheckpointFile::open(dir.path(), key.clone(), Topic::Data).unwrap();
        file.write(&checkpoint(1)).unwrap();
        for (key, topic) in [(ChainKey::new([4; 32]), Topic::Data), (key, Topic::Control)] {
            let loaded = load(dir.path(), &key, topic).unwrap();
            assert!(loaded.checkpoint.is_none());
            assert!(
                loaded.problem.unwrap().contains("not authenticated"),
                "{topic:?}"
            );
        }
    }

    #[test]
    fn anchor_macs_bind_every_field() {
        let key = ChainKey::new([9; 32]);
        let mac = anchor_mac(&key, Topic::Data, 0, 10, &[1; 32]);
        assert_ne!(mac, anchor_mac(&key, Topic::Data, 0, 11, &[1; 32]));
        assert_ne!(mac, anchor_mac(&key, Topic::Control, 0, 10, &[1; 32]));
        assert_ne!(mac, anchor_mac(&key, Topic::Data, 1, 10, &[1; 32]));
        assert_ne!(mac, anchor_mac(&key, Topic::Data, 0, 10, &[2; 32]));
        assert_ne!(
            mac,
            anchor_mac(&ChainKey::new([8; 32]), Topic::Data, 0, 10, &[1; 32])
        );
    }
}
