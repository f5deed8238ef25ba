//! Prices per token, in LiteLLM's `model_prices_and_context_window.json` format, and the cost of a
//! call in integer micro-USD. A model without a known price costs "unknown" (`None`), never 0.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::ProviderKind;
use crate::record::Usage;

/// The table Loom ships (see `gateway/prices/README.md`).
const BUILTIN: &str = include_str!("../prices/model_prices_and_context_window.json");

/// USD per token, as LiteLLM writes them.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input_cost_per_token: f64,
    pub output_cost_per_token: f64,
    #[serde(default)]
    pub cache_read_input_token_cost: Option<f64>,
    #[serde(default)]
    pub cache_creation_input_token_cost: Option<f64>,
    /// The most output tokens the model gives in one answer, where the table says.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

impl PriceTable {
    /// Parses a LiteLLM price file; entries without input and output prices are skipped.
    pub fn parse(json: &str) -> Result<PriceTable, String> {
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| e.to_string())?;
        let prices = raw
            .into_iter()
            .filter_map(|(model, entry)| Some((model, Price::deserialize(entry).ok()?)))
            .collect();
        Ok(PriceTable { prices })
    }

    pub fn builtin() -> Result<PriceTable, String> {
        Self::parse(BUILTIN)
    }

    pub fn load(path: &Path) -> Result<PriceTable, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The price of `model` at a provider: the model id as is, then prefixed with the provider
    /// (LiteLLM's `azure/…`), then without a `vendor/` prefix.
    pub fn lookup(&self, provider: ProviderKind, model: &str) -> Option<&Price> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get(&format!("{}/{model}", provider.name())))
            .or_else(|| {
                model
                    .rsplit_once('/')
                    .and_then(|(_, bare)| self.prices.get(bare))
            })
    }

    /// Cost in micro-USD of `usage` at `price`; `None` when token counts are missing. Prompt
    /// tokens include cache reads and writes (OpenAI's convention), priced at the cache rates
    /// where the table has them.
    pub fn cost(price: &Price, usage: &Usage) -> Option<i64> {
        let tokens_in = usage.tokens_in? as f64;
        let tokens_out = usage.tokens_out? as f64;
        let cached = usage.tokens_cached_read.unwrap_or(0) as f64;
        let creation = usage.tokens_cache_creation.unwrap_or(0) as f64;
        let usd = (tokens_in - cached - creation).max(0.0) * price.input_cost_per_token
            + cached
                * price
                    .cache_read_input_token_cost
                    .unwrap_or(price.input_cost_per_token)
            + creation
                * price
                    .cache_creation_input_token_cost
                    .unwrap_or(price.input_cost_per_token)
            + tokens_out * price.output_cost_per_token;
        Some((usd * 1_000_000.0).round() as i64)
    }

    /// What the provider's prompt cache saved on `usage` at `price`, in micro-USD: the prompt's
    /// cache reads and writes at the plain input price, less what they cost. Negative when
    /// writing the cache cost more than its reads saved; `None` when nothing touched the cache.
    pub fn cache_saving(price: &Price, usage: &Usage) -> Option<i64> {
        let cached = usage.tokens_cached_read.unwrap_or(0) as f64;
        let creation = usage.tokens_cache_creation.unwrap_or(0) as f64;
        if cached == 0.0 && creation == 0.0 {
            return None;
        }
        let input = price.input_cost_per_token;
        let usd = cached * (input - price.cache_read_input_token_cost.unwrap_or(input))
            + creation * (input - price.cache_creation_input_token_cost.unwrap_or(input));
        Some((usd * 1_000_000.0).round() as i64)
    }

    /// The price of a call to `model` (or the more specific `served` model id the upstream
    /// named).
    pub fn price_of(
        &self,
        provider: ProviderKind,
        model: &str,
        served: Option<&str>,
    ) -> Option<&Price> {
        served
            .and_then(|served| self.lookup(provider, served))
            .or_else(|| self.lookup(provider, model))
    }

    /// The cost of a call to `model` (or the more specific `served` model id the upstream named).
    pub fn cost_of(
        &self,
        provider: ProviderKind,
        model: &str,
        served: Option<&str>,
        usage: &Usage,
    ) -> Option<i64> {
        Self::cost(self.price_of(provider, model, served)?, usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_table_prices_known_models_in_micro_usd() {
        let table = PriceTable::builtin().unwrap();
        assert!(table.len() > 1000);
        let usage = Usage {
            tokens_in: Some(1_000_000),
            tokens_out: Some(1_000_000),
            tokens_cached_read: Some(500_000),
            tokens_cache_creation: None,
            estimated: false,
        };
        // gpt-4o-mini: $0.15 / 1M in, $0.075 / 1M cached, $0.60 / 1M out.
        let cost = table.cost_of(ProviderKind::Openai, "gpt-4o-mini", None, &usage);
        assert_eq!(cost, Some(75_000 + 37_500 + 600_000));
        assert!(table.lookup(ProviderKind::Azure, "gpt-4o-mini").is_some());
        assert!(
            table
                .lookup(ProviderKind::OpenaiCompatible, "openai/gpt-4o-mini")
                .is_some()
        );
        assert_eq!(
            table.cost_of(ProviderKind::Openai, "no-such-model", None, &usage),
            None
        );
        let unknown_usage = Usage {
            tokens_out: None,
            ..usage
        };
        assert_eq!(
            table.cost_of(ProviderKind::Openai, "gpt-4o-mini", None, &unknown_usage),
            None
        );
    }

    #[test]
    fn cache_reads_save_and_cache_writes_cost_extra() {
        let table = PriceTable::builtin().unwrap();
        let price = table
            .lookup(ProviderKind::Anthropic, "claude-sonnet-4-5")
            .copied()
            .unwrap();
        // $3 / 1M in, $0.30 / 1M cache reads, $3.75 / 1M cache writes.
        let read = Usage {
            tokens_in: Some(1_100_000),
            tokens_out: Some(0),
            tokens_cached_read: Some(1_000_000),
            ..Usage::default()
        };
        assert_eq!(PriceTable::cache_saving(&price, &read), Some(2_700_000));
        assert_eq!(PriceTable::cost(&price, &read), Some(300_000 + 300_000));
        let write = Usage {
            tokens_cached_read: None,
            tokens_cache_creation: Some(1_000_000),
            ..read
        };
        assert_eq!(PriceTable::cache_saving(&price, &write), Some(-750_000));
        let none = Usage {
            tokens_cache_creation: None,
            ..write
        };
        assert_eq!(PriceTable::cache_saving(&price, &none), None);
    }

    #[test]
    fn a_custom_table_parses_and_bad_files_are_named() {
        let table = PriceTable::parse(r#"{"sample_spec": {"input_cost_per_token": "x"}, "mine": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}"#).unwrap();
        assert_eq!(table.len(), 1);
        let usage = Usage {
            tokens_in: Some(10),
            tokens_out: Some(5),
            ..Usage::default()
        };
        assert_eq!(
            table.cost_of(ProviderKind::Openai, "mine", None, &usage),
            Some(20)
        );
        assert!(PriceTable::parse("[1, 2]").is_err());
    }
}
