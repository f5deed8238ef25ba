//! `loom verify`: walks the embedded log and reports the first altered or damaged record.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

pub async fn run(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let log_dir = data_dir.join("log");
    if !log_dir.is_dir() {
        anyhow::bail!("no log at {}: is --data-dir right?", log_dir.display());
    }
    let report = tokio::task::spawn_blocking(move || loom_schemas::log::verify(&log_dir))
        .await
        .context("verify task")??;
    let mut out = std::io::stdout().lock();
    for partition in &report.partitions {
        writeln!(
            out,
            "{}/{}: {} records in {} segments ({} bytes), chain head {}",
            partition.topic,
            partition.partition,
            partition.records,
            partition.segments,
            partition.bytes,
            hex::encode(partition.head),
        )?;
        if let Some(torn) = &partition.torn_tail {
            writeln!(
                out,
                "  note: an unfinished write at the end ({torn}); the next start truncates it"
            )?;
        }
        if let Some(problem) = &partition.problem {
            writeln!(out, "  ALTERED OR DAMAGED: {problem}")?;
        }
    }
    match report.first_problem() {
        Some(problem) => {
            writeln!(
                std::io::stderr(),
                "error: the log was altered or damaged; first bad record: {problem}"
            )?;
            Ok(ExitCode::FAILURE)
        }
        None => {
            writeln!(
                out,
                "ok: every record's checksum, offset and hash chain verified"
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
