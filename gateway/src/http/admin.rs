//! The admin API (`/admin/*`): the operator with the admin token (`Authorization: Bearer
//! <token>`), or a tenant's API key acting in its own tenant as far as its role allows
//! (docs/roles.md).

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::AppState;
use crate::admin::{
    Actor, AdminError, CredentialRequest, CredentialView, GrantRequest, KeyRequest, KeyView,
    MemberView, ProjectPatch, ProjectRequest, ProjectView, QuotaQuery, QuotaRequest, QuotaView,
    RotatedKey, TenantView,
};
use crate::auth::presented_key;
use crate::error::GatewayError;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/tenants", post(create_tenant).get(list_tenants))
        .route("/tenants/{tenant_id}/erase", post(erase_tenant))
        .route("/tenants/{tenant_id}/rotate-key", post(rotate_tenant_key))
        .route("/projects", post(create_project).get(list_projects))
        .route(
            "/projects/{project_id}",
            get(get_project).patch(update_project),
        )
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{key_id}/revoke", post(revoke_key))
        .route("/members", get(list_members))
        .route("/roles/grant", post(grant_role))
        .route("/roles/revoke", post(revoke_role))
        .route("/quotas", post(set_quota).get(show_quotas))
        .route("/credentials", post(set_credential).get(list_credentials))
        .route("/kms/unwrap", post(unwrap_key))
        .route_layer(middleware::from_fn_with_state(state, actor))
}

/// Who is calling: the operator (the admin token) or a tenant's valid API key.
async fn actor(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let presented = presented_key(request.headers());
    // Compared as hashes, so the comparison's timing says nothing about the token.
    let operator = presented.map(loom_schemas::crypto::hash_api_key);
    let actor = match (&state.admin_token, presented) {
        (Some(expected), _) if operator.as_ref() == Some(&**expected) => Actor::Operator,
        (_, Some(secret)) => match state.services.control.authenticate(secret) {
            Some(key) => Actor::Key(key),
            None if state.admin_token.is_none() => {
                return GatewayError::AdminDisabled.into_response();
            }
            None => return GatewayError::InvalidAdminToken.into_response(),
        },
        (None, None) => return GatewayError::AdminDisabled.into_response(),
        (Some(_), None) => return GatewayError::InvalidAdminToken.into_response(),
    };
    request.extensions_mut().insert(actor);
    next.run(request).await
}

impl From<AdminError> for GatewayError {
    fn from(error: AdminError) -> Self {
        match &error {
            AdminError::Invalid(message) => GatewayError::InvalidRequest(message.clone()),
            AdminError::PermissionDenied(_) | AdminError::Forbidden(_) => {
                GatewayError::PermissionDenied(error.to_string())
            }
            AdminError::Conflict(message) => GatewayError::Conflict(message.clone()),
            AdminError::UnknownTenant(_)
            | AdminError::UnknownKey(_)
            | AdminError::UnknownProject(_) => GatewayError::NotFound(error.to_string()),
            AdminError::TenantErased(_) => GatewayError::TenantErased(error.to_string()),
            AdminError::Log(_)
            | AdminError::KeyStore(_)
            | AdminError::Codec(_)
            | AdminError::Crypto(_)
            | AdminError::NotApplied
            | AdminError::Internal(_) => {
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
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<TenantRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_tenant(&actor, &request.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_tenants(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
) -> Json<Vec<TenantView>> {
    Json(state.services.list_tenants(&actor))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: Option<String>,
}

async fn erase_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    tenant_id: Result<Path<Uuid>, PathRejection>,
    OrEmpty(request): OrEmpty<Reason>,
) -> Result<StatusCode, GatewayError> {
    let Path(tenant_id) = tenant_id.map_err(invalid)?;
    state
        .services
        .erase_tenant(&actor, tenant_id, request.reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_tenant_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    tenant_id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<RotatedKey>, GatewayError> {
    let Path(tenant_id) = tenant_id.map_err(invalid)?;
    let rotated = state.services.rotate_tenant_key(&actor, tenant_id).await?;
    Ok(Json(rotated))
}

/// `?tenant_id=` on listings: the operator's choice of tenant (a key's is its own).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFilter {
    tenant_id: Option<Uuid>,
}

async fn create_project(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<ProjectRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_project(&actor, &request).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_projects(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    filter: Result<Query<TenantFilter>, QueryRejection>,
) -> Result<Json<Vec<ProjectView>>, GatewayError> {
    let Query(filter) = filter.map_err(invalid)?;
    Ok(Json(
        state.services.list_projects(&actor, filter.tenant_id)?,
    ))
}

async fn get_project(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    project_id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<ProjectView>, GatewayError> {
    let Path(project_id) = project_id.map_err(invalid)?;
    Ok(Json(state.services.get_project(&actor, project_id)?))
}

async fn update_project(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    project_id: Result<Path<Uuid>, PathRejection>,
    JsonBody(patch): JsonBody<ProjectPatch>,
) -> Result<Json<ProjectView>, GatewayError> {
    let Path(project_id) = project_id.map_err(invalid)?;
    let updated = state
        .services
        .update_project(&actor, project_id, &patch)
        .await?;
    Ok(Json(updated))
}

async fn set_credential(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<CredentialRequest>,
) -> Result<Json<Option<CredentialView>>, GatewayError> {
    let upstreams: Vec<String> = (state.gateway.config.upstreams.iter())
        .map(|u| u.name.clone())
        .collect();
    let set = state
        .services
        .set_credential(&actor, &request, Some(&upstreams))
        .await?;
    Ok(Json(set))
}

async fn list_credentials(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    filter: Result<Query<TenantFilter>, QueryRejection>,
) -> Result<Json<Vec<CredentialView>>, GatewayError> {
    let Query(filter) = filter.map_err(invalid)?;
    Ok(Json(
        state.services.list_credentials(&actor, filter.tenant_id)?,
    ))
}

async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<KeyRequest>,
) -> Result<Response, GatewayError> {
    let created = state.services.create_key(&actor, &request).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_keys(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    filter: Result<Query<TenantFilter>, QueryRejection>,
) -> Result<Json<Vec<KeyView>>, GatewayError> {
    let Query(filter) = filter.map_err(invalid)?;
    Ok(Json(state.services.list_keys(&actor, filter.tenant_id)?))
}

async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    key_id: Result<Path<Uuid>, PathRejection>,
    OrEmpty(request): OrEmpty<Reason>,
) -> Result<StatusCode, GatewayError> {
    let Path(key_id) = key_id.map_err(invalid)?;
    state
        .services
        .revoke_key(&actor, key_id, request.reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_members(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    filter: Result<Query<TenantFilter>, QueryRejection>,
) -> Result<Json<Vec<MemberView>>, GatewayError> {
    let Query(filter) = filter.map_err(invalid)?;
    Ok(Json(state.services.list_members(&actor, filter.tenant_id)?))
}

async fn grant_role(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<GrantRequest>,
) -> Result<StatusCode, GatewayError> {
    state.services.grant_role(&actor, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_role(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<GrantRequest>,
) -> Result<StatusCode, GatewayError> {
    state.services.revoke_role(&actor, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets limits on a tenant, project, user or key; answers with the scope's limits and usage.
async fn set_quota(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<QuotaRequest>,
) -> Result<Json<QuotaView>, GatewayError> {
    let gateway = &state.gateway;
    let view = state
        .services
        .set_quota(
            &actor,
            &request,
            Some(&gateway.quotas),
            &gateway.config.quotas,
        )
        .await?;
    Ok(Json(view))
}

/// `?scope=project&id=…`: one scope; `?scope=user`: every user with limits or usage today.
async fn show_quotas(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    query: Result<Query<QuotaQuery>, QueryRejection>,
) -> Result<Json<Vec<QuotaView>>, GatewayError> {
    let Query(query) = query.map_err(invalid)?;
    let gateway = &state.gateway;
    let views = state.services.show_quotas(
        &actor,
        &query,
        Some(&gateway.quotas),
        &gateway.config.quotas,
    )?;
    Ok(Json(views))
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
    Extension(actor): Extension<Actor>,
    JsonBody(request): JsonBody<UnwrapRequest>,
) -> Result<Json<UnwrapResponse>, GatewayError> {
    let key =
        state
            .services
            .unwrap_archive_key(&actor, &request.master_key_id, &request.wrapped_key)?;
    Ok(Json(UnwrapResponse { key }))
}
