//! What the query service's tests share.

use std::path::Path;
use std::sync::Arc;

use loom_schemas::codec::Registry;
use loom_schemas::event::Event;
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Topic};

/// An embedded log at `dir` holding `events`, each on its plane's topic.
#[allow(clippy::unwrap_used)]
pub async fn log_of(dir: &Path, events: &[Event]) -> Arc<dyn Log> {
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(
            dir,
            loom_schemas::testing::chain_key(),
        ))
        .await
        .unwrap(),
    );
    append(log.as_ref(), events).await;
    log
}

/// Appends `events` to `log`, each on its plane's topic.
#[allow(clippy::unwrap_used)]
pub async fn append(log: &dyn Log, events: &[Event]) {
    let registry = Registry::builtin().unwrap();
    for topic in Topic::ALL {
        let records: Vec<_> = events
            .iter()
            .filter(|e| Topic::for_plane(e.payload.plane()) == topic)
            .map(|e| registry.encode_record(e).unwrap())
            .collect();
        for chunk in records.chunks(500) {
            log.append(topic, chunk.to_vec()).await.unwrap();
        }
    }
}
