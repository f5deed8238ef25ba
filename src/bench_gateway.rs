//! `loom bench gateway`: latency, throughput and CPU of the gateway against the same mock
//! upstream called directly and through nginx as a plain `proxy_pass` reverse proxy (the floor
//! for one proxy hop), with a real load generator (oha), every event recorded and bodies sealed.
//!
//! The processes share the machine: the mock (`loom-mock`), nginx, one `loom serve` (this binary)
//! per configuration, and oha. Every case runs against each target in turn, at the same
//! concurrency and rate.

use crate::bench::say;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;

use anyhow::{Context, bail};
use loom_gateway::config::EventsAck;
use serde_json::{Value, json};

/// A load case: open connections, and a fixed rate (per second) or as fast as answers come.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    connections: u32,
    rate: Option<u32>,
}

impl FromStr for Case {
    type Err = String;

    fn from_str(text: &str) -> Result<Case, String> {
        let (connections, rate) = text
            .split_once('@')
            .ok_or_else(|| format!("`{text}`: expected CONNECTIONS@RATE, e.g. 8@2000 or 1@max"))?;
        let connections = connections
            .parse()
            .map_err(|_| format!("`{text}`: connections must be a number"))?;
        let rate = match rate {
            "max" => None,
            rate => Some(
                rate.parse()
                    .map_err(|_| format!("`{text}`: the rate must be a number or `max`"))?,
            ),
        };
        Ok(Case { connections, rate })
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate {
            Some(rate) => write!(f, "{}@{rate}", self.connections),
            None => write!(f, "{}@max", self.connections),
        }
    }
}

/// Arguments of `loom bench gateway`.
#[derive(clap::Args)]
pub struct GatewayBenchArgs {
    /// Load cases, each CONNECTIONS@RATE (requests per second, or `max`: closed loop, as fast as
    /// answers come).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8@500,8@2000,8@max,1@max"
    )]
    cases: Vec<Case>,
    /// Seconds per case.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The streaming case (time to first byte, whole stream, memory), CONNECTIONS@RATE.
    #[arg(long, default_value = "8@500")]
    stream: Case,
    /// Seconds of the streaming case (Loom's memory is printed before and after it).
    #[arg(long, default_value_t = 60)]
    stream_seconds: u64,
    /// The client APIs compared at `--api-case`: `chat`, `messages` (Anthropic's, passed through
    /// to an Anthropic upstream), `responses` (OpenAI's, passed through), and `messages-to-chat`,
    /// `responses-to-chat` (translated for a chat-only upstream; their baselines call the
    /// upstream's chat API directly).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chat,messages,responses,messages-to-chat,responses-to-chat"
    )]
    apis: Vec<Api>,
    /// The load of the API comparison, CONNECTIONS@RATE.
    #[arg(long, default_value = "8@2000")]
    api_case: Case,
    /// The `loom serve --read-models` variants to measure, each in a server of its own: `off`
    /// (the gateway alone), `default` (serve's: SQLite in the data directory, folded in-process),
    /// or a location.
    #[arg(long, value_delimiter = ',', default_value = "off,default")]
    read_models: Vec<String>,
    /// Runs of each case, interleaved (direct, nginx, then each server, then again); the figures
    /// printed are the medians, which a noisy shared machine needs.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// The `--events-ack` modes to measure, each in a server of its own.
    #[arg(long, value_delimiter = ',', default_value = "recorded")]
    events_ack: Vec<EventsAck>,
    /// `on` adds a gateway (`--read-models off`) whose requests are counted in quotas: the key
    /// and the requests' user (`x-loom-user`) have per-minute rates and daily budgets that no
    /// run reaches, so every request reserves, settles and records both; `off` is the servers
    /// above, whose requests no limit applies to.
    #[arg(long, value_delimiter = ',', default_value = "off,on")]
    quotas: Vec<Switch>,
    /// The security policy: every server above runs the default one (every built-in rule
    /// scans prompts and answers, and flags); `off` adds a gateway (`--read-models off`) whose
    /// key's project turns it off, to measure what the scan costs.
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    policy: Vec<Switch>,
    /// The oha binary (`cargo install oha`; ./infra/bench.sh installs it).
    #[arg(long, env = "LOOM_OHA", default_value = "oha")]
    oha: PathBuf,
    /// The nginx binary for the `proxy_pass` baseline (./infra/bench.sh installs it); left out,
    /// with a note, when it cannot be run.
    #[arg(long, env = "LOOM_NGINX", default_value = "nginx")]
    nginx: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    Off,
    On,
}

/// A child process stopped on drop: SIGTERM (nginx's master then stops its workers, which a
/// SIGKILL would leave behind), and SIGKILL if it is still there after 5 s.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    fn drop(&mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        if terminated.is_ok_and(|status| status.success()) {
            for _ in 0..100 {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a program that logs `listening on ADDR` on stderr, and returns it with ADDR.
pub(crate) fn spawn_listening(mut command: Command) -> anyhow::Result<(Process, String)> {
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

/// The process and its children (nginx's workers), by pid.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = stat_fields(child)
                .ok()
                .and_then(|fields| fields.get(1).and_then(|p| p.parse::<u32>().ok()));
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// The fields of `/proc/PID/stat` after the command name (the first is the state).
fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    stat_fields_at(Path::new(&format!("/proc/{pid}/stat")))
}

/// The fields of a `stat` file of /proc (a process's or a thread's) after the command name.
fn stat_fields_at(path: &Path) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(path)?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("bad /proc stat")?;
    Ok(after_name.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a process and its children, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut ticks = 0;
    for pid in process_tree(pid) {
        let fields = stat_fields(pid)?;
        ticks += fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
    }
    // /proc reports in USER_HZ, which is 100 on Linux.
    Ok(ticks as f64 / 100.0)
}

/// utime + stime of the read models' threads of a `loom serve` process, in seconds: its fold's
/// thread and SQLite's connection threads (sqlx runs each on a thread of its own).
fn fold_cpu_seconds(pid: u32) -> f64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ticks = 0;
    for thread in threads.flatten() {
        let path = thread.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != loom::serve::FOLD_THREAD && !comm.starts_with("sqlx-sqlite") {
            continue;
        }
        let fields = stat_fields_at(&path.join("stat")).unwrap_or_default();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        ticks += field(11).unwrap_or(0) + field(12).unwrap_or(0);
    }
    ticks as f64 / 100.0
}

/// Resident memory of a process and its children, current and peak, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let (mut rss, mut peak) = (0.0, 0.0);
    for pid in process_tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
        };
        rss += field("VmRSS:").unwrap_or(0.0);
        peak += field("VmHWM:").unwrap_or(0.0);
    }
    Ok((rss, peak))
}

/// One oha run's figures.
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    success: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
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
            p999: median(|r| r.p999),
            ttfb_p50: median(|r| r.ttfb_p50),
            ttfb_p99: median(|r| r.ttfb_p99),
            requests: runs.iter().map(|r| r.requests).sum(),
        }
    }
}

/// A client API, as the API comparison sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    Chat,
    Messages,
    Responses,
    MessagesToChat,
    ResponsesToChat,
}

/// A request: where it goes and its body.
struct Load {
    path: &'static str,
    body: Value,
}

impl Api {
    /// What a client sends Loom, and what the baselines send the upstream directly (the request
    /// Loom sends it).
    fn loads(self) -> (Load, Load) {
        let text = "Summarise the quarterly report in three bullet points for the leadership team.";
        let chat = |model: &str| Load {
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": [{"role": "user", "content": text}]}),
        };
        let messages = |model: &str| Load {
            path: "/v1/messages",
            body: json!({"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}),
        };
        let responses = |model: &str| Load {
            path: "/v1/responses",
            body: json!({"model": model, "input": text}),
        };
        match self {
            Api::Chat => (chat("fast"), chat("gpt-4o-mini")),
            Api::Messages => (messages("claude"), messages("claude-sonnet-4-5")),
            Api::Responses => (responses("gpt"), responses("gpt-4o-mini")),
            Api::MessagesToChat => (messages("fast"), chat("gpt-4o-mini")),
            Api::ResponsesToChat => (responses("fast"), chat("gpt-4o-mini")),
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Chat => "chat",
            Api::Messages => "messages",
            Api::Responses => "responses",
            Api::MessagesToChat => "messages-to-chat",
            Api::ResponsesToChat => "responses-to-chat",
        })
    }
}

/// Runs oha for `seconds` against `target` with `case`'s load, posting `body` to `path`.
fn oha(
    oha: &Path,
    target: &Target,
    case: Case,
    seconds: u64,
    path: &str,
    body: &Value,
) -> anyhow::Result<Run> {
    let mut command = Command::new(oha);
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
        .arg(format!("{seconds}s"))
        .arg("-c")
        .arg(case.connections.to_string())
        .arg("-d")
        .arg(body.to_string());
    if let Some(rate) = case.rate {
        command
            .arg("-q")
            .arg(rate.to_string())
            .arg("--latency-correction");
    }
    if let Some(key) = &target.key {
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"));
    }
    if let Some(user) = target.user {
        command.arg("-H").arg(format!("x-loom-user: {user}"));
    }
    let output = command
        .arg(format!("http://{}{path}", target.addr))
        .output()
        .with_context(|| format!("running {}", oha.display()))?;
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
    // Answered with a 2xx: a refusal (a spent budget's 429) answers fast and must not pass for
    // a served request.
    let statuses = report
        .pointer("/statusCodeDistribution")
        .and_then(Value::as_object);
    let answered: f64 = statuses.map_or(0.0, |s| s.values().filter_map(Value::as_f64).sum());
    let ok: f64 = statuses.map_or(0.0, |s| {
        s.iter()
            .filter(|(code, _)| code.starts_with('2'))
            .filter_map(|(_, n)| n.as_f64())
            .sum()
    });
    let success = report
        .pointer("/summary/successRate")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        * if answered > 0.0 { ok / answered } else { 0.0 };
    Ok(Run {
        rps,
        success,
        p50: ms("/latencyPercentiles/p50"),
        p90: ms("/latencyPercentiles/p90"),
        p99: ms("/latencyPercentiles/p99"),
        p999: ms("/latencyPercentiles/p99.9"),
        ttfb_p50: ms("/firstBytePercentiles/p50"),
        ttfb_p99: ms("/firstBytePercentiles/p99"),
        requests: rps * seconds as f64,
    })
}

pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
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

/// A tenant and a key; with `quotas`, the requests are counted in every scope: the key and the
/// bench's user (`x-loom-user`) get per-minute rates and daily budgets no run reaches, so each
/// request reserves and settles in the tenant, user and key (and runs their GCRAs).
async fn setup_key(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    quotas: bool,
    policy: bool,
) -> anyhow::Result<String> {
    let tenant: Value = client
        .post(format!("{base}/admin/tenants"))
        .bearer_auth(token)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    // The policy off: the key is in a project that turns it off.
    let mut project = Value::Null;
    if !policy {
        let created: Value = client
            .post(format!("{base}/admin/projects"))
            .bearer_auth(token)
            .json(
                &json!({"tenant_id": tenant["tenant_id"], "name": "no-policy",
                          "security_policy": {"default_action": "off", "outputs": "off"}}),
            )
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        project = created["project_id"].clone();
        // A project has a default daily budget; the bench's must not run out mid-run.
        client
            .post(format!("{base}/admin/quotas"))
            .bearer_auth(token)
            .json(
                &json!({"tenant_id": tenant["tenant_id"], "scope": "project", "id": project,
                          "limits": {"tokens_per_day": 0, "cost_micro_usd_per_day": 0}}),
            )
            .send()
            .await?
            .error_for_status()?;
    }
    let key: Value = client
        .post(format!("{base}/admin/keys"))
        .bearer_auth(token)
        .json(&json!({"tenant_id": tenant["tenant_id"], "project_id": project}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if quotas {
        let limits = json!({"tokens_per_day": 1_000_000_000_000i64,
                            "cost_micro_usd_per_day": 1_000_000_000_000_000i64,
                            "requests_per_minute": 10_000_000,
                            "tokens_per_minute": 1_000_000_000});
        for (scope, id) in [("key", key["key_id"].clone()), ("user", json!(BENCH_USER))] {
            client
                .post(format!("{base}/admin/quotas"))
                .bearer_auth(token)
                .json(
                    &json!({"tenant_id": tenant["tenant_id"], "scope": scope, "id": id,
                              "limits": limits}),
                )
                .send()
                .await?
                .error_for_status()?;
        }
    }
    key["key"]
        .as_str()
        .map(str::to_owned)
        .context("no key in the answer")
}

/// The user the requests of a `quotas=on` server are for.
const BENCH_USER: &str = "bench-user";

/// The variable the benchmark's upstream key is in (the mock takes any).
const UPSTREAM_KEY: &str = "LOOM_BENCH_UPSTREAM_KEY";

fn write_config(dir: &Path, mock: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("loom.toml");
    std::fs::write(
        &path,
        format!(
            "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"http://{mock}/v1\"\n\n\
             [upstreams.openai]\nprovider = \"openai\"\nbase_url = \"http://{mock}/v1\"\napi_key_env = \"{UPSTREAM_KEY}\"\n\n\
             [upstreams.anthropic]\nprovider = \"anthropic\"\nbase_url = \"http://{mock}/v1\"\napi_key_env = \"{UPSTREAM_KEY}\"\n\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"gpt-4o-mini\" }}]\n\
             [models.gpt]\ndeployments = [{{ upstream = \"openai\", model = \"gpt-4o-mini\" }}]\n\
             [models.claude]\ndeployments = [{{ upstream = \"anthropic\", model = \"claude-sonnet-4-5\" }}]\n"
        ),
    )?;
    Ok(path)
}

/// What oha is pointed at: the mock directly, nginx in front of it, or a `loom serve`.
struct Target {
    name: String,
    addr: String,
    /// The API key Loom wants.
    key: Option<String>,
    /// The user requests name (`x-loom-user`), so that they are counted in its quotas.
    user: Option<&'static str>,
    /// The process whose CPU and memory are measured (with its children); `None` for the mock
    /// itself, the baseline.
    process: Option<Process>,
}

impl Target {
    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.0.id())
    }
}

/// nginx as users run it in front of an upstream: `proxy_pass` with HTTP/1.1 keep-alive to the
/// upstream, a worker per core, access log off (Loom keeps no per-request text log either).
fn start_nginx(binary: &Path, work: &Path, upstream: &str) -> anyhow::Result<Target> {
    let dir = work.join("nginx");
    std::fs::create_dir_all(dir.join("temp"))?;
    let port = loom_schemas::testing::try_free_port()?;
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/temp;\n  proxy_temp_path {dir}/temp;\n\
               upstream mock {{ server {upstream}; keepalive 64; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://mock;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new(binary)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let process = Process(child);
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok(Target {
                name: "nginx proxy_pass".into(),
                addr,
                key: None,
                user: None,
                process: Some(process),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("nginx did not start listening on {addr}")
}

async fn start_gateway(
    work: &Path,
    config: &Path,
    ack: EventsAck,
    read_models: &str,
    quotas: bool,
    policy: bool,
) -> anyhow::Result<Target> {
    let token = "bench-admin";
    let name = match (quotas, policy) {
        (true, _) => format!("loom rm={read_models} quotas=on"),
        (false, false) => format!("loom rm={read_models} policy=off"),
        (false, true) => format!("loom rm={read_models} ack={ack}"),
    };
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
    .arg(work.join(format!("data-{read_models}-{ack}-{quotas}-{policy}").replace('/', "_")))
    .arg("--config")
    .arg(config)
    .env("LOOM_ADMIN_TOKEN", token)
    .env(UPSTREAM_KEY, "bench")
    .env_remove("LOOM_MASTER_KEY");
    if read_models != "default" {
        loom.args(["--read-models", read_models]);
    }
    let (process, addr) = spawn_listening(loom)?;
    let client = reqwest::Client::new();
    let key = setup_key(&client, &format!("http://{addr}"), token, quotas, policy).await?;
    Ok(Target {
        name,
        addr,
        key: Some(key),
        user: quotas.then_some(BENCH_USER),
        process: Some(process),
    })
}

/// The client APIs side by side at one load: each through Loom, and its baselines (the upstream
/// directly, nginx in front of it) called with the request Loom sends the upstream.
fn compare_apis(args: &GatewayBenchArgs, targets: &[Target]) -> anyhow::Result<()> {
    if args.apis.is_empty() {
        return Ok(());
    }
    let case = args.api_case;
    say!(
        "client APIs at {case}, {}s each, medians of {} interleaved runs: overhead over direct and CPU per request \
         (passthrough: as sent to an upstream of the client's API; -to-chat: translated for a \
         chat-only upstream, whose direct baseline is its chat API)",
        args.seconds,
        args.repeat.max(1)
    );
    say!(
        "{:<18} {:<26} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "api",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "ok",
        "cpu ms/rq"
    );
    for &api in &args.apis {
        let (client, upstream) = api.loads();
        let load = |target: &Target| {
            if target.key.is_some() {
                &client
            } else {
                &upstream
            }
        };
        let mut runs = vec![Vec::new(); targets.len()];
        let mut cpu = vec![0.0; targets.len()];
        for _ in 0..args.repeat.max(1) {
            for (i, target) in targets.iter().enumerate() {
                let (path, body) = (load(target).path, &load(target).body);
                let before = target.pid().map(cpu_seconds).transpose()?;
                runs[i].push(tokio::task::block_in_place(|| {
                    oha(&args.oha, target, case, args.seconds, path, body)
                })?);
                if let (Some(pid), Some(before)) = (target.pid(), before) {
                    cpu[i] += cpu_seconds(pid)? - before;
                }
            }
        }
        let medians: Vec<Run> = runs.iter().map(|r| Run::median(r)).collect();
        for (i, target) in targets.iter().enumerate() {
            let run = medians[i];
            let cpu_ms = target
                .pid()
                .map(|_| cpu[i] / run.requests.max(1.0) * 1000.0);
            say!(
                "{:<18} {:<26} {:>9.0} {:>8.3} {:>8.3} {:>+8.3} {:>6.1}% {:>9}",
                api.to_string(),
                target.name,
                run.rps,
                run.p50,
                run.p99,
                run.p50 - medians[0].p50,
                run.success * 100.0,
                cpu_ms.map_or_else(|| "-".to_owned(), |c| format!("{c:.3}")),
            );
        }
    }
    Ok(())
}

/// One table row: a target's figures in a case, CPU per request and memory where measured.
fn row(name: &str, case: Case, run: &Run, cpu_ms: Option<f64>, rss: Option<f64>) {
    let dash = || "-".to_owned();
    say!(
        "{name:<26} {:>9} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7.1}% {:>9} {:>8}",
        case.to_string(),
        run.rps,
        run.p50,
        run.p90,
        run.p99,
        run.p999,
        run.success * 100.0,
        cpu_ms.map_or_else(dash, |c| format!("{c:.3}")),
        rss.map_or_else(dash, |r| format!("{r:.1}")),
    );
}

pub async fn run(args: GatewayBenchArgs) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("loom-bench-gateway")
        .tempdir()?;
    let mut mock = Command::new(sibling("loom-mock")?);
    mock.args(["--listen", "127.0.0.1:0"]);
    let (_mock, mock_addr) = spawn_listening(mock)?;
    let config = write_config(work.path(), &mock_addr)?;
    let mut targets = vec![Target {
        name: "direct".into(),
        addr: mock_addr.clone(),
        key: None,
        user: None,
        process: None,
    }];
    match start_nginx(&args.nginx, work.path(), &mock_addr) {
        Ok(nginx) => targets.push(nginx),
        Err(error) => say!(
            "no nginx baseline ({error:#}); install nginx (./infra/bench.sh does) or pass --nginx"
        ),
    }
    for read_models in &args.read_models {
        for ack in &args.events_ack {
            targets
                .push(start_gateway(work.path(), &config, *ack, read_models, false, true).await?);
        }
    }
    if args.quotas.contains(&Switch::On) {
        let ack = args
            .events_ack
            .first()
            .copied()
            .unwrap_or(EventsAck::Recorded);
        targets.push(start_gateway(work.path(), &config, ack, "off", true, true).await?);
    }
    if args.policy.contains(&Switch::Off) {
        let ack = args
            .events_ack
            .first()
            .copied()
            .unwrap_or(EventsAck::Recorded);
        targets.push(start_gateway(work.path(), &config, ack, "off", false, false).await?);
    }

    let chat = json!({"model": "fast", "messages": [{"role": "user", "content": "Summarise the quarterly report in three bullet points for the leadership team."}]});
    let stream = json!({"model": "fast", "stream": true, "messages": chat["messages"]});

    say!(
        "loom bench gateway: {}s per case, medians of {} interleaved runs, oha {}; the mock upstream (no added latency) directly, through nginx proxy_pass, and through Loom",
        args.seconds,
        args.repeat.max(1),
        args.oha.display()
    );
    say!(
        "Loom records every request's events on its embedded log (fsync 200ms) with sealed bodies; \
         rm=off is the gateway alone, rm=default folds the read models into SQLite in-process. \
         Each server is idle while the others are measured; all share the machine's {} cores with oha and the mock. \
         CPU: user+system ms per request of the proxy process (nginx: master and workers; rm=default: with its fold's and SQLite's threads, whose share is printed apart).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    say!(
        "{:<26} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "target",
        "case",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "ok",
        "cpu ms/rq",
        "rss MiB"
    );
    for &case in &args.cases {
        let mut runs = vec![Vec::new(); targets.len()];
        let mut cpu = vec![0.0; targets.len()];
        let mut fold_cpu = vec![0.0; targets.len()];
        for _ in 0..args.repeat.max(1) {
            for (i, target) in targets.iter().enumerate() {
                let before = target.pid().map(cpu_seconds).transpose()?;
                let fold_before = target.pid().map(fold_cpu_seconds);
                runs[i].push(tokio::task::block_in_place(|| {
                    oha(
                        &args.oha,
                        target,
                        case,
                        args.seconds,
                        "/v1/chat/completions",
                        &chat,
                    )
                })?);
                if let (Some(pid), Some(before), Some(fold_before)) =
                    (target.pid(), before, fold_before)
                {
                    cpu[i] += cpu_seconds(pid)? - before;
                    fold_cpu[i] += fold_cpu_seconds(pid) - fold_before;
                }
            }
        }
        let medians: Vec<Run> = runs.iter().map(|r| Run::median(r)).collect();
        let cpu_ms: Vec<Option<f64>> = targets
            .iter()
            .zip(&cpu)
            .zip(&medians)
            .map(|((t, cpu), run)| t.pid().map(|_| cpu / run.requests.max(1.0) * 1000.0))
            .collect();
        let nginx = targets.iter().position(|t| t.name.starts_with("nginx"));
        for (i, target) in targets.iter().enumerate() {
            let rss = target
                .pid()
                .map(memory_mib)
                .transpose()?
                .map(|(rss, _)| rss);
            row(&target.name, case, &medians[i], cpu_ms[i], rss);
            if i == 0 {
                continue;
            }
            let (base, ours) = (&medians[0], &medians[i]);
            let mut versus = format!(
                "{:<26} {:>9} {:>8.2}x {:>+8.3} {:>+8.3} {:>+8.3} {:>+8.3}   overhead over direct",
                "",
                "",
                ours.rps / base.rps.max(1e-9),
                ours.p50 - base.p50,
                ours.p90 - base.p90,
                ours.p99 - base.p99,
                ours.p999 - base.p999,
            );
            if let Some(n) = nginx.filter(|&n| n != i) {
                versus.push_str(&format!(
                    "; vs nginx: {:.2}x req/s, {:.1}x CPU per request",
                    ours.rps / medians[n].rps.max(1e-9),
                    cpu_ms[i].unwrap_or(f64::NAN) / cpu_ms[n].unwrap_or(f64::NAN)
                ));
            }
            if fold_cpu[i] > 0.0 {
                let fold_ms = fold_cpu[i] / ours.requests.max(1.0) * 1000.0;
                versus.push_str(&format!(
                    "; the read models' share {fold_ms:.3} ms per request"
                ));
            }
            say!("{versus}");
        }
    }

    compare_apis(&args, &targets)?;

    let case = args.stream;
    say!(
        "streaming, {case} for {}s: time to first byte and whole stream, ms",
        args.stream_seconds
    );
    let mut direct: Option<Run> = None;
    for target in &targets {
        let before = target.pid().map(memory_mib).transpose()?;
        let run = tokio::task::block_in_place(|| {
            oha(
                &args.oha,
                target,
                case,
                args.stream_seconds,
                "/v1/chat/completions",
                &stream,
            )
        })?;
        let memory = match (before, target.pid().map(memory_mib).transpose()?) {
            (Some((start, _)), Some((end, peak))) => {
                format!("; RSS {start:.1} MiB before, {end:.1} after, peak {peak:.1}")
            }
            _ => String::new(),
        };
        let versus = direct.map_or_else(String::new, |d| {
            format!(
                " (first byte {:+.3} / {:+.3}, whole {:+.3} / {:+.3} over direct)",
                run.ttfb_p50 - d.ttfb_p50,
                run.ttfb_p99 - d.ttfb_p99,
                run.p50 - d.p50,
                run.p99 - d.p99
            )
        });
        say!(
            "  {:<26} {:>7.0} req/s, first byte p50 {:.3} p99 {:.3}, whole stream p50 {:.3} p99 {:.3}{versus}{memory}",
            target.name,
            run.rps,
            run.ttfb_p50,
            run.ttfb_p99,
            run.p50,
            run.p99
        );
        direct.get_or_insert(run);
    }
    let client = reqwest::Client::new();
    for target in targets.iter().filter(|t| t.key.is_some()) {
        let health: Value = client
            .get(format!("http://{}/health", target.addr))
            .send()
            .await?
            .json()
            .await?;
        say!(
            "{}: events on the log: {}",
            target.name,
            health
                .pointer("/log/data/end_offset")
                .unwrap_or(&Value::Null)
        );
    }
    Ok(())
}
