//! Loom's events as Rust types.
//!
//! The Avro schemas in `schemas/avro/*.avsc` are the source of truth; these types mirror the
//! newest version of each, and `codec` tests that every one round-trips through its schema.
//! Each event is an [`Envelope`] plus one typed [`Payload`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Microseconds since the Unix epoch, UTC.
pub type TimestampMicros = i64;

/// A field sealed with a tenant's data key (see `crypto::seal`): opaque bytes on the log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

/// The part every event carries. `event_type` and `schema_version` are written from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub event_id: Uuid,
    pub occurred_at: TimestampMicros,
    /// The nil UUID for requests no tenant could be resolved for.
    pub tenant_id: Uuid,
    /// Set on data-plane events, `None` on control-plane events.
    pub trace_id: Option<String>,
    pub producer: String,
}

impl Envelope {
    /// A new envelope with a fresh UUIDv7 event id, stamped now.
    pub fn new(tenant_id: Uuid, trace_id: Option<String>, producer: impl Into<String>) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            occurred_at: now_micros(),
            tenant_id,
            trace_id,
            producer: producer.into(),
        }
    }
}

/// Microseconds since the Unix epoch; 0 if the clock is before it.
pub fn now_micros() -> TimestampMicros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// An event: envelope plus payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: Envelope,
    pub payload: Payload,
}

/// Which topic an event belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    /// Per-request events, keyed by trace id.
    Data,
    /// Tenants, projects, keys, quota limits, roles: totally ordered.
    Control,
    /// The quota ledger: reservations and their settlements, totally ordered.
    Quota,
}

macro_rules! events {
    ($( $plane:ident $type_name:literal => $variant:ident, )*) => {
        /// Every event's payload, one variant per event type.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Payload {
            $( $variant($variant), )*
        }

        impl Payload {
            /// The dotted event type, e.g. `llm_call.completed`.
            pub fn event_type(&self) -> &'static str {
                match self { $( Payload::$variant(_) => $type_name, )* }
            }

            pub fn plane(&self) -> Plane {
                match self { $( Payload::$variant(_) => Plane::$plane, )* }
            }
        }

        $(
            impl From<$variant> for Payload {
                fn from(payload: $variant) -> Self { Payload::$variant(payload) }
            }
        )*

        /// All event types.
        pub const EVENT_TYPES: &[&str] = &[$( $type_name, )*];

        impl Payload {
            /// Hands the payload to `encoder` as its concrete type.
            pub(crate) fn encode_with<E: PayloadEncoder>(&self, encoder: E) -> E::Output {
                match self { $( Payload::$variant(p) => encoder.encode(p), )* }
            }
        }

        /// Calls `decoder` with the concrete payload type of `event_type`; `None` if unknown.
        pub(crate) fn decode_with<D: PayloadDecoder>(event_type: &str, decoder: D) -> Option<D::Output> {
            match event_type {
                $( $type_name => Some(decoder.decode::<$variant>()), )*
                _ => None,
            }
        }
    };
}

events! {
    Data "request.received" => RequestReceived,
    Data "policy.evaluated" => PolicyEvaluated,
    Data "routing.decided" => RoutingDecided,
    Data "llm_call.completed" => LlmCallCompleted,
    Data "tool_call.observed" => ToolCallObserved,
    Data "cache.hit" => CacheHit,
    Quota "quota.reserved" => QuotaReserved,
    Quota "quota.consumed" => QuotaConsumed,
    Quota "quota.released" => QuotaReleased,
    Data "quota.denied" => QuotaDenied,
    Data "request.completed" => RequestCompleted,
    Control "tenant.created" => TenantCreated,
    Control "project.created" => ProjectCreated,
    Control "project.updated" => ProjectUpdated,
    Control "api_key.issued" => ApiKeyIssued,
    Control "api_key.revoked" => ApiKeyRevoked,
    Control "quota.limit_set" => QuotaLimitSet,
    Control "role.granted" => RoleGranted,
    Control "role.revoked" => RoleRevoked,
    Control "upstream_credential.set" => UpstreamCredentialSet,
    Control "user.registered" => UserRegistered,
    Control "user.password_set" => UserPasswordSet,
    Control "session.started" => SessionStarted,
    Control "session.ended" => SessionEnded,
    Control "tenant.erased" => TenantErased,
    Control "tenant.key_rotated" => TenantKeyRotated,
    Control "log.anchored" => LogAnchored,
}

/// Something done with a payload of any concrete type (encoding it, for the codec).
pub(crate) trait PayloadEncoder {
    type Output;
    fn encode<P: Serialize>(self, payload: &P) -> Self::Output;
}

/// Something that produces a payload of a concrete type (decoding it, for the codec).
pub(crate) trait PayloadDecoder {
    type Output;
    fn decode<P: serde::de::DeserializeOwned + Into<Payload>>(self) -> Self::Output;
}

// ---- data plane -------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestReceived {
    pub endpoint: String,
    pub project_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub user: Option<String>,
    pub model: String,
    pub stream: bool,
    pub user_agent: Option<String>,
    pub body_bytes: i64,
    #[serde(with = "serde_bytes")]
    pub body_digest: Vec<u8>,
    pub body: Option<Sealed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    Allow,
    Redact,
    Block,
    /// (v2)
    Flag,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFinding {
    pub rule: String,
    pub kind: String,
    pub location: String,
    /// (v2; empty before)
    pub severity: String,
    /// The rule's action (v2; empty before).
    pub action: String,
    /// Byte offsets of the match (v2; 0 before).
    pub start: i64,
    pub end: i64,
    /// A keyed digest of the match, never the match (v2; empty before).
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEvaluated {
    pub project_id: Option<Uuid>,
    pub action: PolicyAction,
    pub findings: Vec<PolicyFinding>,
    pub latency_us: i64,
    /// `prompt` or `output` (v2; `prompt` before).
    pub direction: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCandidate {
    pub deployment: String,
    pub provider: String,
    pub model: String,
    pub weight: i32,
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingDecided {
    pub model: String,
    pub candidates: Vec<RouteCandidate>,
    pub chosen: Option<String>,
    pub reason: String,
    /// The routed alias's tier (v2).
    pub tier: Option<String>,
    /// Aliases of higher tiers tried after it (v2).
    pub escalation: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    Ok,
    Error,
    Timeout,
    ClientCancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmCallCompleted {
    pub attempt: i32,
    pub deployment: String,
    pub provider: String,
    pub model: String,
    pub status: CallStatus,
    pub http_status: Option<i32>,
    pub error_class: Option<String>,
    pub stream: bool,
    pub started_at: TimestampMicros,
    pub latency_us: i64,
    pub ttft_us: Option<i64>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached_read: Option<i64>,
    pub tokens_cache_creation: Option<i64>,
    pub usage_estimated: bool,
    pub cost_micro_usd: Option<i64>,
    /// What the prompt cache saved (v2).
    pub cache_saved_micro_usd: Option<i64>,
    /// The upstream's id of its answer (v2).
    pub response_id: Option<String>,
    pub request_body: Option<Sealed>,
    pub response_body: Option<Sealed>,
    /// Request fields a translation between APIs could not carry (v2).
    pub dropped_fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallDirection {
    Requested,
    Result,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallObserved {
    pub direction: ToolCallDirection,
    pub tool_call_id: String,
    pub name: Option<String>,
    pub arguments: Option<Sealed>,
    pub result: Option<Sealed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    Tenant,
    Project,
    ApiKey,
    /// An end user of a tenant's application: OpenAI's `user` field or `x-loom-user`.
    User,
}

impl QuotaScope {
    pub const ALL: [QuotaScope; 4] = [
        QuotaScope::Tenant,
        QuotaScope::Project,
        QuotaScope::User,
        QuotaScope::ApiKey,
    ];

    /// The name the API and the events use (`api_key`, …).
    pub fn name(self) -> &'static str {
        match self {
            QuotaScope::Tenant => "tenant",
            QuotaScope::Project => "project",
            QuotaScope::ApiKey => "api_key",
            QuotaScope::User => "user",
        }
    }

    pub fn parse(name: &str) -> Option<QuotaScope> {
        match name {
            "key" => Some(QuotaScope::ApiKey),
            _ => QuotaScope::ALL.into_iter().find(|s| s.name() == name),
        }
    }
}

/// One scope a request is counted in: which kind, and its id (a tenant, project or key id, or a
/// user's id within the event's tenant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuotaScopeRef {
    pub scope: QuotaScope,
    pub scope_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaMetric {
    Requests,
    Tokens,
    CostMicroUsd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaWindow {
    Minute,
    Hour,
    Day,
    Month,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaReserved {
    pub reservation_id: Uuid,
    pub scopes: Vec<QuotaScopeRef>,
    /// Days since 1970-01-01 of the quota day charged (a date in the quotas' time zone).
    pub day: i32,
    pub tokens: i64,
    pub cost_micro_usd: i64,
    pub expires_at: TimestampMicros,
    /// (v2) Admitted in log order against these daily limits of each scope (in the order of
    /// `scopes`), near a limit several gateways share; `None`: admitted by its gateway.
    pub arbitrated: Option<Vec<DailyLimits>>,
}

/// A scope's daily limits (`0`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyLimits {
    pub tokens_per_day: i64,
    pub cost_micro_usd_per_day: i64,
}

/// A reservation settled with what the request used (v1 events, one per scope and metric, read
/// as settling nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaConsumed {
    pub reservation_id: Option<Uuid>,
    pub scopes: Vec<QuotaScopeRef>,
    pub day: i32,
    pub tokens: i64,
    pub cost_micro_usd: i64,
    pub reserved_tokens: i64,
    pub reserved_cost_micro_usd: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaReleased {
    pub reservation_id: Uuid,
    pub scopes: Vec<QuotaScopeRef>,
    pub day: i32,
    pub tokens: i64,
    pub cost_micro_usd: i64,
    /// `failed` (the call used nothing) or `abandoned` (the request ended unsettled).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaDenied {
    pub scope: QuotaScope,
    pub scope_id: String,
    pub metric: QuotaMetric,
    pub window: QuotaWindow,
    pub limit: i64,
    pub used: i64,
    pub retry_after_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Ok,
    Error,
    ClientCancelled,
    Denied,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestCompleted {
    pub status: RequestStatus,
    pub http_status: i32,
    pub error_class: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    pub attempts: i32,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached_read: Option<i64>,
    pub tokens_cache_creation: Option<i64>,
    pub usage_estimated: bool,
    pub cost_micro_usd: Option<i64>,
    pub latency_us: i64,
    pub ttft_us: Option<i64>,
    pub overhead_us: i64,
}

// ---- control plane ----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCreated {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectCreated {
    pub project_id: Uuid,
    pub name: String,
    /// JSON documents (docs/projects.md).
    pub routing_policy: Option<String>,
    pub security_policy: Option<String>,
    /// (v2)
    pub feature_flags: Option<String>,
}

/// A project changed; `None` fields are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectUpdated {
    pub project_id: Uuid,
    pub name: Option<String>,
    pub routing_policy: Option<String>,
    pub security_policy: Option<String>,
    /// (v2)
    pub feature_flags: Option<String>,
    /// The version this update makes (v2; `None` before: the next one).
    pub version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyIssued {
    pub key_id: Uuid,
    pub project_id: Option<Uuid>,
    pub name: Option<String>,
    #[serde(with = "serde_bytes")]
    pub key_hash: Vec<u8>,
    pub prefix: String,
    pub roles: Vec<String>,
    pub expires_at: Option<TimestampMicros>,
    /// The user the key acts for (v2).
    pub owner: Option<String>,
}

/// A request answered from its project's response cache (docs/cache.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHit {
    pub project_id: Option<Uuid>,
    pub model: String,
    #[serde(with = "serde_bytes")]
    pub key_digest: Vec<u8>,
    pub source_trace_id: String,
    pub stream: bool,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub cost_saved_micro_usd: Option<i64>,
    pub age_ms: i64,
}

/// An upstream's credential for a tenant, or one of its projects (docs/credentials.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamCredentialSet {
    pub project_id: Option<Uuid>,
    pub upstream: String,
    pub base_url: Option<String>,
    /// Sealed with the tenant's data key (field `api_key`); `None`: removed.
    pub api_key: Option<Sealed>,
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRevoked {
    pub key_id: Uuid,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimitSet {
    pub scope: QuotaScope,
    pub scope_id: String,
    pub metric: QuotaMetric,
    pub window: QuotaWindow,
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleGranted {
    pub principal: String,
    pub role: String,
    pub project_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRevoked {
    pub principal: String,
    pub role: String,
    pub project_id: Option<Uuid>,
}

/// A dashboard user: signs in with `email` and a password (docs/dashboard.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// Trimmed and lowercased; the user's principal in role grants.
    pub email: String,
    /// The argon2id PHC string, sealed with the tenant's data key (field `password`).
    pub password: Sealed,
}

/// A dashboard user's new password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPasswordSet {
    pub email: String,
    /// The argon2id PHC string, sealed with the tenant's data key (field `password`).
    pub password: Sealed,
}

/// A dashboard session, known to every node by the digest of its cookie's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStarted {
    /// SHA-256 of the cookie's secret value.
    #[serde(with = "serde_bytes")]
    pub session: Vec<u8>,
    /// The user's email, or `key:<id>` for a sign-in with an API key.
    pub principal: String,
    /// The key signed in with, if any: the session lasts no longer than it.
    pub api_key_id: Option<Uuid>,
    pub expires_at: TimestampMicros,
}

/// A dashboard session ended before its expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnded {
    #[serde(with = "serde_bytes")]
    pub session: Vec<u8>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantErased {
    pub reason: Option<String>,
}

/// A tenant's data key has a new version (new seals use it, older ones still open): every node
/// reloads its keys on reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKeyRotated {
    pub version: i32,
}

/// The authenticated chain head of an embedded-log partition (see `log::checkpoint::anchor_mac`),
/// appended by the node that holds the log; `loom verify` checks the chain against the latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAnchored {
    pub topic: String,
    pub partition: i32,
    /// Records the head covers: the chain hash after record `offset - 1`.
    pub offset: i64,
    #[serde(with = "serde_bytes")]
    pub head: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}
