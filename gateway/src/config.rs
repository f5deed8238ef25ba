//! The gateway's configuration file (`loom serve --config FILE`): upstreams, model aliases and
//! routing. TOML, unknown keys refused, validated once into [`GatewayConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderName;
use loom_schemas::SecretString;
use loom_schemas::project::Tier;
use serde::Deserialize;

use crate::pricing::PriceTable;
use crate::providers::Target;
pub use crate::quota::QuotaConfig;
use crate::quota::QuotaSettings;

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// api.openai.com: `Authorization: Bearer`, `/chat/completions` under `base_url`.
    Openai,
    /// Azure OpenAI: `api-key` header, `/openai/deployments/{model}/…?api-version=`.
    Azure,
    /// Anthropic's Messages API (`base_url` up to `/v1`): `x-api-key`, translated from OpenAI chat.
    Anthropic,
    /// Any OpenAI-compatible server (vLLM, Ollama, LM Studio, …); the key is optional.
    OpenaiCompatible,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openai_compatible",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub provider: ProviderKind,
    pub base_url: String,
    /// Name of the environment variable holding the upstream's API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Azure's `api-version` query parameter.
    #[serde(default)]
    pub api_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Try deployments in the order listed.
    #[default]
    Ordered,
    /// Pick the first deployment at random by weight; the rest follow as fallbacks.
    Weighted,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub upstream: String,
    /// The model id at the upstream (for Azure, the deployment name).
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// The alias's tier (`L0`–`L3`), which projects' routing policies limit and escalate by.
    #[serde(default)]
    pub tier: Option<Tier>,
    pub deployments: Vec<DeploymentConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenEventsFull {
    /// Answer 503 rather than serve a request whose events could not be queued.
    #[default]
    Reject,
    /// Make the request wait for room in the queue.
    Wait,
}

/// When a request's answer may go out, relative to recording its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventsAck {
    /// Once the request's events are in the log: appended to the embedded log's segment files
    /// (in the OS), or acknowledged by Kafka or written to the local spool. Survives a crash of
    /// the process.
    #[default]
    Recorded,
    /// Once the fsync that covers them is done (Kafka: as `recorded`, the broker's `acks=all` or
    /// the spool's fsync). Survives power loss.
    Fsynced,
    /// At once; the events follow. A crash can lose the last few milliseconds of events.
    None,
}

impl EventsAck {
    pub fn name(self) -> &'static str {
        match self {
            EventsAck::Recorded => "recorded",
            EventsAck::Fsynced => "fsynced",
            EventsAck::None => "none",
        }
    }
}

impl std::str::FromStr for EventsAck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "recorded" => Ok(EventsAck::Recorded),
            "fsynced" => Ok(EventsAck::Fsynced),
            "none" => Ok(EventsAck::None),
            _ => Err(format!(
                "events ack must be `recorded`, `fsynced` or `none`, not {s:?}"
            )),
        }
    }
}

impl std::fmt::Display for EventsAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Events queued for the log writer at most.
    pub events_capacity: usize,
    pub when_events_full: WhenEventsFull,
    /// When an answer may go out (`--events-ack` overrides it).
    pub events_ack: EventsAck,
    /// How long an answer waits for its events to be recorded before the request fails with
    /// 503 `events_unavailable` instead.
    #[serde(with = "humantime_serde")]
    pub events_ack_timeout: Duration,
    /// The output a request that sets no `max_tokens` is assumed to ask for when its cost is
    /// estimated before it is sent (capped by the model's maximum output).
    pub default_max_output_tokens: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 4 * 1024 * 1024,
            events_capacity: 8192,
            when_events_full: WhenEventsFull::Reject,
            events_ack: EventsAck::Recorded,
            events_ack_timeout: Duration::from_secs(10),
            default_max_output_tokens: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Limit on one upstream attempt (for a stream: until its first byte).
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Limit on a whole request, across retries and fallbacks.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Extra attempts on the same deployment after a 429, 5xx, timeout or connection error.
    pub retries: u32,
    /// Wait before the first retry; doubled each time (a `retry-after` header wins, up to 10 s).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// How long a deployment that exhausted its retries is skipped.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            attempt_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(300),
            retries: 1,
            backoff: Duration::from_millis(200),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// What happens to a request field that a translation between APIs cannot carry (say,
/// Anthropic's `cache_control` on its way to an OpenAI deployment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnsupportedFields {
    /// Send the request without it, and name it in the call's `llm_call.completed`
    /// (`dropped_fields`).
    #[default]
    Drop,
    /// Do not send it to that deployment: the client gets a 400 naming the field (unless a
    /// later deployment speaks the client's API).
    Reject,
}

/// Calls between APIs, and headers from clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranslationConfig {
    pub unsupported_fields: UnsupportedFields,
    /// Client headers forwarded to upstreams that speak the client's API (lower case).
    pub forward_headers: Vec<String>,
}

impl Default for TranslationConfig {
    fn default() -> Self {
        TranslationConfig {
            unsupported_fields: UnsupportedFields::Drop,
            forward_headers: ["anthropic-beta", "anthropic-version", "openai-beta"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// A price table in LiteLLM's format; the copy Loom ships when absent.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub translation: TranslationConfig,
    #[serde(default)]
    pub quotas: QuotaConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

/// A validated upstream, with its key read from the environment (a secret: never printed).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub api_version: Option<String>,
}

/// One place a model alias can be served from.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `upstream/model`, unique.
    pub name: String,
    pub upstream: usize,
    pub model: String,
    pub weight: u32,
    /// Its URLs and headers, ready to send.
    pub target: Target,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub alias: String,
    pub strategy: Strategy,
    pub tier: Option<Tier>,
    /// Indices into [`GatewayConfig::deployments`].
    pub deployments: Vec<usize>,
}

/// The model name that asks for a project's default tier.
pub const AUTO: &str = "auto";

/// Headers that carry credentials or that the HTTP client sets: never taken from a client.
const SENSITIVE: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
];

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    pub limits: LimitsConfig,
    pub routing: RoutingConfig,
    pub unsupported_fields: UnsupportedFields,
    /// Client headers forwarded to upstreams that speak the client's API.
    pub forward_headers: Vec<HeaderName>,
    pub upstreams: Vec<Upstream>,
    pub deployments: Vec<Deployment>,
    pub models: BTreeMap<String, Model>,
    pub prices: Arc<PriceTable>,
    pub quotas: QuotaSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl GatewayConfig {
    /// Reads and validates a config file; `env` looks up environment variables.
    pub fn load(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::validate(raw, env)
    }

    pub fn validate(
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<GatewayConfig, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if raw.limits.events_capacity == 0 || raw.limits.max_body_bytes == 0 {
            return invalid(
                "limits.events_capacity and limits.max_body_bytes must be positive".into(),
            );
        }
        let quotas = raw.quotas.check().map_err(ConfigError::Invalid)?;
        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (name, upstream) in raw.upstreams {
            let api_key = match &upstream.api_key_env {
                Some(var) => match env(var) {
                    Some(key) if !key.is_empty() => Some(SecretString::from(key)),
                    _ => {
                        return invalid(format!(
                            "upstream {name}: environment variable {var} is not set"
                        ));
                    }
                },
                None if upstream.provider == ProviderKind::OpenaiCompatible => None,
                None => {
                    return invalid(format!(
                        "upstream {name}: api_key_env is required for {}",
                        upstream.provider.name()
                    ));
                }
            };
            if upstream.provider == ProviderKind::Azure && upstream.api_version.is_none() {
                return invalid(format!("upstream {name}: azure needs api_version"));
            }
            if !(upstream.base_url.starts_with("http://")
                || upstream.base_url.starts_with("https://"))
            {
                return invalid(format!(
                    "upstream {name}: base_url must start with http:// or https://"
                ));
            }
            upstreams.push(Upstream {
                name,
                kind: upstream.provider,
                base_url: upstream.base_url.trim_end_matches('/').to_owned(),
                api_key,
                api_version: upstream.api_version,
            });
        }
        let mut deployments: Vec<Deployment> = Vec::new();
        let mut models = BTreeMap::new();
        for (alias, model) in raw.models {
            if model.deployments.is_empty() {
                return invalid(format!("model {alias}: no deployments"));
            }
            if alias == AUTO {
                return invalid(format!(
                    "model {AUTO}: the name is reserved for a project's default tier"
                ));
            }
            let mut indices = Vec::with_capacity(model.deployments.len());
            for deployment in model.deployments {
                let Some(upstream) = upstreams.iter().position(|u| u.name == deployment.upstream)
                else {
                    return invalid(format!(
                        "model {alias}: no upstream named {}",
                        deployment.upstream
                    ));
                };
                if model.strategy == Strategy::Weighted && deployment.weight == 0 {
                    return invalid(format!("model {alias}: weights must be positive"));
                }
                let name = format!("{}/{}", deployment.upstream, deployment.model);
                let index = match deployments.iter().position(|d| d.name == name) {
                    Some(index) => index,
                    None => {
                        deployments.push(Deployment {
                            name,
                            upstream,
                            target: Target::new(&upstreams[upstream], &deployment.model)?,
                            model: deployment.model,
                            weight: deployment.weight,
                        });
                        deployments.len() - 1
                    }
                };
                indices.push(index);
            }
            models.insert(
                alias.clone(),
                Model {
                    alias,
                    strategy: model.strategy,
                    tier: model.tier,
                    deployments: indices,
                },
            );
        }
        let prices = match &raw.pricing.path {
            Some(path) => PriceTable::load(path),
            None => PriceTable::builtin(),
        }
        .map_err(|e| ConfigError::Invalid(format!("price table: {e}")))?;
        let mut forward_headers = Vec::new();
        for name in &raw.translation.forward_headers {
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(name) if !SENSITIVE.contains(&name.as_str()) => forward_headers.push(name),
                _ => {
                    return invalid(format!(
                        "translation.forward_headers: {name:?} is not a header Loom forwards"
                    ));
                }
            }
        }
        Ok(GatewayConfig {
            limits: raw.limits,
            routing: raw.routing,
            unsupported_fields: raw.translation.unsupported_fields,
            forward_headers,
            upstreams,
            deployments,
            models,
            prices: Arc::new(prices),
            quotas,
        })
    }
}

#[cfg(test)]
mod tests {
    use loom_schemas::ExposeSecret;

    use super::*;

    const EXAMPLE: &str = r#"
[routing]
retries = 2
backoff = "50ms"

[upstreams.openai]
provider = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_API_KEY"

[upstreams.local]
provider = "openai_compatible"
base_url = "http://127.0.0.1:11434/v1"

[models.fast]
strategy = "weighted"
deployments = [
  { upstream = "openai", model = "gpt-4o-mini", weight = 3 },
  { upstream = "local", model = "llama3.1" },
]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "OPENAI_API_KEY").then(|| "sk-test".to_owned())
    }

    #[test]
    fn a_complete_file_validates() {
        let raw: RawConfig = toml::from_str(EXAMPLE).unwrap();
        let config = GatewayConfig::validate(raw, env).unwrap();
        assert_eq!(config.routing.retries, 2);
        assert_eq!(config.routing.backoff, Duration::from_millis(50));
        assert_eq!(config.routing.cooldown, Duration::from_secs(30));
        let fast = &config.models["fast"];
        assert_eq!(fast.strategy, Strategy::Weighted);
        let first = &config.deployments[fast.deployments[0]];
        assert_eq!(
            (first.name.as_str(), first.weight),
            ("openai/gpt-4o-mini", 3)
        );
        let openai = &config.upstreams[first.upstream];
        assert_eq!(openai.base_url, "https://api.openai.com/v1");
        assert_eq!(
            openai.api_key.as_ref().map(|k| k.expose_secret()),
            Some("sk-test")
        );
        assert!(
            !format!("{config:?}").contains("sk-test"),
            "Debug redacts keys"
        );
        assert!(!format!("{openai:?}").contains("sk-test"));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                EXAMPLE.replace(
                    "api_key_env = \"OPENAI_API_KEY\"",
                    "api_key_env = \"MISSING\"",
                ),
                "MISSING is not set",
            ),
            (
                EXAMPLE.replace("upstream = \"local\"", "upstream = \"nope\""),
                "no upstream named nope",
            ),
            (
                EXAMPLE.replace("retries = 2", "retries = 2\nsurprise = 1"),
                "unknown field",
            ),
            (EXAMPLE.replace("\"50ms\"", "\"soon\""), "soon"),
            (
                EXAMPLE.replace("127.0.0.1:11434", "127.0.0.1:99999"),
                "upstream local: http://127.0.0.1:99999/v1/chat/completions: invalid port number",
            ),
            (
                EXAMPLE.replace("weight = 3", "weight = 0"),
                "weights must be positive",
            ),
        ];
        for (text, expected) in cases {
            let error = toml::from_str::<RawConfig>(&text)
                .map_err(|e| e.to_string())
                .and_then(|raw| GatewayConfig::validate(raw, env).map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
    }
}
