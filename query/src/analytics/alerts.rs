//! Alerts: what needs a look now, from the read models.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::time::window_start;
use super::{Analytics, AnalyticsError, Filters, Question, Sql, Window, rate, rfc3339};
use crate::archive::Scope;

/// Something an operator should look at.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Alert {
    /// `error_rate_spike`, `upstream_failing`, `quota_near_limit` or `policy_blocks`.
    pub kind: &'static str,
    /// `warning` or `critical`.
    pub severity: &'static str,
    pub title: String,
    /// The tenant, deployment, or quota scope it is about.
    pub subject: String,
    /// The measured value (a rate, a fraction of the limit, or a count) and its threshold.
    pub value: f64,
    pub threshold: f64,
    /// The start of the time it was measured over (RFC 3339).
    pub since: String,
}

/// Thresholds of the alerts (docs/query.md).
pub mod thresholds {
    /// The recent window error spikes and failing upstreams are judged over.
    pub const RECENT_US: i64 = 15 * 60_000_000;
    /// The baseline a spike is judged against: the day before the recent window.
    pub const BASELINE_US: i64 = 86_400_000_000;
    /// Fewest requests (or upstream attempts) in the recent window for a rate to count.
    pub const MIN_REQUESTS: i64 = 20;
    pub const MIN_CALLS: i64 = 5;
    /// An error-rate spike: at least this rate, and twice the baseline's.
    pub const SPIKE_RATE: f64 = 0.05;
    pub const SPIKE_CRITICAL: f64 = 0.25;
    /// A failing upstream: this share of its attempts failed.
    pub const UPSTREAM_WARNING: f64 = 0.2;
    pub const UPSTREAM_CRITICAL: f64 = 0.5;
    /// A quota near its limit: this share of it used in the current window.
    pub const QUOTA_WARNING: f64 = 0.8;
    /// Policy blocks are reported over the last day.
    pub const POLICY_US: i64 = 86_400_000_000;
}

impl Analytics {
    /// What needs a look at `now_us`: error-rate spikes, failing upstreams, quotas near their
    /// limit and policy blocks (thresholds in [`thresholds`]).
    pub async fn alerts(
        &self,
        scope: Scope,
        filters: &Filters,
        now_us: i64,
    ) -> Result<Vec<Alert>, AnalyticsError> {
        use thresholds::*;
        let store = self.reads.store().await?;
        let recent = Window {
            from_us: now_us - RECENT_US,
            to_us: now_us,
        };
        let mut alerts = Vec::new();

        // Error-rate spikes, per tenant: the last 15 minutes against the day before.
        let question = Question {
            scope,
            window: Window {
                from_us: recent.from_us - BASELINE_US,
                to_us: now_us,
            },
            filters: filters.clone(),
        };
        let mut sql = Sql::new();
        let filter = sql.filter(scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT t.tenant_id, CASE WHEN t.started_at >= {} THEN 1 ELSE 0 END, COUNT(*), \
                    CAST(SUM(CASE WHEN t.status = 'ok' THEN 0 ELSE 1 END) AS BIGINT) \
             FROM traces t WHERE {filter} AND t.status IS NOT NULL GROUP BY 1, 2",
            recent.from_us
        );
        let mut by_tenant: BTreeMap<String, [(i64, i64); 2]> = BTreeMap::new();
        for row in sql.fetch(&store).await? {
            let recent: i64 = row.try_get(1)?;
            let entry = by_tenant.entry(row.try_get(0)?).or_default();
            entry[usize::from(recent == 1)] = (row.try_get(2)?, row.try_get(3)?);
        }
        for (tenant, [(base_n, base_errors), (n, errors)]) in by_tenant {
            let (now, base) = (rate(errors, n), rate(base_errors, base_n));
            if n >= MIN_REQUESTS && now >= SPIKE_RATE && now >= 2.0 * base {
                alerts.push(Alert {
                    kind: "error_rate_spike",
                    severity: if now >= SPIKE_CRITICAL {
                        "critical"
                    } else {
                        "warning"
                    },
                    title: format!(
                        "{:.0}% of requests failed in the last 15 minutes (the day before: {:.1}%)",
                        now * 100.0,
                        base * 100.0
                    ),
                    subject: tenant,
                    value: now,
                    threshold: SPIKE_RATE.max(2.0 * base),
                    since: rfc3339(recent.from_us),
                });
            }
        }

        // Failing upstreams: deployments whose recent attempts mostly fail.
        let mut sql = Sql::new();
        let mut filter = format!(
            "c.started_at >= {} AND c.started_at < {}",
            recent.from_us, recent.to_us
        );
        if let Scope::Tenant(tenant) = scope {
            let _ = write!(
                filter,
                " AND c.tenant_id = {}",
                sql.bind(&tenant.to_string())
            );
        }
        sql.text = format!(
            "SELECT c.deployment, COUNT(*), \
                    CAST(SUM(CASE WHEN c.status = 'ok' THEN 0 ELSE 1 END) AS BIGINT) \
             FROM llm_calls c WHERE {filter} GROUP BY 1"
        );
        for row in sql.fetch(&store).await? {
            let (deployment, n, errors): (String, i64, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let failing = rate(errors, n);
            if n >= MIN_CALLS && failing >= UPSTREAM_WARNING {
                alerts.push(Alert {
                    kind: "upstream_failing",
                    severity: if failing >= UPSTREAM_CRITICAL {
                        "critical"
                    } else {
                        "warning"
                    },
                    title: format!(
                        "{errors} of {n} calls to {deployment} failed in the last 15 minutes"
                    ),
                    subject: deployment,
                    value: failing,
                    threshold: UPSTREAM_WARNING,
                    since: rfc3339(recent.from_us),
                });
            }
        }

        alerts.extend(self.quota_alerts(&store, scope, now_us).await?);

        // Policy blocks over the last day.
        let day = Window {
            from_us: now_us - POLICY_US,
            to_us: now_us,
        };
        let mut sql = Sql::new();
        let filter = sql.filter(scope, day, filters);
        sql.text = format!(
            "SELECT t.tenant_id, COUNT(*) FROM traces t \
             WHERE {filter} AND t.policy_action = 'block' GROUP BY 1"
        );
        for row in sql.fetch(&store).await? {
            let (tenant, blocks): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            alerts.push(Alert {
                kind: "policy_blocks",
                severity: "warning",
                title: format!("the prompt policy blocked {blocks} requests in the last day"),
                subject: tenant,
                value: blocks as f64,
                threshold: 1.0,
                since: rfc3339(day.from_us),
            });
        }
        alerts.sort_by_key(|a| (a.severity != "critical", a.kind));
        Ok(alerts)
    }

    /// Quotas with a limit whose current window (UTC) has used 80 % of it or more.
    async fn quota_alerts(
        &self,
        store: &loom_projector::ReadStore,
        scope: Scope,
        now_us: i64,
    ) -> Result<Vec<Alert>, AnalyticsError> {
        let mut sql = Sql::new();
        sql.text = "SELECT tenant_id, scope, scope_id, metric, quota_window, limit_value \
                    FROM quota_limits WHERE limit_value IS NOT NULL AND limit_value > 0"
            .into();
        if let Scope::Tenant(tenant) = scope {
            let tenant = sql.bind(&tenant.to_string());
            let _ = write!(sql.text, " AND tenant_id = {tenant}");
        }
        let limits = sql.fetch(store).await?;
        let mut alerts = Vec::new();
        for row in limits {
            let (tenant, quota_scope, scope_id, metric, window, limit): (
                String,
                String,
                String,
                String,
                String,
                i64,
            ) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
                row.try_get(5)?,
            );
            let Some(from_us) = window_start(&window, now_us) else {
                continue;
            };
            let column = match quota_scope.as_str() {
                "tenant" => "t.tenant_id",
                "project" => "t.project_id",
                "api_key" => "t.api_key_id",
                _ => continue,
            };
            let value = match metric.as_str() {
                "requests" => "COUNT(*)",
                "tokens" => "SUM(COALESCE(t.tokens_in, 0) + COALESCE(t.tokens_out, 0))",
                "cost_micro_usd" => "SUM(COALESCE(t.cost_micro_usd, 0))",
                _ => continue,
            };
            let mut sql = Sql::new();
            let tenant_bind = sql.bind(&tenant);
            let id = sql.bind(&scope_id);
            sql.text = format!(
                "SELECT CAST(COALESCE({value}, 0) AS BIGINT) FROM traces t \
                 WHERE t.tenant_id = {tenant_bind} AND {column} = {id} \
                 AND t.started_at >= {from_us} AND t.started_at < {}",
                now_us + 1
            );
            let used: i64 = match sql.fetch(store).await?.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            let share = rate(used, limit);
            if share >= thresholds::QUOTA_WARNING {
                alerts.push(Alert {
                    kind: "quota_near_limit",
                    severity: if share >= 1.0 { "critical" } else { "warning" },
                    title: format!(
                        "{quota_scope} {scope_id} used {:.0}% of its {metric} per {window} \
                         ({used} of {limit})",
                        share * 100.0
                    ),
                    subject: format!("{quota_scope}:{scope_id}"),
                    value: share,
                    threshold: thresholds::QUOTA_WARNING,
                    since: rfc3339(from_us),
                });
            }
        }
        Ok(alerts)
    }
}
