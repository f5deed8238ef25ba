//! `loom bench gateway`: latency and throughput of the gateway against the same mock upstream
//! called directly, with a real load generator (oha), every event recorded and bodies sealed.
//!
//! Three processes share the machine: the mock (`loom-mock`), the gateway (`loom serve`, this
//! binary) and oha. Each case runs twice, direct to the mock and through Loom, at the same rate.

use crate::bench::say;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use loom_gateway::config::EventsAck;
use serde_json::{Value, json};

/// Arguments of `loom bench gateway`.
#[derive(clap::Args)]
pub struct GatewayBenchArgs {
    /// Fixed request rates to measure, per second; the maximum rate is measured after them.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    rates: Vec<u32>,
    /// Seconds per case.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections oha keeps open.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Passed to `loom serve --read-models`: `off` measures the gateway without its in-process
    /// projector [default: serve's, SQLite in the data directory].
    #[arg(long)]
    read_models: Option<String>,
    /// Runs of each case, interleaved (direct, then each mode, then again); the figures printed
    /// are the medians, which a noisy shared machine needs.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// The `--events-ack` modes to measure side by side, each in a server of its own.
    #[arg(long, value_delimiter = ',', default_value = "recorded,fsynced,none")]
    events_ack: Vec<EventsAck>,
    /// The oha binary (`cargo install oha`; ./infra/bench.sh installs it).
    #[arg(long, env = "LOOM_OHA", default_value = "oha")]
    oha: PathBuf,
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a program that logs `listening on ADDR` on stderr, and returns it with ADDR.
fn spawn_listening(mut command: Command) -> anyhow::Result<(Process, String)> {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let process = Process(child);
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(addr) = line.split("listening on ").nth(1) {
            let addr = addr.trim().to_owned();
            // Keep draining stderr so that the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((process, addr));
        }
    }
    bail!("the process exited before listening")
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("bad /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // /proc reports in USER_HZ, which is 100 on Linux.
    Ok(ticks as f64 / 100.0)
}

/// Resident memory of a process, current and peak, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    Ok((
        field("VmRSS:").unwrap_or(0.0),
        field("VmHWM:").unwrap_or(0.0),
    ))
}

/// One oha run's figures.
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    success: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    ttfb_p50: f64,
    ttfb_p99: f64,
    requests: f64,
}

impl Run {
    /// Each figure's median over `runs` (requests: their sum).
    fn median(runs: &[Run]) -> Run {
        let median = |field: fn(&Run) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(field).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
        };
        Run {
            rps: median(|r| r.rps),
            success: median(|r| r.success),
            p50: median(|r| r.p50),
            p90: median(|r| r.p90),
            p99: median(|r| r.p99),
            ttfb_p50: median(|r| r.ttfb_p50),
            ttfb_p99: median(|r| r.ttfb_p99),
            requests: runs.iter().map(|r| r.requests).sum(),
        }
    }
}

fn oha(
    args: &GatewayBenchArgs,
    url: &str,
    key: Option<&str>,
    rate: Option<u32>,
    body: &Value,
) -> anyhow::Result<Run> {
    let mut command = Command::new(&args.oha);
    command
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-m",
            "POST",
            "-T",
            "application/json",
        ])
        .arg("-z")
        .arg(format!("{}s", args.seconds))
        .arg("-c")
        .arg(args.connections.to_string())
        .arg("-d")
        .arg(body.to_string());
    if let Some(rate) = rate {
        command
            .arg("-q")
            .arg(rate.to_string())
            .arg("--latency-correction");
    }
    if let Some(key) = key {
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"));
    }
    let output = command
        .arg(url)
        .output()
        .with_context(|| format!("running {}", args.oha.display()))?;
    if !output.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let report: Value = serde_json::from_slice(&output.stdout).context("reading oha's JSON")?;
    let ms = |pointer: &str| {
        report
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    let rps = report
        .pointer("/summary/requestsPerSec")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok(Run {
        rps,
        success: report
            .pointer("/summary/successRate")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        p50: ms("/latencyPercentiles/p50"),
        p90: ms("/latencyPercentiles/p90"),
        p99: ms("/latencyPercentiles/p99"),
        ttfb_p50: ms("/firstBytePercentiles/p50"),
        ttfb_p99: ms("/firstBytePercentiles/p99"),
        requests: rps * args.seconds as f64,
    })
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}: build the workspace (cargo build --release --workspace)",
            name,
            me.display()
        );
    }
    Ok(path)
}

async fn setup_key(client: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<String> {
    let tenant: Value = client
        .post(format!("{base}/admin/tenants"))
        .bearer_auth(token)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key: Value = client
        .post(format!("{base}/admin/keys"))
        .bearer_auth(token)
        .json(&json!({"tenant_id": tenant["tenant_id"]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    key["key"]
        .as_str()
        .map(str::to_owned)
        .context("no key in the answer")
}

fn write_config(dir: &Path, mock: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("loom.toml");
    std::fs::write(
        &path,
        format!(
            "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"http://{mock}/v1\"\n\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"gpt-4o-mini\" }}]\n"
        ),
    )?;
    Ok(path)
}

/// A `loom serve` under test, with a key of its tenant.
struct Gateway {
    process: Process,
    addr: String,
    key: String,
    ack: EventsAck,
}

async fn start_gateway(
    args: &GatewayBenchArgs,
    work: &Path,
    config: &Path,
    ack: EventsAck,
) -> anyhow::Result<Gateway> {
    let token = "bench-admin";
    let mut loom = Command::new(std::env::current_exe()?);
    loom.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log",
        loom::serve::QUIET_LOG,
        "--events-ack",
        ack.name(),
    ])
    .arg("--data-dir")
    .arg(work.join(format!("data-{ack}")))
    .arg("--config")
    .arg(config)
    .env("LOOM_ADMIN_TOKEN", token)
    .env_remove("LOOM_MASTER_KEY");
    if let Some(read_models) = &args.read_models {
        loom.args(["--read-models", read_models]);
    }
    let (process, addr) = spawn_listening(loom)?;
    let client = reqwest::Client::new();
    let key = setup_key(&client, &format!("http://{addr}"), token).await?;
    Ok(Gateway {
        process,
        addr,
        key,
        ack,
    })
}

pub async fn run(args: GatewayBenchArgs) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("loom-bench-gateway")
        .tempdir()?;
    let mut mock = Command::new(sibling("loom-mock")?);
    mock.args(["--listen", "127.0.0.1:0"]);
    let (_mock, mock_addr) = spawn_listening(mock)?;
    let config = write_config(work.path(), &mock_addr)?;
    let mut gateways = Vec::new();
    for ack in &args.events_ack {
        gateways.push(start_gateway(&args, work.path(), &config, *ack).await?);
    }
    let client = reqwest::Client::new();

    let chat = json!({"model": "fast", "messages": [{"role": "user", "content": "Summarise the quarterly report in three bullet points for the leadership team."}]});
    let stream = json!({"model": "fast", "stream": true, "messages": chat["messages"]});
    let direct = format!("http://{mock_addr}/v1/chat/completions");

    say!(
        "loom bench gateway: {}s per case, medians of {} interleaved runs, {} connections, oha {}; mock upstream (no added latency) vs the same mock through Loom",
        args.seconds,
        args.repeat.max(1),
        args.connections,
        args.oha.display()
    );
    say!(
        "Loom records every request's events on its embedded log (fsync 200ms) with sealed bodies; read models: {}; one server per --events-ack mode ({}), idle while the others are measured; 2 cores shared by oha, the mock and Loom.",
        match args.read_models.as_deref() {
            Some("off") => "off (the gateway alone)".to_owned(),
            Some(other) => format!("projected in-process into {other}"),
            None => "projected in-process into SQLite".to_owned(),
        },
        args.events_ack
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    say!(
        "{:<18} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>12}",
        "case",
        "target/s",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "ok",
        "cpu s/1k",
        "rss MiB"
    );
    let mut cases: Vec<Option<u32>> = args.rates.iter().copied().map(Some).collect();
    cases.push(None);
    for rate in cases {
        let label = rate.map_or_else(|| "max".to_owned(), |r| r.to_string());
        let row = |name: &str, run: &Run, cpu: Option<f64>, rss: Option<f64>| {
            say!(
                "{name:<18} {label:>10} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.1}% {:>10} {:>12}",
                run.rps,
                run.p50,
                run.p90,
                run.p99,
                run.success * 100.0,
                cpu.map_or_else(
                    || "-".into(),
                    |c| format!("{:.3}", c / run.requests.max(1.0) * 1000.0)
                ),
                rss.map_or_else(|| "-".into(), |r| format!("{r:.1}")),
            );
        };
        let mut direct_runs = Vec::new();
        let mut runs = vec![Vec::new(); gateways.len()];
        let mut cpu = vec![0.0; gateways.len()];
        for _ in 0..args.repeat.max(1) {
            direct_runs.push(tokio::task::block_in_place(|| {
                oha(&args, &direct, None, rate, &chat)
            })?);
            for (i, gateway) in gateways.iter().enumerate() {
                let pid = gateway.process.0.id();
                let through = format!("http://{}/v1/chat/completions", gateway.addr);
                let cpu_before = cpu_seconds(pid)?;
                runs[i].push(tokio::task::block_in_place(|| {
                    oha(&args, &through, Some(&gateway.key), rate, &chat)
                })?);
                cpu[i] += cpu_seconds(pid)? - cpu_before;
            }
        }
        let base = Run::median(&direct_runs);
        row("direct", &base, None, None);
        for (i, gateway) in gateways.iter().enumerate() {
            let ours = Run::median(&runs[i]);
            let cpu = cpu[i];
            let (rss, _) = memory_mib(gateway.process.0.id())?;
            row(
                &format!("loom ack={}", gateway.ack),
                &ours,
                Some(cpu),
                Some(rss),
            );
            say!(
                "{:<18} {label:>10} {:>9.2}x {:>+9.3} {:>+9.3} {:>+9.3}   (overhead: loom minus direct; throughput ratio)",
                "  difference",
                ours.rps / base.rps.max(1e-9),
                ours.p50 - base.p50,
                ours.p90 - base.p90,
                ours.p99 - base.p99,
            );
        }
    }

    let rate = args.rates.first().copied();
    let base = tokio::task::block_in_place(|| oha(&args, &direct, None, rate, &stream))?;
    for gateway in &gateways {
        let through = format!("http://{}/v1/chat/completions", gateway.addr);
        let ours = tokio::task::block_in_place(|| {
            oha(&args, &through, Some(&gateway.key), rate, &stream)
        })?;
        say!(
            "streaming at {}/s, ack={}: first byte p50 {:.3} ms direct, {:.3} through Loom ({:+.3}), p99 {:.3} vs {:.3} ({:+.3}); whole stream p99 {:.3} vs {:.3} ({:+.3})",
            rate.map_or_else(|| "max".to_owned(), |r| r.to_string()),
            gateway.ack,
            base.ttfb_p50,
            ours.ttfb_p50,
            ours.ttfb_p50 - base.ttfb_p50,
            base.ttfb_p99,
            ours.ttfb_p99,
            ours.ttfb_p99 - base.ttfb_p99,
            base.p99,
            ours.p99,
            ours.p99 - base.p99,
        );
    }
    for gateway in &gateways {
        let (rss, peak) = memory_mib(gateway.process.0.id())?;
        let health: Value = client
            .get(format!("http://{}/health", gateway.addr))
            .send()
            .await?
            .json()
            .await?;
        say!(
            "ack={}: memory {rss:.1} MiB resident, {peak:.1} MiB peak; events on the log: {}",
            gateway.ack,
            health
                .pointer("/log/data/end_offset")
                .unwrap_or(&Value::Null)
        );
    }
    Ok(())
}
