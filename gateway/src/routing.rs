//! Routing: an alias's deployments in the order to try them (as listed, or the first drawn by
//! weight), skipping those cooling down after their retries ran out; the decision is recorded as
//! `routing.decided`.

use std::sync::atomic::Ordering;

use loom_schemas::event::{Event, RouteCandidate, RoutingDecided, now_micros};

use loom_schemas::project::{RoutingPolicy, Tier};

use crate::config::{AUTO, Model, Strategy};
use crate::error::GatewayError;
use crate::flow::Flow;
use crate::gateway::Gateway;

impl Gateway {
    pub(crate) fn cooling_down(&self, deployment: usize, now: i64) -> bool {
        self.cooldown_until
            .get(deployment)
            .is_some_and(|until| until.load(Ordering::Relaxed) > now)
    }

    /// Skips `deployment` for the configured cool-down.
    pub(crate) fn cool_down(&self, deployment: usize) {
        if let Some(until) = self.cooldown_until.get(deployment) {
            let cooldown =
                i64::try_from(self.config.routing.cooldown.as_micros()).unwrap_or(i64::MAX);
            until.store(now_micros().saturating_add(cooldown), Ordering::Relaxed);
        }
    }
}

/// What a request's model resolves to under its project's routing policy: the alias to route,
/// and the aliases of higher tiers to escalate to when every deployment of it fails.
pub(crate) struct Plan<'a> {
    pub model: &'a Model,
    pub escalation: Vec<&'a Model>,
}

/// Whether `policy` lets its project call `model`: listed in `allowed_models` (if it has a list)
/// and not above `max_tier` (an alias without a tier is limited by the list only).
pub(crate) fn allows(policy: Option<&RoutingPolicy>, model: &Model) -> bool {
    listed(policy, model) && within(policy, model)
}

fn listed(policy: Option<&RoutingPolicy>, model: &Model) -> bool {
    policy
        .and_then(|p| p.allowed_models.as_ref())
        .is_none_or(|allowed| allowed.contains(&model.alias))
}

fn within(policy: Option<&RoutingPolicy>, model: &Model) -> bool {
    let max_tier = policy.and_then(|p| p.max_tier);
    model
        .tier
        .is_none_or(|t| max_tier.is_none_or(|max| t <= max))
}

/// Resolves `requested` (an alias, or `auto` for the project's default tier) under the routing
/// policy of the request's project: refused if the policy does not allow the alias or its tier.
/// An alias without a tier is limited by `allowed_models` only.
pub(crate) fn plan<'a>(flow: &'a Flow, requested: &str) -> Result<Plan<'a>, GatewayError> {
    let models = &flow.gateway.config.models;
    let policy = flow.policy.as_deref();
    let listed = |m: &Model| listed(policy, m);
    let within = |m: &Model| within(policy, m);
    let max_tier = policy.and_then(|p| p.max_tier);
    let not_found = || GatewayError::ModelNotFound(requested.to_owned());
    let model = match requested {
        AUTO => {
            let tier = policy.and_then(|p| p.default_tier).ok_or_else(not_found)?;
            models
                .values()
                .find(|m| m.tier == Some(tier) && listed(m))
                .ok_or_else(not_found)?
        }
        alias => {
            let model = models.get(alias).ok_or_else(not_found)?;
            if !listed(model) {
                return Err(GatewayError::ModelNotAllowed(format!(
                    "The model `{alias}` is not in your project's allowed models."
                )));
            }
            if !within(model) {
                return Err(GatewayError::ModelNotAllowed(format!(
                    "The model `{alias}` is above your project's highest tier ({}).",
                    max_tier.map_or("", Tier::name)
                )));
            }
            model
        }
    };
    let escalate = policy.is_some_and(|p| p.escalate_on_failure);
    let escalation = match (escalate, model.tier) {
        (true, Some(tier)) => [Tier::L1, Tier::L2, Tier::L3]
            .into_iter()
            .filter(|t| *t > tier && max_tier.is_none_or(|max| *t <= max))
            .filter_map(|t| models.values().find(|m| m.tier == Some(t) && listed(m)))
            .collect(),
        _ => Vec::new(),
    };
    Ok(Plan { model, escalation })
}

/// The deployments to try for a request's alias, in order, and the `routing.decided` event.
/// With `pinned` (the upstream that holds a request's `previous_response_id`), only the alias's
/// deployments on that upstream are tried, if it has any. The deployments of the aliases the
/// plan escalates to come last.
pub(crate) fn route(flow: &Flow, plan: &Plan, pinned: Option<usize>) -> (Vec<usize>, Event) {
    let gateway = &flow.gateway;
    let model = plan.model;
    let now = now_micros();
    let mut order: Vec<usize> = model.deployments.clone();
    if model.strategy == Strategy::Weighted {
        // Draw the first by weight; the others follow in the listed order as fallbacks.
        let eligible: Vec<usize> = order
            .iter()
            .copied()
            .filter(|d| !gateway.cooling_down(*d, now))
            .collect();
        let total: u64 = eligible
            .iter()
            .map(|d| u64::from(gateway.config.deployments[*d].weight))
            .sum();
        if total > 0 {
            let mut pick = fastrand::u64(0..total);
            if let Some(first) = eligible.iter().copied().find(|d| {
                let weight = u64::from(gateway.config.deployments[*d].weight);
                if pick < weight {
                    return true;
                }
                pick -= weight;
                false
            }) {
                order.retain(|d| *d != first);
                order.insert(0, first);
            }
        }
    }
    let escalation: Vec<usize> = plan
        .escalation
        .iter()
        .flat_map(|m| m.deployments.iter().copied())
        .filter(|d| !model.deployments.contains(d))
        .collect();
    let candidates = order
        .iter()
        .chain(&escalation)
        .map(|d| {
            let deployment = &gateway.config.deployments[*d];
            let upstream = &gateway.config.upstreams[deployment.upstream];
            RouteCandidate {
                deployment: deployment.name.clone(),
                provider: upstream.kind.name().to_owned(),
                model: deployment.model.clone(),
                weight: i32::try_from(deployment.weight).unwrap_or(i32::MAX),
                skipped: gateway
                    .cooling_down(*d, now)
                    .then(|| "cooling_down".to_owned()),
            }
        })
        .collect::<Vec<_>>();
    let eligible: Vec<usize> = order
        .iter()
        .copied()
        .filter(|d| !gateway.cooling_down(*d, now))
        .collect();
    // When every deployment is cooling down, try them all anyway rather than fail outright.
    let (mut order, mut reason) = match (eligible.is_empty(), model.strategy) {
        (true, _) => (order, "all_cooling_down"),
        (false, Strategy::Weighted) => (eligible, "weighted"),
        (false, Strategy::Ordered) => (eligible, "ordered"),
    };
    if let Some(upstream) = pinned {
        let on_upstream = |d: &usize| gateway.config.deployments[*d].upstream == upstream;
        let holders: Vec<usize> = model
            .deployments
            .iter()
            .copied()
            .filter(on_upstream)
            .collect();
        if !holders.is_empty() {
            order.retain(on_upstream);
            if order.is_empty() {
                order = holders;
            }
            reason = "previous_response";
        }
    }
    for d in escalation {
        if !order.contains(&d) && !gateway.cooling_down(d, now) {
            order.push(d);
        }
    }
    let chosen = order
        .first()
        .map(|d| gateway.config.deployments[*d].name.clone());
    let event = flow.event(RoutingDecided {
        model: model.alias.clone(),
        candidates,
        chosen,
        reason: reason.to_owned(),
        tier: model.tier.map(|t| t.name().to_owned()),
        escalation: plan.escalation.iter().map(|m| m.alias.clone()).collect(),
    });
    (order, event)
}
