//! The query service's HTTP routes: `POST /v1/sql`. Who may read what is decided by the caller's
//! credentials ([`Authenticate`], given by the node that knows the keys): a tenant's key reads
//! its tenant's archive, the operator's admin token every tenant's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::archive::{Access, Scope};
use crate::format::{self, Format};
use crate::sql::SqlService;

/// Whose archive a caller reads, and how much of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub scope: Scope,
    pub access: Access,
}

/// Tells who presented the credentials of a request.
pub trait Authenticate: Send + Sync {
    /// The caller, or `None` for missing or wrong credentials.
    fn authenticate(&self, headers: &HeaderMap) -> Option<Principal>;
}

#[derive(Clone)]
struct QueryState {
    /// `None` when the node keeps no archive.
    sql: Option<Arc<SqlService>>,
    auth: Arc<dyn Authenticate>,
}

/// The query service's routes, to merge into a node's router.
pub fn routes(sql: Option<Arc<SqlService>>, auth: Arc<dyn Authenticate>) -> Router {
    Router::new()
        .route("/v1/sql", post(run_sql))
        .with_state(QueryState { sql, auth })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    query: String,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Deserialize)]
struct FormatParam {
    format: Option<String>,
}

async fn run_sql(
    State(state): State<QueryState>,
    Query(param): Query<FormatParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(principal) = state.auth.authenticate(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or invalid API key",
        );
    };
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
    let Some(sql) = state.sql else {
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
