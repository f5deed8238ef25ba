//! `loom verify` and `loom repair`: check the embedded log, and cut it where it is damaged.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use loom::DataDir;
use loom_projector::archive::{Archive, ArchiveLocation};
use loom_schemas::codec::Registry;
use loom_schemas::log::checkpoint::anchor_event;
use loom_schemas::log::recovery::QUARANTINE_DIR;
use loom_schemas::log::{ChainKey, EmbeddedLog, EmbeddedLogConfig, ExpectedHead, Log, Topic};

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    data: crate::DataDirArgs,

    /// Print each partition's chain head as TOPIC/PARTITION:OFFSET:HEAD, to keep somewhere the
    /// log's host cannot change and pass back with --expect-head later.
    #[arg(long)]
    print_head: bool,

    /// Fail unless the chain has this head (TOPIC/PARTITION:OFFSET:HEAD, as --print-head
    /// prints; repeatable).
    #[arg(long, value_name = "HEAD", value_parser = ExpectedHead::parse)]
    expect_head: Vec<ExpectedHead>,

    /// Verify the archive instead: every tenant's manifest chain and every file's SHA-256,
    /// naming what was altered, removed or added (a directory or s3://BUCKET[/PREFIX]
    /// [default: <data dir>/archive]). Needs no keys.
    #[arg(long, value_name = "DIR_OR_S3_URL", num_args = 0..=1, default_missing_value = "")]
    archive: Option<String>,

    #[command(flatten)]
    s3: crate::S3Args,
}

#[derive(Args)]
pub struct RepairArgs {
    #[command(flatten)]
    data: crate::DataDirArgs,

    /// Cut the partition so that it ends before this record (TOPIC/PARTITION:OFFSET, e.g.
    /// `data/0:1234`, the offset `loom verify` names). What is cut is moved to
    /// <data dir>/log/quarantine/, never deleted. At the partition's end offset nothing is cut
    /// and a new checkpoint is written (to accept a log whose checkpoint is gone).
    #[arg(long, value_name = "TOPIC/PARTITION:OFFSET", value_parser = parse_cut)]
    truncate_at: (Topic, u64),
}

fn parse_cut(text: &str) -> Result<(Topic, u64), String> {
    let bad = || format!("expected TOPIC/0:OFFSET (e.g. data/0:1234), not {text:?}");
    let (place, offset) = text.split_once(':').ok_or_else(bad)?;
    let topic = match place.split_once('/') {
        Some((topic, "0")) => Topic::from_name(topic).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok((topic, offset.parse().map_err(|_| bad())?))
}

/// The key that authenticates the log's chain heads, from the master key (which readers never
/// generate).
pub fn chain_key(data_dir: &DataDir) -> anyhow::Result<ChainKey> {
    let Some(master) = loom::load_master_key(data_dir, crate::master_key_from_env().as_ref())?
    else {
        anyhow::bail!(
            "no master key: neither LOOM_MASTER_KEY nor {} is there, and the log's checkpoints \
             are authenticated with it",
            data_dir.master_key_file().display()
        );
    };
    Ok(master.chain_key())
}

fn log_dir(data_dir: &DataDir) -> anyhow::Result<PathBuf> {
    let log_dir = data_dir.log();
    if !log_dir.is_dir() {
        anyhow::bail!("no log at {}: is --data-dir right?", log_dir.display());
    }
    Ok(log_dir)
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(named) = &args.archive {
        return verify_archive(named, &args).await;
    }
    let data_dir = args.data.dir();
    let log_dir = log_dir(&data_dir)?;
    let key = chain_key(&data_dir)?;
    let expected = args.expect_head;
    let report = {
        let log_dir = log_dir.clone();
        tokio::task::spawn_blocking(move || loom_schemas::log::verify(&log_dir, &key, &expected))
            .await
            .context("verify task")??
    };
    let mut out = std::io::stdout().lock();
    for p in &report.partitions {
        writeln!(
            out,
            "{}/{}: {} records in {} segments ({} bytes), chain head {}",
            p.topic,
            p.partition,
            p.records,
            p.segments,
            p.bytes,
            hex::encode(p.head),
        )?;
        if let Some(checkpoint) = &p.checkpoint {
            writeln!(
                out,
                "  authenticated: checkpoint at offset {}{}{}",
                checkpoint.offset,
                p.anchored
                    .map(|a| format!(", anchored head at offset {a} in the control topic"))
                    .unwrap_or_default(),
                match p.unanchored() {
                    0 => String::new(),
                    n => format!("; {n} records after it (appended since the last fsync)"),
                }
            )?;
        }
        for note in &p.notes {
            writeln!(out, "  note: {note}")?;
        }
        if let Some(torn) = &p.torn_tail {
            writeln!(
                out,
                "  torn tail: an unfinished write at the end ({torn}); the next start moves it to \
                 {}/{QUARANTINE_DIR}/ and goes on",
                log_dir.display()
            )?;
        }
        if let Some(problem) = &p.problem {
            writeln!(out, "  DAMAGED OR ALTERED: {problem}")?;
            writeln!(
                out,
                "  the intact records end at offset {}: `loom repair --data-dir {} \
                 --truncate-at {}/{}:{}` cuts the rest off into {}/{QUARANTINE_DIR}/ (or \
                 restore the log from a backup)",
                p.end,
                data_dir.path().display(),
                p.topic,
                p.partition,
                p.end,
                log_dir.display()
            )?;
        }
        if args.print_head {
            writeln!(out, "  head: {}", p.head())?;
        }
    }
    match report.first_problem() {
        Some(problem) => {
            writeln!(
                std::io::stderr(),
                "error: the log is damaged or was altered; first bad spot: {problem}"
            )?;
            Ok(ExitCode::FAILURE)
        }
        None => {
            writeln!(
                out,
                "ok: every record's checksum, offset and hash chain verified, and the chain leads \
                 to authenticated heads"
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn repair(args: RepairArgs) -> anyhow::Result<ExitCode> {
    let data_dir = args.data.dir();
    let log_dir = log_dir(&data_dir)?;
    let key = chain_key(&data_dir)?;
    let (topic, offset) = args.truncate_at;
    let config = EmbeddedLogConfig::new(&log_dir, key.clone());
    let cut = EmbeddedLog::truncate_at(config.clone(), topic, offset)
        .await
        .with_context(|| format!("cutting {}/0 at offset {offset}", topic.name()))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}/0 now ends at offset {} (chain head {}); a new checkpoint is written",
        topic.name(),
        cut.end,
        hex::encode(cut.head)
    )?;
    for path in &cut.quarantined {
        writeln!(out, "  kept in quarantine: {}", path.display())?;
    }
    // The control topic's anchors must agree with the data topic's new end: anchor it now.
    let log = EmbeddedLog::open(config)
        .await
        .context("the cut is done, but the log does not open (run `loom verify`)")?;
    if topic == Topic::Data {
        let event = anchor_event(&key, Topic::Data, 0, cut.end, &cut.head, "repair");
        let record = Registry::builtin()?.encode_record(&event)?;
        log.append(Topic::Control, vec![record]).await?;
        log.sync().await?;
        writeln!(out, "  anchored the new head in the control topic")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify_archive(named: &str, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let Some(location) = crate::location_or(Some(named), args.data.dir().archive(), &args.s3)?
    else {
        anyhow::bail!("--archive off: nothing to verify");
    };
    if let ArchiveLocation::Directory(dir) = &location
        && !dir.is_dir()
    {
        anyhow::bail!("no archive at {}: is --data-dir right?", dir.display());
    }
    let archive = Archive::open(&location)?;
    let report = loom_projector::archive::verify::verify(&archive)
        .await
        .with_context(|| format!("reading the archive at {location}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{location}: {} tenants, {} manifest entries, {} files ({} bytes, {} rows)",
        report.tenants, report.entries, report.files, report.bytes, report.rows
    )?;
    for tenant in &report.erased {
        writeln!(
            out,
            "  tenant {tenant}: erased (its keys are destroyed; its files remain, unreadable)"
        )?;
    }
    for note in &report.notes {
        writeln!(out, "  note: {note}")?;
    }
    for problem in &report.problems {
        writeln!(out, "  ALTERED, REMOVED OR ADDED: {problem}")?;
    }
    if report.is_intact() {
        writeln!(
            out,
            "ok: every manifest chain links, and every file it names is there with its SHA-256"
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            std::io::stderr(),
            "error: the archive was altered: {} problems",
            report.problems.len()
        )?;
        Ok(ExitCode::FAILURE)
    }
}
