//! The control plane's rules, in one place: a pure fold of the control topic that decides what
//! each event changes — who may create, issue, revoke, erase, set and grant. The gateway keeps
//! the state in memory and authenticates against it; the projector writes the changes it returns
//! into the read models. Both see the same events through the same rules, so they agree.
//!
//! An event the rules refuse (a revocation under another tenant's id, a key for an unknown or
//! erased tenant, a duplicate) changes nothing anywhere; [`ControlState::apply`] says why.

use std::collections::HashMap;

use uuid::Uuid;

use crate::crypto::hash_api_key;
use crate::event::{Event, Payload, QuotaMetric, QuotaScope, QuotaWindow, TimestampMicros};

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

/// A change to the control plane that the rules accepted, with the time of its event.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlChange {
    TenantCreated {
        tenant_id: Uuid,
        name: String,
        at: TimestampMicros,
    },
    TenantErased {
        tenant_id: Uuid,
        at: TimestampMicros,
    },
    ProjectCreated {
        project_id: Uuid,
        tenant_id: Uuid,
        name: String,
        routing_policy: Option<String>,
        security_policy: Option<String>,
        at: TimestampMicros,
    },
    ProjectUpdated {
        project_id: Uuid,
        name: Option<String>,
        routing_policy: Option<String>,
        security_policy: Option<String>,
        at: TimestampMicros,
    },
    KeyIssued {
        key: ApiKeyInfo,
        key_hash: [u8; 32],
        at: TimestampMicros,
    },
    KeyRevoked {
        key_id: Uuid,
        tenant_id: Uuid,
        reason: Option<String>,
        at: TimestampMicros,
    },
    QuotaLimitSet {
        tenant_id: Uuid,
        scope: QuotaScope,
        scope_id: String,
        metric: QuotaMetric,
        window: QuotaWindow,
        limit: Option<i64>,
        at: TimestampMicros,
    },
    RoleGranted {
        tenant_id: Uuid,
        principal: String,
        role: String,
        project_id: Option<Uuid>,
        at: TimestampMicros,
    },
    RoleRevoked {
        tenant_id: Uuid,
        principal: String,
        role: String,
        project_id: Option<Uuid>,
    },
    /// The embedded log's data head, anchored at this offset.
    Anchored { offset: u64 },
}

/// Why the rules refused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a control-plane event")]
    NotControl,
    #[error("the tenant already exists")]
    DuplicateTenant,
    #[error("no such tenant")]
    UnknownTenant,
    #[error("the tenant is erased")]
    ErasedTenant,
    #[error("a key with this id or hash already exists")]
    DuplicateKey,
    #[error("the key hash is not 32 bytes")]
    MalformedKey,
    #[error("no such key")]
    UnknownKey,
    #[error("the key belongs to another tenant")]
    OtherTenantsKey,
    #[error("the key is already revoked")]
    AlreadyRevoked,
    #[error("the project already exists")]
    DuplicateProject,
    #[error("no such project for this tenant")]
    UnknownProject,
}

/// The state the control topic folds into. Pure: the same events give the same state.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    tenants: HashMap<Uuid, TenantInfo>,
    keys: HashMap<Uuid, ApiKeyInfo>,
    key_by_hash: HashMap<[u8; 32], Uuid>,
    /// Project → its tenant.
    projects: HashMap<Uuid, Uuid>,
    anchored: Option<u64>,
}

impl ControlState {
    /// Judges `event` by the rules against the state so far and, if they accept it, applies it:
    /// the change it makes, or why it makes none.
    pub fn apply(&mut self, event: &Event) -> Result<ControlChange, Refused> {
        let tenant_id = event.envelope.tenant_id;
        let at = event.envelope.occurred_at;
        match &event.payload {
            Payload::TenantCreated(created) => {
                if self.tenants.contains_key(&tenant_id) {
                    return Err(Refused::DuplicateTenant);
                }
                self.tenants.insert(
                    tenant_id,
                    TenantInfo {
                        tenant_id,
                        name: created.name.clone(),
                        erased: false,
                    },
                );
                Ok(ControlChange::TenantCreated {
                    tenant_id,
                    name: created.name.clone(),
                    at,
                })
            }
            Payload::TenantErased(_) => {
                self.live_tenant(tenant_id)?;
                if let Some(tenant) = self.tenants.get_mut(&tenant_id) {
                    tenant.erased = true;
                }
                Ok(ControlChange::TenantErased { tenant_id, at })
            }
            Payload::ProjectCreated(created) => {
                self.live_tenant(tenant_id)?;
                if self.projects.contains_key(&created.project_id) {
                    return Err(Refused::DuplicateProject);
                }
                self.projects.insert(created.project_id, tenant_id);
                Ok(ControlChange::ProjectCreated {
                    project_id: created.project_id,
                    tenant_id,
                    name: created.name.clone(),
                    routing_policy: created.routing_policy.clone(),
                    security_policy: created.security_policy.clone(),
                    at,
                })
            }
            Payload::ProjectUpdated(updated) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, Some(updated.project_id))?;
                Ok(ControlChange::ProjectUpdated {
                    project_id: updated.project_id,
                    name: updated.name.clone(),
                    routing_policy: updated.routing_policy.clone(),
                    security_policy: updated.security_policy.clone(),
                    at,
                })
            }
            Payload::ApiKeyIssued(issued) => {
                let key_hash = <[u8; 32]>::try_from(issued.key_hash.as_slice())
                    .map_err(|_| Refused::MalformedKey)?;
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, issued.project_id)?;
                if self.keys.contains_key(&issued.key_id)
                    || self.key_by_hash.contains_key(&key_hash)
                {
                    return Err(Refused::DuplicateKey);
                }
                let key = ApiKeyInfo {
                    key_id: issued.key_id,
                    tenant_id,
                    project_id: issued.project_id,
                    name: issued.name.clone(),
                    prefix: issued.prefix.clone(),
                    roles: issued.roles.clone(),
                    expires_at: issued.expires_at,
                    revoked: false,
                };
                self.key_by_hash.insert(key_hash, issued.key_id);
                self.keys.insert(issued.key_id, key.clone());
                Ok(ControlChange::KeyIssued { key, key_hash, at })
            }
            Payload::ApiKeyRevoked(revoked) => {
                let key = self
                    .keys
                    .get_mut(&revoked.key_id)
                    .ok_or(Refused::UnknownKey)?;
                // Only the key's own tenant can revoke it.
                if key.tenant_id != tenant_id {
                    return Err(Refused::OtherTenantsKey);
                }
                if key.revoked {
                    return Err(Refused::AlreadyRevoked);
                }
                key.revoked = true;
                Ok(ControlChange::KeyRevoked {
                    key_id: revoked.key_id,
                    tenant_id,
                    reason: revoked.reason.clone(),
                    at,
                })
            }
            Payload::QuotaLimitSet(set) => {
                self.live_tenant(tenant_id)?;
                Ok(ControlChange::QuotaLimitSet {
                    tenant_id,
                    scope: set.scope,
                    scope_id: set.scope_id.clone(),
                    metric: set.metric,
                    window: set.window,
                    limit: set.limit,
                    at,
                })
            }
            Payload::RoleGranted(granted) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, granted.project_id)?;
                Ok(ControlChange::RoleGranted {
                    tenant_id,
                    principal: granted.principal.clone(),
                    role: granted.role.clone(),
                    project_id: granted.project_id,
                    at,
                })
            }
            Payload::RoleRevoked(revoked) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, revoked.project_id)?;
                Ok(ControlChange::RoleRevoked {
                    tenant_id,
                    principal: revoked.principal.clone(),
                    role: revoked.role.clone(),
                    project_id: revoked.project_id,
                })
            }
            Payload::LogAnchored(anchored) => {
                let offset = u64::try_from(anchored.offset).unwrap_or(0);
                if anchored.topic == crate::log::Topic::Data.name() {
                    self.anchored = Some(offset);
                }
                Ok(ControlChange::Anchored { offset })
            }
            Payload::RequestReceived(_)
            | Payload::PolicyEvaluated(_)
            | Payload::RoutingDecided(_)
            | Payload::LlmCallCompleted(_)
            | Payload::ToolCallObserved(_)
            | Payload::QuotaConsumed(_)
            | Payload::QuotaDenied(_)
            | Payload::RequestCompleted(_) => Err(Refused::NotControl),
        }
    }

    fn live_tenant(&self, tenant_id: Uuid) -> Result<&TenantInfo, Refused> {
        match self.tenants.get(&tenant_id) {
            None => Err(Refused::UnknownTenant),
            Some(tenant) if tenant.erased => Err(Refused::ErasedTenant),
            Some(tenant) => Ok(tenant),
        }
    }

    /// A project named by an event must be the event's tenant's.
    fn own_project(&self, tenant_id: Uuid, project_id: Option<Uuid>) -> Result<(), Refused> {
        match project_id {
            Some(project) if self.projects.get(&project) != Some(&tenant_id) => {
                Err(Refused::UnknownProject)
            }
            _ => Ok(()),
        }
    }

    /// The data offset of the latest `log.anchored` event.
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

    /// The tenant a project belongs to.
    pub fn project_tenant(&self, project_id: Uuid) -> Option<Uuid> {
        self.projects.get(&project_id).copied()
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

#[cfg(test)]
mod tests {
    use crate::crypto::NewApiKey;
    use crate::event::{
        ApiKeyIssued, ApiKeyRevoked, Envelope, ProjectCreated, TenantCreated, TenantErased,
        now_micros,
    };

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

    fn created(name: &str) -> TenantCreated {
        TenantCreated { name: name.into() }
    }

    #[test]
    fn keys_authenticate_until_revoked_expired_or_their_tenant_erased() {
        let (acme, globex) = (Uuid::now_v7(), Uuid::now_v7());
        let mut state = ControlState::default();
        let now = now_micros();
        let [live, revoked, expired, erased] = [(); 4].map(|()| NewApiKey::generate().unwrap());
        state.apply(&event(acme, created("acme"))).unwrap();
        state.apply(&event(globex, created("globex"))).unwrap();
        let live_issued = issued(&live, Some(now + 60_000_000));
        state.apply(&event(acme, live_issued.clone())).unwrap();
        let revoked_issued = issued(&revoked, None);
        state.apply(&event(acme, revoked_issued.clone())).unwrap();
        state
            .apply(&event(acme, issued(&expired, Some(now - 1))))
            .unwrap();
        state.apply(&event(globex, issued(&erased, None))).unwrap();

        // A revocation sent under another tenant's id changes nothing.
        let revoke = ApiKeyRevoked {
            key_id: revoked_issued.key_id,
            reason: None,
        };
        assert_eq!(
            state.apply(&event(globex, revoke.clone())),
            Err(Refused::OtherTenantsKey)
        );
        assert!(state.authenticate(&revoked.secret, now).is_some());
        assert!(matches!(
            state.apply(&event(acme, revoke.clone())),
            Ok(ControlChange::KeyRevoked { .. })
        ));
        assert_eq!(
            state.apply(&event(acme, revoke)),
            Err(Refused::AlreadyRevoked)
        );
        state
            .apply(&event(globex, TenantErased { reason: None }))
            .unwrap();

        let key = state.authenticate(&live.secret, now).unwrap();
        assert_eq!((key.key_id, key.tenant_id), (live_issued.key_id, acme));
        assert!(state.authenticate(&revoked.secret, now).is_none());
        assert!(state.authenticate(&expired.secret, now).is_none());
        assert!(state.authenticate(&erased.secret, now).is_none());
        assert!(state.authenticate("loom-not-a-key", now).is_none());
        assert!(state.authenticate(&live.secret, now + 61_000_000).is_none());
    }

    #[test]
    fn the_rules_refuse_what_no_one_may_do() {
        let (acme, globex, nobody) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut state = ControlState::default();
        state.apply(&event(acme, created("acme"))).unwrap();
        state.apply(&event(globex, created("globex"))).unwrap();
        assert_eq!(
            state.apply(&event(acme, created("again"))),
            Err(Refused::DuplicateTenant)
        );
        let key = NewApiKey::generate().unwrap();
        assert_eq!(
            state.apply(&event(nobody, issued(&key, None))),
            Err(Refused::UnknownTenant)
        );
        // A key in another tenant's project, or in no project that exists.
        let project = Uuid::now_v7();
        state
            .apply(&event(
                globex,
                ProjectCreated {
                    project_id: project,
                    name: "p".into(),
                    routing_policy: None,
                    security_policy: None,
                },
            ))
            .unwrap();
        for project_id in [project, Uuid::now_v7()] {
            let foreign = ApiKeyIssued {
                project_id: Some(project_id),
                ..issued(&key, None)
            };
            assert_eq!(
                state.apply(&event(acme, foreign)),
                Err(Refused::UnknownProject)
            );
        }
        let first = issued(&key, None);
        state.apply(&event(acme, first.clone())).unwrap();
        assert_eq!(state.apply(&event(acme, first)), Err(Refused::DuplicateKey));
        assert_eq!(
            state.apply(&event(
                acme,
                ApiKeyRevoked {
                    key_id: Uuid::now_v7(),
                    reason: None
                }
            )),
            Err(Refused::UnknownKey)
        );
        state
            .apply(&event(acme, TenantErased { reason: None }))
            .unwrap();
        assert_eq!(
            state.apply(&event(acme, issued(&NewApiKey::generate().unwrap(), None))),
            Err(Refused::ErasedTenant)
        );
        assert_eq!(
            state.apply(&event(acme, TenantErased { reason: None })),
            Err(Refused::ErasedTenant)
        );
    }
}
