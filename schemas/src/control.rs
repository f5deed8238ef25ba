//! The control plane's rules, in one place: a pure fold of the control topic that decides what
//! each event changes — who may create, issue, revoke, erase, set and grant. The gateway keeps
//! the state in memory and authenticates against it; the projector writes the changes it returns
//! into the read models. Both see the same events through the same rules, so they agree.
//!
//! An event the rules refuse (a revocation under another tenant's id, a key for an unknown or
//! erased tenant, a duplicate) changes nothing anywhere; [`ControlState::apply`] says why.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::crypto::hash_api_key;
use crate::event::{Event, Payload, QuotaMetric, QuotaScope, QuotaWindow, Sealed, TimestampMicros};
use crate::project::{FeatureFlags, MAX_NAME_BYTES, RoutingPolicy, SecurityPolicy};
use crate::quota::{LimitKind, Limits};
use crate::roles::Role;

/// An API key as issued, and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub name: Option<String>,
    pub prefix: String,
    pub roles: Vec<String>,
    /// The role the key was issued with; what it may do now is [`ControlState::key_role`] (the
    /// same, or less if its owner's role is less). [`ControlState::authenticate`] gives keys with
    /// the role they have now.
    pub role: Role,
    /// The user the key acts for, if any.
    pub owner: Option<String>,
    pub expires_at: Option<TimestampMicros>,
    pub revoked: bool,
}

impl ApiKeyInfo {
    /// Who acts through the key: its owner, or the key itself (`key:<id>`) for a key that acts
    /// for no user. The keys a caller made are "their own".
    pub fn principal(&self) -> String {
        self.owner
            .clone()
            .unwrap_or_else(|| format!("key:{}", self.key_id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    pub tenant_id: Uuid,
    pub name: String,
    pub erased: bool,
}

/// A project and its configuration at its current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    pub project_id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    /// Shared, so requests take it without copying.
    pub routing: Arc<RoutingPolicy>,
    pub flags: FeatureFlags,
    /// The security policy; `None`: the default one.
    pub security: Option<Arc<SecurityPolicy>>,
    /// 1 when created, one more with every update.
    pub version: i64,
    /// The event that made the current version.
    pub last_event: Uuid,
    pub created_at: TimestampMicros,
    pub updated_at: TimestampMicros,
}

/// A role held by a user, in a whole tenant or in one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub tenant_id: Uuid,
    pub principal: String,
    pub role: Role,
    pub project_id: Option<Uuid>,
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
        feature_flags: Option<String>,
        at: TimestampMicros,
    },
    ProjectUpdated {
        project_id: Uuid,
        name: Option<String>,
        routing_policy: Option<String>,
        security_policy: Option<String>,
        feature_flags: Option<String>,
        version: i64,
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
    /// An upstream credential set or removed (the read models keep none).
    CredentialSet {
        tenant_id: Uuid,
        project_id: Option<Uuid>,
        upstream: String,
    },
    /// A dashboard user registered (the read models keep none yet).
    UserRegistered {
        tenant_id: Uuid,
        email: String,
        at: TimestampMicros,
    },
    /// A dashboard session started or ended, or a user's password set (the read models keep
    /// none of them).
    Session,
    /// The embedded log's data head, anchored at this offset.
    Anchored { offset: u64 },
    /// A tenant's data key got a new version (the key store holds it; the read models nothing).
    KeyRotated { tenant_id: Uuid, version: i32 },
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
    #[error("not a role (viewer, developer, admin, owner)")]
    UnknownRole,
    #[error("a user id is 1 to 256 bytes")]
    MalformedPrincipal,
    #[error("the project is at another version")]
    StaleVersion,
    #[error("a project document does not parse or check")]
    InvalidDocument,
    #[error("a limit out of range")]
    InvalidLimit,
    #[error("the quota's scope id names nothing of this tenant")]
    UnknownScope,
    #[error("a user with this email already exists")]
    DuplicateUser,
    #[error("an email is 3 to 256 bytes with an @, lowercased")]
    MalformedEmail,
    #[error("a session is the 32-byte digest of its secret, for a user or key of its tenant")]
    MalformedSession,
    #[error("no such session")]
    UnknownSession,
    #[error("no such user in this tenant")]
    UnknownUser,
}

/// A role held in a whole tenant (`None`) or in one project.
type Held = (Option<Uuid>, Role);

/// The state the control topic folds into. Pure: the same events give the same state.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    tenants: HashMap<Uuid, TenantInfo>,
    keys: HashMap<Uuid, ApiKeyInfo>,
    key_by_hash: HashMap<[u8; 32], Uuid>,
    projects: HashMap<Uuid, ProjectInfo>,
    /// Tenant → user → the roles they hold.
    grants: HashMap<Uuid, HashMap<String, Vec<Held>>>,
    /// (tenant, scope) → scope id → the limits set on it.
    limits: HashMap<(Uuid, QuotaScope), HashMap<String, Limits>>,
    /// (tenant, project or the whole tenant, upstream) → its credential.
    credentials: HashMap<(Uuid, Option<Uuid>, String), CredentialInfo>,
    /// Dashboard users by email (unique across tenants: an email signs in to one tenant).
    users: HashMap<String, UserInfo>,
    /// Dashboard sessions by the digest of their secret; expired ones are dropped as later
    /// sessions start.
    sessions: HashMap<[u8; 32], SessionInfo>,
    anchored: Option<u64>,
}

/// A dashboard user, as registered (the password's hash sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub tenant_id: Uuid,
    pub email: String,
    /// The argon2id PHC string, sealed with the tenant's data key under `event_id`.
    pub password: Sealed,
    pub event_id: Uuid,
    pub registered_at: TimestampMicros,
}

/// A dashboard session as started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub tenant_id: Uuid,
    pub principal: String,
    pub api_key_id: Option<Uuid>,
    pub started_at: TimestampMicros,
    pub expires_at: TimestampMicros,
}

/// A session valid now, with what its holder may do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub tenant_id: Uuid,
    pub principal: String,
    pub role: Role,
    /// The project its holder acts in only (a key bound to one, or a user whose only roles
    /// are in one project).
    pub project_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub expires_at: TimestampMicros,
}

/// An upstream credential of a tenant or project, as its event carries it (the key sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub upstream: String,
    pub base_url: Option<String>,
    pub api_key: Sealed,
    pub fingerprint: Option<String>,
    /// The event that set it: the key is sealed under its id.
    pub event_id: Uuid,
    pub set_at: TimestampMicros,
}

/// The longest upstream name an event may name (bytes).
const MAX_UPSTREAM_NAME: usize = 128;

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
                self.limits.retain(|(tenant, _), _| *tenant != tenant_id);
                self.credentials
                    .retain(|(tenant, _, _), _| *tenant != tenant_id);
                self.users.retain(|_, user| user.tenant_id != tenant_id);
                self.sessions.retain(|_, s| s.tenant_id != tenant_id);
                Ok(ControlChange::TenantErased { tenant_id, at })
            }
            Payload::TenantKeyRotated(rotated) => {
                self.live_tenant(tenant_id)?;
                Ok(ControlChange::KeyRotated {
                    tenant_id,
                    version: rotated.version,
                })
            }
            Payload::ProjectCreated(created) => {
                self.live_tenant(tenant_id)?;
                if self.projects.contains_key(&created.project_id) {
                    return Err(Refused::DuplicateProject);
                }
                let routing = document(created.routing_policy.as_deref(), RoutingPolicy::parse)?;
                let flags = document(created.feature_flags.as_deref(), FeatureFlags::parse)?;
                let security = document(created.security_policy.as_deref(), SecurityPolicy::parse)?;
                self.projects.insert(
                    created.project_id,
                    ProjectInfo {
                        project_id: created.project_id,
                        tenant_id,
                        name: created.name.clone(),
                        routing: Arc::new(routing.unwrap_or_default()),
                        flags: flags.unwrap_or_default(),
                        security: security.map(Arc::new),
                        version: 1,
                        last_event: event.envelope.event_id,
                        created_at: at,
                        updated_at: at,
                    },
                );
                Ok(ControlChange::ProjectCreated {
                    project_id: created.project_id,
                    tenant_id,
                    name: created.name.clone(),
                    routing_policy: created.routing_policy.clone(),
                    security_policy: created.security_policy.clone(),
                    feature_flags: created.feature_flags.clone(),
                    at,
                })
            }
            Payload::ProjectUpdated(updated) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, Some(updated.project_id))?;
                let routing = document(updated.routing_policy.as_deref(), RoutingPolicy::parse)?;
                let flags = document(updated.feature_flags.as_deref(), FeatureFlags::parse)?;
                let security = document(updated.security_policy.as_deref(), SecurityPolicy::parse)?;
                let project = self
                    .projects
                    .get_mut(&updated.project_id)
                    .ok_or(Refused::UnknownProject)?;
                let version = project.version + 1;
                if updated.version.is_some_and(|v| v != version) {
                    return Err(Refused::StaleVersion);
                }
                if let Some(name) = &updated.name {
                    project.name.clone_from(name);
                }
                if let Some(routing) = routing {
                    project.routing = Arc::new(routing);
                }
                if let Some(flags) = flags {
                    project.flags = flags;
                }
                if let Some(security) = security {
                    project.security = Some(Arc::new(security));
                }
                project.version = version;
                project.last_event = event.envelope.event_id;
                project.updated_at = at;
                Ok(ControlChange::ProjectUpdated {
                    project_id: updated.project_id,
                    name: updated.name.clone(),
                    routing_policy: updated.routing_policy.clone(),
                    security_policy: updated.security_policy.clone(),
                    feature_flags: updated.feature_flags.clone(),
                    version,
                    at,
                })
            }
            Payload::ApiKeyIssued(issued) => {
                let key_hash = <[u8; 32]>::try_from(issued.key_hash.as_slice())
                    .map_err(|_| Refused::MalformedKey)?;
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, issued.project_id)?;
                let role = Role::highest(&issued.roles).ok_or(Refused::UnknownRole)?;
                if let Some(owner) = &issued.owner {
                    check_principal(owner)?;
                }
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
                    role,
                    owner: issued.owner.clone(),
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
                self.check_scope(tenant_id, set.scope, &set.scope_id)?;
                // A limit the gateway enforces is checked and kept for it; other pairs (e.g.
                // requests per day) are read models' and alerts' only.
                if let Some(kind) = LimitKind::of(set.metric, set.window) {
                    if let Some(limit) = set.limit {
                        kind.check(limit).map_err(|_| Refused::InvalidLimit)?;
                    }
                    let scopes = self.limits.entry((tenant_id, set.scope)).or_default();
                    let limits = scopes.entry(set.scope_id.clone()).or_default();
                    limits.set(kind, set.limit);
                    if limits.is_empty() {
                        scopes.remove(&set.scope_id);
                    }
                }
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
                check_principal(&granted.principal)?;
                let role = Role::parse(&granted.role).ok_or(Refused::UnknownRole)?;
                let held = self
                    .grants
                    .entry(tenant_id)
                    .or_default()
                    .entry(granted.principal.clone())
                    .or_default();
                if !held.contains(&(granted.project_id, role)) {
                    held.push((granted.project_id, role));
                }
                Ok(ControlChange::RoleGranted {
                    tenant_id,
                    principal: granted.principal.clone(),
                    role: role.name().to_owned(),
                    project_id: granted.project_id,
                    at,
                })
            }
            Payload::RoleRevoked(revoked) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, revoked.project_id)?;
                let role = Role::parse(&revoked.role).ok_or(Refused::UnknownRole)?;
                if let Some(held) = self
                    .grants
                    .get_mut(&tenant_id)
                    .and_then(|users| users.get_mut(&revoked.principal))
                {
                    held.retain(|grant| *grant != (revoked.project_id, role));
                }
                Ok(ControlChange::RoleRevoked {
                    tenant_id,
                    principal: revoked.principal.clone(),
                    role: role.name().to_owned(),
                    project_id: revoked.project_id,
                })
            }
            Payload::UpstreamCredentialSet(set) => {
                self.live_tenant(tenant_id)?;
                self.own_project(tenant_id, set.project_id)?;
                if set.upstream.is_empty() || set.upstream.len() > MAX_UPSTREAM_NAME {
                    return Err(Refused::InvalidDocument);
                }
                if let Some(url) = &set.base_url
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    return Err(Refused::InvalidDocument);
                }
                let scope = (tenant_id, set.project_id, set.upstream.clone());
                match &set.api_key {
                    Some(api_key) => {
                        self.credentials.insert(
                            scope,
                            CredentialInfo {
                                tenant_id,
                                project_id: set.project_id,
                                upstream: set.upstream.clone(),
                                base_url: set.base_url.clone(),
                                api_key: api_key.clone(),
                                fingerprint: set.fingerprint.clone(),
                                event_id: event.envelope.event_id,
                                set_at: at,
                            },
                        );
                    }
                    None => {
                        self.credentials.remove(&scope);
                    }
                }
                Ok(ControlChange::CredentialSet {
                    tenant_id,
                    project_id: set.project_id,
                    upstream: set.upstream.clone(),
                })
            }
            Payload::UserRegistered(registered) => {
                self.live_tenant(tenant_id)?;
                let email = &registered.email;
                let normal = email.len() >= 3
                    && email.len() <= MAX_NAME_BYTES
                    && email.contains('@')
                    && *email == normalize_email(email);
                if !normal {
                    return Err(Refused::MalformedEmail);
                }
                if self.users.contains_key(email) {
                    return Err(Refused::DuplicateUser);
                }
                self.users.insert(
                    email.clone(),
                    UserInfo {
                        tenant_id,
                        email: email.clone(),
                        password: registered.password.clone(),
                        event_id: event.envelope.event_id,
                        registered_at: at,
                    },
                );
                Ok(ControlChange::UserRegistered {
                    tenant_id,
                    email: email.clone(),
                    at,
                })
            }
            Payload::UserPasswordSet(set) => {
                self.live_tenant(tenant_id)?;
                let user = (self.users.get_mut(&set.email))
                    .filter(|user| user.tenant_id == tenant_id)
                    .ok_or(Refused::UnknownUser)?;
                user.password = set.password.clone();
                user.event_id = event.envelope.event_id;
                Ok(ControlChange::Session)
            }
            Payload::SessionStarted(started) => {
                self.live_tenant(tenant_id)?;
                let digest: [u8; 32] = started
                    .session
                    .as_slice()
                    .try_into()
                    .map_err(|_| Refused::MalformedSession)?;
                let holder = match started.api_key_id {
                    Some(key) => self.keys.get(&key).map(|k| k.tenant_id),
                    None => self.users.get(&started.principal).map(|u| u.tenant_id),
                };
                if holder != Some(tenant_id) {
                    return Err(Refused::MalformedSession);
                }
                if self.sessions.contains_key(&digest) {
                    return Err(Refused::MalformedSession);
                }
                self.sessions.retain(|_, s| s.expires_at > at);
                self.sessions.insert(
                    digest,
                    SessionInfo {
                        tenant_id,
                        principal: started.principal.clone(),
                        api_key_id: started.api_key_id,
                        started_at: at,
                        expires_at: started.expires_at,
                    },
                );
                Ok(ControlChange::Session)
            }
            Payload::SessionEnded(ended) => {
                let digest: [u8; 32] = ended
                    .session
                    .as_slice()
                    .try_into()
                    .map_err(|_| Refused::UnknownSession)?;
                match self.sessions.get(&digest) {
                    Some(session) if session.tenant_id == tenant_id => {
                        self.sessions.remove(&digest);
                        Ok(ControlChange::Session)
                    }
                    _ => Err(Refused::UnknownSession),
                }
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
            | Payload::CacheHit(_)
            | Payload::QuotaReserved(_)
            | Payload::QuotaConsumed(_)
            | Payload::QuotaReleased(_)
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
            Some(project) if self.project_tenant(project) != Some(tenant_id) => {
                Err(Refused::UnknownProject)
            }
            _ => Ok(()),
        }
    }

    /// A quota's scope id must name something of the tenant: itself, one of its projects or
    /// keys, or a user id of 1 to 256 bytes.
    fn check_scope(&self, tenant_id: Uuid, scope: QuotaScope, id: &str) -> Result<(), Refused> {
        let uuid = || Uuid::parse_str(id).map_err(|_| Refused::UnknownScope);
        match scope {
            QuotaScope::Tenant if uuid()? == tenant_id => Ok(()),
            QuotaScope::Project => self.own_project(tenant_id, Some(uuid()?)),
            QuotaScope::ApiKey => match self.keys.get(&uuid()?) {
                Some(key) if key.tenant_id == tenant_id => Ok(()),
                _ => Err(Refused::UnknownKey),
            },
            QuotaScope::User => check_principal(id),
            QuotaScope::Tenant => Err(Refused::UnknownScope),
        }
    }

    /// The limits set on a scope (`id`: a tenant, project or key id, or a user id).
    pub fn limits(&self, tenant_id: Uuid, scope: QuotaScope, id: &str) -> Limits {
        self.limits
            .get(&(tenant_id, scope))
            .and_then(|scopes| scopes.get(id))
            .copied()
            .unwrap_or_default()
    }

    /// Every scope of a kind with limits set in a tenant.
    pub fn limits_of(
        &self,
        tenant_id: Uuid,
        scope: QuotaScope,
    ) -> impl Iterator<Item = (&str, &Limits)> {
        self.limits
            .get(&(tenant_id, scope))
            .into_iter()
            .flat_map(|scopes| scopes.iter().map(|(id, limits)| (id.as_str(), limits)))
    }

    /// The data offset of the latest `log.anchored` event.
    pub fn anchored(&self) -> Option<u64> {
        self.anchored
    }

    /// The key a client presented, if it is valid now — issued, not revoked, not expired, its
    /// tenant not erased, and its owner (if it has one) still holding a role — with the role it
    /// has now.
    pub fn authenticate(&self, secret: &str, now: TimestampMicros) -> Option<ApiKeyInfo> {
        let key = self
            .keys
            .get(self.key_by_hash.get(&hash_api_key(secret))?)?;
        let tenant_live = self.tenants.get(&key.tenant_id).is_some_and(|t| !t.erased);
        let valid = !key.revoked && key.expires_at.is_none_or(|at| at > now) && tenant_live;
        let role = self.key_role(key).filter(|_| valid)?;
        Some(ApiKeyInfo {
            role,
            ..key.clone()
        })
    }

    /// What a key may do now: the role it was issued with, capped by its owner's role now (in
    /// the key's project, or the tenant); `None` if its owner holds none any more. A key made by
    /// a key that acts for no user acts for that key (`key:<id>`): it is capped by it and stops
    /// when it is revoked.
    pub fn key_role(&self, key: &ApiKeyInfo) -> Option<Role> {
        self.key_role_within(key, 16)
    }

    fn key_role_within(&self, key: &ApiKeyInfo, depth: u8) -> Option<Role> {
        let Some(owner) = &key.owner else {
            return Some(key.role);
        };
        let held = match owner.strip_prefix("key:").map(Uuid::parse_str) {
            Some(Ok(maker)) => {
                let maker = self.keys.get(&maker)?;
                let usable = !maker.revoked && maker.tenant_id == key.tenant_id && depth > 0;
                usable.then(|| self.key_role_within(maker, depth - 1))??
            }
            _ => self.role_of(key.tenant_id, owner, key.project_id)?,
        };
        Some(held.min(key.role))
    }

    /// The highest role `principal` holds in a tenant, or in one of its projects (a role in the
    /// whole tenant counts in each project).
    pub fn role_of(&self, tenant_id: Uuid, principal: &str, project: Option<Uuid>) -> Option<Role> {
        self.grants
            .get(&tenant_id)?
            .get(principal)?
            .iter()
            .filter(|(scope, _)| scope.is_none() || *scope == project)
            .map(|(_, role)| *role)
            .max()
    }

    /// Every role held in a tenant, by user.
    pub fn grants(&self, tenant_id: Uuid) -> impl Iterator<Item = Grant> + '_ {
        self.grants
            .get(&tenant_id)
            .into_iter()
            .flat_map(move |users| {
                users.iter().flat_map(move |(principal, held)| {
                    held.iter().map(move |(project_id, role)| Grant {
                        tenant_id,
                        principal: principal.clone(),
                        role: *role,
                        project_id: *project_id,
                    })
                })
            })
    }

    /// A dashboard user by email (as [`normalize_email`] gives it).
    pub fn user(&self, email: &str) -> Option<&UserInfo> {
        self.users.get(email)
    }

    /// Whether any dashboard user has registered.
    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    /// The dashboard users of a tenant, by email.
    pub fn users(&self, tenant_id: Uuid) -> Vec<&UserInfo> {
        let mut users: Vec<&UserInfo> = (self.users.values())
            .filter(|u| u.tenant_id == tenant_id)
            .collect();
        users.sort_by(|a, b| a.email.cmp(&b.email));
        users
    }

    /// The session whose secret digests to `digest`, if it is valid now — not ended or expired,
    /// its tenant live, its key (if signed in with one) still valid, its user still holding a
    /// role — with what its holder may do now.
    pub fn session(&self, digest: &[u8; 32], now: TimestampMicros) -> Option<SignedIn> {
        let session = self.sessions.get(digest).filter(|s| s.expires_at > now)?;
        self.live_tenant(session.tenant_id).ok()?;
        let (role, project_id) = match session.api_key_id {
            Some(key_id) => {
                let key = self.keys.get(&key_id)?;
                let valid = !key.revoked && key.expires_at.is_none_or(|at| at > now);
                (self.key_role(key).filter(|_| valid)?, key.project_id)
            }
            None => match self.role_of(session.tenant_id, &session.principal, None) {
                Some(role) => (role, None),
                // Roles in projects only: the highest, in its project.
                None => self
                    .grants
                    .get(&session.tenant_id)?
                    .get(&session.principal)?
                    .iter()
                    .filter_map(|(project, role)| Some((*role, Some((*project)?))))
                    .max()?,
            },
        };
        Some(SignedIn {
            tenant_id: session.tenant_id,
            principal: session.principal.clone(),
            role,
            project_id,
            api_key_id: session.api_key_id,
            expires_at: session.expires_at,
        })
    }

    pub fn tenant(&self, tenant_id: Uuid) -> Option<&TenantInfo> {
        self.tenants.get(&tenant_id)
    }

    /// The tenant a project belongs to.
    pub fn project_tenant(&self, project_id: Uuid) -> Option<Uuid> {
        self.projects.get(&project_id).map(|p| p.tenant_id)
    }

    /// The credential a request of `tenant_id` in `project_id` uses for `upstream`: the
    /// project's own, else the tenant's.
    pub fn credential(
        &self,
        tenant_id: Uuid,
        project_id: Option<Uuid>,
        upstream: &str,
    ) -> Option<&CredentialInfo> {
        if self.credentials.is_empty() {
            return None;
        }
        let mut scope = (tenant_id, project_id, upstream.to_owned());
        if project_id.is_some()
            && let Some(credential) = self.credentials.get(&scope)
        {
            return Some(credential);
        }
        scope.1 = None;
        self.credentials.get(&scope)
    }

    /// Every credential of a tenant (keys sealed), by project then upstream.
    pub fn credentials(&self, tenant_id: Uuid) -> Vec<&CredentialInfo> {
        let mut found: Vec<&CredentialInfo> = self
            .credentials
            .values()
            .filter(|c| c.tenant_id == tenant_id)
            .collect();
        found.sort_by(|a, b| (a.project_id, &a.upstream).cmp(&(b.project_id, &b.upstream)));
        found
    }

    pub fn project(&self, project_id: Uuid) -> Option<&ProjectInfo> {
        self.projects.get(&project_id)
    }

    pub fn projects(&self) -> impl Iterator<Item = &ProjectInfo> {
        self.projects.values()
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

/// A project document: absent, or one that parses and checks.
fn document<T>(
    json: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, Refused> {
    json.map(parse)
        .transpose()
        .map_err(|_| Refused::InvalidDocument)
}

/// An email as users are known by: trimmed and lowercased.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// A user id: 1 to 256 bytes.
fn check_principal(principal: &str) -> Result<(), Refused> {
    match principal.is_empty() || principal.len() > MAX_NAME_BYTES {
        true => Err(Refused::MalformedPrincipal),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::crypto::NewApiKey;
    use crate::event::{
        ApiKeyIssued, ApiKeyRevoked, Envelope, ProjectCreated, ProjectUpdated, RoleGranted,
        RoleRevoked, TenantCreated, TenantErased, now_micros,
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
            owner: None,
        }
    }

    fn created(name: &str) -> TenantCreated {
        TenantCreated { name: name.into() }
    }

    #[test]
    fn users_and_sessions_follow_the_rules_and_end_with_their_role_or_tenant() {
        use crate::event::{SessionEnded, SessionStarted, UserRegistered};
        let mut state = ControlState::default();
        let (acme, other) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_micros();
        state.apply(&event(acme, created("acme"))).unwrap();
        state.apply(&event(other, created("other"))).unwrap();
        let user = |email: &str| UserRegistered {
            email: email.into(),
            password: Sealed(vec![1; 60]),
        };
        state.apply(&event(acme, user("ada@acme.test"))).unwrap();
        // One email, one user; emails are kept lowercased and must look like one.
        assert_eq!(
            state.apply(&event(other, user("ada@acme.test"))),
            Err(Refused::DuplicateUser)
        );
        for bad in ["Ada@acme.test", "ada", " ada@acme.test"] {
            assert_eq!(
                state.apply(&event(acme, user(bad))),
                Err(Refused::MalformedEmail)
            );
        }
        let grant = RoleGranted {
            principal: "ada@acme.test".into(),
            role: "admin".into(),
            project_id: None,
        };
        state.apply(&event(acme, grant)).unwrap();
        let started = |digest: u8, principal: &str, expires_at| SessionStarted {
            session: vec![digest; 32],
            principal: principal.into(),
            api_key_id: None,
            expires_at,
        };
        // A session of a user of another tenant, a short digest, or a stranger: refused.
        let hour = 3_600_000_000;
        for (tenant, session) in [
            (other, started(1, "ada@acme.test", now + hour)),
            (
                acme,
                SessionStarted {
                    session: vec![1; 31],
                    ..started(1, "ada@acme.test", now + hour)
                },
            ),
            (acme, started(1, "eve@acme.test", now + hour)),
        ] {
            assert_eq!(
                state.apply(&event(tenant, session)),
                Err(Refused::MalformedSession)
            );
        }
        state
            .apply(&event(acme, started(1, "ada@acme.test", now + hour)))
            .unwrap();
        let signed_in = state.session(&[1; 32], now).unwrap();
        assert_eq!((signed_in.tenant_id, signed_in.role), (acme, Role::Admin));
        assert_eq!(state.session(&[1; 32], now + hour), None, "expired");
        assert_eq!(state.session(&[2; 32], now), None, "unknown");
        // Another tenant cannot end it; its own can.
        let ended = || SessionEnded {
            session: vec![1; 32],
            reason: "signed_out".into(),
        };
        assert_eq!(
            state.apply(&event(other, ended())),
            Err(Refused::UnknownSession)
        );
        state.apply(&event(acme, ended())).unwrap();
        assert_eq!(state.session(&[1; 32], now), None);
        // A session ends with its user's last role, and with the tenant.
        state
            .apply(&event(acme, started(3, "ada@acme.test", now + hour)))
            .unwrap();
        let revoke = RoleRevoked {
            principal: "ada@acme.test".into(),
            role: "admin".into(),
            project_id: None,
        };
        state.apply(&event(acme, revoke)).unwrap();
        assert_eq!(state.session(&[3; 32], now), None);
        state
            .apply(&event(acme, TenantErased { reason: None }))
            .unwrap();
        assert!(state.user("ada@acme.test").is_none());
    }

    #[test]
    fn quota_limits_name_the_tenants_own_scopes_and_stay_in_range() {
        use crate::event::{QuotaLimitSet, QuotaMetric, QuotaWindow};
        let (acme, globex) = (Uuid::now_v7(), Uuid::now_v7());
        let mut state = ControlState::default();
        state.apply(&event(acme, created("acme"))).unwrap();
        state.apply(&event(globex, created("globex"))).unwrap();
        let project = Uuid::now_v7();
        let project_created = ProjectCreated {
            project_id: project,
            name: "p".into(),
            routing_policy: None,
            security_policy: None,
            feature_flags: None,
        };
        state.apply(&event(acme, project_created)).unwrap();
        let set = |scope, scope_id: &str, metric, window, limit| QuotaLimitSet {
            scope,
            scope_id: scope_id.into(),
            metric,
            window,
            limit,
        };
        let tokens =
            |scope, id: &str, limit| set(scope, id, QuotaMetric::Tokens, QuotaWindow::Day, limit);
        state
            .apply(&event(
                acme,
                tokens(QuotaScope::Project, &project.to_string(), Some(5)),
            ))
            .unwrap();
        state
            .apply(&event(acme, tokens(QuotaScope::User, "ada", Some(0))))
            .unwrap();
        let limits = state.limits(acme, QuotaScope::Project, &project.to_string());
        assert_eq!(limits.tokens_per_day, Some(5));
        assert_eq!(
            state.limits(acme, QuotaScope::User, "ada").tokens_per_day,
            Some(0)
        );
        // Another tenant's project, a malformed id, a user id too long, a limit out of range.
        for (tenant, bad, refused) in [
            (
                globex,
                tokens(QuotaScope::Project, &project.to_string(), Some(1)),
                Refused::UnknownProject,
            ),
            (
                acme,
                tokens(QuotaScope::Project, "p-1", Some(1)),
                Refused::UnknownScope,
            ),
            (
                acme,
                tokens(QuotaScope::Tenant, &globex.to_string(), Some(1)),
                Refused::UnknownScope,
            ),
            (
                acme,
                tokens(QuotaScope::User, &"u".repeat(257), Some(1)),
                Refused::MalformedPrincipal,
            ),
            (
                acme,
                tokens(QuotaScope::User, "ada", Some(-1)),
                Refused::InvalidLimit,
            ),
        ] {
            assert_eq!(state.apply(&event(tenant, bad)), Err(refused));
        }
        // A limit the gateway does not enforce is accepted for the read models, not kept here.
        let daily_requests = set(
            QuotaScope::Tenant,
            &acme.to_string(),
            QuotaMetric::Requests,
            QuotaWindow::Day,
            Some(10),
        );
        state.apply(&event(acme, daily_requests)).unwrap();
        assert!(
            state
                .limits(acme, QuotaScope::Tenant, &acme.to_string())
                .is_empty()
        );
        // `null` goes back to the default; erasure forgets the tenant's limits.
        state
            .apply(&event(acme, tokens(QuotaScope::User, "ada", None)))
            .unwrap();
        assert!(state.limits(acme, QuotaScope::User, "ada").is_empty());
        state
            .apply(&event(acme, TenantErased { reason: None }))
            .unwrap();
        assert!(
            state
                .limits(acme, QuotaScope::Project, &project.to_string())
                .is_empty()
        );
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
                    feature_flags: None,
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

    #[test]
    fn a_key_acting_for_a_user_has_at_most_the_users_role_and_stops_with_it() {
        let acme = Uuid::now_v7();
        let (support, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut state = ControlState::default();
        let now = now_micros();
        state.apply(&event(acme, created("acme"))).unwrap();
        for project_id in [support, other] {
            let project = ProjectCreated {
                project_id,
                name: "p".into(),
                routing_policy: None,
                security_policy: None,
                feature_flags: None,
            };
            state.apply(&event(acme, project)).unwrap();
        }
        let grant = |role: &str, project_id| RoleGranted {
            principal: "ada@example.com".into(),
            role: role.into(),
            project_id,
        };
        state.apply(&event(acme, grant("viewer", None))).unwrap();
        state
            .apply(&event(acme, grant("developer", Some(support))))
            .unwrap();
        let secret = NewApiKey::generate().unwrap();
        let admin_key = ApiKeyIssued {
            project_id: Some(support),
            roles: vec!["admin".into()],
            owner: Some("ada@example.com".into()),
            ..issued(&secret, None)
        };
        state.apply(&event(acme, admin_key)).unwrap();
        // Issued as admin, but Ada is a developer in `support` (and a viewer elsewhere).
        let role = |state: &ControlState| state.authenticate(&secret.secret, now).map(|k| k.role);
        assert_eq!(role(&state), Some(Role::Developer));
        assert_eq!(
            state.role_of(acme, "ada@example.com", Some(other)),
            Some(Role::Viewer)
        );
        let revoke = |role: &str, project_id| RoleRevoked {
            principal: "ada@example.com".into(),
            role: role.into(),
            project_id,
        };
        state
            .apply(&event(acme, revoke("developer", Some(support))))
            .unwrap();
        assert_eq!(role(&state), Some(Role::Viewer));
        state.apply(&event(acme, revoke("viewer", None))).unwrap();
        assert_eq!(
            role(&state),
            None,
            "a key whose owner holds no role is refused"
        );

        // Roles that do not exist and user ids that are too long change nothing.
        assert_eq!(
            state.apply(&event(acme, grant("root", None))),
            Err(Refused::UnknownRole)
        );
        let long = RoleGranted {
            principal: "a".repeat(257),
            ..grant("viewer", None)
        };
        assert_eq!(
            state.apply(&event(acme, long)),
            Err(Refused::MalformedPrincipal)
        );
        assert_eq!(state.grants(acme).count(), 0);
    }

    #[test]
    fn projects_are_versioned_and_their_documents_checked() {
        let acme = Uuid::now_v7();
        let project_id = Uuid::now_v7();
        let mut state = ControlState::default();
        state.apply(&event(acme, created("acme"))).unwrap();
        let bad = ProjectCreated {
            project_id,
            name: "p".into(),
            routing_policy: Some(r#"{"max_tier":"L7"}"#.into()),
            security_policy: None,
            feature_flags: None,
        };
        assert_eq!(
            state.apply(&event(acme, bad.clone())),
            Err(Refused::InvalidDocument)
        );
        let good = ProjectCreated {
            routing_policy: Some(r#"{"max_tier":"L2"}"#.into()),
            ..bad
        };
        state.apply(&event(acme, good)).unwrap();
        let update = |version, flags: &str| ProjectUpdated {
            project_id,
            name: None,
            routing_policy: None,
            security_policy: None,
            feature_flags: Some(flags.into()),
            version,
        };
        // Two admins update version 1 at once: the second update is for a version gone by.
        state
            .apply(&event(acme, update(Some(2), r#"{"cache":{}}"#)))
            .unwrap();
        assert_eq!(
            state.apply(&event(acme, update(Some(2), "{}"))),
            Err(Refused::StaleVersion)
        );
        // Written before versions (v1): the next one.
        state.apply(&event(acme, update(None, "{}"))).unwrap();
        let project = state.project(project_id).unwrap();
        assert_eq!(project.version, 3);
        assert_eq!(project.flags.cache, None);
        assert_eq!(project.routing.max_tier, Some(crate::project::Tier::L2));
    }
}
