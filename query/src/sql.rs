//! Ad-hoc SQL over the archive, tenant-safe by construction: each query gets a fresh DataFusion
//! session whose only catalog holds its scope's tables (a listing of exactly the files the
//! scope's manifests name), whose object store is bounded to the scope's directories, whose key
//! factory refuses any file outside the scope, and which accepts plain queries and `EXPLAIN`
//! only: no DDL, DML, `COPY`, `SET`, table functions or URL tables. Each query runs on the
//! service's own runtime with its own memory pool, a spill cap shared by all queries, a timeout
//! that cancels it, a row and byte cap on the result and a per-scope concurrency limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManager, DiskManagerBuilder};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::object_store::DefaultObjectStoreRegistry;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, SessionStateBuilder};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext, col, lit};
use futures_util::StreamExt;
use loom_projector::archive::{Archive, Manifest, ManifestError};
use loom_schemas::keystore::KeyStore;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::archive::{Access, Scope, register_events};
use crate::footers::FooterCache;

/// The bounds every query runs within.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// Memory one query may hold (joins, sorts and aggregates spill to disk past it, or fail).
    pub memory_bytes: usize,
    /// Disk all running queries together may spill to.
    pub spill_bytes: u64,
    /// Wall time one query may run before it is cancelled.
    pub timeout: Duration,
    /// Rows returned at most; the rest are cut (and the answer says so).
    pub max_rows: usize,
    /// Bytes (in memory, as Arrow) returned at most; the rest are cut (and the answer says so).
    pub max_bytes: usize,
    /// Queries one scope (a tenant, or the operator) may run at once; more are refused.
    pub per_scope: usize,
    /// Threads of the runtime queries run on (apart from the gateway's).
    pub threads: usize,
    /// Memory the decrypted footers of archive files are kept in between queries.
    pub footer_cache_bytes: usize,
}

impl Default for SqlLimits {
    fn default() -> SqlLimits {
        SqlLimits {
            memory_bytes: 256 << 20,
            spill_bytes: 1 << 30,
            timeout: Duration::from_secs(30),
            max_rows: 10_000,
            max_bytes: 16 << 20,
            per_scope: 2,
            threads: 2,
            footer_cache_bytes: 256 << 20,
        }
    }
}

/// A query's result.
#[derive(Debug)]
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// Whether rows were cut at the row or byte cap.
    pub truncated: bool,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL does not parse or plan (an unknown table or column, a syntax error…).
    #[error("{0}")]
    Invalid(String),
    /// A statement other than a query or `EXPLAIN`.
    #[error("only queries (SELECT, WITH, VALUES) and EXPLAIN may run here: {0}")]
    NotAllowed(String),
    #[error("{0} queries of this scope are running already; retry when one has finished")]
    Busy(usize),
    #[error("the query ran longer than {}s and was cancelled", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the query needs more memory or disk than it may use: {0}")]
    TooLarge(String),
    /// The archive or the key store failed (not the query's fault).
    #[error("the archive could not be read: {0}")]
    Archive(String),
}

impl SqlError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            SqlError::Invalid(_) | SqlError::NotAllowed(_) | SqlError::TooLarge(_) => 400,
            SqlError::Busy(_) => 429,
            SqlError::Timeout(_) => 408,
            SqlError::Archive(_) => 503,
        }
    }

    /// The OpenAI-style error code.
    pub fn code(&self) -> &'static str {
        match self {
            SqlError::Invalid(_) => "invalid_sql",
            SqlError::NotAllowed(_) => "statement_not_allowed",
            SqlError::Busy(_) => "too_many_queries",
            SqlError::Timeout(_) => "query_timeout",
            SqlError::TooLarge(_) => "query_too_large",
            SqlError::Archive(_) => "archive_unavailable",
        }
    }
}

impl From<ManifestError> for SqlError {
    fn from(error: ManifestError) -> SqlError {
        SqlError::Archive(error.to_string())
    }
}

/// The typed views over `events`, as `(name, SELECT …)`; each carries `tenant_id`.
const VIEWS: &[(&str, &str)] = &[
    (
        "requests",
        "SELECT c.envelope_tenant_id AS tenant_id, c.trace_id, r.occurred_at AS started_at, \
         c.occurred_at AS completed_at, r.project_id, r.api_key_id, r.user_id, r.endpoint, \
         r.stream, coalesce(c.model, r.model) AS model, c.provider, c.deployment, c.status, \
         c.http_status, c.error_class, c.attempt AS attempts, c.tokens_in, c.tokens_out, \
         c.tokens_cached, c.tokens_cache_creation, c.cost_micro_usd, c.latency_us, c.ttft_us, \
         c.overhead_us \
         FROM events c LEFT JOIN events r \
         ON r.trace_id = c.trace_id AND r.event_type = 'request.received' \
         WHERE c.event_type = 'request.completed'",
    ),
    (
        "llm_calls",
        "SELECT envelope_tenant_id AS tenant_id, event_id, trace_id, occurred_at, attempt, \
         provider, deployment, model, status, http_status, error_class, stream, latency_us, \
         ttft_us, tokens_in, tokens_out, tokens_cached, tokens_cache_creation, cost_micro_usd, \
         cache_saved_micro_usd, response_id \
         FROM events WHERE event_type = 'llm_call.completed'",
    ),
    (
        "tool_calls",
        "SELECT envelope_tenant_id AS tenant_id, event_id, trace_id, occurred_at, tool_call_id, \
         tool_name, tool_direction \
         FROM events WHERE event_type = 'tool_call.observed'",
    ),
    (
        "quota_events",
        "SELECT envelope_tenant_id AS tenant_id, event_id, event_type, trace_id, occurred_at, \
         quota_scope, quota_scope_id, quota_metric, quota_window, quota_amount, quota_used, \
         quota_limit, cost_micro_usd \
         FROM events WHERE event_type IN \
         ('quota.reserved', 'quota.consumed', 'quota.released', 'quota.denied')",
    ),
    (
        "policy_findings",
        "SELECT envelope_tenant_id AS tenant_id, event_id, trace_id, occurred_at, project_id, \
         policy_action, policy_findings, latency_us \
         FROM events WHERE event_type = 'policy.evaluated'",
    ),
];

/// Control events live in the system tenant's directory: a view of the operator's only.
const CONTROL_VIEW: (&str, &str) = (
    "control_events",
    "SELECT envelope_tenant_id AS tenant_id, event_id, event_type, occurred_at, producer, \
     project_id, api_key_id, user_id, quota_scope, quota_scope_id, quota_metric, quota_window, \
     quota_limit \
     FROM events WHERE event_type IN ('tenant.created', 'project.created', 'project.updated', \
     'api_key.issued', 'api_key.revoked', 'quota.limit_set', 'role.granted', 'role.revoked', \
     'tenant.erased', 'tenant.key_rotated', 'log.anchored')",
);

/// What [`SqlService::warm`] read ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    /// Tenants whose manifests are held.
    pub tenants: usize,
    /// Files whose footers are kept for full readers.
    pub footers: usize,
}

/// The SQL service: runs queries over the archive within [`SqlLimits`].
pub struct SqlService {
    archive: Archive,
    keys: Arc<KeyStore>,
    limits: SqlLimits,
    disk: Arc<DiskManager>,
    runtime: QueryRuntime,
    /// The archive files' footers, decrypted, for every session.
    footers: Arc<FooterCache>,
    /// Each tenant's manifest as last read; refreshed (new entries only) by each query.
    manifests: tokio::sync::Mutex<HashMap<Uuid, Manifest>>,
    /// Queries running, per scope.
    running: Mutex<HashMap<Scope, Arc<Semaphore>>>,
}

impl SqlService {
    pub fn new(
        archive: Archive,
        keys: Arc<KeyStore>,
        limits: SqlLimits,
    ) -> Result<SqlService, SqlError> {
        let disk = DiskManagerBuilder::default()
            .with_max_temp_directory_size(limits.spill_bytes)
            .build()
            .map_err(|e| SqlError::Archive(format!("spill directory: {e}")))?;
        let runtime = QueryRuntime::new(limits.threads)
            .map_err(|e| SqlError::Archive(format!("query runtime: {e}")))?;
        Ok(SqlService {
            archive,
            keys,
            footers: Arc::new(FooterCache::new(limits.footer_cache_bytes)),
            limits,
            disk: Arc::new(disk),
            runtime,
            manifests: tokio::sync::Mutex::default(),
            running: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &SqlLimits {
        &self.limits
    }

    /// How many archive files' footers are kept, decrypted for readers with `access`.
    pub fn footers_kept(&self, access: Access) -> usize {
        self.footers.files(access)
    }

    /// Runs `sql` over the archive of `scope`, its bodies and events whole readable with
    /// [`Access::Full`] only.
    pub async fn query(&self, scope: Scope, access: Access, sql: &str) -> Result<Answer, SqlError> {
        let permit = self.admit(scope)?;
        let manifests = self.manifests(scope).await?;
        let ctx = self
            .session(&manifests, scope, access, Views::Typed)
            .await?;
        let sql = sql.to_owned();
        self.run(permit, ctx, move |ctx| async move {
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            ctx.sql_with_options(&sql, options).await
        })
        .await
    }

    /// The archived events of trace `trace_id` of `tenant`, oldest first, found by the keyed
    /// digest the files' bloom filters hold; in the files of `days` only (`YYYY-MM-DD`) when
    /// given. Bound by the same limits as a query.
    pub async fn trace_events(
        &self,
        tenant: Uuid,
        access: Access,
        trace_id: &str,
        days: Option<Vec<String>>,
    ) -> Result<Vec<RecordBatch>, SqlError> {
        let scope = Scope::Tenant(tenant);
        let permit = self.admit(scope)?;
        let mut manifests = self.manifests(scope).await?;
        if let Some(days) = days {
            for manifest in &mut manifests {
                manifest.files.retain(|path, _| {
                    days.iter()
                        .any(|day| path.starts_with(&format!("date={day}/")))
                });
            }
        }
        let digest = loom_projector::archive::file::trace_digest(&self.keys, tenant, trace_id)
            .map_err(|e| SqlError::Archive(format!("the trace's digest: {e}")))?;
        let ctx = self
            .session(&manifests, scope, access, Views::Lookup)
            .await?;
        let trace_id = trace_id.to_owned();
        let answer = self
            .run(permit, ctx, move |ctx| async move {
                ctx.table("events")
                    .await?
                    .filter(
                        col("trace_digest")
                            .eq(lit(ScalarValue::Binary(Some(digest))))
                            .and(col("trace_id").eq(lit(trace_id))),
                    )?
                    .sort(vec![col("occurred_at").sort(true, false)])
            })
            .await?;
        Ok(answer.batches)
    }

    /// Reads every tenant's manifest, then its files' footers for full readers, ahead of the
    /// first query (a server calls it as it starts): a tenant's first query, or its first
    /// archived trace lookup, would otherwise read the whole chain of its manifest and then
    /// read and decrypt the footers of the files it touches. Footers are read until they fill
    /// the full readers' half of the cache; a tenant whose footers cannot be read is skipped.
    pub async fn warm(&self) -> Result<Warmed, SqlError> {
        let manifests = self.manifests(Scope::AllTenants).await?;
        let room = self.limits.footer_cache_bytes / 2;
        for manifest in &manifests {
            if self.footers.bytes() >= room {
                break;
            }
            let scope = Scope::Tenant(manifest.tenant);
            let ctx = self
                .session(
                    std::slice::from_ref(manifest),
                    scope,
                    Access::Full,
                    Views::EventsOnly,
                )
                .await?;
            // Planning a scan of every file reads each file's footer, for its statistics.
            let planned = self
                .runtime
                .spawn(async move { ctx.table("events").await?.create_physical_plan().await })
                .await;
            match planned {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(tenant = %manifest.tenant, %error, "could not read footers ahead");
                }
                Err(error) => return Err(SqlError::Archive(format!("warming up: {error}"))),
            }
        }
        Ok(Warmed {
            tenants: manifests.len(),
            footers: self.footers.files(Access::Full),
        })
    }

    /// The manifests of the tenants `scope` reads (erased tenants have none), up to date.
    pub(crate) async fn current_manifests(&self, scope: Scope) -> Result<Vec<Manifest>, SqlError> {
        self.manifests(scope).await
    }

    /// The archived events of `tenant` in its files of `day` (`YYYY-MM-DD`) as `plan` shapes
    /// them, streamed: for exports, which read more than a query may return and run longer than
    /// it may take. Poll it on the service's runtime ([`SqlService::spawn`]). The memory limit
    /// applies; the row, byte and time limits do not.
    pub(crate) async fn scan_day<F>(
        &self,
        manifest: &Manifest,
        access: Access,
        day: &str,
        plan: F,
    ) -> Result<SendableRecordBatchStream, SqlError>
    where
        F: FnOnce(DataFrame) -> Result<DataFrame, DataFusionError>,
    {
        let mut manifest = manifest.clone();
        let prefix = format!("date={day}/");
        manifest.files.retain(|path, _| path.starts_with(&prefix));
        let ctx = self
            .session(
                &[manifest.clone()],
                Scope::Tenant(manifest.tenant),
                access,
                Views::EventsOnly,
            )
            .await?;
        let frame = ctx.table("events").await.map_err(classify)?;
        plan(frame)
            .map_err(classify)?
            .execute_stream()
            .await
            .map_err(classify)
    }

    /// Runs `task` on the service's runtime, apart from the gateway's.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(task)
    }

    /// Runs the plan `plan` makes in `ctx` on the service's runtime, within its limits.
    async fn run<F, Fut>(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        ctx: SessionContext,
        plan: F,
    ) -> Result<Answer, SqlError>
    where
        F: FnOnce(SessionContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<DataFrame, DataFusionError>> + Send,
    {
        let started = Instant::now();
        let limits = self.limits.clone();
        let run = self.runtime.spawn(async move {
            // Held until the plan has stopped, not just until the caller gave up on it.
            let _permit = permit;
            let frame = plan(ctx).await?;
            let schema = Arc::clone(frame.schema().inner());
            let mut stream = frame.execute_stream().await?;
            let (mut batches, mut rows, mut bytes, mut truncated) = (Vec::new(), 0, 0, false);
            while let Some(batch) = stream.next().await {
                let mut batch = batch?;
                if rows + batch.num_rows() > limits.max_rows {
                    batch = batch.slice(0, limits.max_rows - rows);
                    truncated = true;
                }
                bytes += batch.get_array_memory_size();
                if bytes > limits.max_bytes && !batches.is_empty() {
                    truncated = true;
                    break;
                }
                rows += batch.num_rows();
                batches.push(batch);
                if truncated || bytes > limits.max_bytes {
                    truncated = true;
                    break;
                }
            }
            Ok::<_, DataFusionError>((schema, batches, rows, truncated))
        });
        // Dropping the task's handle does not stop it: on a timeout, or when the caller goes
        // away (a client that disconnects drops this future), the task is aborted, which drops
        // the stream and so cancels every operator of the plan.
        let _abort = AbortOnDrop(run.abort_handle());
        let answer = match tokio::time::timeout(self.limits.timeout, run).await {
            Err(_) => {
                metrics::counter!("loom_sql_rejected_total", "reason" => "timeout").increment(1);
                return Err(SqlError::Timeout(self.limits.timeout));
            }
            Ok(Err(joined)) => {
                return Err(SqlError::Archive(format!("the query failed: {joined}")));
            }
            Ok(Ok(answer)) => answer.map_err(classify)?,
        };
        let (schema, batches, rows, truncated) = answer;
        metrics::histogram!("loom_sql_query_seconds").record(started.elapsed().as_secs_f64());
        metrics::gauge!("loom_sql_footer_cache_bytes").set(self.footers.bytes() as f64);
        Ok(Answer {
            schema,
            batches,
            rows,
            truncated,
            elapsed: started.elapsed(),
        })
    }

    fn admit(&self, scope: Scope) -> Result<tokio::sync::OwnedSemaphorePermit, SqlError> {
        let semaphore = {
            let mut running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(
                running
                    .entry(scope)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_scope))),
            )
        };
        semaphore.try_acquire_owned().map_err(|_| {
            metrics::counter!("loom_sql_rejected_total", "reason" => "busy").increment(1);
            SqlError::Busy(self.limits.per_scope)
        })
    }

    /// A fresh session holding the tables of `manifests` (of `scope`) only.
    async fn session(
        &self,
        manifests: &[Manifest],
        scope: Scope,
        access: Access,
        views: Views,
    ) -> Result<SessionContext, SqlError> {
        let mut runtime = RuntimeEnvBuilder::new();
        runtime.disk_manager = Some(Arc::clone(&self.disk));
        runtime.memory_pool = Some(Arc::new(GreedyMemoryPool::new(self.limits.memory_bytes)));
        // A registry of its own: the session registers its bounded store in it.
        runtime.object_store_registry = Arc::new(DefaultObjectStoreRegistry::new());
        let runtime = runtime.build_arc().map_err(classify)?;
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_create_default_catalog_and_schema(true);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_table_functions(HashMap::new())
            .with_table_factories(HashMap::new())
            .with_physical_optimizer_rule(Arc::new(YieldEverywhere))
            .build();
        let ctx = SessionContext::new_with_state(state);
        register_events(
            &ctx,
            &self.archive,
            manifests,
            Arc::clone(&self.keys),
            Arc::clone(&self.footers),
            scope,
            access,
            "events",
            views == Views::Lookup,
        )
        .map_err(classify)?;
        if views != Views::Typed {
            return Ok(ctx);
        }
        let control = (scope == Scope::AllTenants).then_some(&CONTROL_VIEW);
        for (name, select) in VIEWS.iter().chain(control) {
            let view = ctx.sql(select).await.map_err(classify)?.into_view();
            ctx.register_table(*name, view).map_err(classify)?;
        }
        Ok(ctx)
    }

    /// The manifests of the tenants `scope` reads, brought up to date; erased tenants have none.
    async fn manifests(&self, scope: Scope) -> Result<Vec<Manifest>, SqlError> {
        let tenants = match scope {
            Scope::Tenant(tenant) => vec![tenant],
            Scope::AllTenants => self.archive.tenants().await?,
        };
        let mut cached = self.manifests.lock().await;
        let erased: Vec<Uuid> = cached
            .keys()
            .copied()
            .filter(|tenant| self.keys.is_erased(*tenant))
            .collect();
        if !erased.is_empty() {
            cached.retain(|tenant, _| !erased.contains(tenant));
            // The footers kept hold the keys that read their files.
            self.footers.clear();
        }
        let mut manifests = Vec::with_capacity(tenants.len());
        for tenant in tenants {
            if self.keys.is_erased(tenant) {
                continue;
            }
            let manifest = match cached.remove(&tenant) {
                Some(mut manifest) => {
                    manifest
                        .refresh(self.archive.store.as_ref(), &self.archive.root)
                        .await?;
                    manifest
                }
                None => self.archive.manifest(tenant).await?,
            };
            if !manifest.erased {
                manifests.push(manifest.clone());
            }
            cached.insert(tenant, manifest);
        }
        Ok(manifests)
    }
}

/// Which tables a session holds besides `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Views {
    /// The typed views too (`requests`, `llm_calls`, …): what users query.
    Typed,
    /// `events` alone: what Loom's own plans read (exports, the warm-up).
    EventsOnly,
    /// `events` alone, read for a few rows: a trace lookup.
    Lookup,
}

/// The error a user sees for a DataFusion error.
fn classify(error: DataFusionError) -> SqlError {
    let root = error.find_root();
    let message = root.message().into_owned();
    match root {
        DataFusionError::Plan(..) if is_statement_refusal(&message) => {
            SqlError::NotAllowed(message)
        }
        DataFusionError::SQL(..)
        | DataFusionError::Plan(..)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(..)
        | DataFusionError::Configuration(..)
        | DataFusionError::Execution(..)
        | DataFusionError::ArrowError(..) => SqlError::Invalid(message),
        DataFusionError::ResourcesExhausted(..) => SqlError::TooLarge(message),
        _ => SqlError::Archive(message),
    }
}

/// Whether `message` is DataFusion refusing a statement kind that [`SQLOptions`] turned off.
fn is_statement_refusal(message: &str) -> bool {
    ["DDL", "DML", "Statement"]
        .iter()
        .any(|kind| message.contains(&format!("{kind} not supported")))
}

/// A yield point above every operator of a plan: each batch any operator produces spends task
/// budget, so that every plan returns to the scheduler regularly — where a timeout's abort takes
/// effect. DataFusion's own rule puts them at sources and exchanges only, which leaves loops such
/// as a cartesian join feeding an aggregate running for minutes past their cancellation.
#[derive(Debug)]
struct YieldEverywhere;

impl PhysicalOptimizerRule for YieldEverywhere {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if node.is::<CooperativeExec>() {
                return Ok(Transformed::no(node));
            }
            let wrapped: Arc<dyn ExecutionPlan> = Arc::new(CooperativeExec::new(node));
            Ok(Transformed::yes(wrapped))
        })
        .data()
    }

    fn name(&self) -> &str {
        "loom_yield_everywhere"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Aborts a task when dropped (a no-op once it has finished).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The runtime queries run on, apart from the one serving requests: a query cannot starve the
/// gateway of threads.
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn new(threads: usize) -> std::io::Result<QueryRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("loom-sql")
            .enable_all()
            .build()?;
        Ok(QueryRuntime(Some(runtime)))
    }

    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // A runtime may not be dropped from within another's async context: let it wind down
        // in the background instead.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
