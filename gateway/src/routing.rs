//! Routing: an alias's deployments in the order to try them (as listed, or the first drawn by
//! weight), skipping those cooling down after their retries ran out; the decision is recorded as
//! `routing.decided`.

use std::sync::atomic::Ordering;

use loom_schemas::event::{Event, RouteCandidate, RoutingDecided, now_micros};

use crate::config::Strategy;
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

/// The deployments to try for `alias`, in order, and the `routing.decided` event. With `pinned`
/// (the upstream that holds a request's `previous_response_id`), only the alias's deployments on
/// that upstream are tried, if it has any.
pub(crate) fn route(
    flow: &Flow,
    alias: &str,
    pinned: Option<usize>,
) -> Option<(Vec<usize>, Event)> {
    let gateway = &flow.gateway;
    let model = gateway.config.models.get(alias)?;
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
    let candidates = order
        .iter()
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
    let chosen = order
        .first()
        .map(|d| gateway.config.deployments[*d].name.clone());
    let event = flow.event(RoutingDecided {
        model: alias.to_owned(),
        candidates,
        chosen,
        reason: reason.to_owned(),
    });
    Some((order, event))
}
