//! What a project configures, as the JSON documents `project.created` and `project.updated`
//! carry (docs/projects.md): its routing policy and its feature flags. Parsed and checked in one
//! place, so an admin API refusing a document and the control rules refusing an event agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A layer of models, from local or free (`L0`) to frontier (`L3`); model aliases carry one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    L0,
    L1,
    L2,
    L3,
}

impl Tier {
    pub fn parse(name: &str) -> Option<Tier> {
        match name {
            "L0" | "l0" => Some(Tier::L0),
            "L1" | "l1" => Some(Tier::L1),
            "L2" | "l2" => Some(Tier::L2),
            "L3" | "l3" => Some(Tier::L3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::L0 => "L0",
            Tier::L1 => "L1",
            Tier::L2 => "L2",
            Tier::L3 => "L3",
        }
    }
}

/// Which models a project may use and what a request may cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingPolicy {
    /// The model aliases the project may call; absent: every alias up to `max_tier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<String>>,
    /// The most one request may cost, in micro-USD (its estimate is checked before it is sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_request_micro_usd: Option<i64>,
    /// The tier a request that names no alias of its own (`model: "auto"`) is served at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tier: Option<Tier>,
    /// The highest tier the project may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tier: Option<Tier>,
    /// When every deployment of a tier fails, try the next tier up (to `max_tier`).
    #[serde(default)]
    pub escalate_on_failure: bool,
}

/// The exact-match response cache of a project: on when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFlag {
    #[serde(default = "CacheFlag::default_ttl")]
    pub ttl_seconds: u64,
    #[serde(default = "CacheFlag::default_entries")]
    pub max_entries: u64,
}

impl CacheFlag {
    fn default_ttl() -> u64 {
        3600
    }

    fn default_entries() -> u64 {
        10_000
    }
}

/// A project's feature flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureFlags {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheFlag>,
}

/// What a security policy does where one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// The rule does not run.
    Off,
    /// The finding is recorded; the text goes on as it is.
    Flag,
    /// The match is replaced (its known prefix and last four characters kept) before the text
    /// goes anywhere: the upstream, the log, the archive.
    Redact,
    /// The request is refused (400 `prompt_blocked_by_policy`, naming the rules).
    Block,
}

impl RuleAction {
    pub fn name(self) -> &'static str {
        match self {
            RuleAction::Off => "off",
            RuleAction::Flag => "flag",
            RuleAction::Redact => "redact",
            RuleAction::Block => "block",
        }
    }
}

/// What the policy does with what upstreams answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputAction {
    /// Answers are not scanned.
    Off,
    /// Findings in answers (streams included) are recorded; the answer goes on as it is.
    #[default]
    Flag,
    /// Also: an answer in which a `block` rule matches is cut there — a JSON answer is replaced by
    /// an error, a stream ends with one.
    Cut,
}

/// A project's own detector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRuleDoc {
    /// 1 to 64 of `a-z`, `0-9`, `_`; not a built-in rule's id.
    pub id: String,
    /// A regular expression (Rust `regex` syntax, Unicode-aware); compiled to at most 1 MiB.
    pub pattern: String,
    /// The rule runs over a text only if one of these occurs in it (case-insensitively); none:
    /// over every text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// `low`, `medium`, `high` or `critical`.
    #[serde(default = "CustomRuleDoc::default_severity")]
    pub severity: String,
    #[serde(default = "CustomRuleDoc::default_action")]
    pub action: RuleAction,
}

impl CustomRuleDoc {
    fn default_severity() -> String {
        "high".into()
    }

    fn default_action() -> RuleAction {
        RuleAction::Block
    }
}

/// A project's prompt and output security policy (docs/policy.md). Absent, a project gets the
/// default: every built-in rule flags, answers are scanned and flagged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityPolicy {
    /// What a built-in rule not named in `rules` does.
    #[serde(default = "SecurityPolicy::default_action")]
    pub default_action: RuleAction,
    /// What each named built-in rule does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleAction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_rules: Vec<CustomRuleDoc>,
    /// Words and phrases refused in prompts (case-insensitively), as the rule `blocked_keyword`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_keywords: Vec<String>,
    #[serde(default)]
    pub outputs: OutputAction,
}

impl Default for SecurityPolicy {
    fn default() -> Self {
        SecurityPolicy {
            default_action: SecurityPolicy::default_action(),
            rules: BTreeMap::new(),
            custom_rules: Vec::new(),
            blocked_keywords: Vec::new(),
            outputs: OutputAction::default(),
        }
    }
}

/// The ids of the built-in rules (the gateway's detectors; a test there keeps the two lists
/// equal).
pub const BUILTIN_RULES: &[&str] = &[
    "openai_api_key",
    "anthropic_api_key",
    "aws_access_key_id",
    "github_token",
    "gitlab_token",
    "slack_token",
    "private_key",
    "jwt",
    "payment_card",
    "us_ssn",
    "iban",
    "email",
    "phone_number",
    "sql_destructive",
    "shell_destructive",
];

/// The rule id blocked keywords are found under.
pub const BLOCKED_KEYWORD_RULE: &str = "blocked_keyword";
/// The most custom rules a policy holds.
pub const MAX_CUSTOM_RULES: usize = 64;
/// The most blocked keywords a policy holds, and the longest one (bytes).
pub const MAX_BLOCKED_KEYWORDS: usize = 1000;
const MAX_KEYWORD_BYTES: usize = 256;
/// The longest custom pattern (bytes), and the most a compiled one may take.
const MAX_PATTERN_BYTES: usize = 4096;
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
const MAX_RULE_KEYWORDS: usize = 64;
const SEVERITIES: &[&str] = &["low", "medium", "high", "critical"];

/// Compiles a rule's pattern with the limits every rule has: at most [`REGEX_SIZE_LIMIT`] bytes
/// compiled, nesting at most 64 deep. `unicode`: Unicode-aware classes (projects' rules).
pub fn compile_pattern(pattern: &str, unicode: bool) -> Result<regex::bytes::Regex, String> {
    regex::bytes::RegexBuilder::new(pattern)
        .unicode(unicode)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(limit) => {
                format!("the regex compiles to more than {limit} bytes")
            }
            other => other.to_string(),
        })
}

/// The regex that finds any of `keywords`, case-insensitively.
pub fn blocked_keywords_pattern(keywords: &[String]) -> String {
    let escaped: Vec<String> = keywords.iter().map(|k| regex::escape(k.trim())).collect();
    format!("(?i)(?:{})", escaped.join("|"))
}

impl SecurityPolicy {
    fn default_action() -> RuleAction {
        RuleAction::Flag
    }

    /// Parses and checks a security policy document.
    pub fn parse(json: &str) -> Result<SecurityPolicy, String> {
        let policy: SecurityPolicy = parse("security_policy", json)?;
        policy.check()?;
        Ok(policy)
    }

    /// Checks every rule id, count, size and pattern; the first problem, naming its field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(id) = self
            .rules
            .keys()
            .find(|id| !BUILTIN_RULES.contains(&id.as_str()))
        {
            return Err(format!(
                "security_policy.rules.{id}: no such built-in rule (they are: {})",
                BUILTIN_RULES.join(", ")
            ));
        }
        if self.custom_rules.len() > MAX_CUSTOM_RULES {
            return Err(format!(
                "security_policy.custom_rules: at most {MAX_CUSTOM_RULES} rules"
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, rule) in self.custom_rules.iter().enumerate() {
            let field = format!("security_policy.custom_rules[{i}]");
            let well_formed = (1..=64).contains(&rule.id.len())
                && rule
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !well_formed {
                return Err(format!(
                    "{field}.id: {:?} is not 1 to 64 of a-z, 0-9 and _",
                    rule.id
                ));
            }
            if BUILTIN_RULES.contains(&rule.id.as_str())
                || rule.id == BLOCKED_KEYWORD_RULE
                || !ids.insert(rule.id.as_str())
            {
                return Err(format!("{field}.id: {:?} is taken", rule.id));
            }
            if rule.pattern.is_empty() || rule.pattern.len() > MAX_PATTERN_BYTES {
                return Err(format!("{field}.pattern: 1 to {MAX_PATTERN_BYTES} bytes"));
            }
            let regex = compile_pattern(&rule.pattern, true)
                .map_err(|e| format!("{field}.pattern: {e}"))?;
            if regex.is_match(b"") {
                return Err(format!("{field}.pattern: matches the empty text"));
            }
            if rule.keywords.len() > MAX_RULE_KEYWORDS
                || rule
                    .keywords
                    .iter()
                    .any(|k| k.trim().is_empty() || k.len() > MAX_KEYWORD_BYTES)
            {
                return Err(format!(
                    "{field}.keywords: at most {MAX_RULE_KEYWORDS}, each 1 to {MAX_KEYWORD_BYTES} bytes"
                ));
            }
            if !SEVERITIES.contains(&rule.severity.as_str()) {
                return Err(format!(
                    "{field}.severity: {:?} is not one of {}",
                    rule.severity,
                    SEVERITIES.join(", ")
                ));
            }
        }
        if self.blocked_keywords.len() > MAX_BLOCKED_KEYWORDS {
            return Err(format!(
                "security_policy.blocked_keywords: at most {MAX_BLOCKED_KEYWORDS}"
            ));
        }
        if let Some(i) = self
            .blocked_keywords
            .iter()
            .position(|k| k.trim().is_empty() || k.len() > MAX_KEYWORD_BYTES)
        {
            return Err(format!(
                "security_policy.blocked_keywords[{i}]: 1 to {MAX_KEYWORD_BYTES} bytes, not blank"
            ));
        }
        if !self.blocked_keywords.is_empty() {
            compile_pattern(&blocked_keywords_pattern(&self.blocked_keywords), true)
                .map_err(|e| format!("security_policy.blocked_keywords: {e}"))?;
        }
        Ok(())
    }
}

/// The longest a name (alias, user, project) may be, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
const MAX_ALLOWED_MODELS: usize = 1000;
const MAX_CACHE_TTL_SECONDS: u64 = 7 * 86_400;
const MAX_CACHE_ENTRIES: u64 = 1_000_000;

/// Parses a document, naming the field that is wrong (`what.field: problem`).
fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> Result<T, String> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        match error.path().to_string().as_str() {
            "." => format!("{what}: {}", error.inner()),
            path => format!("{what}.{path}: {}", error.inner()),
        }
    })
}

impl RoutingPolicy {
    /// Parses and checks a routing policy document.
    pub fn parse(json: &str) -> Result<RoutingPolicy, String> {
        let policy: RoutingPolicy = parse("routing_policy", json)?;
        policy.check()?;
        Ok(policy)
    }

    pub fn check(&self) -> Result<(), String> {
        if let Some(models) = &self.allowed_models {
            if models.len() > MAX_ALLOWED_MODELS {
                return Err(format!(
                    "routing_policy.allowed_models: at most {MAX_ALLOWED_MODELS} aliases"
                ));
            }
            if let Some(bad) = models
                .iter()
                .find(|m| m.is_empty() || m.len() > MAX_NAME_BYTES)
            {
                return Err(format!(
                    "routing_policy.allowed_models: {bad:?} is not 1 to {MAX_NAME_BYTES} bytes"
                ));
            }
        }
        if self.max_cost_per_request_micro_usd.is_some_and(|c| c < 0) {
            return Err("routing_policy.max_cost_per_request_micro_usd: must be 0 or more".into());
        }
        if let (Some(default), Some(max)) = (self.default_tier, self.max_tier)
            && default > max
        {
            return Err(format!(
                "routing_policy.default_tier: {} is above max_tier {}",
                default.name(),
                max.name()
            ));
        }
        Ok(())
    }
}

impl FeatureFlags {
    /// Parses and checks a feature flags document.
    pub fn parse(json: &str) -> Result<FeatureFlags, String> {
        let flags: FeatureFlags = parse("feature_flags", json)?;
        flags.check()?;
        Ok(flags)
    }

    pub fn check(&self) -> Result<(), String> {
        if let Some(cache) = self.cache {
            if !(1..=MAX_CACHE_TTL_SECONDS).contains(&cache.ttl_seconds) {
                return Err(format!(
                    "feature_flags.cache.ttl_seconds: 1 to {MAX_CACHE_TTL_SECONDS} (7 days)"
                ));
            }
            if !(1..=MAX_CACHE_ENTRIES).contains(&cache.max_entries) {
                return Err(format!(
                    "feature_flags.cache.max_entries: 1 to {MAX_CACHE_ENTRIES}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_with_defaults_and_bad_ones_name_their_field() {
        let policy = RoutingPolicy::parse(
            r#"{"allowed_models":["fast"],"default_tier":"L1","max_tier":"L2","escalate_on_failure":true}"#,
        )
        .unwrap();
        assert_eq!(policy.max_tier, Some(Tier::L2));
        assert_eq!(
            RoutingPolicy::parse("{}").unwrap(),
            RoutingPolicy::default()
        );
        let flags = FeatureFlags::parse(r#"{"cache":{}}"#).unwrap();
        assert_eq!(
            flags.cache.map(|c| (c.ttl_seconds, c.max_entries)),
            Some((3600, 10_000))
        );

        for (bad, names) in [
            (r#"{"max_tier":"L9"}"#, "routing_policy.max_tier"),
            (
                r#"{"default_tier":"L3","max_tier":"L1"}"#,
                "routing_policy.default_tier",
            ),
            (
                r#"{"max_cost_per_request_micro_usd":-1}"#,
                "max_cost_per_request_micro_usd",
            ),
            (
                r#"{"allowed_models":[""]}"#,
                "routing_policy.allowed_models",
            ),
            (r#"{"allowed": []}"#, "routing_policy"),
            ("[", "routing_policy"),
        ] {
            let error = RoutingPolicy::parse(bad).unwrap_err();
            assert!(error.contains(names), "{bad}: {error}");
        }
        for (bad, names) in [
            (
                r#"{"cache":{"ttl_seconds":0}}"#,
                "feature_flags.cache.ttl_seconds",
            ),
            (
                r#"{"cache":{"max_entries":-3}}"#,
                "feature_flags.cache.max_entries",
            ),
            (r#"{"cash":{}}"#, "feature_flags"),
        ] {
            let error = FeatureFlags::parse(bad).unwrap_err();
            assert!(error.contains(names), "{bad}: {error}");
        }
    }
}
