//! The control plane as the gateway sees it: the control topic folded by the shared rules
//! (`loom_schemas::control`) into memory, rebuilt from the start of the log when a node opens
//! and kept current by tailing it. Requests authenticate against it without any I/O.

use std::sync::{Arc, RwLock};

use loom_schemas::codec::Registry;
pub use loom_schemas::control::{ApiKeyInfo, ControlState, TenantInfo};
use loom_schemas::event::{Event, Payload, now_micros};
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{Log, LogError, Topic};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The shared, live control state and how far into the control topic it has read.
#[derive(Clone)]
pub struct Control {
    state: Arc<RwLock<ControlState>>,
    applied: watch::Sender<u64>,
}

impl Control {
    /// Reads the control topic from the start and folds it.
    pub async fn load(log: &dyn Log) -> Result<Control, LogError> {
        let control = Control {
            state: Arc::default(),
            applied: watch::Sender::new(0),
        };
        let mut reader = log.read_from(Topic::Control, 0, 0).await?;
        loop {
            let entries = reader.poll(1024).await?;
            if entries.is_empty() {
                break;
            }
            control.apply_entries(&entries);
        }
        Ok(control)
    }

    /// Decodes control entries; an undecodable one is counted and skipped.
    fn decode(entries: &[loom_schemas::log::Entry]) -> Vec<Event> {
        let Ok(registry) = Registry::builtin() else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|entry| match registry.decode(&entry.record.value) {
                Ok(event) => Some(event),
                Err(error) => {
                    metrics::counter!("loom_control_undecodable_events_total").increment(1);
                    tracing::error!(offset = entry.position.offset, %error, "skipping an undecodable control event");
                    None
                }
            })
            .collect()
    }

    fn apply_entries(&self, entries: &[loom_schemas::log::Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        let events = Self::decode(entries);
        if let Ok(mut state) = self.state.write() {
            for event in &events {
                if let Err(refused) = state.apply(event) {
                    metrics::counter!("loom_control_refused_events_total").increment(1);
                    tracing::debug!(%refused, event_type = event.payload.event_type(), tenant = %event.envelope.tenant_id, "a control event changes nothing");
                }
            }
        }
        self.applied.send_replace(last.position.offset + 1);
    }

    /// Tails the control topic until `shutdown`, applying new events as they are appended. When
    /// tenants appear or go, or a tenant's key is rotated, `keys` is reloaded first: another node
    /// may have made their keys.
    pub async fn follow(self, log: Arc<dyn Log>, keys: Arc<KeyStore>, shutdown: CancellationToken) {
        let from = *self.applied.borrow();
        let mut reader = match log.read_from(Topic::Control, 0, from).await {
            Ok(reader) => reader,
            Err(error) => {
                tracing::error!(%error, "cannot follow the control topic");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                next = reader.next(1024) => match next {
                    Ok(entries) => {
                        let tenants_changed = Self::decode(&entries).iter().any(|e| {
                            matches!(
                                e.payload,
                                Payload::TenantCreated(_)
                                    | Payload::TenantErased(_)
                                    | Payload::TenantKeyRotated(_)
                            )
                        });
                        if tenants_changed && let Err(error) = keys.reload().await {
                                tracing::error!(%error, "could not reload tenant keys");
                        }
                        self.apply_entries(&entries);
                    }
                    Err(error) => {
                        tracing::error!(%error, "reading the control topic failed; retrying in 1s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                },
            }
        }
    }

    /// Waits until every control event before `offset` has been applied.
    pub async fn wait_for(&self, offset: u64) {
        let mut applied = self.applied.subscribe();
        let _ = applied.wait_for(|at| *at >= offset).await;
    }

    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&ControlState) -> T) -> T {
        match self.state.read() {
            Ok(state) => f(&state),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The key a client presented, if valid now, with the role it has now.
    pub fn authenticate(&self, secret: &str) -> Option<ApiKeyInfo> {
        self.read(|state| state.authenticate(secret, now_micros()))
    }
}
