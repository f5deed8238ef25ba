//! The admin API (`/admin/*`), guarded by the admin token (`Authorization: Bearer <token>`).

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use crate::admin::{AdminError, KeyRequest, KeyView, TenantView};
use crate::error::GatewayError;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/tenants", post(create_tenant).get(list_tenants))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{key_id}/revoke", post(revoke_key))
        .route_layer(middleware::from_fn_with_state(state, require_admin_token))
}

async fn require_admin_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.admin_token else {
        return GatewayError::AdminDisabled.into_response();
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared as hashes, so the comparison's timing says nothing about the token.
    if presented.map(loom_schemas::crypto::hash_api_key).as_ref() != Some(&**expected) {
        return GatewayError::InvalidAdminToken.into_response();
    }
    next.run(request).await
}

impl From<AdminError> for GatewayError {
    fn from(error: AdminError) -> Self {
        match &error {
            AdminError::Invalid(message) => GatewayError::InvalidRequest(message.clone()),
            AdminError::UnknownTenant(_)
            | AdminError::UnknownKey(_)
            | AdminError::UnknownProject { .. } => GatewayError::NotFound(error.to_string()),
            AdminError::TenantErased(_) => GatewayError::TenantErased(error.to_string()),
            AdminError::Log(_)
            | AdminError::KeyStore(_)
            | AdminError::Codec(_)
            | AdminError::Crypto(_)
            | AdminError::NotApplied => {
                tracing::error!(%error, "admin operation failed");
                GatewayError::Internal("the operation failed; see the server log")
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantRequest {
    name: String,
}

async fn create_tenant(
    State(state): State<AppState>,
    Json(request): Json<TenantRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_tenant(&request.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_tenants(State(state): State<AppState>) -> Json<Vec<TenantView>> {
    Json(state.services.list_tenants())
}

async fn create_key(
    State(state): State<AppState>,
    Json(request): Json<KeyRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_key(&request).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(Deserialize)]
struct KeyFilter {
    tenant_id: Option<Uuid>,
}

async fn list_keys(
    State(state): State<AppState>,
    Query(filter): Query<KeyFilter>,
) -> Json<Vec<KeyView>> {
    Json(state.services.list_keys(filter.tenant_id))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke_key(
    State(state): State<AppState>,
    Path(key_id): Path<Uuid>,
    body: Option<Json<RevokeRequest>>,
) -> Result<StatusCode, GatewayError> {
    let reason = body.and_then(|Json(r)| r.reason);
    state.services.revoke_key(key_id, reason).await?;
    Ok(StatusCode::NO_CONTENT)
}
