//! What a project configures, as the JSON documents `project.created` and `project.updated`
//! carry (docs/projects.md): its routing policy and its feature flags. Parsed and checked in one
//! place, so an admin API refusing a document and the control rules refusing an event agree.

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
