//! Quota limits (`quota.limit_set`) and what each scope has used today: set by admins and
//! owners, read by every role (docs/quotas.md).

use loom_schemas::event::{QuotaLimitSet, QuotaScope, TimestampMicros, now_micros};
use loom_schemas::project::MAX_NAME_BYTES;
use loom_schemas::quota::{LimitKind, Limits};
use loom_schemas::roles::Permission;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::{Actor, AdminError, name, rfc3339};
use crate::quota::{Limited, Quotas, Scope, ScopeStatus};
use crate::services::Services;

/// A field that may be absent (`None`: unchanged), `null` (`Some(None)`: back to the default)
/// or a number.
fn set_or_clear<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// Limits to set on one scope. A limit left out stays as it is, `null` falls back to the
/// default (`[quotas]` in the config), `0` is unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    #[serde(default, deserialize_with = "set_or_clear")]
    pub tokens_per_day: Option<Option<i64>>,
    #[serde(default, deserialize_with = "set_or_clear")]
    pub cost_micro_usd_per_day: Option<Option<i64>>,
    #[serde(default, deserialize_with = "set_or_clear")]
    pub requests_per_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "set_or_clear")]
    pub tokens_per_minute: Option<Option<i64>>,
}

impl LimitsPatch {
    fn get(&self, kind: LimitKind) -> Option<Option<i64>> {
        match kind {
            LimitKind::TokensPerDay => self.tokens_per_day,
            LimitKind::CostPerDay => self.cost_micro_usd_per_day,
            LimitKind::RequestsPerMinute => self.requests_per_minute,
            LimitKind::TokensPerMinute => self.tokens_per_minute,
        }
    }
}

/// `POST /admin/quotas`: limits for a tenant, project, user or key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    /// `tenant`, `project`, `user` or `key`.
    pub scope: String,
    /// The project or key id, or the user's id; the tenant's own id (or nothing) for `tenant`.
    #[serde(default)]
    pub id: Option<String>,
    pub limits: LimitsPatch,
}

/// Which scope to show: one (`id`), or every one of a kind with limits or usage today.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaQuery {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    pub scope: String,
    #[serde(default)]
    pub id: Option<String>,
}

/// Tokens and micro-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub tokens: i64,
    pub cost_micro_usd: i64,
}

/// What is left now; `null` where nothing limits it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remaining {
    pub tokens: Option<i64>,
    pub cost_micro_usd: Option<i64>,
    pub requests_this_minute: Option<i64>,
    pub tokens_this_minute: Option<i64>,
}

/// A scope's limits in force, the limits set on it (the rest are defaults), and today's usage
/// as this gateway counts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuotaView {
    pub scope: String,
    pub id: String,
    /// The limits in force: its own, else the default; `null` where nothing limits it.
    pub limits: Limits,
    /// The limits set on this scope itself: `0` unlimited, `null` the default.
    pub own: Limits,
    /// `null` where no ledger counts (`loom admin quota set` on a data dir).
    pub used: Option<Amounts>,
    pub reserved: Option<Amounts>,
    pub remaining: Option<Remaining>,
    /// When today's budgets end (RFC 3339).
    pub resets_at: Option<String>,
}

/// The name the API uses for a scope.
fn scope_name(scope: QuotaScope) -> &'static str {
    match scope {
        QuotaScope::ApiKey => "key",
        other => other.name(),
    }
}

fn parse_scope(name: &str) -> Result<QuotaScope, AdminError> {
    QuotaScope::parse(name).ok_or_else(|| {
        AdminError::Invalid(format!(
            "scope: {name:?} is not a scope (tenant, project, user, key)"
        ))
    })
}

/// The view of one scope: its limits, and its usage if a ledger counts it.
pub(crate) fn view(
    scope: &Scope,
    own: Limits,
    in_force: Limits,
    ledger: Option<&Quotas>,
    now: TimestampMicros,
) -> QuotaView {
    let status = ledger.map(|q| q.status(Limited::new(scope.clone(), in_force), now));
    let remaining = |limit: i64, taken: i64| (limit > 0).then(|| (limit - taken).max(0));
    let mut limits = in_force;
    for kind in LimitKind::ALL {
        limits.set(kind, in_force.get(kind).filter(|limit| *limit > 0));
    }
    QuotaView {
        scope: scope_name(scope.kind).into(),
        id: scope.id.to_string(),
        limits,
        own,
        used: status.as_ref().map(|s| Amounts {
            tokens: s.budget.used_tokens,
            cost_micro_usd: s.budget.used_cost,
        }),
        reserved: status.as_ref().map(|s| Amounts {
            tokens: s.budget.reserved_tokens,
            cost_micro_usd: s.budget.reserved_cost,
        }),
        remaining: status.as_ref().map(|s: &ScopeStatus| Remaining {
            tokens: remaining(s.limited.tokens_per_day, s.budget.tokens()),
            cost_micro_usd: remaining(s.limited.cost_per_day, s.budget.cost()),
            requests_this_minute: s.requests_remaining,
            tokens_this_minute: s.tokens_remaining_this_minute,
        }),
        resets_at: status.map(|s| rfc3339(s.day_ends_at)),
    }
}

impl Services {
    /// The scope a request names, checked: something of the tenant the actor sees.
    fn quota_scope(
        &self,
        actor: &Actor,
        tenant_id: Uuid,
        kind: QuotaScope,
        id: Option<&str>,
    ) -> Result<Scope, AdminError> {
        let uuid = |field: &str| -> Result<Uuid, AdminError> {
            let id = id.ok_or_else(|| AdminError::Invalid(format!("id: required for {field}")))?;
            Uuid::parse_str(id)
                .map_err(|_| AdminError::Invalid(format!("id: {id:?} is not a {field} id")))
        };
        match kind {
            QuotaScope::Tenant => {
                actor.tenant_wide()?;
                match id.map(Uuid::parse_str) {
                    None => Ok(Scope::of(tenant_id, kind, tenant_id)),
                    Some(Ok(id)) if id == tenant_id => Ok(Scope::of(tenant_id, kind, id)),
                    Some(_) => Err(AdminError::Invalid(
                        "id: the tenant's own id, or nothing, for scope tenant".into(),
                    )),
                }
            }
            QuotaScope::Project => {
                let project = self.visible_project(actor, uuid("project")?)?;
                match project.tenant_id == tenant_id {
                    true => Ok(Scope::of(tenant_id, kind, project.project_id)),
                    false => Err(AdminError::UnknownProject(project.project_id)),
                }
            }
            QuotaScope::ApiKey => {
                let key_id = uuid("key")?;
                self.control
                    .read(|s| s.key(key_id).cloned())
                    .filter(|k| k.tenant_id == tenant_id && actor.sees(k.tenant_id, k.project_id))
                    .map(|_| Scope::of(tenant_id, kind, key_id))
                    .ok_or(AdminError::UnknownKey(key_id))
            }
            QuotaScope::User => {
                actor.tenant_wide()?;
                let user = id.ok_or_else(|| AdminError::Invalid("id: required for user".into()))?;
                Ok(Scope::user(tenant_id, &name("id", user, MAX_NAME_BYTES)?))
            }
        }
    }

    /// Sets limits on a scope (admin or owner): one `quota.limit_set` per limit named, all
    /// checked before any is appended.
    pub async fn set_quota(
        &self,
        actor: &Actor,
        request: &QuotaRequest,
        ledger: Option<&Quotas>,
        defaults: &crate::quota::QuotaSettings,
    ) -> Result<QuotaView, AdminError> {
        let tenant_id = self.live_tenant(actor, request.tenant_id)?;
        let kind = parse_scope(&request.scope)?;
        let scope = self.quota_scope(actor, tenant_id, kind, request.id.as_deref())?;
        actor.require(Permission::ManageTenant)?;
        let mut events = Vec::new();
        for limit_kind in LimitKind::ALL {
            let Some(limit) = request.limits.get(limit_kind) else {
                continue;
            };
            if let Some(limit) = limit {
                limit_kind
                    .check(limit)
                    .map_err(|e| AdminError::Invalid(format!("limits.{e}")))?;
            }
            let set = QuotaLimitSet {
                scope: kind,
                scope_id: scope.id.to_string(),
                metric: limit_kind.metric(),
                window: limit_kind.window(),
                limit,
            };
            events.push(self.control_event(tenant_id, set));
        }
        if events.is_empty() {
            return Err(AdminError::Invalid(format!(
                "limits: name at least one of {}",
                LimitKind::ALL.map(LimitKind::field).join(", ")
            )));
        }
        self.append_control(events).await?;
        Ok(self.quota_view(&scope, ledger, defaults))
    }

    /// One scope's limits and usage, or every scope of a kind with limits set or usage today
    /// (every role reads them; a key bound to a project, its project's).
    pub fn show_quotas(
        &self,
        actor: &Actor,
        query: &QuotaQuery,
        ledger: Option<&Quotas>,
        defaults: &crate::quota::QuotaSettings,
    ) -> Result<Vec<QuotaView>, AdminError> {
        let tenant_id = self.live_tenant(actor, query.tenant_id)?;
        let kind = parse_scope(&query.scope)?;
        actor.require(Permission::ReadUsage)?;
        if query.id.is_some() || kind == QuotaScope::Tenant {
            let scope = self.quota_scope(actor, tenant_id, kind, query.id.as_deref())?;
            return Ok(vec![self.quota_view(&scope, ledger, defaults)]);
        }
        let mut scopes: Vec<Scope> = self.control.read(|s| {
            s.limits_of(tenant_id, kind)
                .filter_map(|(id, _)| {
                    let reference = loom_schemas::event::QuotaScopeRef {
                        scope: kind,
                        scope_id: id.to_owned(),
                    };
                    Scope::from_ref(tenant_id, &reference)
                })
                .collect()
        });
        if let Some(ledger) = ledger {
            for scope in ledger.counted(tenant_id, kind, now_micros()) {
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
        }
        let mut views: Vec<QuotaView> = scopes
            .iter()
            .filter(|scope| {
                self.quota_scope(actor, tenant_id, kind, Some(&scope.id.to_string()))
                    .is_ok()
            })
            .map(|scope| self.quota_view(scope, ledger, defaults))
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }

    pub(crate) fn quota_view(
        &self,
        scope: &Scope,
        ledger: Option<&Quotas>,
        defaults: &crate::quota::QuotaSettings,
    ) -> QuotaView {
        let (own, in_force) = self.control.read(|state| {
            let own = scope.own_limits(state);
            (own, scope.limits(state, defaults))
        });
        view(scope, own, in_force, ledger, now_micros())
    }
}
