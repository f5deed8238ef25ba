//! The fold: log entries in, row changes out. Pure and deterministic — the same entries give the
//! same changes whatever the batch boundaries — so that a replay rebuilds exactly the same tables.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use loom_schemas::codec::Registry;
pub use loom_schemas::control::{ControlChange, ControlState};
use loom_schemas::event::{Event, Payload, Plane, Sealed};
use loom_schemas::log::{Entry, Topic};

/// Row changes of one batch, applied in one transaction (see `write`).
#[derive(Debug, Default)]
pub struct Changes {
    /// Control-plane changes the rules accepted, in log order.
    pub control: Vec<ControlChange>,
    /// One merged patch per trace, in the order the traces first appear.
    pub traces: Vec<TracePatch>,
    pub llm_calls: Vec<LlmCallRow>,
    pub tool_calls: Vec<ToolCallRow>,
    pub decisions: Vec<DecisionRow>,
    pub bodies: Vec<BodyRow>,
    /// Completed requests to count in the usage rollups (once each, by event id).
    pub completions: Vec<Completion>,
    pub dead_letters: Vec<DeadLetter>,
    /// The next offset of each (topic, partition) touched.
    pub positions: BTreeMap<(&'static str, u32), u64>,
    /// The first offset of each (topic, partition) the batch read: the changes are stored only
    /// where the stored positions have reached it (see `write::check_start`).
    pub starts: BTreeMap<(&'static str, u32), u64>,
}

/// Declares [`TracePatch`] from one list of the columns a patch may set, so that its merge
/// cannot leave one out.
macro_rules! trace_patch {
    ($($column:ident: $type:ty),* $(,)?) => {
        /// What the events of a batch say about one trace; `None` leaves a column as it is.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct TracePatch {
            pub tenant_id: String,
            pub trace_id: String,
            /// When the first of these events happened: the trace's start if its
            /// `request.received` is nowhere to be found (see `write::resolve_starts`).
            pub first_at: i64,
            $(pub $column: Option<$type>,)*
        }

        impl TracePatch {
            /// Takes every value `later` sets (later events win, as they do across batches).
            fn merge(&mut self, later: TracePatch) {
                $(if later.$column.is_some() {
                    self.$column = later.$column;
                })*
            }
        }
    };
}

trace_patch! {
    project_id: String,
    user_id: String,
    api_key_id: String,
    endpoint: String,
    stream: bool,
    model_requested: String,
    tier: String,
    model_served: String,
    provider: String,
    deployment: String,
    status: String,
    http_status: i64,
    error_class: String,
    latency_us: i64,
    ttft_us: i64,
    overhead_us: i64,
    tokens_in: i64,
    tokens_out: i64,
    tokens_cached: i64,
    cost_micro_usd: i64,
    policy_action: String,
    policy_findings: i64,
    attempts: i64,
    started_at: i64,
    completed_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmCallRow {
    pub event_id: String,
    pub tenant_id: String,
    pub trace_id: String,
    pub attempt: i64,
    pub deployment: String,
    pub provider: String,
    pub model: String,
    pub status: String,
    pub http_status: Option<i64>,
    pub error_class: Option<String>,
    pub stream: bool,
    pub started_at: i64,
    pub latency_us: i64,
    pub ttft_us: Option<i64>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached: Option<i64>,
    pub cost_micro_usd: Option<i64>,
    pub usage_estimated: bool,
    pub response_id: Option<String>,
    pub tokens_cache_creation: Option<i64>,
    pub cache_saved_micro_usd: Option<i64>,
    /// A JSON array of the dropped fields' paths; `None` when there were none.
    pub dropped_fields: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallRow {
    pub event_id: String,
    pub tenant_id: String,
    pub trace_id: String,
    pub direction: String,
    pub tool_call_id: String,
    pub name: Option<String>,
    pub occurred_at: i64,
}

/// A routing, policy or quota decision of a trace: its payload as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRow {
    pub event_id: String,
    pub tenant_id: String,
    pub trace_id: String,
    pub kind: &'static str,
    pub occurred_at: i64,
    pub detail: String,
}

/// A body, still sealed with the tenant's data key.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyRow {
    pub event_id: String,
    pub field: &'static str,
    pub tenant_id: String,
    pub trace_id: String,
    pub occurred_at: i64,
    pub sealed: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub event_id: String,
    pub tenant_id: String,
    pub trace_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub topic: &'static str,
    pub partition: u32,
    pub offset: u64,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub reason: String,
    pub record: Vec<u8>,
    /// When the record was appended to the log (its timestamp): a replay writes the same row.
    pub recorded_at: i64,
}

/// The snake_case name serde gives an enum value (`CallStatus::ClientCancelled` →
/// `client_cancelled`).
pub(crate) fn name_of<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

impl Changes {
    /// The tenants whose data rows these changes write.
    pub fn data_tenants(&self) -> BTreeSet<&str> {
        let mut tenants = BTreeSet::new();
        tenants.extend(self.traces.iter().map(|t| t.tenant_id.as_str()));
        tenants.extend(self.llm_calls.iter().map(|c| c.tenant_id.as_str()));
        tenants.extend(self.tool_calls.iter().map(|c| c.tenant_id.as_str()));
        tenants.extend(self.decisions.iter().map(|d| d.tenant_id.as_str()));
        tenants.extend(self.bodies.iter().map(|b| b.tenant_id.as_str()));
        tenants.extend(self.completions.iter().map(|c| c.tenant_id.as_str()));
        tenants
    }

    /// These changes without the data rows of `tenants` (control changes and positions stay).
    pub fn without_tenants(&self, tenants: &HashSet<String>) -> Changes {
        let keep = |tenant: &String| !tenants.contains(tenant);
        Changes {
            control: self.control.clone(),
            traces: self
                .traces
                .iter()
                .filter(|t| keep(&t.tenant_id))
                .cloned()
                .collect(),
            llm_calls: self
                .llm_calls
                .iter()
                .filter(|c| keep(&c.tenant_id))
                .cloned()
                .collect(),
            tool_calls: self
                .tool_calls
                .iter()
                .filter(|c| keep(&c.tenant_id))
                .cloned()
                .collect(),
            decisions: self
                .decisions
                .iter()
                .filter(|d| keep(&d.tenant_id))
                .cloned()
                .collect(),
            bodies: self
                .bodies
                .iter()
                .filter(|b| keep(&b.tenant_id))
                .cloned()
                .collect(),
            completions: self
                .completions
                .iter()
                .filter(|c| keep(&c.tenant_id))
                .cloned()
                .collect(),
            dead_letters: self.dead_letters.clone(),
            positions: self.positions.clone(),
            starts: self.starts.clone(),
        }
    }

    /// Folds `entries` of `topic`. Control events are judged by the shared rules against
    /// `control`, the state of the control topic before them, which they advance.
    pub fn fold(
        registry: &Registry,
        topic: Topic,
        entries: &[Entry],
        control: &mut ControlState,
    ) -> Changes {
        let mut changes = Changes::default();
        let mut trace_index: BTreeMap<(String, String), usize> = BTreeMap::new();
        for entry in entries {
            let next = entry.position.offset + 1;
            let position = changes
                .positions
                .entry((topic.name(), entry.position.partition))
                .or_insert(next);
            *position = (*position).max(next);
            let start = changes
                .starts
                .entry((topic.name(), entry.position.partition))
                .or_insert(entry.position.offset);
            *start = (*start).min(entry.position.offset);
            match registry.decode(&entry.record.value) {
                Ok(event) => {
                    if let Err(reason) = changes.add(topic, event, &mut trace_index, control) {
                        changes.dead(topic, entry, reason);
                    }
                }
                Err(error) => changes.dead(topic, entry, format!("undecodable: {error}")),
            }
        }
        changes
    }

    fn dead(&mut self, topic: Topic, entry: &Entry, reason: String) {
        let header = |name| {
            entry
                .record
                .header(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        self.dead_letters.push(DeadLetter {
            topic: topic.name(),
            partition: entry.position.partition,
            offset: entry.position.offset,
            event_id: header("loom.event_id"),
            event_type: header("loom.event_type"),
            reason,
            record: entry.record.value.clone(),
            recorded_at: entry.record.timestamp_us,
        });
    }

    /// Adds one event; an event that breaks an invariant is refused with the reason.
    fn add(
        &mut self,
        topic: Topic,
        event: Event,
        trace_index: &mut BTreeMap<(String, String), usize>,
        control: &mut ControlState,
    ) -> Result<(), String> {
        let plane = event.payload.plane();
        if Topic::for_plane(plane) != topic {
            return Err(format!(
                "{} is a {:?}-plane event on the {} topic",
                event.payload.event_type(),
                plane,
                topic.name()
            ));
        }
        if plane == Plane::Control {
            // A refused event (another tenant's key, a duplicate, …) changes nothing, as in the
            // gateway, which folds the same events by the same rules.
            match control.apply(&event) {
                Ok(ControlChange::Anchored { .. }) | Err(_) => {}
                Ok(change) => self.control.push(change),
            }
            return Ok(());
        }
        let envelope = event.envelope;
        let tenant_id = envelope.tenant_id.to_string();
        let event_id = envelope.event_id.to_string();
        let at = envelope.occurred_at;
        let Some(trace_id) = envelope.trace_id.filter(|t| !t.is_empty()) else {
            return Err(format!("{} has no trace id", event.payload.event_type()));
        };
        let mut patch = TracePatch {
            tenant_id: tenant_id.clone(),
            trace_id: trace_id.clone(),
            first_at: at,
            ..TracePatch::default()
        };
        let mut body = |field: &'static str, sealed: Option<Sealed>| {
            if let Some(Sealed(sealed)) = sealed {
                self.bodies.push(BodyRow {
                    event_id: event_id.clone(),
                    field,
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    occurred_at: at,
                    sealed,
                });
            }
        };
        match event.payload {
            Payload::RequestReceived(p) => {
                body("request", p.body);
                patch.project_id = p.project_id.map(|id| id.to_string());
                patch.user_id = p.user;
                patch.api_key_id = p.api_key_id.map(|id| id.to_string());
                patch.endpoint = Some(p.endpoint);
                patch.stream = Some(p.stream);
                patch.model_requested = Some(p.model);
                patch.started_at = Some(at);
            }
            Payload::PolicyEvaluated(p) => {
                // The request's are the prompt's; an answer's findings are in its decisions.
                if p.direction != "output" {
                    patch.policy_action = Some(name_of(&p.action));
                    patch.policy_findings = Some(p.findings.len() as i64);
                }
                self.decisions.push(DecisionRow {
                    event_id: event_id.clone(),
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    kind: "policy",
                    occurred_at: at,
                    detail: serde_json::to_string(&p).map_err(|e| format!("policy: {e}"))?,
                });
            }
            Payload::LlmCallCompleted(p) => {
                body("llm_request", p.request_body);
                body("llm_response", p.response_body);
                self.llm_calls.push(LlmCallRow {
                    event_id: event_id.clone(),
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    attempt: i64::from(p.attempt),
                    deployment: p.deployment,
                    provider: p.provider,
                    model: p.model,
                    status: name_of(&p.status),
                    http_status: p.http_status.map(i64::from),
                    error_class: p.error_class,
                    stream: p.stream,
                    started_at: p.started_at,
                    latency_us: p.latency_us,
                    ttft_us: p.ttft_us,
                    tokens_in: p.tokens_in,
                    tokens_out: p.tokens_out,
                    tokens_cached: p.tokens_cached_read,
                    cost_micro_usd: p.cost_micro_usd,
                    usage_estimated: p.usage_estimated,
                    response_id: p.response_id,
                    tokens_cache_creation: p.tokens_cache_creation,
                    cache_saved_micro_usd: p.cache_saved_micro_usd,
                    dropped_fields: (!p.dropped_fields.is_empty())
                        .then(|| serde_json::Value::from(p.dropped_fields).to_string()),
                });
            }
            Payload::ToolCallObserved(p) => {
                body("tool_arguments", p.arguments);
                body("tool_result", p.result);
                self.tool_calls.push(ToolCallRow {
                    event_id: event_id.clone(),
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    direction: name_of(&p.direction),
                    tool_call_id: p.tool_call_id,
                    name: p.name,
                    occurred_at: at,
                });
            }
            Payload::RequestCompleted(p) => {
                patch.status = Some(name_of(&p.status));
                patch.http_status = Some(i64::from(p.http_status));
                patch.error_class = p.error_class;
                patch.model_served = p.model;
                patch.provider = p.provider;
                patch.deployment = p.deployment;
                patch.attempts = Some(i64::from(p.attempts));
                patch.tokens_in = p.tokens_in;
                patch.tokens_out = p.tokens_out;
                patch.tokens_cached = p.tokens_cached_read;
                patch.cost_micro_usd = p.cost_micro_usd;
                patch.latency_us = Some(p.latency_us);
                patch.ttft_us = p.ttft_us;
                patch.overhead_us = Some(p.overhead_us);
                patch.completed_at = Some(at);
                self.completions.push(Completion {
                    event_id,
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                });
            }
            // A replayed answer shows in the trace's timeline.
            Payload::CacheHit(p) => {
                self.decisions.push(DecisionRow {
                    event_id,
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    kind: "cache_hit",
                    occurred_at: at,
                    detail: serde_json::to_string(&p).map_err(|e| format!("cache: {e}"))?,
                });
            }
            // Routing gives the trace its tier; the decision shows in the trace's timeline.
            Payload::RoutingDecided(p) => {
                patch.tier = p.tier.clone();
                self.decisions.push(DecisionRow {
                    event_id,
                    tenant_id: tenant_id.clone(),
                    trace_id: trace_id.clone(),
                    kind: "routing",
                    occurred_at: at,
                    detail: serde_json::to_string(&p).map_err(|e| format!("routing: {e}"))?,
                });
            }
            // Decisions show in the trace's timeline; the trace's row needs nothing of them.
            Payload::QuotaReserved(_)
            | Payload::QuotaConsumed(_)
            | Payload::QuotaReleased(_)
            | Payload::QuotaDenied(_) => {
                let (kind, detail) = match &event.payload {
                    Payload::QuotaDenied(p) => ("quota_denied", serde_json::to_string(p)),
                    _ => return Ok(()),
                };
                self.decisions.push(DecisionRow {
                    event_id,
                    tenant_id,
                    trace_id,
                    kind,
                    occurred_at: at,
                    detail: detail.map_err(|e| format!("{kind}: {e}"))?,
                });
                return Ok(());
            }
            // Control-plane payloads were handled above.
            _ => return Ok(()),
        }
        match trace_index.get(&(tenant_id.clone(), trace_id.clone())) {
            Some(&i) => self.traces[i].merge(patch),
            None => {
                trace_index.insert((tenant_id, trace_id), self.traces.len());
                self.traces.push(patch);
            }
        }
        Ok(())
    }
}
