//! The ledger as every gateway keeps it: the quota topic read when the gateway starts (from the
//! start of what the day's counts depend on, so a restart keeps them), then tailed, so that each gateway counts what
//! the others reserve and settle. A gateway's own events were applied when it made them; reading
//! them back tells it the others can see them, and gives the verdict on those admitted in log
//! order ([`Arbiter`]).

use std::sync::Weak;
use std::time::Duration;

use loom_schemas::codec::Registry;
use loom_schemas::event::{Payload, now_micros};
use loom_schemas::log::{Log, LogError, Topic};

use super::{Arbiter, QuotaSettings, Quotas};
use crate::gateway::Gateway;

/// Folds the quota topic into `gateway`'s ledger until the gateway is gone; `producer` is this
/// gateway. It holds neither the gateway nor the log (only a
/// reader of it), so that both close when the node stops.
pub(crate) async fn follow(gateway: Weak<Gateway>, log: Weak<dyn Log>, producer: String) {
    let Ok(registry) = Registry::builtin() else {
        return;
    };
    let (mut arbiter, start) = match (gateway.upgrade(), log.upgrade()) {
        (Some(gateway), Some(log)) => {
            let settings = &gateway.quotas.settings;
            // Kafka keeps the topic 3 days; the embedded log keeps it all: skip what no
            // counter the ledger keeps (today's and yesterday's) depends on.
            let start = match settings.shared_log {
                true => 0,
                false => {
                    let ttl = i64::try_from(settings.reservation_ttl.as_micros()).unwrap_or(0);
                    first_since(&*log, registry, now_micros() - KEPT_US - ttl).await
                }
            };
            (Arbiter::new(settings.time_zone), start)
        }
        _ => return,
    };
    let mut reader = loop {
        let Some(log) = log.upgrade() else {
            return;
        };
        match log.read_from(Topic::Quota, 0, start).await {
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
                Ok(event) => {
                    let verdict = arbiter.fold(&event);
                    let quotas = &gateway.quotas;
                    let own = event.envelope.producer == producer;
                    match (own, &event.payload, verdict) {
                        (true, Payload::QuotaReserved(r), Some(verdict)) => {
                            quotas.decide(r.reservation_id, verdict);
                        }
                        (true, Payload::QuotaReserved(r), None) => quotas.confirm(r.reservation_id),
                        (true, ..) => {}
                        // Refused in log order: it counts nowhere.
                        (false, _, Some(Err(_))) => {}
                        (false, ..) => quotas.apply(&event, now),
                    }
                }
                Err(error) => {
                    metrics::counter!("loom_quota_undecodable_events_total").increment(1);
                    tracing::error!(offset = entry.position.offset, %error, "skipping an undecodable quota event");
                }
            }
        }
    }
}

/// The ledger as the log holds it now, for a process that runs no gateway (`loom admin quota
/// show` on a data dir): the quota topic from where today's counts start to where it ends.
pub async fn read_ledger(log: &dyn Log, settings: QuotaSettings) -> Result<Quotas, LogError> {
    let registry = Registry::builtin().map_err(|e| LogError::Task(e.to_string()))?;
    let ttl = i64::try_from(settings.reservation_ttl.as_micros()).unwrap_or(0);
    let start = first_since(log, registry, now_micros() - KEPT_US - ttl).await;
    let end = log.end_offset(Topic::Quota, 0).await?;
    let quotas = Quotas::new(settings);
    let mut reader = log.read_from(Topic::Quota, 0, start).await?;
    let mut next = start;
    while next < end {
        let entries = reader.next(1024).await?;
        let Some(last) = entries.last() else {
            break;
        };
        next = last.position.offset + 1;
        let now = now_micros();
        for entry in &entries {
            if let Ok(event) = registry.decode(&entry.record.value) {
                quotas.apply(&event, now);
            }
        }
    }
    Ok(quotas)
}

/// How far back the ledger's counters reach: yesterday and today in any time zone (two days),
/// and an hour for producers' clocks that disagree, in µs.
const KEPT_US: i64 = 49 * 3_600_000_000;

/// The offset of the first quota event that happened at or after `since` (µs), found by
/// bisection on the events' times (appended in about the order they happen); 0 if the topic
/// cannot be read that way.
async fn first_since(log: &dyn Log, registry: &Registry, since: i64) -> u64 {
    let Ok(end) = log.end_offset(Topic::Quota, 0).await else {
        return 0;
    };
    let (mut low, mut high) = (0, end);
    while low < high {
        let middle = low + (high - low) / 2;
        match occurred_at(log, registry, middle).await {
            Some(at) if at < since => low = middle + 1,
            Some(_) => high = middle,
            None => return 0,
        }
    }
    low
}

/// When the quota event at `offset` happened.
async fn occurred_at(log: &dyn Log, registry: &Registry, offset: u64) -> Option<i64> {
    let mut reader = log.read_from(Topic::Quota, 0, offset).await.ok()?;
    let entries = tokio::time::timeout(Duration::from_secs(5), reader.next(1))
        .await
        .ok()?
        .ok()?;
    let entry = entries.first()?;
    Some(
        registry
            .decode(&entry.record.value)
            .ok()?
            .envelope
            .occurred_at,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use loom_schemas::event::{Envelope, Event, QuotaReleased};
    use loom_schemas::log::{ChainKey, EmbeddedLog, EmbeddedLogConfig};
    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn the_ledger_starts_at_the_first_event_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedLogConfig::new(dir.path(), ChainKey::new([1; 32]));
        let log = Arc::new(EmbeddedLog::open(config).await.unwrap());
        let registry = Registry::builtin().unwrap();
        let hour = 3_600_000_000;
        // 100 events an hour apart.
        let records = (0..100)
            .map(|i| {
                let mut envelope = Envelope::new(Uuid::nil(), None, "gateway/t/1");
                envelope.occurred_at = i * hour;
                let payload = QuotaReleased {
                    reservation_id: Uuid::now_v7(),
                    scopes: Vec::new(),
                    day: 0,
                    tokens: 0,
                    cost_micro_usd: 0,
                    reason: "failed".into(),
                };
                registry
                    .encode_record(&Event {
                        envelope,
                        payload: payload.into(),
                    })
                    .unwrap()
            })
            .collect();
        log.append(Topic::Quota, records).await.unwrap();
        assert_eq!(first_since(&*log, registry, 0).await, 0);
        assert_eq!(first_since(&*log, registry, 51 * hour).await, 51);
        assert_eq!(first_since(&*log, registry, 50 * hour + 1).await, 51);
        assert_eq!(first_since(&*log, registry, 1_000 * hour).await, 100);
        let empty = tempfile::tempdir().unwrap();
        let config = EmbeddedLogConfig::new(empty.path(), ChainKey::new([1; 32]));
        let empty = EmbeddedLog::open(config).await.unwrap();
        assert_eq!(first_since(&empty, registry, 51 * hour).await, 0);
    }
}
