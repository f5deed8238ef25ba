//! The query service's HTTP routes: `POST /v1/sql` over the archive, the analytics over the read
//! models (`analytics`), traces (`traces`), exports to a data lake (`exports`), and
//! `GET /openapi.json` describing them. Who may read what is decided
//! by the caller's credentials ([`Authenticate`], given by the node that knows the keys): a
//! tenant's key reads its tenant's data, the operator's admin token every tenant's.

mod analytics;
mod exports;
mod traces;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::analytics::{Analytics, AnalyticsError};
use crate::archive::{Access, Scope};
use crate::export::Jobs;
use crate::format::{self, Format};
use crate::sql::SqlService;
use crate::traces::Traces;

/// Whose archive a caller reads, and how much of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub scope: Scope,
    pub access: Access,
    /// The project a tenant's key is bound to: its analytics and traces are that project's, and
    /// it may not run ad-hoc SQL or exports (they read the whole tenant's archive).
    pub project: Option<uuid::Uuid>,
}

/// Why a key bound to a project may not read the whole tenant's archive.
const PROJECT_BOUND: &str = "ad-hoc SQL and exports read the whole tenant's archive: a key \
    bound to a project reads its project through /v1/analytics and /v1/traces (use a key of the \
    whole tenant)";

/// Tells who presented the credentials of a request.
pub trait Authenticate: Send + Sync {
    /// The caller, or `None` for missing or wrong credentials.
    fn authenticate(&self, headers: &HeaderMap) -> Option<Principal>;
}

/// What a node serves: SQL when it keeps an archive, analytics and traces when it reads read
/// models.
#[derive(Clone, Default)]
pub struct QueryServices {
    pub sql: Option<Arc<SqlService>>,
    pub analytics: Option<Arc<Analytics>>,
    pub traces: Option<Arc<Traces>>,
    pub exports: Option<Arc<Jobs>>,
}

#[derive(Clone)]
struct QueryState {
    services: QueryServices,
    auth: Arc<dyn Authenticate>,
}

impl QueryState {
    fn analytics(&self) -> Result<Arc<Analytics>, AnalyticsError> {
        self.services.analytics.clone().ok_or(NO_READ_MODELS)
    }

    fn traces(&self) -> Result<Arc<Traces>, AnalyticsError> {
        self.services.traces.clone().ok_or(NO_READ_MODELS)
    }
}

const NO_READ_MODELS: AnalyticsError = AnalyticsError::Unavailable(
    "this server reads no read models (start `loom query` with --read-models, or use `loom \
     serve`)",
);

/// The query service's routes, to merge into a node's router.
pub fn routes(services: QueryServices, auth: Arc<dyn Authenticate>) -> Router {
    Router::new()
        .route("/v1/sql", post(run_sql))
        .route("/v1/analytics", get(analytics::legacy))
        .route("/v1/analytics/summary", get(analytics::summary))
        .route("/v1/analytics/timeseries", get(analytics::timeseries))
        .route("/v1/analytics/breakdown", get(analytics::breakdown))
        .route("/v1/analytics/top", get(analytics::top))
        .route("/v1/analytics/top-expensive", get(analytics::top_expensive))
        .route("/v1/analytics/errors", get(analytics::errors))
        .route("/v1/analytics/error-rate", get(analytics::error_rate))
        .route("/v1/alerts", get(analytics::alerts))
        .route("/v1/activity", get(analytics::activity))
        .route("/v1/traces", get(traces::list))
        .route("/v1/traces/{id}", get(traces::timeline))
        .route("/v1/exports", post(exports::start).get(exports::list))
        .route("/v1/exports/{id}", get(exports::get))
        .route("/openapi.json", get(openapi))
        .with_state(QueryState { services, auth })
}

/// A query over the caller's archive.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    /// `SELECT …`, `WITH …`, `VALUES …` or `EXPLAIN …` over `events`, `requests`, `llm_calls`,
    /// `tool_calls`, `quota_events`, `policy_findings` (and `control_events` for the operator).
    #[schema(example = "SELECT model, count(*) AS calls FROM llm_calls GROUP BY model")]
    query: String,
    /// `json` (the default), `csv` or `arrow` (Arrow IPC stream); also `?format=` or `Accept`.
    #[serde(default)]
    format: Option<String>,
}

/// The rows of a query, as JSON.
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the JSON the handler writes.
struct SqlAnswer {
    columns: Vec<SqlColumn>,
    /// One object per row, keyed by column name.
    #[schema(value_type = Vec<Object>)]
    rows: Vec<()>,
    row_count: usize,
    /// Whether rows were cut at the row or byte limit.
    truncated: bool,
    elapsed_ms: f64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct SqlColumn {
    name: String,
    /// The Arrow type, e.g. `Utf8`, `Int64`, `Timestamp(µs, "UTC")`.
    r#type: String,
}

/// OpenAI's error shape.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct ErrorDetail {
    message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    r#type: String,
    param: Option<String>,
    /// `invalid_sql`, `statement_not_allowed`, `query_too_large`, `invalid_request`,
    /// `invalid_format`, `invalid_api_key`, `query_timeout`, `too_many_queries`,
    /// `archive_unavailable`, `read_models_unavailable`, `invalid_target`, `permission_denied`,
    /// `not_found`, `too_many_exports`, `exports_unavailable`.
    code: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FormatParam {
    /// `json`, `csv` or `arrow`.
    format: Option<String>,
}

/// The query service's OpenAPI document (`GET /openapi.json`), generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Loom query API",
        description = "Analytics over Loom's read models and SQL over its archive; docs/query.md"
    ),
    paths(
        run_sql,
        analytics::summary,
        analytics::timeseries,
        analytics::breakdown,
        analytics::top,
        analytics::top_expensive,
        analytics::errors,
        analytics::error_rate,
        analytics::legacy,
        analytics::alerts,
        analytics::activity,
        traces::list,
        traces::timeline,
        exports::start,
        exports::list,
        exports::get,
    ),
    components(schemas(
        SqlRequest,
        SqlAnswer,
        SqlColumn,
        ErrorBody,
        ErrorDetail,
        crate::analytics::Metrics,
        exports::ExportRequest,
        crate::export::JobView,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// API keys and the admin token go in `Authorization: Bearer`.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Runs a query over the caller's archive: a tenant's key reads its tenant's events, the admin
/// token every tenant's.
#[utoipa::path(
    post,
    path = "/v1/sql",
    params(FormatParam),
    request_body = SqlRequest,
    responses(
        (status = 200, description = "The rows (`x-loom-rows`, `x-loom-truncated` headers too)",
         content((SqlAnswer = "application/json"), (String = "text/csv"),
                 (Vec<u8> = "application/vnd.apache.arrow.stream"))),
        (status = 400, description = "Bad SQL, a refused statement, a bad body or format", body = ErrorBody),
        (status = 401, description = "No key, or a wrong one", body = ErrorBody),
        (status = 408, description = "Cancelled at the time limit", body = ErrorBody),
        (status = 429, description = "The tenant runs its limit of queries already", body = ErrorBody),
        (status = 503, description = "No archive here, or it cannot be read", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn run_sql(
    State(state): State<QueryState>,
    param: Result<Query<FormatParam>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Query(param) = match param {
        Ok(param) => param,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("the query string: {}", e.body_text()),
            );
        }
    };
    let Some(principal) = state.auth.authenticate(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or invalid API key",
        );
    };
    if principal.project.is_some() {
        return error(StatusCode::FORBIDDEN, "permission_denied", PROJECT_BOUND);
    }
    let request: SqlRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!(
                    "the body must be {{\"query\": \"SELECT …\", \"format\"?: \"json|csv|arrow\"}}: {e}"
                ),
            );
        }
    };
    let named = param.format.or(request.format);
    let format = match named.as_deref() {
        Some(name) => match Format::parse(name) {
            Some(format) => format,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_format",
                    &format!("unknown format {name:?}: json, csv or arrow"),
                );
            }
        },
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::from_accept)
            .unwrap_or(Format::Json),
    };
    let Some(sql) = state.services.sql else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "archive_unavailable",
            "this server does not serve the archive (started with --archive off, or a `loom \
             gateway`): ask `loom serve` or `loom query`",
        );
    };
    let answer = match sql
        .query(principal.scope, principal.access, &request.query)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            if status.is_server_error() {
                // What failed inside (a path, the store's words) is for the operator's log.
                tracing::error!(error = %e, "a SQL query failed");
                return error(
                    status,
                    e.code(),
                    "the archive could not be read; the server's log has the details",
                );
            }
            return error(status, e.code(), &e.to_string());
        }
    };
    let rows = match format::write(format, &answer.schema, &answer.batches) {
        Ok(rows) => rows,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_result",
                &format!("the result cannot be written as {format:?}: {e}"),
            );
        }
    };
    let mut response = match format {
        Format::Json => {
            let rows = String::from_utf8(rows)
                .ok()
                .and_then(|rows| RawValue::from_string(rows).ok());
            let Some(rows) = rows else {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the result could not be written as JSON",
                );
            };
            let columns: Vec<_> = answer
                .schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            Json(json!({
                "columns": columns,
                "rows": rows,
                "row_count": answer.rows,
                "truncated": answer.truncated,
                "elapsed_ms": answer.elapsed.as_secs_f64() * 1e3,
            }))
            .into_response()
        }
        _ => ([(header::CONTENT_TYPE, format.content_type())], rows).into_response(),
    };
    let headers = response.headers_mut();
    headers.insert("x-loom-rows", HeaderValue::from(answer.rows));
    headers.insert(
        "x-loom-truncated",
        HeaderValue::from_static(if answer.truncated { "true" } else { "false" }),
    );
    response
}

/// An OpenAI-shaped error.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = match status.as_u16() {
        429 => "rate_limit_error",
        500.. => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}
