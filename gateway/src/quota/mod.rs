//! Budgets and rate limits on the request path: reserve, then settle.
//!
//! Before a request goes upstream its estimate (prompt plus the most output it may ask for, in
//! tokens and micro-USD) is reserved in every scope it is counted in — tenant, project, user,
//! key — all at once or not at all. After the call the reservation is settled with what was
//! used, or released when nothing was. Budgets are counted per (scope, quota day), the day being
//! the date in `[quotas] time_zone`, so a new day needs no reset. Rates (requests and tokens per
//! minute) are a GCRA per scope: the estimate is charged at admission and corrected at
//! settlement. A reservation never settled stops counting at its `expires_at`.
//!
//! The ledger is a fold of `quota.reserved` / `quota.consumed` / `quota.released`: the gateway
//! applies its own events as it makes them, and the others' as it reads them from the log.
//!
//! On a log several gateways share, a reservation that would bring a scope within
//! `arbitration_margin` of its daily limit — or this gateway's reservations the others cannot see
//! yet above the margin — is admitted in log order instead: it is appended with the limits it
//! must fit, and admitted once it is read back if, after every event before it, it fits. Every
//! gateway folds the log alike ([`Arbiter`]) and reaches the same verdict.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use loom_schemas::control::ControlState;
use loom_schemas::event::{
    DailyLimits, Event, Payload, QuotaReserved, QuotaScope, QuotaScopeRef, TimestampMicros,
};
use loom_schemas::quota::{LimitKind, Limits};
use serde::Deserialize;
use tokio::sync::oneshot;
use uuid::Uuid;

mod admit;
mod follow;
pub(crate) use admit::Reservation;
pub(crate) use follow::follow;
pub use follow::read_ledger;

/// A minute, the window of rate limits, in µs.
const MINUTE_US: i64 = 60_000_000;
/// How often expired reservations and old counters are swept, in µs.
const SWEEP_US: i64 = 1_000_000;

/// `[quotas]`: the defaults for scopes with no limit of their own, and the quota day.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Where a quota day begins and ends (an IANA name, e.g. `Europe/Berlin`).
    pub time_zone: String,
    /// Default daily token budget of each user (`0`: unlimited).
    pub user_tokens_per_day: i64,
    /// Default daily budget of each user, in USD (`0`: unlimited).
    pub user_usd_per_day: f64,
    pub project_tokens_per_day: i64,
    pub project_usd_per_day: f64,
    /// How long a reservation counts if it is never settled or released (a gateway that died
    /// mid-request).
    #[serde(with = "humantime_serde")]
    pub reservation_ttl: Duration,
    /// On a log several gateways share (Kafka): the part of a daily limit near which admission
    /// is arbitrated through the log, and the most of it one gateway may have reserved that the
    /// others have not read yet (`0`: never arbitrate).
    pub arbitration_margin: f64,
    /// How long an arbitrated request waits for its reservation to come back from the log
    /// before it is refused (503 `quota_unavailable`).
    #[serde(with = "humantime_serde")]
    pub arbitration_timeout: Duration,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            time_zone: "UTC".into(),
            user_tokens_per_day: 1_000_000,
            user_usd_per_day: 10.0,
            project_tokens_per_day: 1_000_000,
            project_usd_per_day: 10.0,
            reservation_ttl: Duration::from_secs(15 * 60),
            arbitration_margin: 0.1,
            arbitration_timeout: Duration::from_secs(5),
        }
    }
}

/// `[quotas]`, checked.
#[derive(Debug, Clone)]
pub struct QuotaSettings {
    pub time_zone: Tz,
    /// The limits of a user and of a project that set none themselves.
    pub user_defaults: Limits,
    pub project_defaults: Limits,
    pub reservation_ttl: Duration,
    pub arbitration_margin: f64,
    pub arbitration_timeout: Duration,
    /// Whether other gateways share the log (and so the budgets): set by the node.
    pub shared_log: bool,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        // The defaults check.
        QuotaConfig::default().check().unwrap_or(QuotaSettings {
            time_zone: Tz::UTC,
            user_defaults: Limits::default(),
            project_defaults: Limits::default(),
            reservation_ttl: Duration::from_secs(900),
            arbitration_margin: 0.1,
            arbitration_timeout: Duration::from_secs(5),
            shared_log: false,
        })
    }
}

impl QuotaConfig {
    pub fn check(&self) -> Result<QuotaSettings, String> {
        let time_zone: Tz = self
            .time_zone
            .parse()
            .map_err(|_| format!("quotas.time_zone: {:?} is not a time zone", self.time_zone))?;
        let usd = |field: &str, usd: f64| -> Result<i64, String> {
            let micro = (usd * 1e6).round();
            match usd.is_finite() && micro >= 0.0 && micro <= LimitKind::CostPerDay.max() as f64 {
                true => Ok(micro as i64),
                false => Err(format!("quotas.{field}: 0 (unlimited) or more (got {usd})")),
            }
        };
        let tokens = |field: &str, tokens: i64| {
            LimitKind::TokensPerDay
                .check(tokens)
                .map_err(|_| format!("quotas.{field}: 0 (unlimited) or more (got {tokens})"))
        };
        let defaults = |tokens_per_day: i64, cost: i64| Limits {
            tokens_per_day: Some(tokens_per_day),
            cost_micro_usd_per_day: Some(cost),
            ..Limits::default()
        };
        if self.reservation_ttl.is_zero() {
            return Err("quotas.reservation_ttl: more than 0s".into());
        }
        if !(0.0..=1.0).contains(&self.arbitration_margin) {
            return Err(format!(
                "quotas.arbitration_margin: between 0 and 1, a part of each daily limit (got {})",
                self.arbitration_margin
            ));
        }
        if self.arbitration_timeout.is_zero() {
            return Err("quotas.arbitration_timeout: more than 0s".into());
        }
        Ok(QuotaSettings {
            time_zone,
            user_defaults: defaults(
                tokens("user_tokens_per_day", self.user_tokens_per_day)?,
                usd("user_usd_per_day", self.user_usd_per_day)?,
            ),
            project_defaults: defaults(
                tokens("project_tokens_per_day", self.project_tokens_per_day)?,
                usd("project_usd_per_day", self.project_usd_per_day)?,
            ),
            reservation_ttl: self.reservation_ttl,
            arbitration_margin: self.arbitration_margin,
            arbitration_timeout: self.arbitration_timeout,
            shared_log: false,
        })
    }
}

/// What a scope is: a tenant, project or key by id, or a user by the id the client sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScopeId {
    Id(Uuid),
    User(Box<str>),
}

impl fmt::Display for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeId::Id(id) => id.fmt(f),
            ScopeId::User(user) => f.write_str(user),
        }
    }
}

/// One scope a request is counted in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub tenant: Uuid,
    pub kind: QuotaScope,
    pub id: ScopeId,
}

impl Scope {
    pub fn of(tenant: Uuid, kind: QuotaScope, id: Uuid) -> Scope {
        Scope {
            tenant,
            kind,
            id: ScopeId::Id(id),
        }
    }

    pub fn user(tenant: Uuid, user: &str) -> Scope {
        Scope {
            tenant,
            kind: QuotaScope::User,
            id: ScopeId::User(user.into()),
        }
    }

    pub fn to_ref(&self) -> QuotaScopeRef {
        QuotaScopeRef {
            scope: self.kind,
            scope_id: self.id.to_string(),
        }
    }

    /// The scope an event names, within `tenant`.
    pub fn from_ref(tenant: Uuid, scope: &QuotaScopeRef) -> Option<Scope> {
        let id = match scope.scope {
            QuotaScope::User => ScopeId::User(scope.scope_id.as_str().into()),
            _ => ScopeId::Id(Uuid::parse_str(&scope.scope_id).ok()?),
        };
        Some(Scope {
            tenant,
            kind: scope.scope,
            id,
        })
    }

    /// The limits set on this scope itself.
    pub fn own_limits(&self, state: &ControlState) -> Limits {
        match &self.id {
            ScopeId::Id(id) => {
                let mut buffer = Uuid::encode_buffer();
                let id = id.as_hyphenated().encode_lower(&mut buffer);
                state.limits(self.tenant, self.kind, id)
            }
            ScopeId::User(user) => state.limits(self.tenant, self.kind, user),
        }
    }

    /// The limits in force on this scope: its own, else the configured default.
    pub fn limits(&self, state: &ControlState, settings: &QuotaSettings) -> Limits {
        let own = self.own_limits(state);
        let default = match self.kind {
            QuotaScope::User => settings.user_defaults,
            QuotaScope::Project => settings.project_defaults,
            QuotaScope::Tenant | QuotaScope::ApiKey => Limits::default(),
        };
        let mut limits = Limits::default();
        for kind in LimitKind::ALL {
            limits.set(kind, own.get(kind).or(default.get(kind)));
        }
        limits
    }
}

/// A scope and the limits in force on it (`0`: unlimited).
#[derive(Debug, Clone)]
pub struct Limited {
    pub scope: Scope,
    pub tokens_per_day: i64,
    pub cost_per_day: i64,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
}

impl Limited {
    pub fn new(scope: Scope, limits: Limits) -> Limited {
        let get = |kind| limits.get(kind).unwrap_or(0);
        Limited {
            scope,
            tokens_per_day: get(LimitKind::TokensPerDay),
            cost_per_day: get(LimitKind::CostPerDay),
            requests_per_minute: get(LimitKind::RequestsPerMinute),
            tokens_per_minute: get(LimitKind::TokensPerMinute),
        }
    }

    pub fn unlimited(&self) -> bool {
        self.tokens_per_day == 0
            && self.cost_per_day == 0
            && self.requests_per_minute == 0
            && self.tokens_per_minute == 0
    }
}

/// A scope's budget on one quota day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub used_tokens: i64,
    pub used_cost: i64,
    pub reserved_tokens: i64,
    pub reserved_cost: i64,
}

impl Budget {
    pub fn tokens(&self) -> i64 {
        self.used_tokens.saturating_add(self.reserved_tokens)
    }

    pub fn cost(&self) -> i64 {
        self.used_cost.saturating_add(self.reserved_cost)
    }
}

/// A scope's rates: the theoretical arrival time (µs) of each GCRA.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    requests_tat: i64,
    tokens_tat: i64,
}

/// A GCRA of `limit` units per minute: the arrival time after charging `units` at `now`, or
/// how long until they fit.
fn gcra(tat: i64, now: i64, units: i64, limit: i64) -> Result<i64, i64> {
    let charged = tat
        .max(now)
        .saturating_add(units.saturating_mul(MINUTE_US) / limit);
    match charged - now <= MINUTE_US {
        true => Ok(charged),
        false => Err(charged - now - MINUTE_US),
    }
}

/// What is left of a GCRA at `now` after arrivals up to `tat`, in units.
fn gcra_remaining(tat: i64, now: i64, limit: i64) -> i64 {
    let used = (tat - now).clamp(0, MINUTE_US);
    (MINUTE_US - used).saturating_mul(limit) / MINUTE_US
}

/// A reservation as the ledger holds it.
#[derive(Debug, Clone)]
pub struct Held {
    pub scopes: Vec<Scope>,
    pub day: i32,
    pub tokens: i64,
    pub cost: i64,
    pub expires_at: TimestampMicros,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub scope: QuotaScope,
    pub scope_id: String,
    pub kind: LimitKind,
    pub limit: i64,
    /// Used and reserved before this request.
    pub used: i64,
    pub retry_after: Duration,
}

impl Denial {
    /// A daily budget, not a rate: retrying before the day ends does not help.
    pub fn is_budget(&self) -> bool {
        matches!(self.kind, LimitKind::TokensPerDay | LimitKind::CostPerDay)
    }
}

/// One `x-ratelimit-*` family: the tightest limit of a request's scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    pub limit: i64,
    pub remaining: i64,
    pub reset: Duration,
}

/// The `x-ratelimit-*` headers of an admitted request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<Headroom>,
    pub tokens: Option<Headroom>,
}

impl RateHeaders {
    fn tighten(slot: &mut Option<Headroom>, candidate: Headroom) {
        if slot.is_none_or(|h| candidate.remaining < h.remaining) {
            *slot = Some(candidate);
        }
    }
}

/// An admitted request's reservation.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub id: Uuid,
    pub held: Held,
    pub headers: RateHeaders,
    /// Near a limit on a shared log: admitted only once the log says so, against these limits
    /// of each scope.
    pub arbitrated: Option<Vec<DailyLimits>>,
}

/// A scope's state now, for `/v1/quota/status` and the admin API.
#[derive(Debug, Clone)]
pub struct ScopeStatus {
    pub limited: Limited,
    pub budget: Budget,
    pub requests_remaining: Option<i64>,
    pub tokens_remaining_this_minute: Option<i64>,
    /// When the quota day ends (µs).
    pub day_ends_at: TimestampMicros,
}

#[derive(Default)]
struct Ledger {
    /// The current quota day and when it ends (µs).
    day: i32,
    day_ends_at: i64,
    budgets: HashMap<(Scope, i32), Budget>,
    rates: HashMap<Scope, Rates>,
    held: HashMap<Uuid, Held>,
    next_sweep: i64,
    /// On a shared log: this gateway's reservations admitted from its own view that it has not
    /// read back from the log yet (the others may not count them yet), with when they were
    /// made, and their sum per scope.
    unconfirmed: HashMap<Uuid, (Held, i64)>,
    unconfirmed_sums: HashMap<Scope, (i64, i64)>,
}

/// What the log says of a reservation admitted in log order.
pub type Verdict = Result<(), Denial>;

/// The quota ledger of a gateway.
pub struct Quotas {
    pub settings: QuotaSettings,
    ledger: Mutex<Ledger>,
    /// Reservations admitted in log order that wait for their verdict.
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<Verdict>>>,
}

/// Days since 1970-01-01 of the date at `now` in `tz`, and when that date ends (µs).
pub fn quota_day(tz: Tz, now: TimestampMicros) -> (i32, TimestampMicros) {
    let utc = DateTime::<Utc>::from_timestamp_micros(now).unwrap_or_default();
    let date = utc.with_timezone(&tz).date_naive();
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let day = i32::try_from((date - epoch).num_days()).unwrap_or(0);
    let next = date
        .succ_opt()
        .unwrap_or(date)
        .and_time(chrono::NaiveTime::MIN);
    // A midnight skipped by a clock change: the day ends at the first instant of the next.
    let ends = tz
        .from_local_datetime(&next)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(next + chrono::Duration::hours(1)))
                .earliest()
        })
        .map_or(now + 86_400_000_000, |at| at.timestamp_micros());
    (day, ends)
}

fn until(at: i64, now: i64) -> Duration {
    Duration::from_micros(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
}

impl Quotas {
    pub fn new(settings: QuotaSettings) -> Quotas {
        Quotas {
            settings,
            ledger: Mutex::default(),
            waiting: Mutex::default(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request estimated at `tokens` and `cost` in every scope of `scopes`, or says
    /// which limit refuses it. Budgets are checked before rates; nothing is charged unless all
    /// of them have room.
    pub fn reserve(
        &self,
        scopes: &[Limited],
        tokens: i64,
        cost: i64,
        now: TimestampMicros,
    ) -> Result<Admitted, Denial> {
        let mut ledger = self.ledger();
        ledger.roll(self.settings.time_zone, now);
        let (day, day_ends_at) = (ledger.day, ledger.day_ends_at);
        let mut headers = RateHeaders::default();
        let mut arbitrate = false;
        for limited in scopes {
            let budget = ledger
                .budgets
                .get(&(limited.scope.clone(), day))
                .copied()
                .unwrap_or_default();
            let deny = |kind: LimitKind, limit: i64, used: i64| Denial {
                scope: limited.scope.kind,
                scope_id: limited.scope.id.to_string(),
                kind,
                limit,
                used,
                retry_after: until(day_ends_at, now),
            };
            if limited.tokens_per_day > 0 {
                if budget.tokens().saturating_add(tokens) > limited.tokens_per_day {
                    return Err(deny(
                        LimitKind::TokensPerDay,
                        limited.tokens_per_day,
                        budget.tokens(),
                    ));
                }
                let remaining = limited.tokens_per_day - budget.tokens() - tokens;
                RateHeaders::tighten(
                    &mut headers.tokens,
                    Headroom {
                        limit: limited.tokens_per_day,
                        remaining,
                        reset: until(day_ends_at, now),
                    },
                );
            }
            if limited.cost_per_day > 0 && budget.cost().saturating_add(cost) > limited.cost_per_day
            {
                return Err(deny(
                    LimitKind::CostPerDay,
                    limited.cost_per_day,
                    budget.cost(),
                ));
            }
            arbitrate =
                arbitrate || ledger.near_limit(&self.settings, limited, &budget, tokens, cost);
        }
        let mut charged = Vec::with_capacity(scopes.len());
        for limited in scopes {
            let rates = ledger
                .rates
                .get(&limited.scope)
                .copied()
                .unwrap_or_default();
            let mut next = rates;
            let deny = |kind: LimitKind, limit: i64, tat: i64, wait: i64| Denial {
                scope: limited.scope.kind,
                scope_id: limited.scope.id.to_string(),
                kind,
                limit,
                used: limit - gcra_remaining(tat, now, limit),
                retry_after: until(now + wait, now),
            };
            if limited.requests_per_minute > 0 {
                let limit = limited.requests_per_minute;
                next.requests_tat = gcra(rates.requests_tat, now, 1, limit).map_err(|wait| {
                    deny(
                        LimitKind::RequestsPerMinute,
                        limit,
                        rates.requests_tat,
                        wait,
                    )
                })?;
                RateHeaders::tighten(
                    &mut headers.requests,
                    Headroom {
                        limit,
                        remaining: gcra_remaining(next.requests_tat, now, limit),
                        reset: until(next.requests_tat, now),
                    },
                );
            }
            if limited.tokens_per_minute > 0 {
                let limit = limited.tokens_per_minute;
                next.tokens_tat = gcra(rates.tokens_tat, now, tokens, limit).map_err(|wait| {
                    // More than a minute's tokens in one request never fits: wait a minute,
                    // and the message says to ask for less.
                    let wait = if tokens > limit { MINUTE_US } else { wait };
                    deny(LimitKind::TokensPerMinute, limit, rates.tokens_tat, wait)
                })?;
                RateHeaders::tighten(
                    &mut headers.tokens,
                    Headroom {
                        limit,
                        remaining: gcra_remaining(next.tokens_tat, now, limit),
                        reset: until(next.tokens_tat, now),
                    },
                );
            }
            charged.push(next);
        }
        for (limited, next) in scopes.iter().zip(charged) {
            if limited.requests_per_minute > 0 || limited.tokens_per_minute > 0 {
                ledger.rates.insert(limited.scope.clone(), next);
            }
        }
        let held = Held {
            scopes: scopes.iter().map(|l| l.scope.clone()).collect(),
            day,
            tokens,
            cost,
            expires_at: now.saturating_add(
                i64::try_from(self.settings.reservation_ttl.as_micros()).unwrap_or(i64::MAX),
            ),
        };
        let id = Uuid::now_v7();
        ledger.hold(id, held.clone());
        let arbitrated = arbitrate.then(|| {
            scopes
                .iter()
                .map(|limited| DailyLimits {
                    tokens_per_day: limited.tokens_per_day,
                    cost_micro_usd_per_day: limited.cost_per_day,
                })
                .collect()
        });
        if self.settings.shared_log && !arbitrate {
            ledger.unconfirm(id, &held, now);
        }
        Ok(Admitted {
            id,
            held,
            headers,
            arbitrated,
        })
    }

    /// Waits for the log's verdict on reservation `id` (admitted in log order): call before its
    /// event is appended.
    pub fn verdict(&self, id: Uuid) -> oneshot::Receiver<Verdict> {
        let (send, receive) = oneshot::channel();
        self.waiters().insert(id, send);
        receive
    }

    /// Stops waiting for the verdict on `id`.
    pub fn forget_verdict(&self, id: Uuid) {
        self.waiters().remove(&id);
    }

    /// Hands the log's verdict on this gateway's reservation `id` to the request waiting for it.
    pub fn decide(&self, id: Uuid, verdict: Verdict) {
        if let Some(waiter) = self.waiters().remove(&id) {
            // The request may have left: then nothing waits for it.
            let _ = waiter.send(verdict);
        }
    }

    /// This gateway read its reservation `id` back from the log: the others see it too.
    pub fn confirm(&self, id: Uuid) {
        self.ledger().confirm(id);
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, oneshot::Sender<Verdict>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settles a reservation with what the request used; `None` if it is not held (settled,
    /// released or expired already). Rates are corrected by the difference from the estimate.
    pub fn settle(&self, id: Uuid, tokens: i64, cost: i64, scopes: &[Limited]) -> Option<Held> {
        let mut ledger = self.ledger();
        let held = ledger.unhold(id)?;
        ledger.consume(&held, tokens, cost);
        let delta = tokens - held.tokens;
        for limited in scopes.iter().filter(|l| l.tokens_per_minute > 0) {
            if let Some(rates) = ledger.rates.get_mut(&limited.scope) {
                rates.tokens_tat = rates
                    .tokens_tat
                    .saturating_add(delta.saturating_mul(MINUTE_US) / limited.tokens_per_minute);
            }
        }
        Some(held)
    }

    /// Gives a reservation back unused; `None` if it is not held.
    pub fn release(&self, id: Uuid) -> Option<Held> {
        self.ledger().unhold(id)
    }

    /// Applies a ledger event another gateway made (or an earlier run of this one): the same
    /// change the local calls made there. A settlement of a reservation not held here still
    /// counts its usage; a reservation past its expiry is not held.
    pub fn apply(&self, event: &Event, now: TimestampMicros) {
        self.ledger().apply(event, now);
    }

    /// A scope's state now.
    pub fn status(&self, limited: Limited, now: TimestampMicros) -> ScopeStatus {
        let mut ledger = self.ledger();
        ledger.roll(self.settings.time_zone, now);
        let budget = ledger
            .budgets
            .get(&(limited.scope.clone(), ledger.day))
            .copied()
            .unwrap_or_default();
        let rates = ledger
            .rates
            .get(&limited.scope)
            .copied()
            .unwrap_or_default();
        let remaining = |limit: i64, tat: i64| (limit > 0).then(|| gcra_remaining(tat, now, limit));
        ScopeStatus {
            requests_remaining: remaining(limited.requests_per_minute, rates.requests_tat),
            tokens_remaining_this_minute: remaining(limited.tokens_per_minute, rates.tokens_tat),
            budget,
            limited,
            day_ends_at: ledger.day_ends_at,
        }
    }

    /// The scopes of a tenant with a budget counted today, of one kind.
    pub fn counted(&self, tenant: Uuid, kind: QuotaScope, now: TimestampMicros) -> Vec<Scope> {
        let mut ledger = self.ledger();
        ledger.roll(self.settings.time_zone, now);
        let day = ledger.day;
        ledger
            .budgets
            .keys()
            .filter(|(scope, d)| *d == day && scope.tenant == tenant && scope.kind == kind)
            .map(|(scope, _)| scope.clone())
            .collect()
    }
}

impl Ledger {
    /// Moves to the quota day of `now`, and sweeps now and then: reservations past their
    /// expiry are dropped, counters of days before yesterday and replenished rates forgotten.
    fn roll(&mut self, tz: Tz, now: i64) {
        if now >= self.day_ends_at {
            (self.day, self.day_ends_at) = quota_day(tz, now);
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_US;
        let expired: Vec<Uuid> = self
            .held
            .iter()
            .filter(|(_, held)| held.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.unhold(id);
        }
        // Not read back in a minute (the log is down, or far behind): the margin is not held
        // up by them.
        let unread: Vec<Uuid> = self
            .unconfirmed
            .iter()
            .filter(|(_, (_, at))| *at <= now - MINUTE_US)
            .map(|(id, _)| *id)
            .collect();
        for id in unread {
            self.confirm(id);
        }
        let today = self.day;
        self.budgets.retain(|(_, day), _| *day >= today - 1);
        self.rates
            .retain(|_, rates| rates.requests_tat > now || rates.tokens_tat > now);
    }

    /// Applies a ledger event made by any gateway, at `now`.
    fn apply(&mut self, event: &Event, now: i64) {
        let tenant = event.envelope.tenant_id;
        let scopes = |refs: &[QuotaScopeRef]| -> Vec<Scope> {
            refs.iter()
                .filter_map(|r| Scope::from_ref(tenant, r))
                .collect()
        };
        match &event.payload {
            Payload::QuotaReserved(r)
                if r.expires_at > now && !self.held.contains_key(&r.reservation_id) =>
            {
                let held = Held {
                    scopes: scopes(&r.scopes),
                    day: r.day,
                    tokens: r.tokens,
                    cost: r.cost_micro_usd,
                    expires_at: r.expires_at,
                };
                self.hold(r.reservation_id, held);
            }
            Payload::QuotaConsumed(c) => {
                if let Some(id) = c.reservation_id {
                    self.unhold(id);
                }
                let used = Held {
                    scopes: scopes(&c.scopes),
                    day: c.day,
                    tokens: c.tokens,
                    cost: c.cost_micro_usd,
                    expires_at: 0,
                };
                self.consume(&used, used.tokens, used.cost);
            }
            Payload::QuotaReleased(r) => {
                self.unhold(r.reservation_id);
            }
            _ => {}
        }
    }

    /// Whether admitting `tokens` and `cost` in `limited` must be arbitrated through the log:
    /// on a shared log, when it brings the scope within the margin of a daily limit, or this
    /// gateway's reservations the others have not read yet above the margin.
    fn near_limit(
        &self,
        settings: &QuotaSettings,
        limited: &Limited,
        budget: &Budget,
        tokens: i64,
        cost: i64,
    ) -> bool {
        if !settings.shared_log || settings.arbitration_margin == 0.0 {
            return false;
        }
        let (unseen_tokens, unseen_cost) = self
            .unconfirmed_sums
            .get(&limited.scope)
            .copied()
            .unwrap_or_default();
        let near = |limit: i64, counted: i64, unseen: i64, amount: i64| {
            let margin = (limit as f64 * settings.arbitration_margin) as i64;
            limit > 0
                && (counted.saturating_add(amount) > limit - margin
                    || unseen.saturating_add(amount) > margin)
        };
        near(
            limited.tokens_per_day,
            budget.tokens(),
            unseen_tokens,
            tokens,
        ) || near(limited.cost_per_day, budget.cost(), unseen_cost, cost)
    }

    fn unconfirm(&mut self, id: Uuid, held: &Held, now: i64) {
        for scope in &held.scopes {
            let sums = self.unconfirmed_sums.entry(scope.clone()).or_default();
            sums.0 = sums.0.saturating_add(held.tokens);
            sums.1 = sums.1.saturating_add(held.cost);
        }
        self.unconfirmed.insert(id, (held.clone(), now));
    }

    fn confirm(&mut self, id: Uuid) {
        let Some((held, _)) = self.unconfirmed.remove(&id) else {
            return;
        };
        for scope in &held.scopes {
            if let Some(sums) = self.unconfirmed_sums.get_mut(scope) {
                sums.0 -= held.tokens;
                sums.1 -= held.cost;
                if sums.0 <= 0 && sums.1 <= 0 {
                    self.unconfirmed_sums.remove(scope);
                }
            }
        }
    }

    /// Whether the reservation fits every scope's daily limits it was arbitrated against.
    fn room(
        &self,
        tenant: Uuid,
        reserved: &QuotaReserved,
        limits: &[DailyLimits],
        now: i64,
    ) -> Verdict {
        for (scope, limits) in reserved.scopes.iter().zip(limits) {
            let Some(scope) = Scope::from_ref(tenant, scope) else {
                continue;
            };
            let key = (scope, reserved.day);
            let budget = self.budgets.get(&key).copied().unwrap_or_default();
            let checks = [
                (
                    LimitKind::TokensPerDay,
                    limits.tokens_per_day,
                    budget.tokens(),
                    reserved.tokens,
                ),
                (
                    LimitKind::CostPerDay,
                    limits.cost_micro_usd_per_day,
                    budget.cost(),
                    reserved.cost_micro_usd,
                ),
            ];
            for (kind, limit, counted, amount) in checks {
                if limit > 0 && counted.saturating_add(amount) > limit {
                    return Err(Denial {
                        scope: key.0.kind,
                        scope_id: key.0.id.to_string(),
                        kind,
                        limit,
                        used: counted,
                        retry_after: until(self.day_ends_at, now),
                    });
                }
            }
        }
        Ok(())
    }

    fn hold(&mut self, id: Uuid, held: Held) {
        for scope in &held.scopes {
            let budget = self.budgets.entry((scope.clone(), held.day)).or_default();
            budget.reserved_tokens = budget.reserved_tokens.saturating_add(held.tokens);
            budget.reserved_cost = budget.reserved_cost.saturating_add(held.cost);
        }
        self.held.insert(id, held);
    }

    fn unhold(&mut self, id: Uuid) -> Option<Held> {
        let held = self.held.remove(&id)?;
        for scope in &held.scopes {
            if let Some(budget) = self.budgets.get_mut(&(scope.clone(), held.day)) {
                budget.reserved_tokens = (budget.reserved_tokens - held.tokens).max(0);
                budget.reserved_cost = (budget.reserved_cost - held.cost).max(0);
            }
        }
        Some(held)
    }

    fn consume(&mut self, held: &Held, tokens: i64, cost: i64) {
        for scope in &held.scopes {
            let budget = self.budgets.entry((scope.clone(), held.day)).or_default();
            budget.used_tokens = budget.used_tokens.saturating_add(tokens);
            budget.used_cost = budget.used_cost.saturating_add(cost);
        }
    }
}

/// The ledger in log order, as every gateway folds it alike from the quota topic: it decides the
/// reservations admitted in log order. Expiry and the quota day go by the events' own times.
pub struct Arbiter {
    ledger: Ledger,
    time_zone: Tz,
}

impl Arbiter {
    pub fn new(time_zone: Tz) -> Arbiter {
        Arbiter {
            ledger: Ledger::default(),
            time_zone,
        }
    }

    /// Folds the next event of the quota topic; for a reservation admitted in log order, the
    /// verdict: it counts if it fits every scope's limit after the events before it, else
    /// nowhere.
    pub fn fold(&mut self, event: &Event) -> Option<Verdict> {
        let at = event.envelope.occurred_at;
        self.ledger.roll(self.time_zone, at);
        if let Payload::QuotaReserved(reserved) = &event.payload
            && let Some(limits) = &reserved.arbitrated
        {
            let verdict = self
                .ledger
                .room(event.envelope.tenant_id, reserved, limits, at);
            if verdict.is_ok() {
                self.ledger.apply(event, at);
            }
            return Some(verdict);
        }
        self.ledger.apply(event, at);
        None
    }
}

/// A duration as OpenAI writes `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn reset_format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m{seconds}s"),
        _ => format!("{hours}h{minutes}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000_000;

    fn scope(kind: QuotaScope) -> Scope {
        match kind {
            QuotaScope::User => Scope::user(Uuid::nil(), "ada"),
            _ => Scope::of(Uuid::nil(), kind, Uuid::from_u128(kind as u128 + 1)),
        }
    }

    fn limited(kind: QuotaScope, tokens_per_day: i64, cost_per_day: i64) -> Limited {
        Limited {
            tokens_per_day,
            cost_per_day,
            ..Limited::new(scope(kind), Limits::default())
        }
    }

    fn quotas() -> Quotas {
        Quotas::new(QuotaSettings::default())
    }

    #[test]
    fn budgets_admit_until_every_scope_is_full_and_charge_all_or_none() {
        let quotas = quotas();
        let scopes = [
            limited(QuotaScope::Tenant, 0, 0),
            limited(QuotaScope::Project, 1_000, 0),
            limited(QuotaScope::User, 0, 500),
        ];
        let first = quotas.reserve(&scopes, 600, 100, T).unwrap();
        // The project has 400 tokens left: a request for 500 is refused, and charges nothing.
        let denied = quotas.reserve(&scopes, 500, 100, T).unwrap_err();
        assert_eq!(
            (denied.scope, denied.kind, denied.limit, denied.used),
            (QuotaScope::Project, LimitKind::TokensPerDay, 1_000, 600)
        );
        assert!(denied.is_budget());
        let user = quotas.status(scopes[2].clone(), T);
        assert_eq!(user.budget.reserved_cost, 100);
        // Settled below the estimate: the difference is free again.
        quotas.settle(first.id, 200, 50, &scopes).unwrap();
        assert!(quotas.settle(first.id, 200, 50, &scopes).is_none(), "once");
        let project = quotas.status(scopes[1].clone(), T);
        assert_eq!(
            project.budget,
            Budget {
                used_tokens: 200,
                used_cost: 50,
                ..Budget::default()
            }
        );
        let second = quotas.reserve(&scopes, 800, 450, T).unwrap();
        assert_eq!(
            second.headers.tokens.map(|h| (h.limit, h.remaining)),
            Some((1_000, 0))
        );
        let denied = quotas.reserve(&scopes, 0, 1, T).unwrap_err();
        assert_eq!(
            (denied.scope, denied.kind),
            (QuotaScope::User, LimitKind::CostPerDay)
        );
        quotas.release(second.id).unwrap();
        quotas.reserve(&scopes, 800, 450, T).unwrap();
    }

    #[test]
    fn a_new_day_starts_empty_and_denials_wait_for_it() {
        let quotas = quotas();
        let scopes = [limited(QuotaScope::ApiKey, 100, 0)];
        let (_, midnight) = quota_day(Tz::UTC, T);
        let admitted = quotas
            .reserve(&scopes, 100, 0, midnight - 10_000_000)
            .unwrap();
        quotas.settle(admitted.id, 100, 0, &scopes).unwrap();
        let denied = quotas
            .reserve(&scopes, 1, 0, midnight - 10_000_000)
            .unwrap_err();
        assert_eq!(denied.retry_after, Duration::from_secs(10));
        quotas.reserve(&scopes, 100, 0, midnight).unwrap();
    }

    #[test]
    fn unsettled_reservations_expire() {
        let quotas = quotas();
        let scopes = [limited(QuotaScope::User, 100, 0)];
        quotas.reserve(&scopes, 100, 0, T).unwrap();
        assert!(quotas.reserve(&scopes, 1, 0, T + 1).is_err());
        let ttl = i64::try_from(quotas.settings.reservation_ttl.as_micros()).unwrap();
        quotas.reserve(&scopes, 100, 0, T + ttl + 1).unwrap();
    }

    #[test]
    fn rates_are_a_gcra_per_scope_corrected_at_settlement() {
        let quotas = quotas();
        let scopes = [Limited {
            requests_per_minute: 3,
            tokens_per_minute: 1_000,
            ..limited(QuotaScope::ApiKey, 0, 0)
        }];
        let first = quotas.reserve(&scopes, 500, 0, T).unwrap();
        assert_eq!(
            first.headers.requests,
            Some(Headroom {
                limit: 3,
                remaining: 2,
                reset: Duration::from_secs(20)
            })
        );
        // 500 more tokens fit, 600 do not; settling the first at 100 makes room.
        let denied = quotas.reserve(&scopes, 600, 0, T).unwrap_err();
        assert_eq!(denied.kind, LimitKind::TokensPerMinute);
        assert_eq!(denied.retry_after, Duration::from_secs(6));
        quotas.settle(first.id, 100, 0, &scopes).unwrap();
        quotas.reserve(&scopes, 600, 0, T).unwrap();
        // A refused request took no request: the third still fits, the fourth does not.
        quotas.reserve(&scopes, 0, 0, T).unwrap();
        let denied = quotas.reserve(&scopes, 0, 0, T).unwrap_err();
        assert_eq!(
            (denied.kind, denied.limit, denied.used),
            (LimitKind::RequestsPerMinute, 3, 3)
        );
        // One request's worth comes back every 20 s.
        quotas.reserve(&scopes, 0, 0, T + 20_000_000).unwrap();
        // More tokens than a minute allows never fit.
        let too_big = quotas
            .reserve(&scopes, 1_001, 0, T + 600_000_000)
            .unwrap_err();
        assert_eq!(too_big.retry_after, Duration::from_secs(60));
    }

    #[test]
    fn the_quota_day_follows_the_time_zone() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // 2026-12-05T03:00:00Z is still the 4th in New York; the day ends at 05:00Z.
        let at = DateTime::parse_from_rfc3339("2026-12-05T03:00:00Z").unwrap();
        let (day, ends) = quota_day(tz, at.timestamp_micros());
        let (utc_day, _) = quota_day(Tz::UTC, at.timestamp_micros());
        assert_eq!(day + 1, utc_day);
        let end = DateTime::parse_from_rfc3339("2026-12-05T05:00:00Z").unwrap();
        assert_eq!(ends, end.timestamp_micros());
    }

    #[test]
    fn another_gateways_ledger_events_count_here() {
        use loom_schemas::event::{Envelope, QuotaConsumed, QuotaReleased, QuotaReserved};
        let (here, there) = (quotas(), quotas());
        let scopes = [limited(QuotaScope::User, 1_000, 0)];
        let event = |payload: Payload| Event {
            envelope: Envelope::new(Uuid::nil(), Some("t".into()), "gateway/other/1"),
            payload,
        };
        let refs: Vec<QuotaScopeRef> = scopes.iter().map(|l| l.scope.to_ref()).collect();
        let admitted = there.reserve(&scopes, 600, 0, T).unwrap();
        let reserved = QuotaReserved {
            reservation_id: admitted.id,
            scopes: refs.clone(),
            day: admitted.held.day,
            tokens: 600,
            cost_micro_usd: 0,
            expires_at: admitted.held.expires_at,
            arbitrated: None,
        };
        here.apply(&event(reserved.clone().into()), T);
        assert!(
            here.reserve(&scopes, 500, 0, T).is_err(),
            "600 of 1,000 held there"
        );
        here.apply(
            &event(
                QuotaConsumed {
                    reservation_id: Some(admitted.id),
                    scopes: refs.clone(),
                    day: admitted.held.day,
                    tokens: 100,
                    cost_micro_usd: 0,
                    reserved_tokens: 600,
                    reserved_cost_micro_usd: 0,
                }
                .into(),
            ),
            T,
        );
        let user = here.status(scopes[0].clone(), T);
        assert_eq!(
            (user.budget.used_tokens, user.budget.reserved_tokens),
            (100, 0)
        );
        // A reservation released, and one past its expiry when read, hold nothing.
        let second = QuotaReserved {
            reservation_id: Uuid::now_v7(),
            ..reserved.clone()
        };
        here.apply(&event(second.clone().into()), T);
        here.apply(
            &event(
                QuotaReleased {
                    reservation_id: second.reservation_id,
                    scopes: refs,
                    day: second.day,
                    tokens: 600,
                    cost_micro_usd: 0,
                    reason: "failed".into(),
                }
                .into(),
            ),
            T,
        );
        let expired = QuotaReserved {
            reservation_id: Uuid::now_v7(),
            expires_at: T - 1,
            ..reserved
        };
        here.apply(&event(expired.into()), T);
        assert_eq!(here.status(scopes[0].clone(), T).budget.reserved_tokens, 0);
    }

    #[test]
    fn resets_read_as_openai_writes_them() {
        assert_eq!(reset_format(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_format(Duration::from_secs(1)), "1s");
        assert_eq!(reset_format(Duration::from_millis(1500)), "2s");
        assert_eq!(reset_format(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_format(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn defaults_apply_where_a_scope_sets_nothing() {
        let settings = QuotaConfig {
            user_usd_per_day: 2.5,
            ..QuotaConfig::default()
        }
        .check()
        .unwrap();
        let state = ControlState::default();
        let user = Scope::user(Uuid::nil(), "u-1").limits(&state, &settings);
        assert_eq!(user.cost_micro_usd_per_day, Some(2_500_000));
        assert_eq!(user.tokens_per_day, Some(1_000_000));
        let key = scope(QuotaScope::ApiKey).limits(&state, &settings);
        assert!(Limited::new(scope(QuotaScope::ApiKey), key).unlimited());
        let bad = QuotaConfig {
            time_zone: "Mars/Olympus".into(),
            ..QuotaConfig::default()
        };
        assert!(bad.check().unwrap_err().contains("quotas.time_zone"));
        let negative = QuotaConfig {
            project_usd_per_day: -1.0,
            ..QuotaConfig::default()
        };
        assert!(
            negative
                .check()
                .unwrap_err()
                .contains("project_usd_per_day")
        );
    }

    fn shared() -> Quotas {
        Quotas::new(QuotaSettings {
            shared_log: true,
            ..QuotaSettings::default()
        })
    }

    #[test]
    fn on_a_shared_log_reservations_near_a_limit_or_above_the_unseen_margin_are_arbitrated() {
        let quotas = shared();
        let scopes = [limited(QuotaScope::User, 1_000, 0)];
        // The margin is 100 tokens: 100 the others have not seen is admitted here...
        let first = quotas.reserve(&scopes, 100, 0, T).unwrap();
        assert!(first.arbitrated.is_none());
        // ...but not 150.
        let second = quotas.reserve(&scopes, 50, 0, T).unwrap();
        assert_eq!(
            second.arbitrated,
            Some(vec![DailyLimits {
                tokens_per_day: 1_000,
                cost_micro_usd_per_day: 0
            }])
        );
        quotas.release(second.id);
        // Once the first is read back from the log, the others see it.
        quotas.confirm(first.id);
        let third = quotas.reserve(&scopes, 50, 0, T).unwrap();
        assert!(third.arbitrated.is_none());
        quotas.confirm(third.id);
        // Within 100 of the limit: arbitrated, however little the others have not seen.
        let fourth = quotas.reserve(&scopes, 700, 0, T).unwrap();
        assert!(fourth.arbitrated.is_some(), "850 of 1,000");
        // Not on a log of its own, nor with no margin.
        let alone = Quotas::new(QuotaSettings::default());
        assert!(
            alone
                .reserve(&scopes, 950, 0, T)
                .unwrap()
                .arbitrated
                .is_none()
        );
        let no_margin = Quotas::new(QuotaSettings {
            shared_log: true,
            arbitration_margin: 0.0,
            ..QuotaSettings::default()
        });
        assert!(
            no_margin
                .reserve(&scopes, 950, 0, T)
                .unwrap()
                .arbitrated
                .is_none()
        );
    }

    #[test]
    fn the_arbiter_admits_in_log_order_what_fits_and_counts_the_rest_nowhere() {
        use loom_schemas::event::{Envelope, QuotaConsumed};
        let scope = scope(QuotaScope::User).to_ref();
        let event = |payload: Payload| {
            let mut envelope = Envelope::new(Uuid::nil(), None, "gateway/x/1");
            envelope.occurred_at = T;
            Event { envelope, payload }
        };
        let limits = Some(vec![DailyLimits {
            tokens_per_day: 1_000,
            cost_micro_usd_per_day: 0,
        }]);
        let (day, _) = quota_day(Tz::UTC, T);
        let reserved = |id: u128, tokens: i64, arbitrated: Option<Vec<DailyLimits>>| {
            event(
                QuotaReserved {
                    reservation_id: Uuid::from_u128(id),
                    scopes: vec![scope.clone()],
                    day,
                    tokens,
                    cost_micro_usd: 0,
                    expires_at: T + 60_000_000,
                    arbitrated,
                }
                .into(),
            )
        };
        let mut arbiter = Arbiter::new(Tz::UTC);
        // Admitted by its gateway: counted whatever it brings the scope to.
        assert_eq!(arbiter.fold(&reserved(1, 700, None)), None);
        assert_eq!(
            arbiter.fold(&reserved(2, 300, limits.clone())),
            Some(Ok(()))
        );
        let refused = arbiter.fold(&reserved(3, 1, limits.clone()));
        let denial = refused.unwrap().unwrap_err();
        assert_eq!(
            (denial.kind, denial.limit, denial.used),
            (LimitKind::TokensPerDay, 1_000, 1_000)
        );
        // A settlement below the estimate makes room; the refused reservation held none.
        let settled = QuotaConsumed {
            reservation_id: Some(Uuid::from_u128(1)),
            scopes: vec![scope.clone()],
            day,
            tokens: 400,
            cost_micro_usd: 0,
            reserved_tokens: 700,
            reserved_cost_micro_usd: 0,
        };
        assert_eq!(arbiter.fold(&event(settled.into())), None);
        assert_eq!(
            arbiter.fold(&reserved(4, 300, limits.clone())),
            Some(Ok(()))
        );
        assert!(matches!(
            arbiter.fold(&reserved(5, 1, limits)),
            Some(Err(_))
        ));
    }
}
