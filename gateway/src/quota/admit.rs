//! Quotas on the request path: the scopes a request is counted in, its reservation before the
//! upstream call (`quota.reserved`, or `quota.denied` and a 429), and its settlement after
//! (`quota.consumed`, or `quota.released` when the call used nothing).

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use loom_schemas::event::{
    Envelope, Event, QuotaConsumed, QuotaDenied, QuotaReleased, QuotaReserved, QuotaScope,
    now_micros,
};
use serde_json::Value;

use super::{Admitted, Denial, Held, Limited, RateHeaders, Scope, reset_format};
use crate::error::GatewayError;
use crate::flow::Flow;
use crate::gateway::Gateway;
use crate::record::Outcome;
use crate::tokens;

/// A request's reservation. Dropped unsettled (the request ended some other way), it is
/// released and `quota.released` recorded with reason `abandoned`.
pub(crate) struct Reservation {
    pub admitted: Admitted,
    scopes: Vec<Limited>,
    gateway: Arc<Gateway>,
    envelope: Envelope,
}

impl Flow {
    /// The scopes the request is counted in, with the limits in force on each: its tenant,
    /// project, user and key.
    fn quota_scopes(&self) -> Vec<Limited> {
        let Some(key) = &self.key else {
            return Vec::new();
        };
        let tenant = key.tenant_id;
        let mut scopes = Vec::with_capacity(4);
        scopes.push(Scope::of(tenant, QuotaScope::Tenant, tenant));
        if let Some(project) = key.project_id {
            scopes.push(Scope::of(tenant, QuotaScope::Project, project));
        }
        if let Some(user) = &self.user {
            scopes.push(Scope::user(tenant, user));
        }
        scopes.push(Scope::of(tenant, QuotaScope::ApiKey, key.key_id));
        let settings = &self.gateway.config.quotas;
        self.control.read(|state| {
            scopes
                .into_iter()
                .map(|scope| {
                    let limits = scope.limits(state, settings);
                    Limited::new(scope, limits)
                })
                .filter(|limited| !limited.unlimited())
                .collect()
        })
    }

    /// Reserves the request's estimate in every limited scope, recording `quota.reserved`; or
    /// records `quota.denied` and returns the 429. A request no limit applies to reserves
    /// nothing.
    pub async fn reserve(
        &mut self,
        request: &Value,
        embeddings: bool,
        order: &[usize],
    ) -> Result<(), GatewayError> {
        let scopes = self.quota_scopes();
        if scopes.is_empty() {
            return Ok(());
        }
        // The prompt is counted by its bytes here (an over-estimate for most text, and cheap):
        // the settlement puts the real count in its place.
        let prompt = (tokens::prompt_bytes(request) + 2) / 3;
        let (tokens, cost) = self.estimate(request, embeddings, order, prompt);
        let quotas = &self.gateway.quotas;
        let admitted = match quotas.reserve(&scopes, tokens, cost, now_micros()) {
            Ok(admitted) => admitted,
            Err(denial) => return Err(self.deny(denial).await),
        };
        let id = admitted.id;
        let held = &admitted.held;
        let event = self.event(QuotaReserved {
            reservation_id: id,
            scopes: held.scopes.iter().map(Scope::to_ref).collect(),
            day: held.day,
            tokens: held.tokens,
            cost_micro_usd: held.cost,
            expires_at: held.expires_at,
            arbitrated: admitted.arbitrated.clone(),
        });
        let verdict = admitted.arbitrated.is_some().then(|| quotas.verdict(id));
        let envelope = event.envelope.clone();
        self.gateway.emitter.emit(event).await;
        // From here on, a request that ends unsettled releases what it holds.
        self.quota = Some(Reservation {
            admitted,
            scopes,
            gateway: Arc::clone(&self.gateway),
            envelope,
        });
        let Some(verdict) = verdict else {
            return Ok(());
        };
        let timeout = self.gateway.config.quotas.arbitration_timeout;
        match tokio::time::timeout(timeout, verdict).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(denial))) => {
                // Refused in log order: it counts nowhere, so there is nothing to release.
                self.gateway.quotas.release(id);
                self.quota = None;
                Err(self.deny(denial).await)
            }
            Ok(Err(_)) | Err(_) => {
                if let Some(reservation) = self.quota.take() {
                    reservation.release("unarbitrated");
                }
                Err(GatewayError::QuotaUnavailable)
            }
        }
    }

    /// Records `quota.denied` and returns the 429.
    async fn deny(&self, denial: Denial) -> GatewayError {
        crate::meter::quota_denied(denial.scope, denial.kind.metric());
        let event = self.event(QuotaDenied {
            scope: denial.scope,
            scope_id: denial.scope_id.clone(),
            metric: denial.kind.metric(),
            window: denial.kind.window(),
            limit: denial.limit,
            used: denial.used,
            retry_after_ms: i64::try_from(denial.retry_after.as_millis()).ok(),
        });
        self.gateway.emitter.emit(event).await;
        GatewayError::Quota(denial)
    }

    /// Settles the request's reservation with what `outcome` used (`quota.consumed`), or
    /// releases it if the upstream call used nothing (`quota.released`). `None` without one.
    pub fn settlement(&self, outcome: &Outcome) -> Option<Event> {
        let reservation = self.quota.as_ref()?;
        let id = reservation.admitted.id;
        let quotas = &self.gateway.quotas;
        let usage = &outcome.usage;
        if usage.tokens_in.is_none() && usage.tokens_out.is_none() {
            let held = quotas.release(id)?;
            return Some(self.event(released(id, &held, "failed")));
        }
        let tokens = usage.tokens_in.unwrap_or(0) + usage.tokens_out.unwrap_or(0);
        let cost = outcome.cost_micro_usd.unwrap_or(0);
        let held = quotas.settle(id, tokens, cost, &reservation.scopes)?;
        Some(self.event(QuotaConsumed {
            reservation_id: Some(id),
            scopes: held.scopes.iter().map(Scope::to_ref).collect(),
            day: held.day,
            tokens,
            cost_micro_usd: cost,
            reserved_tokens: held.tokens,
            reserved_cost_micro_usd: held.cost,
        }))
    }

    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of an admitted request.
    pub fn rate_headers(&self, headers: &mut HeaderMap) {
        let Some(reservation) = &self.quota else {
            return;
        };
        let RateHeaders { requests, tokens } = reservation.admitted.headers;
        for (names, headroom) in [(&REQUESTS, requests), (&TOKENS, tokens)] {
            let Some(headroom) = headroom else {
                continue;
            };
            let [limit, remaining, reset] = names;
            headers.insert(limit, HeaderValue::from(headroom.limit));
            headers.insert(remaining, HeaderValue::from(headroom.remaining.max(0)));
            if let Ok(value) = HeaderValue::from_str(&reset_format(headroom.reset)) {
                headers.insert(reset, value);
            }
        }
    }
}

/// `x-ratelimit-{limit,remaining,reset}-requests`.
const REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
/// `x-ratelimit-{limit,remaining,reset}-tokens`.
const TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

fn released(id: uuid::Uuid, held: &Held, reason: &str) -> QuotaReleased {
    QuotaReleased {
        reservation_id: id,
        scopes: held.scopes.iter().map(Scope::to_ref).collect(),
        day: held.day,
        tokens: held.tokens,
        cost_micro_usd: held.cost,
        reason: reason.into(),
    }
}

impl Reservation {
    /// Releases what the reservation still holds, recording `quota.released` with `reason`.
    fn release(&self, reason: &str) {
        let id = self.admitted.id;
        let quotas = &self.gateway.quotas;
        if self.admitted.arbitrated.is_some() {
            quotas.forget_verdict(id);
        }
        let Some(held) = quotas.release(id) else {
            return;
        };
        let envelope = Envelope::new(
            self.envelope.tenant_id,
            self.envelope.trace_id.clone(),
            self.envelope.producer.clone(),
        );
        let event = Event {
            envelope,
            payload: released(id, &held, reason).into(),
        };
        let emitter = self.gateway.emitter.clone();
        if let Err(event) = emitter.try_emit(event) {
            self.gateway.tasks.spawn(async move {
                emitter.emit(*event).await;
            });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release("abandoned");
    }
}
