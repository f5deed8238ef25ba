//! `loom bench ui`: the dashboard's pages and widgets over a million traces, as a signed-in
//! browser asks for them, next to the JSON API answering the same questions (the baseline: what
//! the HTML adds); the time each takes on loopback (an upper bound of the server's time), the
//! server's CPU per request, and the page weight a browser loads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use loom_projector::{ReadStore, StoreLocation};
use reqwest::header::{COOKIE, SET_COOKIE};
use uuid::Uuid;

use crate::bench::{percentile, say};
use crate::bench_gateway::{Process, cpu_seconds, spawn_listening};

#[derive(Args)]
pub struct UiBenchArgs {
    /// Traces written into the read models (over the last 30 days, one organization).
    #[arg(long, default_value_t = 1_000_000)]
    traces: usize,
    /// Times each page or widget is asked for.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Where the data directory goes (a temporary directory inside it is removed).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

const ADMIN: &str = "bench-admin";

/// How a case's request is made (again for every run).
type Request = Box<dyn Fn() -> reqwest::RequestBuilder>;
const PASSWORD: &str = "a bench's password";

/// `loom serve` on `data`, with open registration and no archive.
fn serve(data: &std::path::Path) -> anyhow::Result<(Process, String)> {
    let mut loom = std::process::Command::new(std::env::current_exe()?);
    loom.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log",
        loom::serve::QUIET_LOG,
        "--registration",
        "open",
        "--archive",
        "off",
    ])
    .arg("--data-dir")
    .arg(data)
    .env("LOOM_ADMIN_TOKEN", ADMIN)
    .env_remove("LOOM_MASTER_KEY");
    spawn_listening(loom)
}

/// The value of cookie `name` set by `response`.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let text = v.to_str().ok()?;
        let pair = text.split(';').next()?;
        let (n, value) = pair.split_once('=')?;
        (n == name).then(|| value.to_owned())
    })
}

/// Registers an organization through the dashboard's forms: its tenant id and the session cookie.
async fn register(client: &reqwest::Client, base: &str) -> anyhow::Result<(Uuid, String)> {
    let form = client.get(format!("{base}/register")).send().await?;
    let cookie = set_cookie(&form, "loom_form").context("no form cookie")?;
    let page = form.text().await?;
    let token = page
        .split(r#"name="token" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no form token")?
        .to_owned();
    let registered = client
        .post(format!("{base}/register"))
        .header(COOKIE, format!("loom_form={cookie}"))
        .form(&[
            ("token", token.as_str()),
            ("organization", "Bench"),
            ("email", "bench@loom.test"),
            ("password", PASSWORD),
        ])
        .send()
        .await?;
    let session = set_cookie(&registered, "loom_session").context("registration failed")?;
    let tenants: serde_json::Value = client
        .get(format!("{base}/admin/tenants"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let tenant = tenants
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == "Bench"))
        .and_then(|t| t["tenant_id"].as_str())
        .context("no tenant")?
        .parse()?;
    Ok((tenant, session))
}

/// One measured thing: its name, the request, and its times and sizes.
struct Measured {
    name: &'static str,
    times: Vec<f64>,
    bytes: usize,
    cpu_ms: f64,
}

async fn measure(
    name: &'static str,
    request: impl Fn() -> reqwest::RequestBuilder,
    runs: usize,
    pid: u32,
) -> anyhow::Result<Measured> {
    // One to warm up (SQLite's pages, the footers, the template code).
    let warm = request().send().await?;
    anyhow::ensure!(warm.status().is_success(), "{name}: {}", warm.status());
    let bytes = warm.bytes().await?.len();
    let cpu_before = cpu_seconds(pid)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let response = request().send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{name}: {}",
            response.status()
        );
        response.bytes().await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = (cpu_seconds(pid)? - cpu_before) * 1e3 / runs as f64;
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        name,
        times,
        bytes,
        cpu_ms,
    })
}

fn row(measured: &Measured) {
    say!(
        "{:<44} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9}",
        measured.name,
        percentile(&measured.times, 0.50),
        percentile(&measured.times, 0.95),
        measured.times.last().copied().unwrap_or(0.0),
        measured.cpu_ms,
        measured.bytes
    );
}

pub async fn run(args: UiBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let data = dir.path().join("data");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    // Register through the forms, then stop the server to write the traces into its read models.
    let (process, addr) = serve(&data)?;
    let base = format!("http://{addr}");
    let (tenant, session) = register(&client, &base).await?;
    let key: serde_json::Value = client
        .post(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"tenant_id": tenant, "role": "developer"}))
        .send()
        .await?
        .json()
        .await?;
    let key = key["key"].as_str().context("no key")?.to_owned();
    drop(process);

    let started = Instant::now();
    let store = ReadStore::open(&StoreLocation::Sqlite(data.join("read-models")), 1).await?;
    let end_us = loom_schemas::event::now_micros();
    crate::bench_query::fill_read_models(&store, args.traces, &[tenant], end_us).await?;
    store.close().await;
    say!(
        "loom bench ui: {} traces (30 days, one organization) written into the read models in {:.0}s; \
         each page and widget asked for {} times by a signed-in client on loopback (after one to warm up), \
         next to the JSON API asked the same with an API key",
        args.traces,
        started.elapsed().as_secs_f64(),
        args.runs
    );

    let (process, addr) = serve(&data)?;
    let pid = process.0.id();
    let base = format!("http://{addr}");
    let cookie = format!("loom_session={session}; loom_tz=UTC");
    let page = |path: &'static str| {
        let (client, base, cookie) = (client.clone(), base.clone(), cookie.clone());
        move || client.get(format!("{base}{path}")).header(COOKIE, &cookie)
    };
    let api = |path: &'static str| {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        move || client.get(format!("{base}{path}")).bearer_auth(&key)
    };
    let runs = args.runs.max(1);
    let cases: Vec<(&'static str, Request)> = vec![
        ("home page (the frame)", Box::new(page("/"))),
        (
            "home: KPIs, 24h",
            Box::new(page("/ui/home/kpis?window=24h")),
        ),
        (
            "home: KPIs, 30d",
            Box::new(page("/ui/home/kpis?window=30d")),
        ),
        (
            "  API: /v1/analytics/summary, 30d",
            Box::new(api("/v1/analytics/summary?window=30d")),
        ),
        ("home: alerts", Box::new(page("/ui/home/alerts"))),
        (
            "home: recent activity, 24h",
            Box::new(page("/ui/home/activity?window=24h")),
        ),
        (
            "  API: /v1/activity, 24h",
            Box::new(api("/v1/activity?window=24h&limit=10")),
        ),
        ("traces page (the frame)", Box::new(page("/traces"))),
        (
            "traces: first 50 rows, 24h",
            Box::new(page("/ui/traces/rows?window=24h")),
        ),
        (
            "traces: first 50 rows, 30d, failed",
            Box::new(page("/ui/traces/rows?window=30d&status=failed")),
        ),
        (
            "  API: /v1/traces, 30d, failed, 50",
            Box::new(api("/v1/traces?window=30d&status=failed&limit=50")),
        ),
        (
            "trace timeline panel",
            Box::new(page("/ui/traces/t0000000007")),
        ),
        (
            "analytics: latency chart, 7d",
            Box::new(page("/ui/analytics/chart?window=7d&chart=latency")),
        ),
        (
            "analytics: breakdown by model, 30d",
            Box::new(page("/ui/analytics/breakdown?window=30d&by=model")),
        ),
    ];
    say!(
        "{:<44} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "page or widget",
        "p50 ms",
        "p95 ms",
        "max ms",
        "cpu ms/rq",
        "bytes"
    );
    let mut measured = Vec::new();
    for (name, request) in &cases {
        let m = measure(name, request, runs, pid).await?;
        row(&m);
        measured.push(m);
    }
    let p95 = |name: &str| {
        measured
            .iter()
            .find(|m| m.name == name)
            .map_or(0.0, |m| percentile(&m.times, 0.95))
    };
    // A page is its frame, then its widgets at once: it is whole when the slowest is in.
    let home = p95("home page (the frame)")
        + [
            "home: KPIs, 24h",
            "home: alerts",
            "home: recent activity, 24h",
        ]
        .iter()
        .map(|n| p95(n))
        .fold(0.0, f64::max);
    let traces = p95("traces page (the frame)") + p95("traces: first 50 rows, 24h");
    say!(
        "home, whole (frame + slowest widget, p95): {home:.1} ms; traces, whole: {traces:.1} ms (target: < 200 ms)"
    );
    let weight = |name: &str| {
        measured
            .iter()
            .find(|m| m.name == name)
            .map_or(0, |m| m.bytes)
    };
    say!(
        "page weight: home {} B HTML + {} B widgets, traces {} B HTML + {} B rows; the stylesheet and script {} B (loaded once, cached an hour)",
        weight("home page (the frame)"),
        weight("home: KPIs, 24h") + weight("home: alerts") + weight("home: recent activity, 24h"),
        weight("traces page (the frame)"),
        weight("traces: first 50 rows, 24h"),
        loom_dashboard::asset_bytes()
    );
    drop(process);
    Ok(())
}
