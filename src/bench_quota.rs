//! `loom bench quota`: what admission costs a request — reserving its estimate in every scope
//! (tenant, project, user, key: daily budgets and per-minute GCRAs) and settling it — on one
//! thread and on every core at once, with one user and with many. With a Kafka broker and a
//! Postgres key store: the worst overshoot of a budget by a concurrent burst through 2 and 4
//! gateway processes sharing the ledger, with admission near the limit arbitrated through the log
//! and, the plain alternative, with each gateway admitting from its own view.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use loom_gateway::quota::{Arbiter, Limited, QuotaSettings, Quotas, Scope};
use loom_schemas::codec::Registry;
use loom_schemas::event::{Payload, QuotaScope, QuotaScopeRef, now_micros};
use loom_schemas::log::{KafkaLog, KafkaLogConfig, Log, Topic};
use loom_schemas::quota::Limits;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::bench::say;
use crate::bench_gateway::{Process, sibling, spawn_listening};

#[derive(clap::Args)]
pub struct QuotaBenchArgs {
    /// Seconds per case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Also measure the overshoot of a burst through several gateways sharing the ledger on
    /// this Kafka broker (with `--key-store-url`).
    #[arg(long, env = "LOOM_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The Postgres the burst's gateways keep their key store in.
    #[arg(long, env = "LOOM_KEY_STORE_URL")]
    key_store_url: Option<String>,
    /// How many gateway processes share the budget, per case.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    gateways: Vec<usize>,
    /// Requests of one burst, all at once, spread evenly over the gateways.
    #[arg(long, default_value_t = 400)]
    burst: usize,
    /// Bursts per case, each against a fresh budget (a new user).
    #[arg(long, default_value_t = 5)]
    bursts: usize,
}

/// The daily token budget of each burst's user; each request reserves about 1,000 tokens.
const BURST_LIMIT: i64 = 100_000;
const ADMIN: &str = "bench-admin";
/// A fixed master key: the gateways share one key store.
const MASTER: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// A request's four scopes, each with a budget and rates no request reaches.
fn scopes(tenant: Uuid, project: Uuid, key: Uuid, user: &str) -> Vec<Limited> {
    let limits = Limits {
        tokens_per_day: Some(1_000_000_000_000),
        cost_micro_usd_per_day: Some(1_000_000_000_000_000),
        requests_per_minute: Some(10_000_000),
        tokens_per_minute: Some(1_000_000_000),
    };
    [
        Scope::of(tenant, QuotaScope::Tenant, tenant),
        Scope::of(tenant, QuotaScope::Project, project),
        Scope::user(tenant, user),
        Scope::of(tenant, QuotaScope::ApiKey, key),
    ]
    .into_iter()
    .map(|scope| Limited::new(scope, limits))
    .collect()
}

/// Admits and settles requests on `threads` threads for `seconds`; requests per second, and the
/// median and p99 of one admission plus settlement in µs.
fn case(quotas: &Arc<Quotas>, threads: usize, users: usize, seconds: f64) -> (f64, f64, f64) {
    let (tenant, project, key) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let quotas = Arc::clone(quotas);
            std::thread::spawn(move || {
                let mut samples = Vec::with_capacity(1 << 20);
                let mut n = thread;
                while Instant::now() < deadline {
                    let user = format!("user-{}", n % users);
                    n += threads;
                    let scopes = scopes(tenant, project, key, &user);
                    let at = Instant::now();
                    if let Ok(admitted) = quotas.reserve(&scopes, 4_200, 2_600, now_micros()) {
                        quotas.settle(admitted.id, 600, 310, &scopes);
                    }
                    samples.push(at.elapsed().as_secs_f64() * 1e6);
                }
                samples
            })
        })
        .collect();
    let mut samples: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    (
        samples.len() as f64 / elapsed,
        crate::bench::percentile(&samples, 0.5),
        crate::bench::percentile(&samples, 0.99),
    )
}

pub async fn run(args: QuotaBenchArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    say!(
        "loom bench quota: reserve + settle of one request in 4 scopes (tenant, project, user, \
         key), each with a daily token and dollar budget and per-minute request and token rates \
         (GCRA), {}s per case, {cores} cores",
        args.seconds
    );
    say!(
        "{:<10} {:>8} {:>14} {:>10} {:>10}",
        "threads",
        "users",
        "admissions/s",
        "p50 µs",
        "p99 µs"
    );
    for (threads, users) in [(1, 1), (1, 100_000), (cores, 1), (cores, 100_000)] {
        let quotas = Arc::new(Quotas::new(QuotaSettings::default()));
        let seconds = args.seconds;
        let (rate, p50, p99) =
            tokio::task::spawn_blocking(move || case(&quotas, threads, users, seconds)).await?;
        say!("{threads:<10} {users:>8} {rate:>14.0} {p50:>10.2} {p99:>10.2}");
    }
    say!(
        "The gateway's request path adds the estimate (prompt bytes, the price table) and two \
         events (quota.reserved, quota.consumed): `loom bench gateway --quotas off,on` measures \
         the whole request with and without them."
    );
    match (&args.kafka_brokers, &args.key_store_url) {
        (Some(brokers), Some(key_store)) => overshoot(&args, brokers, key_store).await,
        _ => {
            say!(
                "The overshoot of a burst through several gateways: pass --kafka-brokers and \
                 --key-store-url (./infra/bench.sh quota starts both)."
            );
            Ok(())
        }
    }
}

/// One case of the burst: its gateways, and what they admitted.
struct Burst {
    /// Per burst: tokens reserved by admitted requests (in log order), requests arbitrated and
    /// refused in log order.
    reserved: Vec<i64>,
    arbitrated: usize,
    admitted: usize,
    denied: usize,
    unavailable: usize,
    latencies_ms: Vec<f64>,
}

async fn overshoot(args: &QuotaBenchArgs, brokers: &str, key_store: &str) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("loom-bench-quota")
        .tempdir()?;
    let mut mock = Command::new(sibling("loom-mock")?);
    mock.args(["--listen", "127.0.0.1:0", "--latency-ms", "50"]);
    let (_mock, mock_addr) = spawn_listening(mock)?;
    say!(
        "\nOvershoot of a burst: {} bursts of {} requests at once, spread over the gateways (loom \
         gateway processes on one Kafka topic set, one key store), each request reserving about \
         1,000 tokens of a user's daily budget of {BURST_LIMIT} (about {} fit); the mock answers \
         in 50 ms. Overshoot: tokens reserved by admitted requests above the budget, worst burst \
         (reservations are the most a request may use; usage settles at or below them).",
        args.bursts,
        args.burst,
        BURST_LIMIT / 1_003
    );
    say!(
        "{:<10} {:<22} {:>9} {:>9} {:>8} {:>11} {:>10} {:>10} {:>8} {:>8}",
        "gateways",
        "admission",
        "admitted",
        "denied",
        "503",
        "arbitrated",
        "overshoot",
        "bound",
        "p50 ms",
        "p99 ms"
    );
    for &gateways in &args.gateways {
        for margin in [0.0, 0.1] {
            let burst = burst_case(
                args,
                work.path(),
                &mock_addr,
                brokers,
                key_store,
                gateways,
                margin,
            )
            .await
            .with_context(|| format!("{gateways} gateways, margin {margin}"))?;
            let worst = burst.reserved.iter().copied().max().unwrap_or(0);
            let overshoot = (worst - BURST_LIMIT).max(0) as f64 / BURST_LIMIT as f64 * 100.0;
            let (admission, bound) = match margin {
                0.0 => ("own view (margin 0)".to_owned(), "none".to_owned()),
                _ => (
                    format!("log order, margin {margin}"),
                    format!("{:.0}%", gateways as f64 * margin * 100.0),
                ),
            };
            let mut latencies = burst.latencies_ms;
            latencies.sort_by(f64::total_cmp);
            let runs = args.bursts.max(1);
            say!(
                "{:<10} {:<22} {:>9} {:>9} {:>8} {:>11} {:>9.1}% {:>10} {:>8.1} {:>8.1}",
                gateways,
                admission,
                burst.admitted / runs,
                burst.denied / runs,
                burst.unavailable,
                burst.arbitrated / runs,
                overshoot,
                bound,
                crate::bench::percentile(&latencies, 0.5),
                crate::bench::percentile(&latencies, 0.99)
            );
        }
    }
    say!(
        "admitted, denied, arbitrated: per burst; 503: in all (quota_unavailable: no verdict in \
         time); latency: every request of every burst, admitted or not. The bound: \
         gateways x margin of the budget (docs/quotas.md)."
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn burst_case(
    args: &QuotaBenchArgs,
    work: &Path,
    mock: &str,
    brokers: &str,
    key_store: &str,
    gateways: usize,
    margin: f64,
) -> anyhow::Result<Burst> {
    let case = work.join(format!("g{gateways}-m{margin}"));
    std::fs::create_dir_all(&case)?;
    let config = case.join("loom.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"http://{mock}/v1\"\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"gpt-4o-mini\" }}]\n\
             [quotas]\narbitration_margin = {margin:?}\n"
        ),
    )?;
    let prefix = format!("loom-bench-quota-{}.", Uuid::now_v7().simple());
    let mut processes: Vec<Process> = Vec::new();
    let mut bases = Vec::new();
    for i in 0..gateways {
        let mut loom = Command::new(std::env::current_exe()?);
        loom.args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--log",
            loom::serve::QUIET_LOG,
        ])
        .arg("--data-dir")
        .arg(case.join(format!("gateway-{i}")))
        .arg("--config")
        .arg(&config)
        .args(["--kafka-brokers", brokers, "--kafka-topic-prefix", &prefix])
        .args(["--key-store-url", key_store])
        .env("LOOM_ADMIN_TOKEN", ADMIN)
        .env("LOOM_MASTER_KEY", MASTER);
        let (process, addr) = spawn_listening(loom)?;
        processes.push(process);
        bases.push(format!("http://{addr}"));
    }
    let client = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        client
            .post(format!("{}{path}", bases[0]))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let tenant: Value = admin("/admin/tenants", json!({"name": "burst"}))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key: Value = admin("/admin/keys", json!({"tenant_id": tenant["tenant_id"]}))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = key["key"].as_str().context("no key")?.to_owned();
    let users: Vec<String> = (0..args.bursts.max(1))
        .map(|b| format!("burst-{b}"))
        .collect();
    for user in &users {
        admin(
            "/admin/quotas",
            json!({"tenant_id": tenant["tenant_id"], "scope": "user", "id": user,
                   "limits": {"tokens_per_day": BURST_LIMIT}}),
        )
        .await?
        .error_for_status()?;
    }
    // Every gateway knows the key and the last limit before the bursts.
    let started = Instant::now();
    for base in &bases {
        loop {
            let status = client
                .get(format!("{base}/v1/quota/status"))
                .bearer_auth(&key)
                .header("x-loom-user", users.last().map_or("", String::as_str))
                .send()
                .await?;
            if status.status().is_success()
                && status
                    .text()
                    .await?
                    .contains(&format!("\"tokens_per_day\":{BURST_LIMIT}"))
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the gateway at {base} never saw the key and its limits");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let (mut admitted, mut denied, mut unavailable) = (0, 0, 0);
    let mut latencies_ms = Vec::with_capacity(args.burst * users.len());
    for user in &users {
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..args.burst {
            let request = client
                .post(format!("{}/v1/chat/completions", bases[i % gateways]))
                .bearer_auth(&key)
                .header("x-loom-user", user)
                .json(&json!({"model": "fast", "max_tokens": 1_000,
                              "messages": [{"role": "user", "content": "hi"}]}));
            burst.spawn(async move {
                let at = Instant::now();
                let status = request.send().await.map(|r| r.status().as_u16());
                (status, at.elapsed().as_secs_f64() * 1e3)
            });
        }
        for (status, ms) in burst.join_all().await {
            latencies_ms.push(ms);
            match status? {
                200 => admitted += 1,
                429 => denied += 1,
                503 => unavailable += 1,
                other => bail!("a request of the burst answered {other}"),
            }
        }
    }
    drop(processes);

    // What was admitted, in log order, as every gateway folds it.
    let mut kafka = KafkaLogConfig::new(brokers);
    kafka.topic_prefix = prefix;
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await?;
    let registry = Registry::builtin()?;
    let mut arbiter = Arbiter::new(chrono_tz::Tz::UTC);
    let mut reserved: HashMap<String, i64> = HashMap::new();
    let mut arbitrated = 0;
    let mut reader = log.read_from(Topic::Quota, 0, 0).await?;
    loop {
        let batch = reader.poll(1_000).await?;
        if batch.is_empty() {
            break;
        }
        for entry in batch {
            let event = registry.decode(&entry.record.value)?;
            let verdict = arbiter.fold(&event);
            let Payload::QuotaReserved(r) = &event.payload else {
                continue;
            };
            arbitrated += usize::from(verdict.is_some());
            if matches!(verdict, Some(Err(_))) {
                continue;
            }
            if let Some(QuotaScopeRef { scope_id, .. }) =
                r.scopes.iter().find(|s| s.scope == QuotaScope::User)
            {
                *reserved.entry(scope_id.clone()).or_default() += r.tokens;
            }
        }
    }
    Ok(Burst {
        reserved: users
            .iter()
            .map(|u| reserved.get(u).copied().unwrap_or(0))
            .collect(),
        arbitrated,
        admitted,
        denied,
        unavailable,
        latencies_ms,
    })
}
