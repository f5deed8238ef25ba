//! What a quota limits, as the control plane sets it (`quota.limit_set`) and the gateway enforces
//! it: daily budgets of tokens and micro-USD, and per-minute rates of requests and tokens, for a
//! tenant, a project, a user or a key. One check of what a limit may be, shared by the admin API
//! and the control rules.

use serde::{Deserialize, Serialize};

use crate::event::{QuotaMetric, QuotaWindow};

/// One limit a scope can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Tokens (input plus output) per quota day.
    TokensPerDay,
    /// Micro-USD per quota day.
    CostPerDay,
    RequestsPerMinute,
    TokensPerMinute,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        LimitKind::TokensPerDay,
        LimitKind::CostPerDay,
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerMinute,
    ];

    /// The limit a metric and window name, if Loom enforces that pair.
    pub fn of(metric: QuotaMetric, window: QuotaWindow) -> Option<LimitKind> {
        match (metric, window) {
            (QuotaMetric::Tokens, QuotaWindow::Day) => Some(LimitKind::TokensPerDay),
            (QuotaMetric::CostMicroUsd, QuotaWindow::Day) => Some(LimitKind::CostPerDay),
            (QuotaMetric::Requests, QuotaWindow::Minute) => Some(LimitKind::RequestsPerMinute),
            (QuotaMetric::Tokens, QuotaWindow::Minute) => Some(LimitKind::TokensPerMinute),
            _ => None,
        }
    }

    pub fn metric(self) -> QuotaMetric {
        match self {
            LimitKind::TokensPerDay | LimitKind::TokensPerMinute => QuotaMetric::Tokens,
            LimitKind::CostPerDay => QuotaMetric::CostMicroUsd,
            LimitKind::RequestsPerMinute => QuotaMetric::Requests,
        }
    }

    pub fn window(self) -> QuotaWindow {
        match self {
            LimitKind::TokensPerDay | LimitKind::CostPerDay => QuotaWindow::Day,
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute => QuotaWindow::Minute,
        }
    }

    /// The field naming this limit in the admin API.
    pub fn field(self) -> &'static str {
        match self {
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::CostPerDay => "cost_micro_usd_per_day",
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
        }
    }

    /// The largest limit that is not a mistake: a trillion tokens a day, a billion dollars a
    /// day, ten million requests or a billion tokens a minute.
    pub fn max(self) -> i64 {
        match self {
            LimitKind::TokensPerDay => 1_000_000_000_000,
            LimitKind::CostPerDay => 1_000_000_000_000_000,
            LimitKind::RequestsPerMinute => 10_000_000,
            LimitKind::TokensPerMinute => 1_000_000_000,
        }
    }

    /// Checks a limit: `0` (unlimited) up to [`LimitKind::max`].
    pub fn check(self, limit: i64) -> Result<i64, String> {
        match (0..=self.max()).contains(&limit) {
            true => Ok(limit),
            false => Err(format!(
                "{}: 0 (unlimited) to {} (got {limit})",
                self.field(),
                self.max()
            )),
        }
    }
}

/// The limits set on one scope; `None` falls back to the configured default, `Some(0)` is
/// unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub tokens_per_day: Option<i64>,
    pub cost_micro_usd_per_day: Option<i64>,
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
}

impl Limits {
    pub fn get(&self, kind: LimitKind) -> Option<i64> {
        match kind {
            LimitKind::TokensPerDay => self.tokens_per_day,
            LimitKind::CostPerDay => self.cost_micro_usd_per_day,
            LimitKind::RequestsPerMinute => self.requests_per_minute,
            LimitKind::TokensPerMinute => self.tokens_per_minute,
        }
    }

    pub fn set(&mut self, kind: LimitKind, limit: Option<i64>) {
        let slot = match kind {
            LimitKind::TokensPerDay => &mut self.tokens_per_day,
            LimitKind::CostPerDay => &mut self.cost_micro_usd_per_day,
            LimitKind::RequestsPerMinute => &mut self.requests_per_minute,
            LimitKind::TokensPerMinute => &mut self.tokens_per_minute,
        };
        *slot = limit;
    }

    pub fn is_empty(&self) -> bool {
        LimitKind::ALL.iter().all(|k| self.get(*k).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_enforced_pairs_are_limits_and_absurd_values_are_refused() {
        for kind in LimitKind::ALL {
            assert_eq!(LimitKind::of(kind.metric(), kind.window()), Some(kind));
            assert_eq!(kind.check(0), Ok(0));
            assert!(kind.check(-1).unwrap_err().contains(kind.field()));
            assert!(kind.check(kind.max() + 1).is_err());
        }
        assert_eq!(LimitKind::of(QuotaMetric::Requests, QuotaWindow::Day), None);
        assert_eq!(
            LimitKind::of(QuotaMetric::CostMicroUsd, QuotaWindow::Month),
            None
        );
        let mut limits = Limits::default();
        assert!(limits.is_empty());
        limits.set(LimitKind::CostPerDay, Some(5));
        assert_eq!(limits.get(LimitKind::CostPerDay), Some(5));
        assert!(!limits.is_empty());
    }
}
