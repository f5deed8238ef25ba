//! The dashboard in a real browser: starts `loom serve` (in process, with read models, open
//! registration) against the mock upstream, then runs `tests/browser/*.test.mjs` with node's own
//! test runner, which drives Chromium through playwright-core (./infra/test.sh installs both:
//! LOOM_TEST_NODE_PATH, LOOM_TEST_CHROMIUM). Screenshots of every page go to
//! `$CARGO_TARGET_DIR/browser-artifacts` (or `target/browser-artifacts`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::gateway::{ADMIN, start_full};
use loom_dashboard::{DashboardConfig, RegistrationMode};
use loom_mock::MockConfig;

fn artifacts() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    PathBuf::from(target).join("browser-artifacts")
}

/// Runs `tests/browser/{script}` with node's test runner against `harness`; its output is
/// printed, and the test fails with it if a browser test failed.
#[allow(clippy::print_stdout)] // the browser tests' report, shown with --no-capture
async fn run_node(harness: &common::gateway::Harness, script: &str) {
    let artifacts = artifacts();
    std::fs::create_dir_all(&artifacts).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    let mut node = tokio::process::Command::new("node");
    node.arg("--test")
        .arg("--test-reporter=spec")
        .arg(&script)
        .env("LOOM_URL", &harness.base)
        .env("LOOM_ADMIN_TOKEN", ADMIN)
        .env("LOOM_ARTIFACTS", &artifacts)
        .kill_on_drop(true);
    if let Ok(path) = std::env::var("LOOM_TEST_NODE_PATH") {
        node.env("NODE_PATH", path);
    }
    if let Ok(chromium) = std::env::var("LOOM_TEST_CHROMIUM") {
        node.env("LOOM_CHROMIUM", chromium);
    }
    let run = tokio::time::timeout(Duration::from_secs(240), node.output())
        .await
        .expect("the browser tests finish within 4 minutes")
        .expect("node runs (./infra/test.sh installs it and playwright-core)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        run.status.success(),
        "the browser tests failed:\n{stdout}\n{stderr}"
    );
}

async fn dashboard(ttl: Duration) -> common::gateway::Harness {
    let config = DashboardConfig {
        registration: RegistrationMode::Open,
        session_ttl: ttl,
    };
    start_full(MockConfig::default(), "", true, config, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium() {
    let harness = dashboard(Duration::from_secs(3600)).await;
    run_node(&harness, "dashboard.test.mjs").await;
    let artifacts = artifacts();
    for page in [
        "signin",
        "register",
        "home",
        "traces",
        "trace-timeline",
        "analytics",
        "quotas",
        "policy",
        "admin",
        "sql",
        "home-dark",
    ] {
        assert!(
            artifacts.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_in_chromium() {
    let harness = dashboard(Duration::from_secs(2)).await;
    run_node(&harness, "expiry.test.mjs").await;
    harness.stop().await;
}
