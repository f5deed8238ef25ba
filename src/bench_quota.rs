//! `loom bench quota`: what admission costs a request — reserving its estimate in every scope
//! (tenant, project, user, key: daily budgets and per-minute GCRAs) and settling it — on one
//! thread and on every core at once, with one user and with many.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_gateway::quota::{Limited, QuotaSettings, Quotas, Scope};
use loom_schemas::event::{QuotaScope, now_micros};
use loom_schemas::quota::Limits;
use uuid::Uuid;

use crate::bench::say;

#[derive(clap::Args)]
pub struct QuotaBenchArgs {
    /// Seconds per case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

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
    say!(
        "The overshoot of a burst from 2 and 4 gateways sharing the ledger on Kafka: not \
         measured yet (admission near a limit is not arbitrated through the log yet)."
    );
    Ok(())
}
