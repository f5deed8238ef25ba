//! `POST /v1/exports` (start exporting the caller's events to a Delta table), `GET /v1/exports`
//! and `GET /v1/exports/{id}` (a job's progress and result).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Principal, QueryState, error};
use crate::export::{Bodies, ExportError, Jobs, JobsError};

/// An export to start.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportRequest {
    /// The table's name under your directory of the server's export root (`--exports`):
    /// segments of letters, digits, `_`, `-` and `.` separated by `/`. Default `events`.
    #[schema(example = "lake/events")]
    target: Option<String>,
    /// `omit` (the default), `decrypt` (the bodies in clear, for roles that may read them) or
    /// `sealed` (still encrypted with Loom's keys).
    #[schema(example = "omit")]
    bodies: Option<String>,
    /// `delta` (the only format so far).
    format: Option<String>,
}

/// Why a request is refused before it reaches the jobs.
struct Refusal(StatusCode, &'static str, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1, self.2)
    }
}

/// The caller, and the server's jobs.
fn admit(state: &QueryState, headers: &HeaderMap) -> Result<(Principal, Arc<Jobs>), Refusal> {
    let principal = state.auth.authenticate(headers).ok_or(Refusal(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "missing or invalid API key",
    ))?;
    if principal.project.is_some() {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "permission_denied",
            super::PROJECT_BOUND,
        ));
    }
    let exports = state.services.exports.clone().ok_or(Refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "exports_unavailable",
        "this server does not export (it serves no archive, or was started with --exports off)",
    ))?;
    Ok((principal, exports))
}

/// Starts exporting the caller's archived events to a Delta Lake table (a tenant's key: its
/// events, under its directory; the admin token: every tenant's). The export runs in the
/// background: follow it at `GET /v1/exports/{id}`. Incremental: an export to a table adds the
/// events it does not hold yet.
#[utoipa::path(
    post,
    path = "/v1/exports",
    operation_id = "start_export",
    request_body = ExportRequest,
    responses(
        (status = 202, description = "Started (or queued behind another export); `Location` names the job", body = crate::export::JobView),
        (status = 400, description = "A bad target, bodies or format", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
        (status = 403, description = "Bodies asked for by a role that may not read them", body = super::ErrorBody),
        (status = 429, description = "Too many exports queued", body = super::ErrorBody),
        (status = 503, description = "This server does not export", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn start(
    State(state): State<QueryState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (principal, exports) = match admit(&state, &headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let request: ExportRequest = match body.is_empty() {
        true => ExportRequest {
            target: None,
            bodies: None,
            format: None,
        },
        false => match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!(
                        "the body must be {{\"target\"?: \"NAME\", \"bodies\"?: \
                         \"omit|decrypt|sealed\", \"format\"?: \"delta\"}}: {e}"
                    ),
                );
            }
        },
    };
    if let Some(format) = request.format.as_deref().filter(|f| *f != "delta") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_format",
            &format!("unknown format {format:?}: exports are Delta Lake tables (`delta`)"),
        );
    }
    let bodies = match request.bodies.as_deref() {
        None => Bodies::Omit,
        Some(name) => match Bodies::parse(name) {
            Some(bodies) => bodies,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("unknown bodies {name:?}: omit, decrypt or sealed"),
                );
            }
        },
    };
    let target = request.target.as_deref().unwrap_or("events");
    match exports.start(principal.scope, principal.access, target, bodies) {
        Ok(job) => {
            let mut response = (StatusCode::ACCEPTED, Json(job.view())).into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/exports/{}", job.id)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(JobsError::Busy) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_exports",
            &JobsError::Busy.to_string(),
        ),
        Err(JobsError::Export(e @ ExportError::Forbidden(_))) => {
            error(StatusCode::FORBIDDEN, "permission_denied", &e.to_string())
        }
        Err(JobsError::Export(ExportError::Invalid(message))) => {
            error(StatusCode::BAD_REQUEST, "invalid_target", &message)
        }
        Err(JobsError::Export(e)) => {
            tracing::error!(error = %e, "an export could not start");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "exports_unavailable",
                "the export could not start; the server's log has the details",
            )
        }
    }
}

/// The caller's export jobs, newest first (the server keeps the last 100).
#[utoipa::path(
    get,
    path = "/v1/exports",
    operation_id = "list_exports",
    responses(
        (status = 200, description = "`{\"data\": [job, …]}`", body = Vec<crate::export::JobView>),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list(State(state): State<QueryState>, headers: HeaderMap) -> Response {
    let (principal, exports) = match admit(&state, &headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let jobs: Vec<_> = exports
        .list(principal.scope)
        .iter()
        .map(|job| job.view())
        .collect();
    Json(json!({"object": "list", "data": jobs})).into_response()
}

/// An export job: `queued`, `running` (with its progress), `succeeded` (with the commits it
/// made) or `failed` (with why).
#[utoipa::path(
    get,
    path = "/v1/exports/{id}",
    operation_id = "get_export",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, body = crate::export::JobView),
        (status = 401, body = super::ErrorBody),
        (status = 404, description = "No such job of the caller's", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (principal, exports) = match admit(&state, &headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let job = Uuid::parse_str(&id)
        .ok()
        .and_then(|id| exports.get(principal.scope, id));
    match job {
        Some(job) => Json(job.view()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no export {id:?}"),
        ),
    }
}
