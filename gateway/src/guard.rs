//! The security policy on a request's way (docs/policy.md): the prompt is screened before it is
//! recorded or sent anywhere, the answer scanned as it arrives, and what either found is recorded
//! as `policy.evaluated` — rule, severity, action, field, offsets and a keyed digest, never the
//! match.

use std::sync::Arc;
use std::time::Duration;

use loom_schemas::event::{Event, PolicyAction, PolicyEvaluated, PolicyFinding};
use serde_json::Value;

use crate::control::ApiKeyInfo;
use crate::error::GatewayError;
use crate::flow::{Flow, micros};
use crate::gateway::Gateway;
use crate::policy::{Policy, Screening};

/// How many bytes of a match's keyed digest are recorded.
const DIGEST_BYTES: usize = 16;

/// The policy of `key`'s project; the default policy for a key outside any project.
pub(crate) fn policy_of(
    gateway: &Gateway,
    control: &crate::control::Control,
    key: &ApiKeyInfo,
) -> Result<Arc<Policy>, GatewayError> {
    let Some(project) = key.project_id else {
        return Ok(gateway.policies.default_policy());
    };
    let document = control.read(|s| s.project(project).and_then(|p| p.security.clone()));
    gateway
        .policies
        .get(project, document.as_ref())
        .map_err(|error| {
            // The control fold checks every document first: this is a bug, and fails closed.
            tracing::error!(%error, %project, "compiling a project's security policy");
            GatewayError::Internal("the project's security policy could not be compiled")
        })
}

impl Flow {
    /// The keyed digest of a match (HMAC-SHA-256 under the tenant's digest key, first 16 bytes).
    fn digest(&self, text: &[u8]) -> Vec<u8> {
        let mut digest = (self.keys)
            .body_digest(self.tenant_id, text)
            .unwrap_or_default();
        digest.truncate(DIGEST_BYTES);
        digest
    }

    /// Screens the prompt fields of `request` with the key's policy, redacting in place what
    /// `redact` and `block` rules found. `None`: nothing found (or no key).
    pub fn screen(&self, request: &mut Value) -> Option<Screening> {
        let policy = self.security.as_ref()?;
        policy.screen(request, &|text| self.digest(text))
    }

    /// Screens a body that is not a JSON object as one text.
    pub fn screen_text(&self, text: &mut String) -> Option<Screening> {
        let policy = self.security.as_ref()?;
        policy.screen_text(text, &|text| self.digest(text))
    }

    /// Scans what has arrived of an answer (see [`Policy::scan_output`]).
    pub fn scan_output(&self, scan: &mut crate::policy::OutputScan, text: &str, last: bool) {
        if let Some(policy) = &self.security {
            policy.scan_output(scan, text, last, &|text| self.digest(text));
        }
    }

    /// `policy.evaluated` for what a scan of the prompt or (`output`) the answer found.
    pub fn policy_event(
        &self,
        output: bool,
        action: PolicyAction,
        findings: Vec<PolicyFinding>,
        latency: Duration,
    ) -> Event {
        crate::meter::policy_action(output, action);
        self.event(PolicyEvaluated {
            project_id: self.key.as_ref().and_then(|k| k.project_id),
            action,
            findings,
            latency_us: micros(latency),
            direction: if output { "output" } else { "prompt" }.to_owned(),
        })
    }
}
