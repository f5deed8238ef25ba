//! Control-plane operations: each checks what its [`Actor`] may do (docs/roles.md), appends
//! control events to the log and returns once the node's control state has applied them. Used by
//! the admin HTTP API and by `loom admin` on a data dir.
//!
//! A tenant's key acts in its own tenant only (and a project's key in its project only): another
//! tenant's objects are "not found", never "forbidden", so a refusal says nothing of what exists.

use std::time::{Duration, SystemTime};

use base64::Engine;
use loom_schemas::codec::{CodecError, Registry};
use loom_schemas::control::{ApiKeyInfo, ControlState, ProjectInfo, SignedIn};
use loom_schemas::crypto::{CryptoError, MasterKeyId, NewApiKey};
use loom_schemas::event::{
    ApiKeyIssued, ApiKeyRevoked, Envelope, Event, Payload, ProjectCreated, ProjectUpdated,
    QuotaLimitSet, QuotaMetric, QuotaScope, QuotaWindow, RoleGranted, RoleRevoked, TenantCreated,
    TenantErased, TenantKeyRotated, TimestampMicros, now_micros,
};
use loom_schemas::keystore::KeyStoreError;
use loom_schemas::log::{LogError, Topic};
use loom_schemas::project::{FeatureFlags, MAX_NAME_BYTES, RoutingPolicy, SecurityPolicy};
use loom_schemas::roles::{Permission, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::services::Services;

mod credential;
mod quota;
mod users;
pub use credential::{CredentialRequest, CredentialView};
pub use quota::{Amounts, LimitsPatch, QuotaQuery, QuotaRequest, QuotaView, Remaining};
pub use users::{NewSession, Registration, SessionSecret, SignInError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}", .0.describe())]
    PermissionDenied(Permission),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no tenant {0}")]
    UnknownTenant(Uuid),
    #[error("tenant {0} was erased")]
    TenantErased(Uuid),
    #[error("no API key {0}")]
    UnknownKey(Uuid),
    #[error("no project {0}")]
    UnknownProject(Uuid),
    #[error("{0}")]
    Conflict(String),
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    #[error(
        "the change is on the log, but this node did not apply it in time (is the control follower running?)"
    )]
    NotApplied,
    #[error("{0}")]
    Internal(&'static str),
}

/// How long an operation waits for its control events to be applied.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who asks for a control-plane operation.
#[derive(Debug, Clone)]
pub enum Actor {
    /// The operator (the admin token, or `loom admin` on a data dir): every tenant, everything.
    Operator,
    /// A tenant's API key, with the role it has now.
    Key(ApiKeyInfo),
    /// Somebody signed in to the dashboard (a user, or an API key), with the role they have now.
    User(SignedIn),
}

impl Actor {
    /// The operator acts as an owner would in whichever tenant it names.
    fn role(&self) -> Role {
        match self {
            Actor::Operator => Role::Owner,
            Actor::Key(key) => key.role,
            Actor::User(user) => user.role,
        }
    }

    fn require(&self, permission: Permission) -> Result<(), AdminError> {
        match self.role().allows(permission) {
            true => Ok(()),
            false => Err(AdminError::PermissionDenied(permission)),
        }
    }

    /// The tenant an operation acts in: a key's own (naming another is "no such tenant"); the
    /// operator's must be named.
    fn tenant(&self, named: Option<Uuid>) -> Result<Uuid, AdminError> {
        let own = match self {
            Actor::Operator => {
                return named.ok_or_else(|| AdminError::Invalid("tenant_id: required".into()));
            }
            Actor::Key(key) => key.tenant_id,
            Actor::User(user) => user.tenant_id,
        };
        match named {
            Some(tenant) if tenant != own => Err(AdminError::UnknownTenant(tenant)),
            _ => Ok(own),
        }
    }

    /// The project a key is bound to, if any: it acts in that project only.
    fn project(&self) -> Option<Uuid> {
        match self {
            Actor::Operator => None,
            Actor::Key(key) => key.project_id,
            Actor::User(user) => user.project_id,
        }
    }

    /// Whether the actor sees a tenant's object (in `project`, if it is in one).
    fn sees(&self, tenant_id: Uuid, project: Option<Uuid>) -> bool {
        match self {
            Actor::Operator => true,
            Actor::Key(key) => {
                key.tenant_id == tenant_id && key.project_id.is_none_or(|p| project == Some(p))
            }
            Actor::User(user) => {
                user.tenant_id == tenant_id && user.project_id.is_none_or(|p| project == Some(p))
            }
        }
    }

    /// A tenant-wide change: refused to a key bound to one project.
    fn tenant_wide(&self) -> Result<(), AdminError> {
        match self.project() {
            Some(_) => Err(AdminError::Forbidden(
                "a key bound to a project acts in that project only",
            )),
            None => Ok(()),
        }
    }

    /// Whether `key` is the actor's own: the actor's key itself, or a key acting for the same
    /// user (for a key that acts for no user: a key it made).
    fn owns(&self, key: &ApiKeyInfo) -> bool {
        match self {
            Actor::Operator => false,
            Actor::Key(me) => {
                me.key_id == key.key_id || key.owner.as_deref() == Some(me.principal().as_str())
            }
            Actor::User(me) => {
                me.api_key_id == Some(key.key_id) || key.owner.as_deref() == Some(&*me.principal)
            }
        }
    }

    /// The user keys made by this actor act for (a key that acts for no user: the key itself).
    fn principal(&self) -> Option<String> {
        match self {
            Actor::Operator => None,
            Actor::Key(key) => Some(key.principal()),
            Actor::User(user) => Some(user.principal.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedTenant {
    pub tenant_id: Uuid,
    pub name: String,
}

/// A tenant's data key, rotated: the version new seals use from now on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotatedKey {
    pub tenant_id: Uuid,
    pub version: u32,
}

/// A key to issue. A tenant's key issues keys in its own tenant (`tenant_id` may be left out).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    #[serde(default)]
    pub project_id: Option<Uuid>,
    #[serde(default)]
    pub name: Option<String>,
    /// viewer, developer (the default), admin or owner; never above the issuer's own.
    #[serde(default)]
    pub role: Option<String>,
    /// The user the key acts for: its role is capped by theirs. Developers' keys act for them.
    #[serde(default)]
    pub owner: Option<String>,
    /// How long the key is valid, e.g. `90d`; forever if absent.
    #[serde(default, with = "humantime_serde")]
    pub expires_in: Option<Duration>,
    /// The most the key may spend per UTC day, in micro-USD (`0`: unlimited).
    #[serde(default)]
    pub daily_budget_micro_usd: Option<i64>,
}

/// A new key: `key` is the secret, shown this once and never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub role: Role,
    pub prefix: String,
    pub key: String,
}

/// A tenant as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant_id: Uuid,
    pub name: String,
    pub erased: bool,
}

/// A key as listed: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub name: Option<String>,
    pub prefix: String,
    /// The role it was issued with.
    pub role: Role,
    /// The role it has now (capped by its owner's); `null` if its owner holds none.
    pub effective_role: Option<Role>,
    pub owner: Option<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub revoked: bool,
}

/// A project to create.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectRequest {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    pub name: String,
    #[serde(default)]
    pub routing_policy: Option<RoutingPolicy>,
    #[serde(default)]
    pub feature_flags: Option<FeatureFlags>,
    /// Absent: the default policy (docs/policy.md).
    #[serde(default)]
    pub security_policy: Option<SecurityPolicy>,
}

/// A change to a project: what is left out stays as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub routing_policy: Option<RoutingPolicy>,
    #[serde(default)]
    pub feature_flags: Option<FeatureFlags>,
    /// Absent: the default policy (docs/policy.md).
    #[serde(default)]
    pub security_policy: Option<SecurityPolicy>,
    /// The version the change was made against; a project that has moved on since is a 409.
    #[serde(default)]
    pub expected_version: Option<i64>,
}

/// A project as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectView {
    pub project_id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub routing_policy: RoutingPolicy,
    pub feature_flags: FeatureFlags,
    /// The policy in force: the project's own, or the default.
    pub security_policy: SecurityPolicy,
    pub version: i64,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
}

/// A role to grant or revoke.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    /// The user: an id or email, 1 to 256 bytes.
    pub user: String,
    pub role: String,
    /// In this project only; in the whole tenant if absent.
    #[serde(default)]
    pub project_id: Option<Uuid>,
}

/// A role a user holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub user: String,
    pub role: Role,
    pub project_id: Option<Uuid>,
}

fn rfc3339(at: TimestampMicros) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

fn key_view(state: &ControlState, key: &ApiKeyInfo) -> KeyView {
    KeyView {
        key_id: key.key_id,
        tenant_id: key.tenant_id,
        project_id: key.project_id,
        name: key.name.clone(),
        prefix: key.prefix.clone(),
        role: key.role,
        effective_role: state.key_role(key),
        owner: key.owner.clone(),
        expires_at: key.expires_at.map(rfc3339),
        revoked: key.revoked,
    }
}

fn project_view(project: &ProjectInfo) -> ProjectView {
    ProjectView {
        project_id: project.project_id,
        tenant_id: project.tenant_id,
        name: project.name.clone(),
        routing_policy: (*project.routing).clone(),
        feature_flags: project.flags.clone(),
        security_policy: project.security.as_deref().cloned().unwrap_or_default(),
        version: project.version,
        created_at: rfc3339(project.created_at),
        updated_at: rfc3339(project.updated_at),
    }
}

/// A name of 1 to `max` bytes, trimmed.
fn name(field: &str, value: &str, max: usize) -> Result<String, AdminError> {
    let value = value.trim();
    match value.is_empty() || value.len() > max {
        true => Err(AdminError::Invalid(format!(
            "{field}: 1 to {max} bytes (got {})",
            value.len()
        ))),
        false => Ok(value.to_owned()),
    }
}

fn role(field: &str, value: &str) -> Result<Role, AdminError> {
    match Role::parse(value) {
        Some(role) if value != "inference" => Ok(role),
        _ => Err(AdminError::Invalid(format!(
            "{field}: {value:?} is not a role (viewer, developer, admin, owner)"
        ))),
    }
}

fn json(value: &impl Serialize) -> Result<String, AdminError> {
    serde_json::to_string(value).map_err(|e| AdminError::Invalid(e.to_string()))
}

impl Services {
    /// Appends control events and waits until the control state has applied them.
    async fn append_control(&self, events: Vec<Event>) -> Result<(), AdminError> {
        let registry = Registry::builtin()?;
        let records = events
            .iter()
            .map(|e| registry.encode_record(e))
            .collect::<Result<Vec<_>, _>>()?;
        let positions = self.log.append(Topic::Control, records).await?;
        let Some(last) = positions.last() else {
            return Ok(());
        };
        let applied = self.control.wait_for(last.offset + 1);
        tokio::time::timeout(APPLY_TIMEOUT, applied)
            .await
            .map_err(|_| AdminError::NotApplied)
    }

    fn control_event(&self, tenant_id: Uuid, payload: impl Into<Payload>) -> Event {
        Event {
            envelope: Envelope::new(tenant_id, None, &*self.producer),
            payload: payload.into(),
        }
    }

    /// The tenant an operation acts in, live.
    fn live_tenant(&self, actor: &Actor, named: Option<Uuid>) -> Result<Uuid, AdminError> {
        let tenant_id = actor.tenant(named)?;
        match self.control.read(|s| s.tenant(tenant_id).map(|t| t.erased)) {
            None => Err(AdminError::UnknownTenant(tenant_id)),
            Some(true) => Err(AdminError::TenantErased(tenant_id)),
            Some(false) => Ok(tenant_id),
        }
    }

    /// A project of `tenant_id` the actor sees.
    fn visible_project(&self, actor: &Actor, project_id: Uuid) -> Result<ProjectInfo, AdminError> {
        self.control
            .read(|s| s.project(project_id).cloned())
            .filter(|p| actor.sees(p.tenant_id, Some(p.project_id)))
            .ok_or(AdminError::UnknownProject(project_id))
    }

    /// Checks a project named for a change in `tenant_id`: the tenant's, and the actor's project
    /// if it is bound to one.
    fn project_in(
        &self,
        actor: &Actor,
        tenant_id: Uuid,
        project_id: Option<Uuid>,
    ) -> Result<Option<Uuid>, AdminError> {
        let project_id = project_id.or(actor.project());
        if let Some(project) = project_id {
            let project = self.visible_project(actor, project)?;
            if project.tenant_id != tenant_id {
                return Err(AdminError::UnknownProject(project.project_id));
            }
        }
        Ok(project_id)
    }

    // ---- tenants ------------------------------------------------------------------------------

    /// The tenants the actor sees (a key: its own), by id.
    pub fn list_tenants(&self, actor: &Actor) -> Vec<TenantView> {
        let mut tenants: Vec<TenantView> = self.control.read(|s| {
            s.tenants()
                .filter(|t| actor.sees(t.tenant_id, actor.project()))
                .map(|t| TenantView {
                    tenant_id: t.tenant_id,
                    name: t.name.clone(),
                    erased: t.erased,
                })
                .collect()
        });
        tenants.sort_by_key(|t| t.tenant_id);
        tenants
    }

    /// Creates a tenant with its data and digest keys (the operator's alone).
    pub async fn create_tenant(
        &self,
        actor: &Actor,
        name: &str,
    ) -> Result<CreatedTenant, AdminError> {
        if !matches!(actor, Actor::Operator) {
            return Err(AdminError::Forbidden(
                "tenants are created by the operator (the admin token)",
            ));
        }
        let name = self::name("name", name, 200)?;
        let tenant_id = Uuid::now_v7();
        self.keys.create_tenant_keys(tenant_id).await?;
        let created = TenantCreated { name: name.clone() };
        self.append_control(vec![self.control_event(tenant_id, created)])
            .await?;
        Ok(CreatedTenant { tenant_id, name })
    }

    /// Erases a tenant: destroys its keys (crypto-shredding: its sealed bodies and archive files
    /// become unreadable for good), then records `tenant.erased`; every node refuses its API keys
    /// once it has read the event, and the projectors drop its rows. Irreversible. Erasing an
    /// erased tenant again changes nothing. The operator's, or an owner's of the tenant.
    pub async fn erase_tenant(
        &self,
        actor: &Actor,
        tenant_id: Uuid,
        reason: Option<String>,
    ) -> Result<(), AdminError> {
        let tenant_id = actor.tenant(Some(tenant_id))?;
        actor.require(Permission::OwnTenant)?;
        actor.tenant_wide()?;
        match self.control.read(|s| s.tenant(tenant_id).map(|t| t.erased)) {
            None => return Err(AdminError::UnknownTenant(tenant_id)),
            Some(true) => return Ok(()),
            Some(false) => {}
        }
        // Keys first: if the event cannot be written, the tenant is shredded all the same, and
        // erasing again writes it.
        self.keys.erase(tenant_id).await?;
        self.append_control(vec![self.control_event(tenant_id, TenantErased { reason })])
            .await
    }

    /// Rotates a tenant's data key: adds a version that new seals use (every older version
    /// still opens what it sealed), then records `tenant.key_rotated`, on which every node
    /// reloads its keys. The operator's, or an owner's of the tenant.
    pub async fn rotate_tenant_key(
        &self,
        actor: &Actor,
        tenant_id: Uuid,
    ) -> Result<RotatedKey, AdminError> {
        let tenant_id = self.live_tenant(actor, Some(tenant_id))?;
        actor.require(Permission::OwnTenant)?;
        actor.tenant_wide()?;
        let version = self.keys.rotate(tenant_id).await?;
        let rotated = TenantKeyRotated {
            version: i32::try_from(version).unwrap_or(i32::MAX),
        };
        self.append_control(vec![self.control_event(tenant_id, rotated)])
            .await?;
        Ok(RotatedKey { tenant_id, version })
    }

    // ---- projects -----------------------------------------------------------------------------

    /// Creates a project (admin or owner, for the whole tenant).
    pub async fn create_project(
        &self,
        actor: &Actor,
        request: &ProjectRequest,
    ) -> Result<ProjectView, AdminError> {
        let tenant_id = self.live_tenant(actor, request.tenant_id)?;
        actor.require(Permission::ManageTenant)?;
        actor.tenant_wide()?;
        let name = name("name", &request.name, MAX_NAME_BYTES)?;
        let routing = request.routing_policy.as_ref();
        let flags = request.feature_flags.as_ref();
        let security = request.security_policy.as_ref();
        routing
            .map(RoutingPolicy::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        flags
            .map(FeatureFlags::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        security
            .map(SecurityPolicy::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        let project_id = Uuid::now_v7();
        let created = ProjectCreated {
            project_id,
            name,
            routing_policy: routing.map(json).transpose()?,
            security_policy: security.map(json).transpose()?,
            feature_flags: flags.map(json).transpose()?,
        };
        self.append_control(vec![self.control_event(tenant_id, created)])
            .await?;
        self.visible_project(actor, project_id)
            .map(|p| project_view(&p))
    }

    /// Changes a project (admin or owner); its version goes up by one.
    pub async fn update_project(
        &self,
        actor: &Actor,
        project_id: Uuid,
        patch: &ProjectPatch,
    ) -> Result<ProjectView, AdminError> {
        let project = self.visible_project(actor, project_id)?;
        self.live_tenant(actor, Some(project.tenant_id))?;
        actor.require(Permission::ManageTenant)?;
        if let Some(expected) = patch.expected_version
            && expected != project.version
        {
            return Err(AdminError::Conflict(format!(
                "project {project_id} is at version {}, not {expected}: read it again",
                project.version
            )));
        }
        let name = patch
            .name
            .as_deref()
            .map(|n| name("name", n, MAX_NAME_BYTES))
            .transpose()?;
        let routing = patch.routing_policy.as_ref();
        let flags = patch.feature_flags.as_ref();
        let security = patch.security_policy.as_ref();
        routing
            .map(RoutingPolicy::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        flags
            .map(FeatureFlags::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        security
            .map(SecurityPolicy::check)
            .transpose()
            .map_err(AdminError::Invalid)?;
        let version = project.version + 1;
        let updated = ProjectUpdated {
            project_id,
            name,
            routing_policy: routing.map(json).transpose()?,
            security_policy: security.map(json).transpose()?,
            feature_flags: flags.map(json).transpose()?,
            version: Some(version),
        };
        let event = self.control_event(project.tenant_id, updated);
        let event_id = event.envelope.event_id;
        self.append_control(vec![event]).await?;
        let now = self.visible_project(actor, project_id)?;
        // Another update of the same version was read first: this one changed nothing.
        if now.last_event != event_id {
            return Err(AdminError::Conflict(format!(
                "project {project_id} was changed at the same time: read it again"
            )));
        }
        Ok(project_view(&now))
    }

    /// The projects the actor sees (any role), by id.
    pub fn list_projects(
        &self,
        actor: &Actor,
        tenant: Option<Uuid>,
    ) -> Result<Vec<ProjectView>, AdminError> {
        let tenant = match actor {
            Actor::Operator => tenant,
            Actor::Key(_) | Actor::User(_) => Some(actor.tenant(tenant)?),
        };
        actor.require(Permission::ReadUsage)?;
        let mut projects: Vec<ProjectView> = self.control.read(|s| {
            s.projects()
                .filter(|p| tenant.is_none_or(|t| t == p.tenant_id))
                .filter(|p| actor.sees(p.tenant_id, Some(p.project_id)))
                .map(project_view)
                .collect()
        });
        projects.sort_by_key(|p| p.project_id);
        Ok(projects)
    }

    pub fn get_project(&self, actor: &Actor, project_id: Uuid) -> Result<ProjectView, AdminError> {
        let project = self.visible_project(actor, project_id)?;
        actor.require(Permission::ReadUsage)?;
        Ok(project_view(&project))
    }

    // ---- keys ---------------------------------------------------------------------------------

    /// Issues an API key. A developer issues keys that act for them, in their project if their
    /// key is bound to one; an admin for anyone in the tenant; nobody above their own role.
    pub async fn create_key(
        &self,
        actor: &Actor,
        request: &KeyRequest,
    ) -> Result<CreatedKey, AdminError> {
        let tenant_id = self.live_tenant(actor, request.tenant_id)?;
        let project_id = self.project_in(actor, tenant_id, request.project_id)?;
        actor.require(Permission::ManageOwnKeys)?;
        let role = match &request.role {
            Some(name) => self::role("role", name)?,
            None => Role::Developer.min(actor.role()),
        };
        if !actor.role().may_grant(role) {
            return Err(AdminError::Forbidden(
                "nobody issues a key with a role above their own",
            ));
        }
        let owner = match (&request.owner, actor.principal()) {
            (Some(owner), _) => Some(name("owner", owner, MAX_NAME_BYTES)?),
            (None, principal) => principal,
        };
        if owner != actor.principal() && !actor.role().allows(Permission::ManageTenant) {
            return Err(AdminError::PermissionDenied(Permission::ManageTenant));
        }
        if let Some(name) = &request.name {
            self::name("name", name, MAX_NAME_BYTES)?;
        }
        let expires_at = match request.expires_in {
            None => None,
            Some(ttl) if ttl.is_zero() || ttl > Duration::from_secs(10 * 365 * 86_400) => {
                return Err(AdminError::Invalid(
                    "expires_in: more than 0 and at most 10 years".into(),
                ));
            }
            Some(ttl) => Some(now_micros() + i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)),
        };
        let budget = match request.daily_budget_micro_usd {
            Some(budget) if budget < 0 => {
                return Err(AdminError::Invalid(
                    "daily_budget_micro_usd: 0 (unlimited) or more".into(),
                ));
            }
            budget => budget,
        };
        let new = NewApiKey::generate()?;
        let key_id = Uuid::now_v7();
        let issued = ApiKeyIssued {
            key_id,
            project_id,
            name: request.name.as_deref().map(|n| n.trim().to_owned()),
            key_hash: new.hash.to_vec(),
            prefix: new.prefix.clone(),
            roles: vec![role.name().to_owned()],
            expires_at,
            owner,
        };
        let mut events = vec![self.control_event(tenant_id, issued)];
        if let Some(budget) = budget {
            let limit = QuotaLimitSet {
                scope: QuotaScope::ApiKey,
                scope_id: key_id.to_string(),
                metric: QuotaMetric::CostMicroUsd,
                window: QuotaWindow::Day,
                limit: (budget > 0).then_some(budget),
            };
            events.push(self.control_event(tenant_id, limit));
        }
        self.append_control(events).await?;
        Ok(CreatedKey {
            key_id,
            tenant_id,
            project_id,
            role,
            prefix: new.prefix,
            key: new.secret.to_string(),
        })
    }

    /// The keys the actor may manage, by id: an admin's, every key of the tenant (or of its
    /// project); a developer's, their own.
    pub fn list_keys(
        &self,
        actor: &Actor,
        tenant: Option<Uuid>,
    ) -> Result<Vec<KeyView>, AdminError> {
        let tenant = match actor {
            Actor::Operator => tenant,
            Actor::Key(_) | Actor::User(_) => Some(actor.tenant(tenant)?),
        };
        actor.require(Permission::ManageOwnKeys)?;
        let everyone = actor.role().allows(Permission::ManageTenant);
        let mut keys: Vec<KeyView> = self.control.read(|s| {
            s.keys()
                .filter(|k| tenant.is_none_or(|t| t == k.tenant_id))
                .filter(|k| actor.sees(k.tenant_id, k.project_id))
                .filter(|k| everyone || actor.owns(k))
                .map(|k| key_view(s, k))
                .collect()
        });
        keys.sort_by_key(|k| k.key_id);
        Ok(keys)
    }

    /// Revokes an API key; every node refuses it once it has read the event. One's own keys
    /// (developer and up), anyone's in the tenant (admin and up).
    pub async fn revoke_key(
        &self,
        actor: &Actor,
        key_id: Uuid,
        reason: Option<String>,
    ) -> Result<(), AdminError> {
        let key = self
            .control
            .read(|s| s.key(key_id).cloned())
            .filter(|k| actor.sees(k.tenant_id, k.project_id))
            .ok_or(AdminError::UnknownKey(key_id))?;
        actor.require(Permission::ManageOwnKeys)?;
        if !actor.owns(&key) {
            actor.require(Permission::ManageTenant)?;
        }
        if key.revoked {
            return Ok(());
        }
        let revoked = ApiKeyRevoked { key_id, reason };
        self.append_control(vec![self.control_event(key.tenant_id, revoked)])
            .await
    }

    // ---- members ------------------------------------------------------------------------------

    /// Grants a role (admin or owner; the owner role by an owner only).
    pub async fn grant_role(
        &self,
        actor: &Actor,
        request: &GrantRequest,
    ) -> Result<(), AdminError> {
        self.change_role(actor, request, true).await
    }

    /// Revokes a role (as granting it: an owner's by an owner only).
    pub async fn revoke_role(
        &self,
        actor: &Actor,
        request: &GrantRequest,
    ) -> Result<(), AdminError> {
        self.change_role(actor, request, false).await
    }

    async fn change_role(
        &self,
        actor: &Actor,
        request: &GrantRequest,
        grant: bool,
    ) -> Result<(), AdminError> {
        let (tenant_id, project_id, principal, role) = self.grant_parts(actor, request)?;
        let role = role.name().to_owned();
        let event = match grant {
            true => self.control_event(
                tenant_id,
                RoleGranted {
                    principal,
                    role,
                    project_id,
                },
            ),
            false => self.control_event(
                tenant_id,
                RoleRevoked {
                    principal,
                    role,
                    project_id,
                },
            ),
        };
        self.append_control(vec![event]).await
    }

    fn grant_parts(
        &self,
        actor: &Actor,
        request: &GrantRequest,
    ) -> Result<(Uuid, Option<Uuid>, String, Role), AdminError> {
        let tenant_id = self.live_tenant(actor, request.tenant_id)?;
        let project_id = self.project_in(actor, tenant_id, request.project_id)?;
        actor.require(Permission::ManageTenant)?;
        let user = name("user", &request.user, MAX_NAME_BYTES)?;
        let role = role("role", &request.role)?;
        if role == Role::Owner {
            actor.require(Permission::OwnTenant)?;
        }
        if !actor.role().may_grant(role) {
            return Err(AdminError::Forbidden(
                "nobody grants or revokes a role above their own",
            ));
        }
        Ok((tenant_id, project_id, user, role))
    }

    /// The roles held in a tenant (admin or owner), by user.
    pub fn list_members(
        &self,
        actor: &Actor,
        tenant: Option<Uuid>,
    ) -> Result<Vec<MemberView>, AdminError> {
        let tenant_id = actor.tenant(tenant)?;
        if self.control.read(|s| s.tenant(tenant_id).is_none()) {
            return Err(AdminError::UnknownTenant(tenant_id));
        }
        actor.require(Permission::ManageTenant)?;
        let mut members: Vec<MemberView> = self.control.read(|s| {
            s.grants(tenant_id)
                .filter(|g| actor.project().is_none() || g.project_id == actor.project())
                .map(|g| MemberView {
                    user: g.principal,
                    role: g.role,
                    project_id: g.project_id,
                })
                .collect()
        });
        members
            .sort_by(|a, b| (&a.user, a.project_id, a.role).cmp(&(&b.user, b.project_id, b.role)));
        Ok(members)
    }

    // ---- the archive's key service -------------------------------------------------------------

    /// The key service of the archive: an archive file's data key, `wrapped` under the tenant's
    /// key named by `master_key_id` (`loom:<tenant>:v<version>:<purpose>`), unwrapped — what a
    /// Parquet reader's KMS client (pyarrow's `KmsClient.unwrap_key`) asks for. Base64 in and out.
    /// The operator's alone.
    pub fn unwrap_archive_key(
        &self,
        actor: &Actor,
        master_key_id: &str,
        wrapped: &str,
    ) -> Result<String, AdminError> {
        if !matches!(actor, Actor::Operator) {
            return Err(AdminError::Forbidden(
                "the archive's key service is the operator's (the admin token)",
            ));
        }
        let id = MasterKeyId::parse(master_key_id).ok_or_else(|| {
            AdminError::Invalid(format!(
                "master_key_id: {master_key_id:?} is not a Loom archive key \
                 (loom:<tenant>:v<version>:metadata|records)"
            ))
        })?;
        match self.keys.unwrap_archive_key(&id, wrapped) {
            Ok(key) => Ok(base64::engine::general_purpose::STANDARD.encode(key)),
            Err(KeyStoreError::Erased(tenant)) => Err(AdminError::TenantErased(tenant)),
            Err(KeyStoreError::UnknownTenant(tenant)) => Err(AdminError::UnknownTenant(tenant)),
            Err(KeyStoreError::Crypto(_)) => Err(AdminError::Invalid(format!(
                "wrapped_key: not a key wrapped under {id} (or altered)"
            ))),
            Err(error) => Err(error.into()),
        }
    }
}
