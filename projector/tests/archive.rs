//! The archive projector against a real log and real object stores (a local directory, and the
//! S3-compatible server `./infra/test.sh` starts): every event exactly once, whole, across kills
//! and duplicates; `verify` names what was altered, removed or added; compaction concurrent with
//! archiving; erasure; and a replay from the archive that rebuilds the same read models as the
//! log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, BinaryArray, StringArray};
use bytes::Bytes;
use futures_util::TryStreamExt;
use loom_projector::archive::compact::CompactConfig;
use loom_projector::archive::keys::ArchiveKeys;
use loom_projector::archive::manifest::tenant_dir;
use loom_projector::archive::read::read_file;
use loom_projector::archive::verify::verify;
use loom_projector::archive::{
    Archive, ArchiveConfig, ArchiveLocation, Archiver, S3Options, SYSTEM_TENANT,
};
use loom_projector::{FromArchive, ProjectorConfig, ReadStore, StoreLocation};
use loom_schemas::codec::Registry;
use loom_schemas::event::{Envelope, Event, Payload, TenantErased};
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Record, Topic};
use loom_schemas::samples;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// 22:30 UTC two days ago: a history of a few hours crosses midnight into a second date.
fn late_evening_us() -> i64 {
    let day = 86_400_000_000;
    let now = loom_schemas::event::now_micros();
    (now / day - 2) * day + 22 * 3_600_000_000 + 30 * 60_000_000
}

/// A key store with `tenants` tenants and an embedded log holding their generated history.
struct Setup {
    dir: tempfile::TempDir,
    keys: Arc<KeyStore>,
    log: Arc<dyn Log>,
    /// The same log, for what only the embedded log does (removing old segments).
    embedded: Arc<EmbeddedLog>,
    tenants: Vec<Uuid>,
    /// Every event on the log, by id, as its record's bytes.
    records: BTreeMap<Uuid, Vec<u8>>,
}

impl Setup {
    async fn new(tenants: usize, requests: usize) -> Setup {
        Setup::with_segments(tenants, requests, EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES).await
    }

    async fn with_segments(tenants: usize, requests: usize, segment_bytes: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let keys =
            KeyStore::open_file(dir.path().join("keys.json"), MasterKey::generate().unwrap())
                .await
                .unwrap();
        let mut data_keys = Vec::new();
        for _ in 0..tenants {
            let tenant = Uuid::now_v7();
            keys.create_tenant_keys(tenant).await.unwrap();
            data_keys.push(keys.current_key(tenant).unwrap());
        }
        let events = samples::history(&data_keys, requests, late_evening_us(), 7).unwrap();
        let embedded = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig {
                segment_bytes,
                ..EmbeddedLogConfig::new(dir.path().join("log"), loom_schemas::testing::chain_key())
            })
            .await
            .unwrap(),
        );
        let mut setup = Setup {
            dir,
            keys: Arc::new(keys),
            log: Arc::clone(&embedded) as Arc<dyn Log>,
            embedded,
            tenants: data_keys.iter().map(|k| k.tenant_id).collect(),
            records: BTreeMap::new(),
        };
        setup.append(&events).await;
        setup
    }

    /// Appends `events` in order, each to its plane's topic.
    async fn append(&mut self, events: &[Event]) {
        let registry = Registry::builtin().unwrap();
        for chunk in events.chunks(300) {
            for topic in Topic::ALL {
                let records: Vec<Record> = chunk
                    .iter()
                    .filter(|e| Topic::for_plane(e.payload.plane()) == topic)
                    .map(|e| registry.encode_record(e).unwrap())
                    .collect();
                if !records.is_empty() {
                    self.log.append(topic, records).await.unwrap();
                }
            }
        }
        for event in events {
            self.records
                .insert(event.envelope.event_id, registry.encode(event).unwrap());
        }
    }

    /// Appends some data records a second time, as the spool's at-least-once forwarding does.
    async fn append_copies(&self, every: usize) {
        let mut reader = self.log.read_from(Topic::Data, 0, 0).await.unwrap();
        let entries = reader.poll(100_000).await.unwrap();
        let copies: Vec<Record> = entries
            .iter()
            .step_by(every)
            .map(|e| e.record.clone())
            .collect();
        self.log.append(Topic::Data, copies).await.unwrap();
    }

    fn archive(&self) -> Archive {
        Archive::open(&ArchiveLocation::Directory(self.dir.path().join("archive"))).unwrap()
    }

    fn archiver(&self, archive: &Archive, config: ArchiveConfig) -> Arc<Archiver> {
        Arc::new(Archiver::new(
            archive.clone(),
            Arc::clone(&self.log),
            Arc::clone(&self.keys),
            config,
        ))
    }
}

/// Small files, written out fast, no compaction: many manifest entries.
fn small_files() -> ArchiveConfig {
    ArchiveConfig {
        roll_bytes: 48 << 10,
        roll_after: Duration::from_millis(100),
        compaction: None,
        ..ArchiveConfig::default()
    }
}

/// Every archived row readers see: (tenant, event id, record bytes).
async fn archived(archive: &Archive, keys: &Arc<KeyStore>) -> Vec<(Uuid, String, Vec<u8>)> {
    let mut rows = Vec::new();
    for tenant in archive.tenants().await.unwrap() {
        let manifest = archive.manifest(tenant).await.unwrap();
        for file in manifest.files.values() {
            let reader = ArchiveKeys::full(Arc::clone(keys), tenant);
            for batch in read_file(archive, tenant, file, reader, None)
                .await
                .unwrap()
            {
                let ids = batch
                    .column_by_name("event_id")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap();
                let records = batch
                    .column_by_name("record")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<BinaryArray>()
                    .unwrap();
                for i in 0..batch.num_rows() {
                    rows.push((tenant, ids.value(i).to_owned(), records.value(i).to_vec()));
                }
            }
        }
    }
    rows
}

/// Rows the manifests name, without reading the files.
async fn manifest_rows(archive: &Archive) -> u64 {
    let mut rows = 0;
    for tenant in archive.tenants().await.unwrap() {
        let manifest = archive.manifest(tenant).await.unwrap();
        rows += manifest.files.values().map(|f| f.rows).sum::<u64>();
    }
    rows
}

/// Runs `archiver` until the manifests name `rows` rows, then stops it (it writes out what it
/// buffers).
async fn archive_until(archiver: &Arc<Archiver>, archive: &Archive, rows: u64) {
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let archiver = Arc::clone(archiver);
        let shutdown = shutdown.clone();
        async move { archiver.run(shutdown).await }
    });
    let started = Instant::now();
    while manifest_rows(archive).await < rows {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the archive holds {} of {rows} rows after 2 minutes",
            manifest_rows(archive).await
        );
        assert!(
            !running.is_finished(),
            "the archiver stopped: {:?}",
            running.await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// Checks that the archive holds every event of `setup` exactly once, whole, in its tenant.
async fn assert_exactly_once(setup: &Setup, archive: &Archive) {
    let rows = archived(archive, &setup.keys).await;
    let mut seen = BTreeSet::new();
    let registry = Registry::builtin().unwrap();
    for (tenant, id, record) in &rows {
        let id: Uuid = id.parse().unwrap();
        assert!(seen.insert(id), "event {id} is archived twice");
        assert_eq!(
            setup.records.get(&id),
            Some(record),
            "event {id} is not archived whole"
        );
        let event = registry.decode(record).unwrap();
        let expected = match event.payload.plane() {
            loom_schemas::event::Plane::Control => SYSTEM_TENANT,
            loom_schemas::event::Plane::Data | loom_schemas::event::Plane::Quota => {
                event.envelope.tenant_id
            }
        };
        assert_eq!(
            *tenant, expected,
            "event {id} is in another tenant's archive"
        );
    }
    let missing: Vec<&Uuid> = setup
        .records
        .keys()
        .filter(|id| !seen.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events are not archived",
        missing.len()
    );
}

/// Files of `tenant` under `date=…` directories, as stored (named by a manifest or not).
async fn stored_files(archive: &Archive, tenant: Uuid) -> Vec<Path> {
    let mut files: Vec<Path> = archive
        .store
        .list(Some(&tenant_dir(&archive.root, tenant)))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .unwrap();
    files.retain(|p| p.as_ref().ends_with(".parquet"));
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_archived_exactly_once_across_kills_and_duplicates() {
    let setup = Setup::new(3, 1500).await;
    setup.append_copies(7).await;
    let archive = setup.archive();
    // A file a crash left between writing it and naming it: readers never see it, a start
    // sweeps it away.
    let orphan = archive.file_path(setup.tenants[0], "date=2020-01-01/orphan.parquet");
    archive
        .put(&orphan, Bytes::from_static(b"half a file"))
        .await
        .unwrap();

    let archiver = setup.archiver(&archive, small_files());
    // Killed (its task dropped at whatever await it was at) three times part way.
    for kill_after in [120, 350, 700] {
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let archiver = Arc::clone(&archiver);
            async move { archiver.run(shutdown).await }
        });
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        running.abort();
        let _ = running.await;
    }
    archive_until(&archiver, &archive, setup.records.len() as u64).await;
    assert_exactly_once(&setup, &archive).await;

    // Files span two dates, every one of them named by a manifest; the orphan is gone.
    let mut dates = BTreeSet::new();
    for tenant in archive.tenants().await.unwrap() {
        let manifest = archive.manifest(tenant).await.unwrap();
        for file in manifest.files.values() {
            dates.insert(file.date().to_owned());
        }
        let named: BTreeSet<Path> = manifest
            .files
            .keys()
            .map(|path| archive.file_path(tenant, path))
            .collect();
        for path in stored_files(&archive, tenant).await {
            assert!(
                named.contains(&path),
                "{path} is stored but named by no manifest"
            );
        }
    }
    assert!(dates.len() >= 2, "the history spans {dates:?}");
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.rows, setup.records.len() as u64);

    // A restart finds nothing new to archive.
    let entries_before = report.entries;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let archiver = Arc::clone(&archiver);
        let shutdown = shutdown.clone();
        async move { archiver.run(shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(verify(&archive).await.unwrap().entries, entries_before);
    assert_exactly_once(&setup, &archive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_what_was_altered_removed_or_added() {
    let setup = Setup::new(2, 600).await;
    let archive = setup.archive();
    let archiver = setup.archiver(&archive, small_files());
    archive_until(&archiver, &archive, setup.records.len() as u64).await;
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);

    let (first, second) = (setup.tenants[0], setup.tenants[1]);
    let files = stored_files(&archive, first).await;
    assert!(files.len() >= 3, "{files:?}");
    // A byte flipped.
    let altered = &files[0];
    let mut bytes = archive.get(altered).await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    archive.put(altered, Bytes::from(bytes)).await.unwrap();
    // A file deleted.
    let removed = &files[1];
    archive.store.delete(removed).await.unwrap();
    // A manifest entry dropped (of the other tenant, whose files are intact).
    let entry = tenant_dir(&archive.root, second)
        .join("_manifest")
        .join(format!("{:012}.json", 1));
    archive.store.delete(&entry).await.unwrap();
    // A file added.
    let added = archive.file_path(first, "date=2021-06-01/added.parquet");
    archive
        .put(&added, Bytes::from_static(b"PAR1 not ours"))
        .await
        .unwrap();

    let report = verify(&archive).await.unwrap();
    let problems = report.problems.join("\n");
    assert!(!report.is_intact());
    assert!(
        problems.contains(&format!("{altered}: altered")),
        "{problems}"
    );
    assert!(
        problems.contains(&format!("{removed}: removed")),
        "{problems}"
    );
    assert!(problems.contains("000000000001"), "{problems}");
    let notes = report.notes.join("\n");
    assert!(notes.contains(added.as_ref()), "{notes}");

    // Reading names the file and what is wrong with it.
    let manifest = archive.manifest(first).await.unwrap();
    let name = altered
        .as_ref()
        .rsplit_once("tenant_id=")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, path)| path.to_owned())
        .unwrap();
    let error = read_file(
        &archive,
        first,
        &manifest.files[&name],
        ArchiveKeys::full(Arc::clone(&setup.keys), first),
        None,
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains(altered.as_ref()), "{error}");
    assert!(archive.manifest(second).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_concurrent_with_archiving_shows_every_event_once() {
    let setup = Setup::new(2, 1500).await;
    let archive = setup.archive();
    let config = ArchiveConfig {
        compaction: Some(CompactConfig {
            every: Duration::from_millis(200),
            small_bytes: 16 << 20,
            min_files: 3,
            target_bytes: 128 << 20,
            grace: Duration::from_secs(30),
        }),
        ..small_files()
    };
    let archiver = setup.archiver(&archive, config);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let archiver = Arc::clone(&archiver);
        let shutdown = shutdown.clone();
        async move { archiver.run(shutdown).await }
    });
    // Readers' snapshots while both run: never an event twice (both the small files and their
    // merge) or missing from what was there before (neither).
    let total = setup.records.len();
    let mut last = 0;
    let started = Instant::now();
    loop {
        let rows = archived(&archive, &setup.keys).await;
        let ids: BTreeSet<&String> = rows.iter().map(|(_, id, _)| id).collect();
        assert_eq!(ids.len(), rows.len(), "a snapshot shows an event twice");
        assert!(
            rows.len() >= last,
            "a snapshot lost events: {} < {last}",
            rows.len()
        );
        last = rows.len();
        if last == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{last} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Let compaction finish its rounds over the last files (the bound only keeps a broken
    // compactor from hanging the test: on a loaded machine a round takes seconds). What may stay:
    // per tenant (two and the system's) the merged file and fewer than `min_files` small ones.
    const MOST_FILES: u64 = 3 * 3;
    let compacted = Instant::now();
    let mut report = verify(&archive).await.unwrap();
    while compacted.elapsed() < Duration::from_secs(120) {
        let files: u64 = report.files;
        tokio::time::sleep(Duration::from_millis(500)).await;
        report = verify(&archive).await.unwrap();
        if report.files == files && files <= MOST_FILES {
            break;
        }
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_exactly_once(&setup, &archive).await;
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    // Many small appends, merged into few files.
    assert!(report.entries > report.files, "{report:?}");
    assert!(report.files <= MOST_FILES, "{report:?}");
}

/// A read-model store in a temporary directory (SQLite).
fn sqlite_store(dir: &tempfile::TempDir, name: &str) -> StoreLocation {
    StoreLocation::Sqlite(dir.path().join(name))
}

fn replay_config() -> ProjectorConfig {
    ProjectorConfig {
        group: format!("archive-test-{}", Uuid::now_v7().simple()),
        batch: 500,
        ..ProjectorConfig::default()
    }
}

async fn digests(location: &StoreLocation) -> BTreeMap<&'static str, String> {
    let catalog = loom_projector::Catalog::open(location).await.unwrap();
    let store = ReadStore::open(location, catalog.active().await.unwrap())
        .await
        .unwrap();
    let mut digests = store.digests().await.unwrap();
    // Positions say how far each rebuild read, not what it holds.
    digests.remove("positions");
    store.close().await;
    digests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_the_archive_rebuilds_what_the_log_rebuilds() {
    let mut setup = Setup::new(3, 1200).await;
    setup.append_copies(11).await;
    let archive = setup.archive();
    let archiver = setup.archiver(&archive, small_files());
    // Archived part way (killed: some tenants' events are written out, others' not) …
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let archiver = Arc::clone(&archiver);
        async move { archiver.run(shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    running.abort();
    let _ = running.await;
    assert!(manifest_rows(&archive).await > 0, "nothing archived yet");
    // … and more history on the log since.
    let keys: Vec<_> = setup
        .tenants
        .iter()
        .map(|t| setup.keys.current_key(*t).unwrap())
        .collect();
    let later = samples::history(&keys, 300, late_evening_us() + 10 * 3_600_000_000, 8).unwrap();
    setup.append(&later).await;

    let stores = tempfile::tempdir().unwrap();
    let from_log = sqlite_store(&stores, "from-log");
    loom_projector::replay(
        Arc::clone(&setup.log),
        None,
        &from_log,
        replay_config(),
        false,
    )
    .await
    .unwrap();
    let from_archive = sqlite_store(&stores, "from-archive");
    let report = loom_projector::replay(
        Arc::clone(&setup.log),
        Some(FromArchive {
            archive: archive.clone(),
            keys: Arc::clone(&setup.keys),
        }),
        &from_archive,
        replay_config(),
        false,
    )
    .await
    .unwrap();
    assert!(report.records > 0);
    let (expected, found) = (digests(&from_log).await, digests(&from_archive).await);
    for (table, digest) in &expected {
        assert_eq!(Some(digest), found.get(table), "table {table} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_the_archive_rebuilds_the_history_the_log_no_longer_holds() {
    // A log of small segments, wholly archived; then more history, not archived yet.
    let mut setup = Setup::with_segments(3, 900, 64 << 10).await;
    let archive = setup.archive();
    let archiver = setup.archiver(&archive, small_files());
    archive_until(&archiver, &archive, setup.records.len() as u64).await;
    let mut archived_to = BTreeMap::new();
    for topic in Topic::ALL {
        archived_to.insert(topic, setup.log.end_offset(topic, 0).await.unwrap());
    }
    let keys: Vec<_> = setup
        .tenants
        .iter()
        .map(|t| setup.keys.current_key(*t).unwrap())
        .collect();
    let later = samples::history(&keys, 200, late_evening_us() + 10 * 3_600_000_000, 9).unwrap();
    setup.append(&later).await;

    // What a rebuild from the whole log gives …
    let stores = tempfile::tempdir().unwrap();
    let from_log = sqlite_store(&stores, "from-log");
    loom_projector::replay(
        Arc::clone(&setup.log),
        None,
        &from_log,
        replay_config(),
        false,
    )
    .await
    .unwrap();
    // … then retention takes the segments the archive holds.
    let mut removed = 0;
    for (topic, offset) in archived_to {
        removed += setup.embedded.remove_before(topic, offset).await.unwrap();
    }
    assert!(removed > 0, "no segment was old enough to remove");
    let without_archive = loom_projector::replay(
        Arc::clone(&setup.log),
        None,
        &sqlite_store(&stores, "log-only"),
        replay_config(),
        false,
    )
    .await;
    assert!(
        without_archive.is_err(),
        "the log alone no longer holds the history"
    );

    let from_archive = sqlite_store(&stores, "from-archive");
    loom_projector::replay(
        Arc::clone(&setup.log),
        Some(FromArchive {
            archive: archive.clone(),
            keys: Arc::clone(&setup.keys),
        }),
        &from_archive,
        replay_config(),
        false,
    )
    .await
    .unwrap();
    let (expected, found) = (digests(&from_log).await, digests(&from_archive).await);
    assert!(expected.len() > 5);
    for (table, digest) in &expected {
        assert_eq!(Some(digest), found.get(table), "table {table} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_tenant_is_unreadable_everywhere_and_the_archive_still_verifies() {
    let mut setup = Setup::new(2, 600).await;
    let archive = setup.archive();
    let archiver = setup.archiver(&archive, small_files());
    archive_until(&archiver, &archive, setup.records.len() as u64).await;
    let (erased, kept) = (setup.tenants[0], setup.tenants[1]);

    let before: Vec<_> = setup
        .tenants
        .iter()
        .map(|t| setup.keys.current_key(*t).unwrap())
        .collect();
    // As `loom admin tenant erase` does: keys first, then the event.
    setup.keys.erase(erased).await.unwrap();
    let event = Event {
        envelope: Envelope::new(erased, None, "test/erase"),
        payload: Payload::TenantErased(TenantErased {
            reason: Some("the customer asked".into()),
        }),
    };
    setup.append(std::slice::from_ref(&event)).await;
    // Events of the tenant still arriving after its erasure are not archived.
    let more = samples::history(&before, 100, late_evening_us() + 5 * 3_600_000_000, 9).unwrap();
    setup.append(&more).await;
    let archived_more = more
        .iter()
        .filter(|e| {
            e.payload.plane() == loom_schemas::event::Plane::Control || e.envelope.tenant_id == kept
        })
        .count();
    assert!(archived_more < more.len());
    let expected = manifest_rows(&archive).await + archived_more as u64 + 1;
    archive_until(&archiver, &archive, expected).await;

    let manifest = archive.manifest(erased).await.unwrap();
    assert!(manifest.erased);
    let file = manifest.files.values().next().unwrap();
    let error = read_file(
        &archive,
        erased,
        file,
        ArchiveKeys::full(Arc::clone(&setup.keys), erased),
        None,
    )
    .await
    .unwrap_err();
    assert!(error.is_erased(), "{error}");
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.erased, vec![erased]);

    // A rebuild from the log and one from the archive: no row of the tenant but its tombstone.
    let stores = tempfile::tempdir().unwrap();
    for (name, from) in [
        ("from-log", None),
        (
            "from-archive",
            Some(FromArchive {
                archive: archive.clone(),
                keys: Arc::clone(&setup.keys),
            }),
        ),
    ] {
        let location = sqlite_store(&stores, name);
        loom_projector::replay(
            Arc::clone(&setup.log),
            from,
            &location,
            replay_config(),
            false,
        )
        .await
        .unwrap();
        let catalog = loom_projector::Catalog::open(&location).await.unwrap();
        let store = ReadStore::open(&location, catalog.active().await.unwrap())
            .await
            .unwrap();
        for table in [
            "traces",
            "llm_calls",
            "trace_bodies",
            "usage_daily",
            "api_keys",
        ] {
            let count = |tenant: Uuid| {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT CAST(count(*) AS BIGINT) FROM {table} WHERE tenant_id = $1"
                )))
                .bind(tenant.to_string())
                .fetch_one(store.pool())
            };
            let gone: i64 = count(erased).await.unwrap().get(0);
            let there: i64 = count(kept).await.unwrap().get(0);
            assert_eq!(gone, 0, "{name}: {table} holds the erased tenant's rows");
            assert!(there > 0, "{name}: {table} lost the other tenant's rows");
        }
        let erased_at: Option<i64> =
            sqlx::query("SELECT erased_at FROM tenants WHERE tenant_id = $1")
                .bind(erased.to_string())
                .fetch_one(store.pool())
                .await
                .unwrap()
                .get(0);
        assert!(erased_at.is_some(), "{name}: the tombstone is missing");
        store.close().await;
    }
}

/// The S3-compatible server `./infra/test.sh` starts, under a prefix of this run's own.
fn s3_location() -> Option<ArchiveLocation> {
    let endpoint = std::env::var("LOOM_TEST_S3_ENDPOINT").ok()?;
    let var = |name: &str| std::env::var(name).unwrap();
    Some(ArchiveLocation::S3 {
        bucket: var("LOOM_TEST_S3_BUCKET"),
        prefix: format!("archive-test-{}", Uuid::now_v7().simple()),
        options: S3Options {
            endpoint: Some(endpoint),
            region: Some(var("LOOM_TEST_S3_REGION")),
            access_key_id: Some(var("LOOM_TEST_S3_ACCESS_KEY_ID")),
            secret_access_key: Some(var("LOOM_TEST_S3_SECRET_ACCESS_KEY").into()),
            path_style: true,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_to_s3_exactly_once() {
    let Some(location) = s3_location() else {
        panic!("LOOM_TEST_S3_ENDPOINT is not set: run the tests with ./infra/test.sh");
    };
    let setup = Setup::new(2, 600).await;
    setup.append_copies(5).await;
    let archive = Archive::open(&location).unwrap();
    let archiver = setup.archiver(&archive, small_files());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let archiver = Arc::clone(&archiver);
        async move { archiver.run(shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    running.abort();
    let _ = running.await;
    archive_until(&archiver, &archive, setup.records.len() as u64).await;
    assert_exactly_once(&setup, &archive).await;
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}

/// An S3-compatible server of this test's own (`LOOM_TEST_S3S_FS`, which `./infra/test.sh`
/// exports), on `port`, storing into `dir`: killed and restarted by the test.
struct OwnS3 {
    binary: String,
    port: u16,
    dir: std::path::PathBuf,
    process: Option<std::process::Child>,
}

impl OwnS3 {
    const BUCKET: &str = "outage";
    const KEY_ID: &str = "outage-key";
    const SECRET: &str = "outage-secret";

    fn start(dir: std::path::PathBuf) -> OwnS3 {
        let binary = std::env::var("LOOM_TEST_S3S_FS")
            .expect("LOOM_TEST_S3S_FS is not set: run the tests with ./infra/test.sh");
        std::fs::create_dir_all(dir.join(Self::BUCKET)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s3 = OwnS3 {
            binary,
            port,
            dir,
            process: None,
        };
        s3.restart();
        s3
    }

    fn restart(&mut self) {
        let child = std::process::Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", Self::KEY_ID, "--secret-key", Self::SECRET])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.process = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn location(&self) -> ArchiveLocation {
        ArchiveLocation::S3 {
            bucket: Self::BUCKET.to_owned(),
            prefix: "archive".to_owned(),
            options: S3Options {
                endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
                region: Some("us-east-1".to_owned()),
                access_key_id: Some(Self::KEY_ID.to_owned()),
                secret_access_key: Some(Self::SECRET.to_owned().into()),
                path_style: true,
            },
        }
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_mid_run_loses_and_repeats_nothing() {
    let mut setup = Setup::new(2, 400).await;
    let mut s3 = OwnS3::start(setup.dir.path().join("s3"));
    let archive = Archive::open(&s3.location()).unwrap();
    let archiver = setup.archiver(&archive, small_files());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (archiver, shutdown) = (Arc::clone(&archiver), shutdown.clone());
        async move { archiver.run(shutdown).await }
    });
    let started = Instant::now();
    while manifest_rows(&archive).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing archived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server goes away mid-run, while more history (and copies of it) arrives …
    s3.kill();
    let keys: Vec<_> = setup
        .tenants
        .iter()
        .map(|t| setup.keys.current_key(*t).unwrap())
        .collect();
    let later = samples::history(&keys, 200, late_evening_us() + 3_600_000_000, 11).unwrap();
    setup.append(&later).await;
    setup.append_copies(7).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.is_finished(),
        "the archiver gave up: {:?}",
        running.await
    );
    // … and comes back: the archiver carries on, without a restart.
    s3.restart();
    let started = Instant::now();
    while manifest_rows(&archive).await < setup.records.len() as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the archive holds {} of {} rows after the outage",
            manifest_rows(&archive).await,
            setup.records.len()
        );
        assert!(
            !running.is_finished(),
            "the archiver stopped: {:?}",
            running.await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_exactly_once(&setup, &archive).await;
    let report = verify(&archive).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}
