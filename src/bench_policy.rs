//! `loom bench policy`: what scanning a prompt for secrets, personal data and destructive commands
//! costs, on one core — the scanner (a keyword prefilter, then only the matching rules' regexes
//! and checks) and a request's whole screening (the JSON walk, findings with their keyed digests,
//! redaction), on prompts of 1 KB, 16 KB and 256 KB, clean and with findings. Next to it, the
//! plain alternatives on the same text: every rule's regex run over all of it (no prefilter), and
//! one `RegexSet` of every rule (the single big alternation).

use std::time::{Duration, Instant};

use loom_gateway::policy::{Policy, rules::BUILTIN};
use loom_schemas::project::SecurityPolicy;
use regex::bytes::{Regex, RegexBuilder, RegexSetBuilder};
use serde_json::{Value, json};

use crate::bench::say;

#[derive(clap::Args)]
pub struct PolicyBenchArgs {
    /// Prompt sizes, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384,262144")]
    sizes: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

/// Words of the made-up prompts: prose, code and numbers that look like nothing secret.
const WORDS: &[&str] = &[
    "the",
    "quarterly",
    "report",
    "shows",
    "revenue",
    "growth",
    "of",
    "12%",
    "in",
    "Q3",
    "and",
    "customers",
    "asked",
    "for",
    "a",
    "summary",
    "fn",
    "main()",
    "{",
    "}",
    "let",
    "x",
    "=",
    "42;",
    "version",
    "1.4.2",
    "on",
    "2026-11-30",
    "at",
    "14:05",
    "please",
    "review",
    "this",
    "diff",
    "commit",
    "3f9a1c2",
    "uuid",
    "9b2e4f1a-7c3d-4e5f-8a9b-0c1d2e3f4a5b",
    "SELECT",
    "name",
    "FROM",
    "users",
    "WHERE",
    "id",
    "=",
    "7",
    "order",
    "#4521",
    "costs",
    "$1,299.00",
    "send",
    "it",
    "to",
    "the",
    "team",
    "by",
    "Friday",
    "token",
    "limit",
    "is",
    "4096",
    "keys",
    "rotate",
    "monthly",
];

/// Findings a prompt with findings carries, one every 2 KB or so (made up: nobody's).
const SECRETS: &[&str] = &[
    "AKIAZ7RX4KD2LM5NQ3EG",
    "ada.lovelace@example.com",
    "4111 1111 1111 1111",
    "sk-proj-Zr8Tq2Wm5Xc9Vb3Nk7Lp4Hd6Jf1Gs0Ae2Ui8Oy5Rt3Ew",
    "ghp_9aZk3LmQ7xW2pR5tY8uV1sN4bC6dF0gH3jK7",
    "DROP TABLE customers;",
];

fn prompt(size: usize, findings: bool) -> String {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut text = String::with_capacity(size + 64);
    let mut next_secret = 0;
    while text.len() < size {
        if findings && text.len() >= next_secret * 2048 + 512 {
            text.push_str(SECRETS[next_secret % SECRETS.len()]);
            text.push(' ');
            next_secret += 1;
        }
        text.push_str(WORDS[rng.usize(..WORDS.len())]);
        text.push(if rng.u8(..12) == 0 { '\n' } else { ' ' });
    }
    text.truncate(size);
    while !text.is_char_boundary(text.len()) {
        text.pop();
    }
    text
}

/// Runs `f` for about `seconds`; the time of one call.
fn per_call(seconds: f64, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut found = f();
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed().as_secs_f64() < seconds || calls < 3 {
        found = std::hint::black_box(f());
        calls += 1;
    }
    (started.elapsed() / calls, found)
}

fn mb_per_s(bytes: usize, per: Duration) -> f64 {
    bytes as f64 / per.as_secs_f64() / 1e6
}

pub async fn run(args: PolicyBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || measure(&args)).await?
}

fn measure(args: &PolicyBenchArgs) -> anyhow::Result<()> {
    let policy = Policy::compile(&SecurityPolicy::default())?;
    let scanner = policy.scanner();
    // As the scanner compiles them: ASCII classes.
    let each: Vec<Regex> = BUILTIN
        .iter()
        .map(|rule| RegexBuilder::new(rule.pattern).unicode(false).build())
        .collect::<Result<_, _>>()?;
    let set = RegexSetBuilder::new(BUILTIN.iter().map(|rule| rule.pattern))
        .unicode(false)
        .build()?;
    let digest = |text: &[u8]| text.iter().take(16).copied().collect::<Vec<u8>>();
    say!(
        "loom bench policy: the default policy ({} built-in rules, every one flagging), one core, {}s per figure; \
         MB/s of prompt text, and µs per prompt",
        BUILTIN.len(),
        args.seconds
    );
    say!(
        "scan: Loom's scanner (keyword prefilter, the matching rules' regexes, checks); screen: a chat request's \
         whole screening (JSON walk, findings, keyed digests; the request cloned each time); \
         every regex: each rule's regex over the whole text, no prefilter; RegexSet: one set of every rule (which rules match, no positions)"
    );
    say!(
        "{:>8} {:>9} {:>8} {:>11} {:>9} {:>11} {:>9} {:>12} {:>12}",
        "prompt",
        "case",
        "findings",
        "scan MB/s",
        "scan µs",
        "screen MB/s",
        "screen µs",
        "every regex",
        "RegexSet"
    );
    for &size in &args.sizes {
        for findings in [false, true] {
            let text = prompt(size, findings);
            let bytes = text.as_bytes();
            let mut found = Vec::new();
            let (scan, count) = per_call(args.seconds, || {
                found.clear();
                scanner.scan(bytes, &mut found);
                found.len()
            });
            let request = json!({"model": "fast", "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text}]});
            let (screen, _) = per_call(args.seconds, || {
                let mut request: Value = request.clone();
                policy
                    .screen(&mut request, &digest)
                    .map_or(0, |s| s.findings.len())
            });
            let (every, _) = per_call(args.seconds, || {
                each.iter()
                    .map(|regex| regex.find_iter(bytes).count())
                    .sum()
            });
            let (one_set, _) = per_call(args.seconds, || set.matches(bytes).iter().count());
            say!(
                "{:>8} {:>9} {:>8} {:>11.1} {:>9.1} {:>11.1} {:>9.1} {:>12.1} {:>12.1}",
                format!("{} KB", size / 1024),
                if findings { "findings" } else { "clean" },
                count,
                mb_per_s(size, scan),
                scan.as_secs_f64() * 1e6,
                mb_per_s(size, screen),
                screen.as_secs_f64() * 1e6,
                mb_per_s(size, every),
                mb_per_s(size, one_set),
            );
        }
    }
    Ok(())
}
