use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::{CHECKPOINT_FILE, CheckpointFile, anchor_event};
use super::recovery::{QUARANTINE_DIR, truncate_at};
use super::segment::{
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, Step, decode_frame_header, encode_frame,
    encode_segment_header, list_segments, scan_segment,
};
use super::*;

fn record(i: u64) -> Record {
    Record {
        key: format!("trace-{}", i % 7).into_bytes(),
        headers: vec![Header::new("loom.event_type", b"test.event")],
        value: format!("value number {i} {}", "x".repeat((i % 50) as usize)).into_bytes(),
        timestamp_us: 1_700_000_000_000_000 + i as i64,
    }
}

fn key() -> ChainKey {
    crate::testing::chain_key()
}

fn config(dir: &Path) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        dir: dir.to_owned(),
        fsync: FsyncPolicy::Never,
        segment_bytes: EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES,
        chain_key: key(),
    }
}

fn verify_dir(dir: &Path) -> VerifyReport {
    verify(dir, &key(), &[]).unwrap()
}

/// A data partition of `batches` batches of 5 records in segments of `segment_bytes`, written and
/// closed; returns the log's config.
async fn segmented(dir: &Path, segment_bytes: u64, batches: u64) -> EmbeddedLogConfig {
    let config = EmbeddedLogConfig {
        segment_bytes,
        ..config(dir)
    };
    let log = EmbeddedLog::open(config.clone()).await.unwrap();
    for i in 0..batches {
        append_range(&log, Topic::Data, i * 5..i * 5 + 5).await;
    }
    config
}

/// Leaves `topic` as a crash would: records `0..durable` synced and checkpointed, then
/// `durable..total` written after the last checkpoint.
async fn crashed(dir: &Path, topic: Topic, durable: u64, total: u64) {
    {
        let log = EmbeddedLog::open(config(dir)).await.unwrap();
        append_range(&log, topic, 0..durable).await;
    }
    let checkpoint = partition_dir(dir, topic).join(CHECKPOINT_FILE);
    let saved = std::fs::read(&checkpoint).unwrap();
    {
        let log = EmbeddedLog::open(config(dir)).await.unwrap();
        append_range(&log, topic, durable..total).await;
    }
    std::fs::write(&checkpoint, saved).unwrap();
}

/// The files in the quarantine directory, with their bytes.
fn quarantined(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir.join(QUARANTINE_DIR)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn corrupt_offset(error: &LogError) -> Option<u64> {
    match error {
        LogError::Corrupt { offset, .. } => *offset,
        _ => None,
    }
}

async fn append_range(log: &EmbeddedLog, topic: Topic, range: std::ops::Range<u64>) {
    let records = range.map(record).collect();
    log.append(topic, records).await.unwrap();
}

async fn read_all(log: &EmbeddedLog, topic: Topic, from: u64) -> Vec<Entry> {
    let mut reader = log.read_from(topic, 0, from).await.unwrap();
    let mut entries = Vec::new();
    loop {
        let batch = reader.poll(100).await.unwrap();
        if batch.is_empty() {
            return entries;
        }
        entries.extend(batch);
    }
}

/// The partition holds exactly `record(0)`, `record(1)`, … up to `count`.
async fn assert_holds_records(log: &EmbeddedLog, topic: Topic, count: u64) {
    let entries = read_all(log, topic, 0).await;
    assert_eq!(entries.len() as u64, count);
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.record == record(i as u64))
    );
}

fn partition_dir(dir: &Path, topic: Topic) -> PathBuf {
    dir.join(topic.name()).join("0")
}

/// (byte position, frame length) of every frame of a segment.
fn frames(segment: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(segment).unwrap();
    let mut pos = SEGMENT_HEADER_LEN as usize;
    let mut frames = Vec::new();
    while pos + FRAME_HEADER_LEN as usize <= bytes.len() {
        let header: [u8; 12] = bytes[pos..pos + 12].try_into().unwrap();
        let header = decode_frame_header(&header).unwrap();
        let len = FRAME_HEADER_LEN + u64::from(header.body_len);
        frames.push((pos as u64, len));
        pos += len as usize;
    }
    frames
}

fn last_segment(dir: &Path, topic: Topic) -> PathBuf {
    list_segments(&partition_dir(dir, topic))
        .unwrap()
        .pop()
        .unwrap()
        .1
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn appends_and_reads_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    assert!(
        log.append(Topic::Data, Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
    let positions = log
        .append(Topic::Data, (0..10).map(record).collect())
        .await
        .unwrap();
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    append_range(&log, Topic::Data, 10..25).await;
    append_range(&log, Topic::Control, 0..3).await;
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 25);
    assert_eq!(log.end_offset(Topic::Control, 0).await.unwrap(), 3);

    let entries = read_all(&log, Topic::Data, 0).await;
    assert_eq!(entries.len(), 25);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(
            entry.position,
            Position {
                partition: 0,
                offset: i as u64
            }
        );
        assert_eq!(entry.record, record(i as u64));
    }
    let tail = read_all(&log, Topic::Data, 20).await;
    assert_eq!(tail.first().unwrap().record, record(20));
    assert_eq!(tail.len(), 5);
    assert!(read_all(&log, Topic::Data, 25).await.is_empty());
    assert!(matches!(
        log.read_from(Topic::Data, 0, 26).await.err(),
        Some(LogError::OffsetOutOfRange {
            requested: 26,
            end: 25
        })
    ));
    assert!(matches!(
        log.read_from(Topic::Data, 1, 0).await.err(),
        Some(LogError::UnknownPartition { .. })
    ));
}

#[tokio::test]
async fn a_second_process_cannot_open_a_locked_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    assert!(matches!(
        EmbeddedLog::open(config(dir.path())).await.err(),
        Some(LogError::Locked(_))
    ));
    drop(log);
    EmbeddedLog::open(config(dir.path())).await.unwrap();
}

#[tokio::test]
async fn tailing_readers_are_woken_by_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(config(dir.path())).await.unwrap());
    let mut reader = log.read_from(Topic::Control, 0, 0).await.unwrap();
    let waiting = tokio::spawn(async move { reader.next(10).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    append_range(&log, Topic::Control, 0..2).await;
    let entries = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entries.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_and_readers_see_every_record_once_in_order() {
    const WRITERS: u64 = 4;
    const BATCHES: u64 = 50;
    const PER_BATCH: u64 = 10;
    let total = WRITERS * BATCHES * PER_BATCH;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.segment_bytes = 16 * 1024;
    let log = Arc::new(EmbeddedLog::open(config).await.unwrap());

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
                let mut seen = Vec::new();
                while (seen.len() as u64) < total {
                    seen.extend(reader.next(64).await.unwrap());
                }
                seen
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let records = (0..PER_BATCH)
                        .map(|i| Record {
                            key: vec![w as u8],
                            value: format!("{w}:{}", b * PER_BATCH + i).into_bytes(),
                            ..Record::default()
                        })
                        .collect();
                    log.append(Topic::Data, records).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.len() as u64, total);
        let mut next_per_writer = vec![0u64; WRITERS as usize];
        for (i, entry) in seen.iter().enumerate() {
            assert_eq!(entry.position.offset, i as u64);
            let text = String::from_utf8(entry.record.value.clone()).unwrap();
            let (w, n) = text.split_once(':').unwrap();
            let (w, n): (usize, u64) = (w.parse().unwrap(), n.parse().unwrap());
            assert_eq!(n, next_per_writer[w], "writer {w} out of order");
            next_per_writer[w] += 1;
        }
    }
    assert!(
        list_segments(&partition_dir(dir.path(), Topic::Data))
            .unwrap()
            .len()
            > 3
    );
    assert!(verify_dir(dir.path()).first_problem().is_none());
}

#[tokio::test]
async fn segments_roll_and_the_chain_runs_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = segmented(dir.path(), 2 * 1024, 40).await;
    let segments = list_segments(&partition_dir(dir.path(), Topic::Data)).unwrap();
    assert!(segments.len() >= 5, "{} segments", segments.len());
    let log = EmbeddedLog::open(config).await.unwrap();
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 200);
    append_range(&log, Topic::Data, 200..210).await;
    let entries = read_all(&log, Topic::Data, 0).await;
    assert_eq!(entries.len(), 210);
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.record == record(i as u64))
    );
    // Starting in the middle of a later segment works too.
    assert_eq!(
        read_all(&log, Topic::Data, 137).await[0].record,
        record(137)
    );
    let report = verify_dir(dir.path());
    assert!(
        report.first_problem().is_none(),
        "{:?}",
        report.first_problem()
    );
    let data = report
        .partitions
        .iter()
        .find(|p| p.topic == "data")
        .unwrap();
    assert_eq!(data.records, 210);

    // Replacing a whole segment with one from elsewhere breaks the chain link.
    drop(log);
    let (_, second) = &segments[1];
    let (_, third) = &segments[2];
    std::fs::copy(third, second).unwrap();
    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert_eq!(&problem.segment, second);
}

#[tokio::test]
async fn torn_writes_after_the_checkpoint_are_cut_off_into_quarantine() {
    for damage in [
        "half a record",
        "half a frame header",
        "zeroed tail",
        "a length but a zeroed body",
    ] {
        let dir = tempfile::tempdir().unwrap();
        crashed(dir.path(), Topic::Control, 3, 5).await;
        let segment = last_segment(dir.path(), Topic::Control);
        let mut bytes = std::fs::read(&segment).unwrap();
        let (last_pos, last_len) = *frames(&segment).last().unwrap();
        let (kept, cut_at) = match damage {
            "half a record" => {
                bytes.truncate((last_pos + last_len / 2) as usize);
                (4, last_pos)
            }
            "half a frame header" => {
                bytes.extend_from_slice(&[7, 0, 0, 0, 1]);
                (5, last_pos + last_len)
            }
            "zeroed tail" => {
                bytes.extend_from_slice(&[0u8; 4096]);
                (5, last_pos + last_len)
            }
            _ => {
                let body = (last_pos + FRAME_HEADER_LEN) as usize..(last_pos + last_len) as usize;
                bytes[body].fill(0);
                (4, last_pos)
            }
        };
        std::fs::write(&segment, &bytes).unwrap();
        let report = verify_dir(dir.path());
        assert!(report.first_problem().is_none(), "{damage}: {report:?}");
        let control = report.partition(Topic::Control, 0).unwrap();
        assert!(control.torn_tail.is_some(), "{damage}");
        assert_eq!(control.end, kept, "{damage}");

        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        assert_eq!(
            log.end_offset(Topic::Control, 0).await.unwrap(),
            kept,
            "{damage}"
        );
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            cut_at,
            "{damage}"
        );
        // The cut bytes are kept, not deleted.
        let kept_bytes = quarantined(dir.path());
        assert_eq!(kept_bytes.len(), 1, "{damage}");
        assert_eq!(kept_bytes[0].1, bytes[cut_at as usize..], "{damage}");
        assert!(
            kept_bytes[0].0.starts_with("control-0-"),
            "{}",
            kept_bytes[0].0
        );
        // Appends go on after the last complete record.
        append_range(&log, Topic::Control, kept..kept + 3).await;
        assert_holds_records(&log, Topic::Control, kept + 3).await;
        drop(log);
        let report = verify_dir(dir.path());
        let control = report.partition(Topic::Control, 0).unwrap();
        assert!(
            report.first_problem().is_none() && control.torn_tail.is_none(),
            "{damage}: {report:?}"
        );
        assert_eq!(control.checkpoint.unwrap().offset, kept + 3);
    }
}

#[tokio::test]
async fn a_complete_record_that_fails_its_checksum_is_damage_even_at_the_end() {
    // The last record synced (before the checkpoint), and written after it.
    for durable in [5, 3] {
        let dir = tempfile::tempdir().unwrap();
        crashed(dir.path(), Topic::Data, durable, 5).await;
        let segment = last_segment(dir.path(), Topic::Data);
        let (pos, len) = *frames(&segment).last().unwrap();
        flip_byte(&segment, pos + len - 40);
        let before = std::fs::read(&segment).unwrap();

        let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
        assert_eq!((problem.offset, problem.byte), (Some(4), pos), "{problem}");
        let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
        assert_eq!(corrupt_offset(&error), Some(4), "{error}");
        let message = error.to_string();
        assert!(
            message.contains(&segment.display().to_string()) && message.contains("loom repair"),
            "{message}"
        );
        // Nothing was changed or dropped.
        assert_eq!(std::fs::read(&segment).unwrap(), before);
        assert!(quarantined(dir.path()).is_empty());
    }
}

#[tokio::test]
async fn damage_in_the_active_segment_refuses_to_open_and_names_the_spot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..30).await;
    }
    let segment = last_segment(dir.path(), Topic::Data);
    let (pos, len) = frames(&segment)[17];
    flip_byte(&segment, pos + len - 40);
    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert_eq!(problem.segment, segment);
    assert_eq!((problem.offset, problem.byte), (Some(17), pos));
    let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
    assert_eq!(corrupt_offset(&error), Some(17), "{error}");

    // A damaged length: the boundaries after it cannot be trusted.
    flip_byte(&segment, pos + len - 40);
    let (pos, _) = frames(&segment)[4];
    flip_byte(&segment, pos + 1);
    let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
    assert_eq!(corrupt_offset(&error), Some(4), "{error}");
    assert_eq!(
        verify_dir(dir.path()).first_problem().unwrap().offset,
        Some(4)
    );
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_named_by_verify_and_by_readers() {
    let dir = tempfile::tempdir().unwrap();
    let config = segmented(dir.path(), 1024, 10).await;
    let (_, first) = list_segments(&partition_dir(dir.path(), Topic::Data)).unwrap()[0].clone();
    let (pos, len) = frames(&first)[2];
    flip_byte(&first, pos + len - 40);
    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert_eq!(
        (problem.segment.clone(), problem.offset),
        (first.clone(), Some(2))
    );

    // Opening reads only the sealed segments' headers; a reader that reaches the damage gets an
    // error naming it (never the record silently skipped), and can step over it.
    let log = EmbeddedLog::open(config).await.unwrap();
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    assert_eq!(reader.poll(100).await.unwrap().len(), 2);
    let error = reader.poll(100).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, LogError::Corrupt { offset: Some(2), segment: s, .. } if s == &first),
        "{message}"
    );
    assert_eq!(reader.poll(100).await.unwrap()[0].position.offset, 3);
}

#[tokio::test]
async fn a_log_shorter_than_its_checkpoint_or_with_garbage_after_it_is_damage() {
    for damage in ["cut before the checkpoint", "garbage appended"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
            append_range(&log, Topic::Data, 0..10).await;
        }
        let segment = last_segment(dir.path(), Topic::Data);
        let mut bytes = std::fs::read(&segment).unwrap();
        let (last_pos, last_len) = *frames(&segment).last().unwrap();
        match damage {
            "cut before the checkpoint" => bytes.truncate((last_pos + last_len / 2) as usize),
            _ => bytes.extend_from_slice(b"this is not a frame, but it is not a torn write either"),
        }
        std::fs::write(&segment, &bytes).unwrap();
        let problem = verify_dir(dir.path()).first_problem().cloned();
        assert!(problem.is_some(), "{damage}");
        let error = EmbeddedLog::open(config(dir.path())).await.err();
        assert!(
            matches!(error, Some(LogError::Corrupt { .. })),
            "{damage}: {error:?}"
        );
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            bytes,
            "{damage}: nothing changed"
        );
    }
}

#[tokio::test]
async fn a_damaged_checkpoint_falls_back_to_its_other_slot_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..10).await;
    }
    let checkpoint = partition_dir(dir.path(), Topic::Data).join(CHECKPOINT_FILE);
    let original = std::fs::read(&checkpoint).unwrap();

    // One slot damaged (as a torn checkpoint write leaves it): the other one is used, and said.
    for slot in [0, 1] {
        let mut bytes = original.clone();
        bytes[slot * 128 + 60] ^= 1;
        std::fs::write(&checkpoint, &bytes).unwrap();
        let report = verify_dir(dir.path());
        assert!(report.first_problem().is_none(), "slot {slot}: {report:?}");
        let data = report.partition(Topic::Data, 0).unwrap();
        assert!(
            data.notes.iter().any(|n| n.contains("unreadable")),
            "{:?}",
            data.notes
        );
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 10);
        drop(log);
        std::fs::write(&checkpoint, &original).unwrap();
    }

    // Both slots, the file gone, or a checkpoint under another key: refused, nothing changed.
    let mut both = original.clone();
    both[60] ^= 1;
    both[128 + 60] ^= 1;
    let foreign = tempfile::tempdir().unwrap();
    CheckpointFile::open(foreign.path(), ChainKey::new([1; 32]), Topic::Data)
        .unwrap()
        .write(
            &verify_dir(dir.path())
                .partition(Topic::Data, 0)
                .unwrap()
                .checkpoint
                .unwrap(),
        )
        .unwrap();
    let foreign = std::fs::read(foreign.path().join(CHECKPOINT_FILE)).unwrap();
    for (damage, bytes, reason) in [
        ("both slots", Some(both), "readable"),
        ("deleted", None, "no checkpoint"),
        ("another key", Some(foreign), "not authenticated"),
    ] {
        match &bytes {
            Some(bytes) => std::fs::write(&checkpoint, bytes).unwrap(),
            None => std::fs::remove_file(&checkpoint).unwrap(),
        }
        let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
        assert!(problem.reason.contains(reason), "{damage}: {problem}");
        let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
        assert!(error.to_string().contains(reason), "{damage}: {error}");
        std::fs::write(&checkpoint, &original).unwrap();
    }

    // A log whose checkpoint is gone is accepted as it is by an explicit repair at its end.
    std::fs::remove_file(&checkpoint).unwrap();
    let cut = truncate_at(dir.path(), Topic::Data, 10, &key()).unwrap();
    assert_eq!(cut.end, 10);
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    assert_eq!(read_all(&log, Topic::Data, 0).await.len(), 10);
}

#[tokio::test]
async fn missing_segments_are_damage() {
    for which in ["a middle one", "the last one", "the first one"] {
        let dir = tempfile::tempdir().unwrap();
        let config = segmented(dir.path(), 1024, 20).await;
        let segments = list_segments(&partition_dir(dir.path(), Topic::Data)).unwrap();
        assert!(segments.len() > 4);
        let gone = match which {
            "a middle one" => &segments[2].1,
            "the last one" => &segments[segments.len() - 1].1,
            _ => &segments[0].1,
        };
        std::fs::remove_file(gone).unwrap();
        let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
        assert!(problem.reason.contains("missing"), "{which}: {problem}");
        let error = EmbeddedLog::open(config).await.err().unwrap();
        assert!(error.to_string().contains("missing"), "{which}: {error}");
    }
}

#[tokio::test]
async fn a_segment_rewritten_with_a_recomputed_chain_is_found_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..10).await;
    }
    // A forger without the master key rewrites record 6 and recomputes every checksum and the
    // whole chain from the segment header on.
    let segment = last_segment(dir.path(), Topic::Data);
    let mut records = Vec::new();
    scan_segment(&segment, 0, |step| {
        if let Step::Record { record, .. } = step {
            records.push(record.clone());
        }
    })
    .unwrap();
    // Same length, other bytes: every frame stays where it was.
    records[6].value.reverse();
    let mut chain = [0u8; 32];
    let mut bytes = encode_segment_header(0, &chain).to_vec();
    for (i, record) in records.iter().enumerate() {
        encode_frame(&mut bytes, i as u64, record, &mut chain).unwrap();
    }
    std::fs::write(&segment, &bytes).unwrap();

    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert!(problem.reason.contains("checkpoint's head"), "{problem}");
    let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
    assert!(error.to_string().contains("checkpoint's head"), "{error}");

    // A checkpoint forged for the new chain needs the key: one under another key is refused.
    let forged = CheckpointFile::open(
        &partition_dir(dir.path(), Topic::Data),
        ChainKey::new([2; 32]),
        Topic::Data,
    )
    .unwrap();
    let mut checkpoint =
        super::checkpoint::load(&partition_dir(dir.path(), Topic::Data), &key(), Topic::Data)
            .unwrap()
            .checkpoint
            .unwrap();
    checkpoint.sequence += 1;
    checkpoint.head = chain;
    forged.write(&checkpoint).unwrap();
    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert!(problem.reason.contains("not authenticated"), "{problem}");
}

#[tokio::test]
async fn repair_cuts_at_the_damage_and_keeps_what_it_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let config = segmented(dir.path(), 2048, 8).await;
    let segments = list_segments(&partition_dir(dir.path(), Topic::Data)).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let (base, path) = segments[1].clone();
    let (pos, len) = frames(&path)[1];
    let damaged = base + 1;
    flip_byte(&path, pos + len - 40);
    assert_eq!(
        verify_dir(dir.path())
            .partition(Topic::Data, 0)
            .unwrap()
            .end,
        damaged
    );

    // Past the damage: refused, with where to cut instead.
    let error = truncate_at(dir.path(), Topic::Data, damaged + 2, &key()).unwrap_err();
    assert!(
        error.to_string().contains(&format!("cut at {damaged}")),
        "{error}"
    );

    let segment_bytes = std::fs::read(&path).unwrap();
    let later: Vec<Vec<u8>> = segments[2..]
        .iter()
        .map(|(_, p)| std::fs::read(p).unwrap())
        .collect();
    let cut = truncate_at(dir.path(), Topic::Data, damaged, &key()).unwrap();
    assert_eq!(cut.end, damaged);
    // The rest of the segment, every later segment and the old checkpoint are in quarantine.
    let kept: Vec<Vec<u8>> = quarantined(dir.path())
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert!(kept.contains(&segment_bytes[pos as usize..].to_vec()));
    for bytes in &later {
        assert!(kept.contains(bytes));
    }
    assert_eq!(kept.len(), 2 + later.len());

    let log = EmbeddedLog::open(config).await.unwrap();
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), damaged);
    append_range(&log, Topic::Data, damaged..damaged + 5).await;
    assert_holds_records(&log, Topic::Data, damaged + 5).await;
    drop(log);
    let report = verify_dir(dir.path());
    assert!(report.first_problem().is_none(), "{report:?}");
}

#[tokio::test]
async fn the_chain_is_checked_against_expected_and_anchored_heads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..20).await;
        log.sync().await.unwrap();
        let (offset, head) = log.durable_head(Topic::Data).unwrap();
        assert_eq!(offset, 20);
        let registry = crate::codec::Registry::builtin().unwrap();
        let anchor = anchor_event(&key(), Topic::Data, 0, offset, &head, "test");
        log.append(
            Topic::Control,
            vec![registry.encode_record(&anchor).unwrap()],
        )
        .await
        .unwrap();
        append_range(&log, Topic::Data, 20..25).await;
    }
    let report = verify_dir(dir.path());
    assert!(report.first_problem().is_none(), "{report:?}");
    let data = report.partition(Topic::Data, 0).unwrap();
    assert_eq!(data.anchored, Some(20));
    let head = data.head();
    assert_eq!(head.offset, 25);
    assert_eq!(ExpectedHead::parse(&head.to_string()).unwrap(), head);

    let expect = |heads: &[ExpectedHead]| verify(dir.path(), &key(), heads).unwrap();
    assert!(
        expect(std::slice::from_ref(&head))
            .first_problem()
            .is_none()
    );
    let wrong = ExpectedHead {
        head: [9; 32],
        ..head.clone()
    };
    assert!(
        expect(&[wrong])
            .first_problem()
            .unwrap()
            .reason
            .contains("rewritten")
    );
    let beyond = ExpectedHead {
        offset: 26,
        ..head.clone()
    };
    assert!(
        expect(&[beyond])
            .first_problem()
            .unwrap()
            .reason
            .contains("only 25")
    );

    // An anchor that the key did not make is refused.
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        let registry = crate::codec::Registry::builtin().unwrap();
        let forged = anchor_event(
            &ChainKey::new([5; 32]),
            Topic::Data,
            0,
            25,
            &head.head,
            "forger",
        );
        log.append(
            Topic::Control,
            vec![registry.encode_record(&forged).unwrap()],
        )
        .await
        .unwrap();
    }
    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert!(problem.reason.contains("not authenticated"), "{problem}");
}

#[tokio::test]
async fn tampering_that_fixes_the_checksum_still_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..10).await;
    }
    let segment = last_segment(dir.path(), Topic::Data);
    let (pos, len) = frames(&segment)[6];
    let mut bytes = std::fs::read(&segment).unwrap();
    let body = (pos + FRAME_HEADER_LEN) as usize..(pos + len) as usize;
    // Change a byte of the value and recompute the body checksum, as a forger would.
    bytes[body.end - 40] = b'Z';
    let crc = crc32c::crc32c(&bytes[body.clone()]);
    bytes[pos as usize + 8..pos as usize + 12].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();

    let problem = verify_dir(dir.path()).first_problem().cloned().unwrap();
    assert_eq!(problem.offset, Some(6));
    assert!(problem.reason.contains("chain"), "{}", problem.reason);
}

#[tokio::test]
async fn oversized_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    let huge = Record {
        value: vec![0; segment::MAX_BODY_LEN + 1],
        ..Record::default()
    };
    assert!(matches!(
        log.append(Topic::Data, vec![huge]).await,
        Err(LogError::RecordTooLarge { .. })
    ));
    append_range(&log, Topic::Data, 0..1).await;
    assert_eq!(read_all(&log, Topic::Data, 0).await.len(), 1);
}

#[tokio::test]
async fn every_fsync_policy_writes_the_same_log() {
    let mut logs = Vec::new();
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(1)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig {
            fsync,
            ..config(dir.path())
        })
        .await
        .unwrap();
        append_range(&log, Topic::Data, 0..5).await;
        append_range(&log, Topic::Data, 5..9).await;
        log.sync().await.unwrap();
        assert_eq!(read_all(&log, Topic::Data, 0).await.len(), 9);
        drop(log);
        logs.push(std::fs::read(last_segment(dir.path(), Topic::Data)).unwrap());
    }
    // The policy decides when bytes reach the disk, never which bytes.
    assert!(logs.windows(2).all(|pair| pair[0] == pair[1]));
}

#[test]
fn fsync_policies_parse() {
    assert_eq!(
        "always".parse::<FsyncPolicy>().unwrap(),
        FsyncPolicy::Always
    );
    assert_eq!("never".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Never);
    assert_eq!(
        "250ms".parse::<FsyncPolicy>().unwrap(),
        FsyncPolicy::Interval(Duration::from_millis(250))
    );
    assert_eq!(
        "2s".parse::<FsyncPolicy>().unwrap(),
        FsyncPolicy::Interval(Duration::from_secs(2))
    );
    for bad in ["", "sometimes", "5", "ms", "5m"] {
        assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
    }
    assert_eq!(
        FsyncPolicy::Interval(Duration::from_millis(250)).to_string(),
        "250ms"
    );
}

#[tokio::test]
async fn segments_before_an_offset_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = segmented(dir.path(), 1024, 20).await;
    let log = EmbeddedLog::open(config.clone()).await.unwrap();
    let before = list_segments(&partition_dir(dir.path(), Topic::Data)).unwrap();
    assert!(before.len() > 4);
    let keep_from = before[3].0;
    let removed = log.remove_before(Topic::Data, keep_from).await.unwrap();
    assert_eq!(removed, 3);
    assert_eq!(
        read_all(&log, Topic::Data, keep_from).await.len() as u64,
        100 - keep_from
    );
    assert!(
        log.read_from(Topic::Data, 0, 0)
            .await
            .unwrap()
            .poll(10)
            .await
            .is_err()
    );
    // The segment being written is never removed, whatever the offset.
    log.remove_before(Topic::Data, u64::MAX).await.unwrap();
    assert_eq!(
        list_segments(&partition_dir(dir.path(), Topic::Data))
            .unwrap()
            .len(),
        1
    );
    append_range(&log, Topic::Data, 100..101).await;
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 101);
    // The checkpoint counts only the segments left: the log opens and verifies as it is.
    drop(log);
    let report = verify_dir(dir.path());
    assert!(report.first_problem().is_none(), "{report:?}");
    let log = EmbeddedLog::open(config).await.unwrap();
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 101);
}

#[tokio::test]
async fn a_read_only_open_reads_beside_the_writer_and_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    let records: Vec<Record> = (0..10)
        .map(|i| Record {
            key: b"k".to_vec(),
            value: format!("v{i}").into_bytes(),
            ..Record::default()
        })
        .collect();
    log.append(Topic::Data, records.clone()).await.unwrap();

    let reader = EmbeddedLog::open_read_only(dir.path(), key())
        .await
        .unwrap();
    assert_eq!(reader.end_offset(Topic::Data, 0).await.unwrap(), 10);
    assert_eq!(reader.end_offset(Topic::Control, 0).await.unwrap(), 0);
    let mut entries = reader.read_from(Topic::Data, 0, 0).await.unwrap();
    let read = entries.poll(100).await.unwrap();
    assert_eq!(
        read.into_iter().map(|e| e.record).collect::<Vec<_>>(),
        records
    );
    assert!(matches!(
        reader.append(Topic::Data, records.clone()).await,
        Err(LogError::ReadOnly)
    ));
    assert!(matches!(
        reader.remove_before(Topic::Data, 5).await,
        Err(LogError::ReadOnly)
    ));
    // The writer goes on; the read-only view is of the moment it was opened.
    log.append(Topic::Data, records).await.unwrap();
    assert_eq!(reader.end_offset(Topic::Data, 0).await.unwrap(), 10);
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 20);
}
