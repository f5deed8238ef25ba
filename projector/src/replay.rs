//! `loom replay`: rebuild the read models from the start of the log into a new version while the
//! active one keeps serving, then switch readers to it in one step (blue/green).
//!
//! The new version folds with its own positions, so an interrupted replay resumes where it
//! stopped (the catalog remembers which version was being built). It folds up to the end the log
//! had when the replay started; live projectors take the new version from there once it is
//! switched to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loom_schemas::log::{Log, Topic};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::run::{Projector, ProjectorConfig, ProjectorError, stored_positions};
use crate::store::{ReadStore, StoreLocation};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The version built and switched to.
    pub version: u32,
    /// The version readers used before.
    pub previous: u32,
    /// Records folded by this run (less than the log when it resumed an earlier one).
    pub records: u64,
    pub elapsed: Duration,
}

/// Rebuilds the read models at `location` from `log`, showing a progress bar on stderr when
/// `progress` is set.
pub async fn replay(
    log: Arc<dyn Log>,
    location: &StoreLocation,
    config: ProjectorConfig,
    progress: bool,
) -> Result<ReplayReport, ProjectorError> {
    let started = Instant::now();
    let catalog = Catalog::open(location).await?;
    let previous = catalog.active().await?;
    let version = match catalog.building().await? {
        Some(building) if building > previous => {
            tracing::info!(version = building, "resuming the interrupted replay");
            building
        }
        _ => {
            let version = previous + 1;
            catalog.set_building(version).await?;
            version
        }
    };
    let store = ReadStore::open(location, version).await?;
    // Tables fill faster without their secondary indexes; they are built once, at the end.
    store.defer_indexes().await?;

    // The end of every partition now: the replay is done when the new version reaches it.
    let mut targets = Vec::new();
    for topic in Topic::ALL {
        for partition in 0..log.partitions(topic) {
            targets.push((topic, partition, log.end_offset(topic, partition).await?));
        }
    }
    let total: u64 = targets.iter().map(|(_, _, end)| end).sum();
    let at_start = folded(&store, &targets).await?;

    let bar = ProgressBar::with_draw_target(
        Some(total),
        if progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "replay v{msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(version.to_string());
    bar.set_position(at_start);
    bar.reset_eta();

    let shutdown = CancellationToken::new();
    // A group of its own per run: a resumed replay need not wait for the broker to notice that
    // the interrupted one's member is gone (its positions are in the store anyway).
    let replaying = ProjectorConfig {
        group: format!(
            "{}-replay-v{version}-{}",
            config.group,
            uuid::Uuid::now_v7().simple()
        ),
        ..config
    };
    let running = tokio::spawn(Projector::new(log, store.clone(), replaying).run(shutdown.clone()));
    let watched = async {
        loop {
            let done = folded(&store, &targets).await?;
            bar.set_position(done);
            if done >= total || running.is_finished() {
                return Ok::<_, sqlx::Error>(done);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    // Whatever ended the watch, the projector stops before the replay returns.
    shutdown.cancel();
    let ran = running.await;
    let done = watched?;
    match ran {
        Ok(result) => result?,
        Err(error) => tracing::error!(%error, "the replay's projector panicked"),
    }
    if done < total {
        bar.abandon();
        return Err(ProjectorError::Stopped);
    }
    bar.set_message(format!("{version}: building indexes"));
    store.restore_indexes().await?;
    store.close().await;
    catalog.switch_to(version).await?;
    bar.finish();
    Ok(ReplayReport {
        version,
        previous,
        records: done - at_start,
        elapsed: started.elapsed(),
    })
}

/// Records of `targets` the store has folded (up to each target's end).
async fn folded(store: &ReadStore, targets: &[(Topic, u32, u64)]) -> Result<u64, sqlx::Error> {
    let mut done = 0;
    for topic in Topic::ALL {
        let stored = stored_positions(store, topic).await?;
        for (_, partition, end) in targets.iter().filter(|(t, _, _)| *t == topic) {
            let at = stored
                .iter()
                .find(|p| p.partition == *partition)
                .map_or(0, |p| p.offset);
            done += at.min(*end);
        }
    }
    Ok(done)
}
