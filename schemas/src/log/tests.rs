use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::segment::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, decode_frame_header, list_segments};
use super::*;

fn record(i: u64) -> Record {
    Record {
        key: format!("trace-{}", i % 7).into_bytes(),
        headers: vec![Header::new("loom.event_type", b"test.event")],
        value: format!("value number {i} {}", "x".repeat((i % 50) as usize)).into_bytes(),
        timestamp_us: 1_700_000_000_000_000 + i as i64,
    }
}

fn config(dir: &Path) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        dir: dir.to_owned(),
        fsync: FsyncPolicy::Never,
        segment_bytes: EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES,
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
    assert!(verify(dir.path()).unwrap().first_problem().is_none());
}

#[tokio::test]
async fn segments_roll_and_the_chain_runs_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.segment_bytes = 2 * 1024;
    {
        let log = EmbeddedLog::open(config.clone()).await.unwrap();
        for i in 0..40 {
            append_range(&log, Topic::Data, i * 5..i * 5 + 5).await;
        }
    }
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
    let report = verify(dir.path()).unwrap();
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
    let problem = verify(dir.path())
        .unwrap()
        .first_problem()
        .cloned()
        .unwrap();
    assert_eq!(&problem.segment, second);
}

#[tokio::test]
async fn a_torn_write_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..20).await;
    }
    let segment = last_segment(dir.path(), Topic::Data);
    let (last_pos, last_len) = *frames(&segment).last().unwrap();
    // Cut the last record in half, as a crash in the middle of a write would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(last_pos + last_len / 2)
        .unwrap();
    let report = verify(dir.path()).unwrap();
    assert!(report.first_problem().is_none());
    assert!(report.partitions[0].torn_tail.is_some());

    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 19);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), last_pos);
    append_range(&log, Topic::Data, 19..25).await;
    let entries = read_all(&log, Topic::Data, 0).await;
    assert_eq!(entries.len(), 25);
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.record == record(i as u64))
    );
    drop(log);
    let report = verify(dir.path()).unwrap();
    assert!(
        report.first_problem().is_none() && report.partitions[0].torn_tail.is_none(),
        "{report:?}"
    );
}

#[tokio::test]
async fn torn_headers_and_zeroed_tails_are_recovered_too() {
    for damage in [
        "half a frame header",
        "zeroed tail",
        "bad checksum on the last record",
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
            append_range(&log, Topic::Control, 0..5).await;
        }
        let segment = last_segment(dir.path(), Topic::Control);
        let mut bytes = std::fs::read(&segment).unwrap();
        let (last_pos, _) = *frames(&segment).last().unwrap();
        let kept = match damage {
            "half a frame header" => {
                bytes.extend_from_slice(&[7, 0, 0, 0, 1]);
                5
            }
            "zeroed tail" => {
                bytes.extend_from_slice(&[0u8; 4096]);
                5
            }
            _ => {
                let end = bytes.len() - 3;
                bytes[end] ^= 0xFF;
                4
            }
        };
        std::fs::write(&segment, &bytes).unwrap();
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        assert_eq!(
            log.end_offset(Topic::Control, 0).await.unwrap(),
            kept,
            "{damage}"
        );
        assert_eq!(
            read_all(&log, Topic::Control, 0).await.len() as u64,
            kept,
            "{damage}"
        );
        if kept == 4 {
            assert_eq!(std::fs::metadata(&segment).unwrap().len(), last_pos);
        }
    }
}

#[tokio::test]
async fn a_flipped_byte_is_pinpointed_by_verify_and_by_readers() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..30).await;
    }
    let segment = last_segment(dir.path(), Topic::Data);
    let (pos, len) = frames(&segment)[17];
    flip_byte(&segment, pos + len - 40);

    let problem = verify(dir.path())
        .unwrap()
        .first_problem()
        .cloned()
        .unwrap();
    assert_eq!(problem.segment, segment);
    assert_eq!(problem.offset, Some(17));
    assert_eq!(problem.byte, pos);

    // The damaged record is in the middle: opening keeps everything, readers name the spot
    // and can step over it.
    let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
    assert_eq!(log.end_offset(Topic::Data, 0).await.unwrap(), 30);
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    assert_eq!(reader.poll(100).await.unwrap().len(), 17);
    let error = reader.poll(100).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, LogError::Corrupt { offset: Some(17), segment: s, .. } if s == &segment),
        "{message}"
    );
    assert!(
        message.contains(&segment.display().to_string()) && message.contains("offset 17"),
        "{message}"
    );
    let rest = reader.poll(100).await.unwrap();
    assert_eq!(rest.first().unwrap().position.offset, 18);
    assert_eq!(rest.len(), 12);
}

#[tokio::test]
async fn a_damaged_length_in_the_middle_refuses_to_open_and_names_the_spot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path())).await.unwrap();
        append_range(&log, Topic::Data, 0..10).await;
    }
    let segment = last_segment(dir.path(), Topic::Data);
    let (pos, _) = frames(&segment)[4];
    flip_byte(&segment, pos + 1);
    let error = EmbeddedLog::open(config(dir.path())).await.err().unwrap();
    assert!(
        matches!(
            &error,
            LogError::Corrupt {
                offset: Some(4),
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        verify(dir.path()).unwrap().first_problem().unwrap().offset,
        Some(4)
    );
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

    let problem = verify(dir.path())
        .unwrap()
        .first_problem()
        .cloned()
        .unwrap();
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
        log.sync().await.unwrap();
        assert_eq!(read_all(&log, Topic::Data, 0).await.len(), 5);
    }
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
    let mut config = config(dir.path());
    config.segment_bytes = 1024;
    let log = EmbeddedLog::open(config).await.unwrap();
    for i in 0..20 {
        append_range(&log, Topic::Data, i * 5..i * 5 + 5).await;
    }
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
}

#[tokio::test]
async fn a_read_only_open_reads_beside_the_writer_and_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir.path()))
        .await
        .unwrap();
    let records: Vec<Record> = (0..10)
        .map(|i| Record {
            key: b"k".to_vec(),
            value: format!("v{i}").into_bytes(),
            ..Record::default()
        })
        .collect();
    log.append(Topic::Data, records.clone()).await.unwrap();

    let reader = EmbeddedLog::open_read_only(dir.path()).await.unwrap();
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
