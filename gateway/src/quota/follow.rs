//! The ledger as every gateway keeps it: the quota topic read from its start when the gateway
//! starts (so a restart keeps the day's counts), then tailed, so that each gateway counts what
//! the others reserve and settle. A gateway's own events were applied when it made them.

use std::sync::Weak;
use std::time::Duration;

use loom_schemas::codec::Registry;
use loom_schemas::event::now_micros;
use loom_schemas::log::{Log, Topic};

use crate::gateway::Gateway;

/// Folds the quota topic into `gateway`'s ledger until the gateway is gone; events of
/// `producer` (this gateway) are skipped. It holds neither the gateway nor the log (only a
/// reader of it), so that both close when the node stops.
pub(crate) async fn follow(gateway: Weak<Gateway>, log: Weak<dyn Log>, producer: String) {
    let Ok(registry) = Registry::builtin() else {
        return;
    };
    let mut reader = loop {
        let Some(log) = log.upgrade() else {
            return;
        };
        match log.read_from(Topic::Quota, 0, 0).await {
            Ok(reader) => break reader,
            Err(error) => {
                tracing::error!(%error, "cannot read the quota topic; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if gateway.strong_count() == 0 {
            return;
        }
    };
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), reader.next(1024)).await;
        let Some(gateway) = gateway.upgrade() else {
            return;
        };
        let entries = match next {
            Err(_) => continue,
            Ok(Ok(entries)) => entries,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading the quota topic failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let now = now_micros();
        for entry in &entries {
            match registry.decode(&entry.record.value) {
                Ok(event) if event.envelope.producer != producer => {
                    gateway.quotas.apply(&event, now);
                }
                Ok(_) => {}
                Err(error) => {
                    metrics::counter!("loom_quota_undecodable_events_total").increment(1);
                    tracing::error!(offset = entry.position.offset, %error, "skipping an undecodable quota event");
                }
            }
        }
    }
}
