//! The control plane as the gateway sees it: an in-memory fold of the control topic (tenants and
//! API keys), rebuilt from the start of the log when a node opens and kept current by tailing it.
//! Requests authenticate against it without any I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use loom_schemas::codec::Registry;
use loom_schemas::crypto::hash_api_key;
use loom_schemas::event::{Event, Payload, TimestampMicros, now_micros};
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{Log, LogError, Topic};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a valid API key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub name: Option<String>,
    pub prefix: String,
    pub roles: Vec<String>,
    pub expires_at: Option<TimestampMicros>,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    pub tenant_id: Uuid,
    pub name: String,
    pub erased: bool,
}

/// The fold of control events. Pure: the same events give the same state.
#[derive(Debug, Default)]
pub struct ControlState {
    tenants: HashMap<Uuid, TenantInfo>,
    keys: HashMap<Uuid, ApiKeyInfo>,
    key_by_hash: HashMap<[u8; 32], Uuid>,
    anchored: Option<u64>,
}

impl ControlState {
    pub fn apply(&mut self, event: &Event) {
        let tenant_id = event.envelope.tenant_id;
        match &event.payload {
            Payload::TenantCreated(created) => {
                self.tenants.insert(
                    tenant_id,
                    TenantInfo {
                        tenant_id,
                        name: created.name.clone(),
                        erased: false,
                    },
                );
            }
            Payload::TenantErased(_) => {
                if let Some(tenant) = self.tenants.get_mut(&tenant_id) {
                    tenant.erased = true;
                }
            }
            Payload::ApiKeyIssued(issued) => {
                let Ok(hash) = <[u8; 32]>::try_from(issued.key_hash.as_slice()) else {
                    tracing::warn!(key_id = %issued.key_id, "ignoring an api_key.issued event whose hash is not 32 bytes");
                    return;
                };
                self.key_by_hash.insert(hash, issued.key_id);
                self.keys.insert(
                    issued.key_id,
                    ApiKeyInfo {
                        key_id: issued.key_id,
                        tenant_id,
                        project_id: issued.project_id,
                        name: issued.name.clone(),
                        prefix: issued.prefix.clone(),
                        roles: issued.roles.clone(),
                        expires_at: issued.expires_at,
                        revoked: false,
                    },
                );
            }
            Payload::ApiKeyRevoked(revoked) => {
                // Only the key's own tenant can revoke it.
                if let Some(key) = self
                    .keys
                    .get_mut(&revoked.key_id)
                    .filter(|k| k.tenant_id == tenant_id)
                {
                    key.revoked = true;
                }
            }
            Payload::LogAnchored(anchored) if anchored.topic == Topic::Data.name() => {
                self.anchored = u64::try_from(anchored.offset).ok();
            }
            _ => {}
        }
    }

    /// The data offset of the latest `log.anchored` event (so that a node does not anchor the
    /// same head twice).
    pub fn anchored(&self) -> Option<u64> {
        self.anchored
    }

    /// The key a client presented, if it is valid now: issued, not revoked, not expired, and its
    /// tenant not erased.
    pub fn authenticate(&self, secret: &str, now: TimestampMicros) -> Option<&ApiKeyInfo> {
        let key = self
            .keys
            .get(self.key_by_hash.get(&hash_api_key(secret))?)?;
        let tenant_live = self.tenants.get(&key.tenant_id).is_some_and(|t| !t.erased);
        let valid = !key.revoked && key.expires_at.is_none_or(|at| at > now) && tenant_live;
        valid.then_some(key)
    }

    pub fn tenant(&self, tenant_id: Uuid) -> Option<&TenantInfo> {
        self.tenants.get(&tenant_id)
    }

    pub fn key(&self, key_id: Uuid) -> Option<&ApiKeyInfo> {
        self.keys.get(&key_id)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantInfo> {
        self.tenants.values()
    }

    pub fn keys(&self) -> impl Iterator<Item = &ApiKeyInfo> {
        self.keys.values()
    }
}

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
            events.iter().for_each(|event| state.apply(event));
        }
        self.applied.send_replace(last.position.offset + 1);
    }

    /// Tails the control topic until `shutdown`, applying new events as they are appended. When
    /// tenants appear or go, `keys` is reloaded first: another node may have made their keys.
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
                            matches!(e.payload, Payload::TenantCreated(_) | Payload::TenantErased(_))
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

    /// The key a client presented, if valid now.
    pub fn authenticate(&self, secret: &str) -> Option<ApiKeyInfo> {
        self.read(|state| state.authenticate(secret, now_micros()).cloned())
    }
}

#[cfg(test)]
mod tests {
    use loom_schemas::crypto::NewApiKey;
    use loom_schemas::event::{ApiKeyIssued, ApiKeyRevoked, Envelope, TenantCreated, TenantErased};

    use super::*;

    fn event(tenant_id: Uuid, payload: impl Into<Payload>) -> Event {
        Event {
            envelope: Envelope::new(tenant_id, None, "test"),
            payload: payload.into(),
        }
    }

    fn issued(key: &NewApiKey, expires_at: Option<i64>) -> ApiKeyIssued {
        ApiKeyIssued {
            key_id: Uuid::now_v7(),
            project_id: None,
            name: None,
            key_hash: key.hash.to_vec(),
            prefix: key.prefix.clone(),
            roles: vec!["inference".into()],
            expires_at,
        }
    }

    #[test]
    fn keys_authenticate_until_revoked_expired_or_their_tenant_erased() {
        let (acme, globex) = (Uuid::now_v7(), Uuid::now_v7());
        let mut state = ControlState::default();
        let now = now_micros();
        let [live, revoked, expired, erased] = [(); 4].map(|()| NewApiKey::generate().unwrap());
        state.apply(&event(
            acme,
            TenantCreated {
                name: "acme".into(),
            },
        ));
        state.apply(&event(
            globex,
            TenantCreated {
                name: "globex".into(),
            },
        ));
        let live_issued = issued(&live, Some(now + 60_000_000));
        state.apply(&event(acme, live_issued.clone()));
        let revoked_issued = issued(&revoked, None);
        state.apply(&event(acme, revoked_issued.clone()));
        state.apply(&event(acme, issued(&expired, Some(now - 1))));
        state.apply(&event(globex, issued(&erased, None)));

        // A revocation sent under another tenant's id changes nothing.
        state.apply(&event(
            globex,
            ApiKeyRevoked {
                key_id: revoked_issued.key_id,
                reason: None,
            },
        ));
        assert!(state.authenticate(&revoked.secret, now).is_some());
        state.apply(&event(
            acme,
            ApiKeyRevoked {
                key_id: revoked_issued.key_id,
                reason: None,
            },
        ));
        state.apply(&event(globex, TenantErased { reason: None }));

        let key = state.authenticate(&live.secret, now).unwrap();
        assert_eq!((key.key_id, key.tenant_id), (live_issued.key_id, acme));
        assert!(state.authenticate(&revoked.secret, now).is_none());
        assert!(state.authenticate(&expired.secret, now).is_none());
        assert!(state.authenticate(&erased.secret, now).is_none());
        assert!(state.authenticate("loom-not-a-key", now).is_none());
        assert!(state.authenticate(&live.secret, now + 61_000_000).is_none());
    }
}
