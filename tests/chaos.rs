//! The fault-tolerance suite: two gateways on Kafka, `loom projector`, `loom archiver` and
//! `loom query`, under a steady mixed load (chat, streams, tool calls, Anthropic streams,
//! embeddings; some answered after an upstream retry) from two tenants, suffer faults in turn.
//! After each one, every request answered 2xx has all its events in the log, the read models hold
//! each once and equal a clean replay (table digests), the archive passes `verify`, holds every
//! event of the log once, and no client waited past its timeout. A table of what happened is
//! printed (docs/reliability.md keeps one).
//!
//! In the suite: one fault (a gateway SIGKILLed). `LOOM_CHAOS=long`: every fault — SIGKILL of a
//! gateway, the projector, the archiver, the broker, the S3 server and Postgres (a private cluster
//! holding the key store and read models), and a stalled (SIGSTOPped) broker; or some of them by
//! key, e.g. `LOOM_CHAOS=broker,postgres` (gateway, projector, archiver, broker, stall, s3,
//! postgres). Everything is this test's own (broker, S3 server, databases) and listens on
//! 127.0.0.1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loom_mock::{MockConfig, MockServer};
use loom_projector::{ReadStore, StoreLocation};
use loom_schemas::codec::Registry;
use loom_schemas::log::{Entry, KafkaLog, KafkaLogConfig, Log, Topic};
use loom_schemas::testing::{TestBroker, TestDatabase, free_port};
use serde_json::{Value, json};

use common::load::{Load, LogTail, Tally, assert_in_log, assert_in_read_models, kafka_entries};
use common::{LOOM, Server, text};

const ADMIN: &str = "chaos-admin";
const MASTER: &str = "7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c7c";
const PREFIX: &str = "chaos.";
const BUCKET: &str = "chaos";
const S3_KEY: &str = "chaos-key";
const S3_SECRET: &str = "chaos-secret";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    KillGateway,
    KillProjector,
    KillArchiver,
    KillBroker,
    StallBroker,
    KillS3,
    KillPostgres,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::KillGateway,
        Fault::KillProjector,
        Fault::KillArchiver,
        Fault::KillBroker,
        Fault::StallBroker,
        Fault::KillS3,
        Fault::KillPostgres,
    ];

    /// Its name in `LOOM_CHAOS`.
    fn key(self) -> &'static str {
        match self {
            Fault::KillGateway => "gateway",
            Fault::KillProjector => "projector",
            Fault::KillArchiver => "archiver",
            Fault::KillBroker => "broker",
            Fault::StallBroker => "stall",
            Fault::KillS3 => "s3",
            Fault::KillPostgres => "postgres",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::KillGateway => "SIGKILL a gateway",
            Fault::KillProjector => "SIGKILL the projector",
            Fault::KillArchiver => "SIGKILL the archiver",
            Fault::KillBroker => "SIGKILL the broker",
            Fault::StallBroker => "SIGSTOP the broker (stall)",
            Fault::KillS3 => "SIGKILL the S3 server",
            Fault::KillPostgres => "SIGKILL Postgres (read models, key store)",
        }
    }
}

/// What one fault came to: a row of the printed table.
struct Row {
    fault: Fault,
    sent: u64,
    ok: u64,
    errors: u64,
    /// Connections refused or cut (a killed gateway's clients).
    refused: u64,
    expected: usize,
    found: usize,
    read_models_equal: bool,
    archive_equal: bool,
    /// Until every answered request was in the log, in the read models, and until the archive
    /// held every event of the log.
    recovery: [Duration; 3],
}

/// A process of the cluster, started again with the same command after a fault.
struct Process {
    command: Vec<String>,
    child: Option<Child>,
}

impl Process {
    fn start(args: &[&str], log: &Path) -> Process {
        let mut process = Process {
            command: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        process.restart(log);
        process
    }

    fn restart(&mut self, log: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("LOOM_MASTER_KEY", MASTER)
            .env("LOOM_ADMIN_TOKEN", ADMIN)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let pid = child.id().to_string();
            Command::new("kill").args([signal, &pid]).status().unwrap();
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for it to exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    mock: MockServer,
    config: PathBuf,
    broker_port: u16,
    broker_db: Option<TestDatabase>,
    broker: Option<TestBroker>,
    /// The key store's and the read models' database: on the shared Postgres, or (long form)
    /// on a private cluster the Postgres fault kills.
    db_url: String,
    db: Option<TestDatabase>,
    postgres: Option<PrivatePostgres>,
    s3: Process,
    gateways: Vec<Server>,
    projector: Process,
    archiver: Process,
    query: Option<Server>,
    keys: Vec<String>,
    /// The data topic as the checks have read it so far (read on, not again, each round).
    tail: Option<LogTail>,
}

impl Cluster {
    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.broker_port)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn s3_port(&self) -> String {
        self.s3.command[4].clone()
    }

    /// The flags every role shares: the log, the key store, the archive.
    fn shared(&self) -> Vec<String> {
        let s3 = format!("http://127.0.0.1:{}", self.s3_port());
        [
            "--kafka-brokers",
            &self.brokers(),
            "--kafka-topic-prefix",
            PREFIX,
            "--kafka-data-partitions",
            "2",
            "--key-store-url",
            &self.db_url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(
            [
                "--archive",
                &format!("s3://{BUCKET}/archive"),
                "--s3-endpoint",
                &s3,
                "--s3-access-key-id",
                S3_KEY,
                "--s3-secret-access-key",
                S3_SECRET,
                "--s3-region",
                "us-east-1",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        )
        .collect()
    }

    async fn start(private_postgres: bool) -> Cluster {
        let mock = MockServer::start(MockConfig {
            latency: Duration::from_millis(2),
            chunk_delay: Duration::from_millis(1),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("loom.toml");
        std::fs::write(
            &config,
            format!(
                "[routing]\nbackoff = \"5ms\"\n[upstreams.mock]\nprovider = \"openai_compatible\"\n\
                 base_url = \"{}/v1\"\n[models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n",
                mock.url()
            ),
        )
        .unwrap();
        let broker_db = TestDatabase::create().await;
        let broker_port = free_port();
        let broker = TestBroker::start(broker_port, &broker_db.broker_storage());
        let (db, postgres) = match private_postgres {
            true => (
                None,
                Some(PrivatePostgres::start(&dir.path().join("postgres")).await),
            ),
            false => (Some(TestDatabase::create().await), None),
        };
        let db_url = match (&db, &postgres) {
            (Some(db), _) => db.url.clone(),
            (None, Some(postgres)) => postgres.url.clone(),
            (None, None) => unreachable!(),
        };
        let s3_binary = std::env::var("LOOM_TEST_S3S_FS")
            .expect("LOOM_TEST_S3S_FS is not set: run the tests with ./infra/test.sh");
        let s3_dir = dir.path().join("s3");
        std::fs::create_dir_all(s3_dir.join(BUCKET)).unwrap();
        let s3_port = free_port().to_string();
        let s3 = Process::start(
            &[
                &s3_binary,
                "--host",
                "127.0.0.1",
                "--port",
                &s3_port,
                "--access-key",
                S3_KEY,
                "--secret-key",
                S3_SECRET,
                s3_dir.to_str().unwrap(),
            ],
            &dir.path().join("s3.log"),
        );
        wait_for_port(s3_port.parse().unwrap());
        let mut cluster = Cluster {
            dir,
            mock,
            config,
            broker_port,
            broker_db: Some(broker_db),
            broker: Some(broker),
            db_url,
            db,
            postgres,
            s3,
            gateways: Vec::new(),
            projector: Process {
                command: Vec::new(),
                child: None,
            },
            archiver: Process {
                command: Vec::new(),
                child: None,
            },
            query: None,
            keys: Vec::new(),
            tail: None,
        };
        cluster.gateways = vec![cluster.start_gateway(0), cluster.start_gateway(1)];
        let shared = cluster.shared();
        let mut projector: Vec<&str> = vec![LOOM, "projector", "--read-models", &cluster.db_url];
        projector.extend(shared[..6].iter().map(String::as_str));
        cluster.projector = Process::start(&projector, &cluster.log("projector"));
        let mut archiver: Vec<&str> = vec![
            LOOM,
            "archiver",
            "--data-dir",
            cluster.dir.path().to_str().unwrap(),
            "--archive-roll-after",
            "1s",
        ];
        archiver.extend(shared.iter().map(String::as_str));
        cluster.archiver = Process::start(&archiver, &cluster.log("archiver"));
        let mut query: Vec<&str> = vec!["--read-models", &cluster.db_url];
        query.extend(shared.iter().map(String::as_str));
        cluster.query = Some(
            Server::start_as(
                "query",
                &cluster.dir.path().join("query"),
                &query,
                &[("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)],
            )
            .unwrap(),
        );
        for tenant in ["north", "south"] {
            let (_, key) = common::tenant_and_key(&cluster.gateways[0], ADMIN, tenant).await;
            cluster.keys.push(key);
        }
        cluster.tail = Some(LogTail::open(&cluster.brokers(), PREFIX).await);
        cluster
    }

    fn start_gateway(&self, index: usize) -> Server {
        let shared = self.shared();
        let mut args: Vec<&str> = vec!["--config", self.config.to_str().unwrap()];
        args.extend(shared[..8].iter().map(String::as_str));
        args.extend(["--read-models", &self.db_url]);
        Server::start_as(
            "gateway",
            &self.dir.path().join(format!("gateway-{index}")),
            &args,
            &[("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)],
        )
        .unwrap()
    }
}

/// A Postgres cluster of this test's own (the long form kills it): initdb'd into `dir`, run as
/// the `postgres` user when the test runs as root (initdb refuses root).
struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    url: String,
}

impl PrivatePostgres {
    async fn start(dir: &Path) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres' binaries in /usr/lib/postgresql (apt install postgresql)")
            .map(|e| e.unwrap().path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        // The `postgres` user must reach it through the test's temporary directory.
        use std::os::unix::fs::PermissionsExt;
        let parent = dir.parent().unwrap();
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let postgres = PrivatePostgres {
            bin,
            dir: dir.to_owned(),
            port: free_port(),
            url: String::new(),
        };
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir)
            .status()
            .unwrap();
        let initdb = postgres
            .as_postgres(&postgres.bin.join("initdb"))
            .arg("-D")
            .arg(dir)
            .args(["-U", "postgres", "--auth=trust"])
            .output()
            .unwrap();
        assert!(initdb.status.success(), "{}", text(&initdb.stderr));
        postgres.restart();
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", postgres.port);
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query("CREATE DATABASE chaos")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        PrivatePostgres {
            url: format!("postgres://postgres@127.0.0.1:{}/chaos", postgres.port),
            ..postgres
        }
    }

    /// `program` run as `postgres` when this process is root.
    fn as_postgres(&self, program: &Path) -> Command {
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        if root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// Starts the server (after a crash: it recovers from its WAL first).
    fn restart(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let started = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-o", &options, "start"])
            .output()
            .unwrap();
        assert!(started.status.success(), "{}", text(&started.stderr));
    }

    /// SIGKILL of the postmaster (its backends exit with it), and wait until it is gone.
    fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap_or_default();
        let Some(pid) = pid.lines().next() else {
            return;
        };
        Command::new("kill").args(["-KILL", pid]).status().unwrap();
        let started = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Postgres did not die"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Its backends notice the postmaster's death and exit; a restart waits for them.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_for_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            ":{port} did not open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The load: for each tenant, two clients on each gateway.
fn loads(cluster: &Cluster, round: usize) -> Vec<Load> {
    let mut loads = Vec::new();
    for (t, key) in cluster.keys.iter().enumerate() {
        for (g, gateway) in cluster.gateways.iter().enumerate() {
            loads.push(Load {
                base: gateway.base.clone(),
                key: key.clone(),
                mock: cluster.mock.url(),
                clients: 2,
                tag: format!("r{round}-t{t}-g{g}"),
            });
        }
    }
    loads
}

/// The distinct event ids of every topic of the log.
async fn log_event_ids(cluster: &mut Cluster) -> HashSet<String> {
    let mut kafka = KafkaLogConfig::new(cluster.brokers());
    kafka.topic_prefix = PREFIX.into();
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await.unwrap();
    let registry = Registry::builtin().unwrap();
    let id = |entry: &Entry| {
        let event = registry.decode(&entry.record.value).unwrap();
        event.envelope.event_id.to_string()
    };
    // The data topic read on from the last round; the others (small) whole.
    let mut ids: HashSet<String> = cluster
        .tail
        .as_mut()
        .unwrap()
        .read_on()
        .await
        .iter()
        .map(id)
        .collect();
    for topic in Topic::ALL.into_iter().filter(|t| *t != Topic::Data) {
        ids.extend(kafka_entries(&log, topic).await.iter().map(id));
    }
    ids
}

/// `(rows, distinct event ids)` of the archive, asked of `loom query` with the admin token.
async fn archived(cluster: &Cluster) -> Option<(i64, i64)> {
    let query = cluster.query.as_ref()?;
    let sql = "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events";
    let response = reqwest::Client::new()
        .post(query.url("/v1/sql"))
        .bearer_auth(ADMIN)
        .json(&json!({"query": sql}))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    let row = &body["rows"][0];
    Some((row["n"].as_i64()?, row["d"].as_i64()?))
}

/// Waits until the archive holds every event of the log once; false if it does not within a
/// minute. Then `loom verify --archive` must pass.
async fn archive_equals_the_log(cluster: &mut Cluster) -> bool {
    let expected = log_event_ids(cluster).await.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    let equal = loop {
        last = archived(cluster).await;
        if last == Some((expected, expected)) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        equal,
        "the archive holds {last:?} (rows, distinct) of the log's {expected} events"
    );
    let shared = cluster.shared();
    let s3 = shared.iter().position(|a| a == "--archive").unwrap();
    let verified = Command::new(LOOM)
        .arg("verify")
        .args(&shared[s3..])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        text(&verified.stdout),
        text(&verified.stderr)
    );
    equal
}

/// Waits until the active read models have folded the log to its end (the load has stopped).
async fn wait_for_projection(cluster: &Cluster) {
    let mut kafka = KafkaLogConfig::new(cluster.brokers());
    kafka.topic_prefix = PREFIX.into();
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await.unwrap();
    let catalog = loom_projector::Catalog::open(&StoreLocation::parse(&cluster.db_url))
        .await
        .unwrap();
    let version = catalog.active().await.unwrap();
    let store = ReadStore::open(&StoreLocation::parse(&cluster.db_url), version)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    'waiting: loop {
        assert!(Instant::now() < deadline, "the projector did not catch up");
        for topic in [Topic::Data, Topic::Control] {
            let stored = loom_projector::run::stored_positions(&store, topic)
                .await
                .unwrap();
            for partition in 0..log.partitions(topic) {
                let end = log.end_offset(topic, partition).await.unwrap();
                let at = stored
                    .iter()
                    .find(|p| p.partition == partition)
                    .map_or(0, |p| p.offset);
                if at < end {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'waiting;
                }
            }
        }
        break;
    }
    store.close().await;
}

/// Stops the projector once it has caught up, replays the log into a new version of the read
/// models, compares the two table by table, and starts the projector again (on the new
/// version).
async fn read_models_equal_a_replay(cluster: &mut Cluster) -> bool {
    wait_for_projection(cluster).await;
    cluster.projector.stop();
    let shared = cluster.shared();
    let replayed = Command::new(LOOM)
        .args(["replay", "--read-models", &cluster.db_url, "--data-dir"])
        .arg(cluster.dir.path().join("replay"))
        .args(&shared[..6])
        .env("LOOM_MASTER_KEY", MASTER)
        .output()
        .unwrap();
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    let (new, old) = common::replayed_versions(&text(&replayed.stdout));
    let location = StoreLocation::parse(&cluster.db_url);
    let (old, new) = (
        ReadStore::open(&location, old).await.unwrap(),
        ReadStore::open(&location, new).await.unwrap(),
    );
    let (before, after) = (old.digests().await.unwrap(), new.digests().await.unwrap());
    old.close().await;
    new.close().await;
    let log = cluster.log("projector");
    cluster.projector.restart(&log);
    let differ: Vec<&&str> = before
        .keys()
        .filter(|table| before.get(*table) != after.get(*table))
        .collect();
    assert!(
        differ.is_empty(),
        "tables that differ from a clean replay: {differ:?}"
    );
    true
}

async fn inject(cluster: &mut Cluster, fault: Fault) -> Instant {
    match fault {
        Fault::KillGateway => {
            drop(cluster.gateways.remove(0)); // SIGKILL
            tokio::time::sleep(Duration::from_secs(2)).await;
            let restarted = Instant::now();
            let gateway = cluster.start_gateway(0);
            cluster.gateways.insert(0, gateway);
            restarted
        }
        Fault::KillProjector | Fault::KillArchiver => {
            let (process, name) = match fault {
                Fault::KillProjector => (&mut cluster.projector, "projector"),
                _ => (&mut cluster.archiver, "archiver"),
            };
            process.kill();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let log = cluster.dir.path().join(format!("{name}.log"));
            process.restart(&log);
            Instant::now()
        }
        Fault::KillBroker => {
            cluster.broker.take().unwrap().kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.broker = Some(TestBroker::start(
                cluster.broker_port,
                &cluster.broker_db.as_ref().unwrap().broker_storage(),
            ));
            Instant::now()
        }
        Fault::StallBroker => {
            let pid = cluster.broker.as_ref().unwrap().pid().to_string();
            Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            Command::new("kill").args(["-CONT", &pid]).status().unwrap();
            Instant::now()
        }
        Fault::KillPostgres => {
            let postgres = cluster.postgres.as_ref().unwrap();
            postgres.kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            postgres.restart();
            Instant::now()
        }
        Fault::KillS3 => {
            cluster.s3.kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            let log = cluster.log("s3");
            cluster.s3.restart(&log);
            wait_for_port(cluster.s3_port().parse().unwrap());
            Instant::now()
        }
    }
}

/// Runs the load, injects `fault` in the middle of it, and checks everything.
async fn suffer(cluster: &mut Cluster, fault: Fault, round: usize) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let running: Vec<_> = loads(cluster, round)
        .into_iter()
        .map(|load| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move { load.run(stop, false).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = inject(cluster, fault).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for load in running {
        let one = load.await.unwrap();
        tally.answered.extend(one.answered);
        for (status, n) in one.statuses {
            *tally.statuses.entry(status).or_default() += n;
        }
        tally.transport_errors += one.transport_errors;
        tally.timeouts += one.timeouts;
    }
    assert!(tally.answered.len() > 20, "{fault:?}: {tally:?}");
    assert_eq!(
        tally.timeouts, 0,
        "{fault:?}: a client waited past its timeout: {tally:?}"
    );

    assert_in_log(cluster.tail.as_mut().unwrap(), &tally.answered).await;
    let in_log = restarted.elapsed();
    assert_in_read_models(&cluster.db_url, "loom_read.", &tally.answered).await;
    let in_read_models = restarted.elapsed();
    let archive_equal = archive_equals_the_log(cluster).await;
    let recovery = [in_log, in_read_models, restarted.elapsed()];
    let read_models_equal = read_models_equal_a_replay(cluster).await;
    let sent = tally.statuses.values().sum::<u64>() + tally.transport_errors;
    Row {
        fault,
        sent,
        ok: tally
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum(),
        errors: tally
            .statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum(),
        refused: tally.transport_errors,
        expected: tally.answered.len(),
        found: tally.answered.len(),
        read_models_equal,
        archive_equal,
        recovery,
    }
}

fn table(rows: &[Row]) -> String {
    let mut table = String::from(
        "| Fault | Requests | 2xx | 5xx | Refused or cut | Events of 2xx requests expected / found | Read models = replay | Archive = log, verified | Recovery: log / read models / archive |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let yes = |b: bool| if b { "yes" } else { "no" };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {:.1} / {:.1} / {:.1} s |\n",
            row.fault.name(),
            row.sent,
            row.ok,
            row.errors,
            row.refused,
            row.expected,
            row.found,
            yes(row.read_models_equal),
            yes(row.archive_equal),
            row.recovery[0].as_secs_f64(),
            row.recovery[1].as_secs_f64(),
            row.recovery[2].as_secs_f64(),
        ));
    }
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_survives_faults_of_every_role() {
    let faults = match std::env::var("LOOM_CHAOS").as_deref() {
        Ok("long") => Fault::ALL.to_vec(),
        // Some faults by their keys, e.g. `LOOM_CHAOS=broker,postgres`.
        Ok(keys) if !keys.is_empty() => (keys.split(','))
            .map(|key| {
                let found = Fault::ALL.into_iter().find(|f| f.key() == key.trim());
                found.unwrap_or_else(|| panic!("LOOM_CHAOS: no fault {key:?}"))
            })
            .collect(),
        _ => vec![Fault::KillGateway],
    };
    let private_postgres = faults.contains(&Fault::KillPostgres);
    let mut cluster = Cluster::start(private_postgres).await;
    let mut rows = Vec::new();
    for (round, fault) in faults.into_iter().enumerate() {
        rows.push(suffer(&mut cluster, fault, round).await);
        eprintln!("{}", table(&rows));
    }
    eprintln!("fault-tolerance suite:\n{}", table(&rows));
    for gateway in cluster.gateways.drain(..) {
        assert!(gateway.stop().success());
    }
    cluster.projector.stop();
    cluster.archiver.stop();
    if let Some(query) = cluster.query.take() {
        assert!(query.stop().success());
    }
    cluster.broker.take().unwrap().kill();
    if let Some(db) = cluster.broker_db.take() {
        db.drop().await;
    }
    if let Some(db) = cluster.db.take() {
        db.drop().await;
    }
    if let Some(postgres) = cluster.postgres.take() {
        postgres.kill();
    }
}

impl Drop for Cluster {
    /// A failed run shows the end of each role's log (the directory goes with the cluster).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for name in ["projector", "archiver", "s3"] {
            let log = std::fs::read_to_string(self.log(name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!("--- the end of {name}.log:\n{}", tail.join("\n"));
        }
    }
}
