//! A project's policy on the request path: what each rule does ([`RuleAction`]), a request's
//! prompt fields screened — blocked, redacted or flagged — and answers scanned as they arrive.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use loom_schemas::event::{PolicyAction, PolicyFinding};
use loom_schemas::project::{
    BLOCKED_KEYWORD_RULE, OutputAction, RuleAction, SecurityPolicy, blocked_keywords_pattern,
};
use serde_json::Value;
use uuid::Uuid;

use super::rules::BUILTIN;
use super::scan::{CustomRule, Finding, RuleDef, RuleError, Scanner, Severity};

/// The request fields that hold prompts, in every client API: chat's and Anthropic's `messages`
/// (tool calls and results among them), Anthropic's `system`, the Responses API's `input` and
/// `instructions`, completions' `prompt`.
const PROMPT_FIELDS: [&str; 5] = ["messages", "system", "input", "instructions", "prompt"];

/// Keys whose strings are not prose: ids, roles, types, base64 media and signatures.
const SKIPPED_KEYS: &[&str] = &[
    "role",
    "type",
    "id",
    "tool_call_id",
    "call_id",
    "tool_use_id",
    "media_type",
    "mime_type",
    "data",
    "signature",
    "encrypted_content",
    "detail",
    "format",
];

/// The most findings one event lists (the rest are still acted on).
pub const MAX_FINDINGS: usize = 256;

/// An answer is scanned again once this much text has arrived since (a project that cuts
/// answers has each piece scanned as it arrives).
const OUTPUT_STEP: usize = 256;
/// How far back each scan of an answer starts: a match across pieces is found whole.
pub const OUTPUT_WINDOW: usize = 4096;

/// A keyed digest of a match (never the match itself).
pub type Digest<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

/// A project's policy, compiled.
#[derive(Debug)]
pub struct Policy {
    /// The document it was compiled from (`None`: the default policy).
    source: Option<Arc<SecurityPolicy>>,
    scanner: Scanner,
    /// What each of the scanner's rules does.
    actions: Vec<RuleAction>,
    pub outputs: OutputAction,
}

/// What screening a request's prompt found and did.
#[derive(Debug)]
pub struct Screening {
    pub action: PolicyAction,
    pub findings: Vec<PolicyFinding>,
    /// The rules that refuse the request, each once, sorted.
    pub blocking: Vec<String>,
    /// The top-level fields whose text was redacted, as their new JSON.
    pub redacted: Vec<(&'static str, String)>,
    /// Whether anything was redacted.
    pub changed: bool,
    pub latency: Duration,
}

impl Policy {
    pub fn compile(document: &SecurityPolicy) -> Result<Policy, RuleError> {
        let mut defs: Vec<RuleDef> = Vec::new();
        let mut actions = Vec::new();
        for def in BUILTIN {
            let action = (document.rules.get(def.id).copied()).unwrap_or(document.default_action);
            if action != RuleAction::Off {
                defs.push(def.clone());
                actions.push(action);
            }
        }
        let mut custom = Vec::new();
        for rule in document.custom_rules.iter() {
            if rule.action != RuleAction::Off {
                custom.push(CustomRule {
                    id: rule.id.clone(),
                    pattern: rule.pattern.clone(),
                    keywords: rule.keywords.clone(),
                    severity: Severity::parse(&rule.severity).unwrap_or(Severity::High),
                });
                actions.push(rule.action);
            }
        }
        if !document.blocked_keywords.is_empty() {
            custom.push(CustomRule {
                id: BLOCKED_KEYWORD_RULE.to_owned(),
                pattern: blocked_keywords_pattern(&document.blocked_keywords),
                keywords: document
                    .blocked_keywords
                    .iter()
                    .map(|k| k.trim().to_owned())
                    .collect(),
                severity: Severity::High,
            });
            actions.push(RuleAction::Block);
        }
        Ok(Policy {
            source: None,
            scanner: Scanner::new(&defs, &custom)?,
            actions,
            outputs: document.outputs,
        })
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Scans the prompt fields of `request`; redacts, in place, what `redact` and `block` rules
    /// found. `None`: nothing found.
    pub fn screen(&self, request: &mut Value, digest: Digest<'_>) -> Option<Screening> {
        if self.actions.is_empty() {
            return None;
        }
        let started = Instant::now();
        let mut walk = Walk::new(self, digest);
        let mut redacted = Vec::new();
        for field in PROMPT_FIELDS {
            let Some(value) = request.get_mut(field) else {
                continue;
            };
            walk.path.clear();
            walk.path.push_str(field);
            walk.changed = false;
            walk.value(value, None);
            if walk.changed {
                redacted.push((field, value.to_string()));
            }
        }
        walk.finish(redacted, started)
    }

    /// Screens a body that is not a JSON object as one text (`body`): what it is, it must not be
    /// recorded with what the policy hides either.
    pub fn screen_text(&self, text: &mut String, digest: Digest<'_>) -> Option<Screening> {
        if self.actions.is_empty() {
            return None;
        }
        let started = Instant::now();
        let mut walk = Walk::new(self, digest);
        walk.path.push_str("body");
        walk.text(text);
        walk.finish(Vec::new(), started)
    }

    /// Scans what has arrived of an answer, `text`, from where `scan` stopped (less a window, so
    /// that a match across pieces is found whole). A match touching the end of `text` waits for
    /// more unless this is the `last` scan.
    pub fn scan_output(&self, scan: &mut OutputScan, text: &str, last: bool, digest: Digest<'_>) {
        if self.outputs == OutputAction::Off || self.actions.is_empty() {
            return;
        }
        let step = match self.outputs {
            OutputAction::Cut => 1,
            _ => OUTPUT_STEP,
        };
        if !last && text.len() < scan.scanned + step {
            return;
        }
        let started = Instant::now();
        let mut from = scan.settled.saturating_sub(OUTPUT_WINDOW);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let mut found = Vec::new();
        self.scanner.scan(&text.as_bytes()[from..], &mut found);
        for finding in found {
            let (start, end) = (from + finding.start, from + finding.end);
            let action = self.actions[finding.rule];
            let cuts = action == RuleAction::Block && self.outputs == OutputAction::Cut;
            // A match at the end may go on in the next piece: it waits for it, unless it cuts
            // the answer (what it found so far is enough, and must not be sent).
            if end <= scan.settled || (!last && end >= text.len() && !cuts) {
                continue;
            }
            if cuts {
                scan.cut
                    .push(self.scanner.rules()[finding.rule].id.to_string());
            }
            if scan.findings.len() < MAX_FINDINGS {
                let finding = Finding {
                    start,
                    end,
                    ..finding
                };
                scan.findings
                    .push(self.finding(&finding, text.as_bytes(), "output", digest));
            }
        }
        scan.scanned = text.len();
        scan.settled = match last {
            true => text.len(),
            false => text.len().saturating_sub(1),
        };
        scan.latency += started.elapsed();
    }

    fn finding(
        &self,
        finding: &Finding,
        text: &[u8],
        location: &str,
        digest: Digest<'_>,
    ) -> PolicyFinding {
        let rule = &self.scanner.rules()[finding.rule];
        PolicyFinding {
            rule: rule.id.to_string(),
            kind: rule.kind.name().to_owned(),
            location: location.to_owned(),
            severity: rule.severity.name().to_owned(),
            action: self.actions[finding.rule].name().to_owned(),
            start: finding.start as i64,
            end: finding.end as i64,
            digest: text
                .get(finding.start..finding.end)
                .map(digest)
                .unwrap_or_default(),
        }
    }
}

/// An answer's scan so far.
#[derive(Debug, Default)]
pub struct OutputScan {
    /// Findings ending at or before this offset are in `findings`.
    settled: usize,
    /// How much text the last scan saw.
    scanned: usize,
    pub findings: Vec<PolicyFinding>,
    /// The `block` rules found, when the project cuts answers.
    pub cut: Vec<String>,
    pub latency: Duration,
}

impl OutputScan {
    /// What the policy did with the answer: flagged it, or cut it.
    pub fn action(&self) -> Option<PolicyAction> {
        match (self.findings.is_empty(), self.cut.is_empty()) {
            (_, false) => Some(PolicyAction::Block),
            (false, true) => Some(PolicyAction::Flag),
            (true, true) => None,
        }
    }
}

/// A walk over a request's prompt fields.
struct Walk<'a> {
    policy: &'a Policy,
    digest: Digest<'a>,
    findings: Vec<PolicyFinding>,
    /// The findings in the current text.
    found: Vec<Finding>,
    /// Where the walk is, as `messages[1].content`.
    path: String,
    action: PolicyAction,
    blocking: Vec<String>,
    /// Whether the current field's text was redacted.
    changed: bool,
    /// Whether any text was.
    redacted_any: bool,
}

impl<'a> Walk<'a> {
    fn new(policy: &'a Policy, digest: Digest<'a>) -> Walk<'a> {
        Walk {
            policy,
            digest,
            findings: Vec::new(),
            found: Vec::new(),
            path: String::new(),
            action: PolicyAction::Allow,
            blocking: Vec::new(),
            changed: false,
            redacted_any: false,
        }
    }

    fn finish(
        mut self,
        redacted: Vec<(&'static str, String)>,
        started: Instant,
    ) -> Option<Screening> {
        if self.action == PolicyAction::Allow {
            return None;
        }
        self.blocking.sort_unstable();
        self.blocking.dedup();
        Some(Screening {
            action: self.action,
            findings: self.findings,
            blocking: self.blocking,
            redacted,
            changed: self.redacted_any,
            latency: started.elapsed(),
        })
    }

    fn value(&mut self, value: &mut Value, key: Option<&str>) {
        match value {
            Value::String(text) => {
                if !key.is_some_and(|k| SKIPPED_KEYS.contains(&k)) && !text.starts_with("data:") {
                    self.text(text);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    let at = self.path.len();
                    let _ = write!(self.path, "[{i}]");
                    self.value(item, None);
                    self.path.truncate(at);
                }
            }
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    let at = self.path.len();
                    self.path.push('.');
                    self.path.push_str(key);
                    self.value(item, Some(key));
                    self.path.truncate(at);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    fn text(&mut self, text: &mut String) {
        self.found.clear();
        self.policy.scanner.scan(text.as_bytes(), &mut self.found);
        if self.found.is_empty() {
            return;
        }
        let policy = self.policy;
        let mut hide = false;
        for finding in &self.found {
            let action = policy.actions[finding.rule];
            let overall = match action {
                RuleAction::Block => PolicyAction::Block,
                RuleAction::Redact => PolicyAction::Redact,
                RuleAction::Flag | RuleAction::Off => PolicyAction::Flag,
            };
            self.action = stronger(self.action, overall);
            if action == RuleAction::Block {
                self.blocking
                    .push(policy.scanner.rules()[finding.rule].id.to_string());
            }
            hide |= action >= RuleAction::Redact;
            if self.findings.len() < MAX_FINDINGS {
                let finding = policy.finding(finding, text.as_bytes(), &self.path, self.digest);
                self.findings.push(finding);
            }
        }
        if hide {
            // What is blocked is hidden too: the request is recorded, and its text must not be.
            self.found
                .retain(|f| policy.actions[f.rule] >= RuleAction::Redact);
            *text = policy.scanner.redact(text, &self.found);
            self.changed = true;
            self.redacted_any = true;
        }
    }
}

fn stronger(a: PolicyAction, b: PolicyAction) -> PolicyAction {
    let rank = |action| match action {
        PolicyAction::Allow => 0,
        PolicyAction::Flag => 1,
        PolicyAction::Redact => 2,
        PolicyAction::Block => 3,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// Every project's compiled policy, compiled when first used and again when it changes.
pub struct Policies {
    default: Arc<Policy>,
    compiled: RwLock<HashMap<Uuid, Arc<Policy>>>,
}

impl Policies {
    pub fn new() -> Result<Policies, RuleError> {
        Ok(Policies {
            default: Arc::new(Policy::compile(&SecurityPolicy::default())?),
            compiled: RwLock::default(),
        })
    }

    /// The policy of `project`, whose document is `document` (`None`: the default policy).
    pub fn get(
        &self,
        project: Uuid,
        document: Option<&Arc<SecurityPolicy>>,
    ) -> Result<Arc<Policy>, RuleError> {
        let Some(document) = document else {
            return Ok(Arc::clone(&self.default));
        };
        let current = |policy: &Arc<Policy>| {
            policy
                .source
                .as_ref()
                .is_some_and(|source| Arc::ptr_eq(source, document))
        };
        if let Some(policy) = self
            .compiled
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&project)
            .filter(|p| current(p))
        {
            return Ok(Arc::clone(policy));
        }
        let policy = Arc::new(Policy {
            source: Some(Arc::clone(document)),
            ..Policy::compile(document)?
        });
        self.compiled
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(project, Arc::clone(&policy));
        Ok(policy)
    }

    /// The policy of requests outside any project.
    pub fn default_policy(&self) -> Arc<Policy> {
        Arc::clone(&self.default)
    }
}
