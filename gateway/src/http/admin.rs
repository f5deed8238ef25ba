//! The admin API (`/admin/*`), guarded by the admin token (`Authorization: Bearer <token>`).

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::AppState;
use crate::admin::{AdminError, KeyRequest, KeyView, TenantView};
use crate::error::GatewayError;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/tenants", post(create_tenant).get(list_tenants))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{key_id}/revoke", post(revoke_key))
        .route("/tenants/{tenant_id}/erase", post(erase_tenant))
        .route("/kms/unwrap", post(unwrap_key))
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

/// A JSON request body, whatever its `Content-Type` says (`curl -d` sends a form type); what does
/// not parse is a 400 in OpenAI's shape, naming the problem.
struct JsonBody<T>(T);

/// A JSON request body that may be left out (then `T::default()`).
struct OrEmpty<T>(T);

/// The body as JSON; `None` if it is empty.
async fn read_json<S: Send + Sync, T: DeserializeOwned>(
    request: Request,
    state: &S,
) -> Result<Option<T>, GatewayError> {
    let bytes = Bytes::from_request(request, state).await.map_err(invalid)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut json)
        .map(Some)
        .map_err(|error| match error.path().to_string().as_str() {
            "." => GatewayError::InvalidRequest(format!("the request body: {}", error.inner())),
            path => GatewayError::InvalidRequest(format!("{path}: {}", error.inner())),
        })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(request: Request, state: &S) -> Result<Self, GatewayError> {
        let body = read_json(request, state).await?;
        body.map(JsonBody)
            .ok_or_else(|| GatewayError::InvalidRequest("the request body is empty".into()))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OrEmpty<T> {
    type Rejection = GatewayError;

    async fn from_request(request: Request, state: &S) -> Result<Self, GatewayError> {
        Ok(OrEmpty(
            read_json(request, state).await?.unwrap_or_default(),
        ))
    }
}

/// A path, query or body axum could not take apart, as a 400 in OpenAI's shape.
fn invalid(rejection: impl std::fmt::Display) -> GatewayError {
    GatewayError::InvalidRequest(rejection.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantRequest {
    name: String,
}

async fn create_tenant(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<TenantRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_tenant(&request.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_tenants(State(state): State<AppState>) -> Json<Vec<TenantView>> {
    Json(state.services.list_tenants())
}

async fn create_key(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<KeyRequest>,
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
    filter: Result<Query<KeyFilter>, QueryRejection>,
) -> Result<Json<Vec<KeyView>>, GatewayError> {
    let Query(filter) = filter.map_err(invalid)?;
    Ok(Json(state.services.list_keys(filter.tenant_id)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke_key(
    State(state): State<AppState>,
    key_id: Result<Path<Uuid>, PathRejection>,
    OrEmpty(request): OrEmpty<RevokeRequest>,
) -> Result<StatusCode, GatewayError> {
    let Path(key_id) = key_id.map_err(invalid)?;
    state.services.revoke_key(key_id, request.reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn erase_tenant(
    State(state): State<AppState>,
    tenant_id: Result<Path<Uuid>, PathRejection>,
    OrEmpty(request): OrEmpty<RevokeRequest>,
) -> Result<StatusCode, GatewayError> {
    let Path(tenant_id) = tenant_id.map_err(invalid)?;
    state
        .services
        .erase_tenant(tenant_id, request.reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnwrapRequest {
    master_key_id: String,
    wrapped_key: String,
}

#[derive(serde::Serialize)]
struct UnwrapResponse {
    key: String,
}

/// The archive's key service, for Parquet readers' KMS clients (see docs/archive.md).
async fn unwrap_key(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<UnwrapRequest>,
) -> Result<Json<UnwrapResponse>, GatewayError> {
    let key = state
        .services
        .unwrap_archive_key(&request.master_key_id, &request.wrapped_key)?;
    Ok(Json(UnwrapResponse { key }))
}
