//! Helpers for tests that use the real dependencies `./infra/test.sh` starts.

use crate::scratch::ScratchDatabase;

/// The admin URL of the test Postgres: `LOOM_TEST_DATABASE_URL`, or the machine's default.
pub fn postgres_admin_url() -> String {
    std::env::var("LOOM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database on the test Postgres; [`TestDatabase::drop`] removes it. Its `name`
/// and `url` are the [`ScratchDatabase`]'s.
pub struct TestDatabase(ScratchDatabase);

impl std::ops::Deref for TestDatabase {
    type Target = ScratchDatabase;

    fn deref(&self) -> &ScratchDatabase {
        &self.0
    }
}

impl TestDatabase {
    /// Creates the database. Panics with a hint when the test Postgres is not reachable.
    #[allow(clippy::panic)]
    pub async fn create() -> TestDatabase {
        let admin_url = postgres_admin_url();
        match ScratchDatabase::create(&admin_url, "loom_test").await {
            Ok(database) => TestDatabase(database),
            Err(e) => panic!(
                "test Postgres at {admin_url} is not usable (start it with ./infra/test.sh): {e}"
            ),
        }
    }

    #[allow(clippy::expect_used)]
    pub async fn drop(self) {
        self.0.drop().await.expect("dropping a test database");
    }
}

/// The broker binary the tests start brokers of their own from (`LOOM_TEST_NISSHI`).
pub fn nisshi() -> String {
    std::env::var("LOOM_TEST_NISSHI").unwrap_or_else(|_| {
        format!(
            "{}/.cache/loom/tools/bin/nisshi",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// A port nothing listens on right now.
pub fn try_free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// [`try_free_port`], for tests.
#[allow(clippy::expect_used)]
pub fn free_port() -> u16 {
    try_free_port().expect("binding a free port")
}

/// A Kafka-protocol broker of a test's own (nisshi), killed when dropped. With Postgres storage
/// it keeps its topics across a restart on the same port.
pub struct TestBroker(std::process::Child);

impl TestBroker {
    #[allow(clippy::panic)]
    pub fn start(port: u16, storage: &str) -> TestBroker {
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(nisshi())
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args([
                "--storage-engine",
                storage,
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (./infra/test.sh builds it): {e}", nisshi()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the test broker did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        TestBroker(child)
    }

    /// Stops the broker at once (SIGKILL).
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// The broker's process id (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl TestDatabase {
    /// The database as a nisshi storage URL.
    pub fn broker_storage(&self) -> String {
        format!("{}?sslmode=disable", self.url)
    }
}

/// The chain key of throw-away test logs.
pub fn chain_key() -> crate::log::ChainKey {
    crate::log::ChainKey::new([0x7e; 32])
}
