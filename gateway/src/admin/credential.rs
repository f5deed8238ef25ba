//! Tenants' and projects' own upstream credentials (`upstream_credential.set`): set and removed
//! by admins and owners, listed without their keys (docs/credentials.md).

use loom_schemas::control::CredentialInfo;
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{Envelope, Event, UpstreamCredentialSet};
use loom_schemas::roles::Permission;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Actor, AdminError, name, rfc3339};
use crate::credentials::API_KEY_FIELD;
use crate::services::Services;

/// The longest upstream key accepted (bytes).
const MAX_KEY_BYTES: usize = 4096;

/// A credential to set for an upstream, for a whole tenant or one of its projects; without
/// `api_key`, the scope's credential is removed (the upstream's own applies again).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    #[serde(default)]
    pub project_id: Option<Uuid>,
    /// The upstream's name in the gateway's configuration (`[upstreams.NAME]`).
    pub upstream: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Where the scope's requests to the upstream go instead (e.g. its own Azure resource);
    /// the operator's to set.
    #[serde(default)]
    pub base_url: Option<String>,
}

/// A credential as shown: never its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialView {
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub upstream: String,
    pub base_url: Option<String>,
    /// The key's last four characters.
    pub fingerprint: Option<String>,
    /// RFC 3339.
    pub set_at: String,
}

fn view(credential: &CredentialInfo) -> CredentialView {
    CredentialView {
        tenant_id: credential.tenant_id,
        project_id: credential.project_id,
        upstream: credential.upstream.clone(),
        base_url: credential.base_url.clone(),
        fingerprint: credential.fingerprint.clone(),
        set_at: rfc3339(credential.set_at),
    }
}

impl Services {
    /// Sets (or removes) a credential; `upstreams`: the gateway's upstream names, when known
    /// (a data dir alone does not know them). The key is sealed with the tenant's data key
    /// before it is on the log.
    pub async fn set_credential(
        &self,
        actor: &Actor,
        request: &CredentialRequest,
        upstreams: Option<&[String]>,
    ) -> Result<Option<CredentialView>, AdminError> {
        let tenant_id = match request.project_id {
            Some(project) => {
                let project = self.visible_project(actor, project)?;
                self.live_tenant(actor, Some(project.tenant_id))?
            }
            None => {
                let tenant_id = self.live_tenant(actor, request.tenant_id)?;
                actor.tenant_wide()?;
                tenant_id
            }
        };
        actor.require(Permission::ManageTenant)?;
        let upstream = name("upstream", &request.upstream, 128)?;
        if let Some(known) = upstreams
            && !known.contains(&upstream)
        {
            return Err(AdminError::Invalid(format!(
                "upstream: {upstream:?} is not an upstream of this gateway (they are: {})",
                known.join(", ")
            )));
        }
        if let Some(url) = &request.base_url {
            if !matches!(actor, Actor::Operator) {
                return Err(AdminError::Forbidden(
                    "base_url: only the operator may send a tenant's requests elsewhere",
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return Err(AdminError::Invalid(
                    "base_url: an http:// or https:// URL".into(),
                ));
            }
        }
        let api_key = request.api_key.as_deref().map(str::trim);
        if let Some(key) = api_key
            && (key.is_empty()
                || key.len() > MAX_KEY_BYTES
                || !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(AdminError::Invalid(format!(
                "api_key: 1 to {MAX_KEY_BYTES} printable ASCII characters, no spaces"
            )));
        }
        let envelope = Envelope::new(tenant_id, None, &*self.producer);
        let context = FieldContext {
            tenant_id,
            event_id: envelope.event_id,
            field: API_KEY_FIELD,
        };
        let sealed = api_key
            .map(|key| self.keys.seal(&context, key.as_bytes()))
            .transpose()?;
        // Only long keys keep their last four: a short one would give too much of itself away.
        let fingerprint = api_key
            .filter(|key| key.len() >= 16)
            .map(|key| key[key.len() - 4..].to_owned());
        let event = Event {
            envelope,
            payload: UpstreamCredentialSet {
                project_id: request.project_id,
                upstream: upstream.clone(),
                base_url: request.base_url.clone(),
                api_key: sealed,
                fingerprint,
            }
            .into(),
        };
        self.append_control(vec![event]).await?;
        Ok(self.control.read(|s| {
            s.credentials(tenant_id)
                .into_iter()
                .find(|c| c.project_id == request.project_id && c.upstream == upstream)
                .map(view)
        }))
    }

    /// The credentials the actor sees (never their keys).
    pub fn list_credentials(
        &self,
        actor: &Actor,
        tenant: Option<Uuid>,
    ) -> Result<Vec<CredentialView>, AdminError> {
        let tenant_id = self.live_tenant(actor, tenant)?;
        actor.require(Permission::ManageTenant)?;
        Ok(self.control.read(|s| {
            s.credentials(tenant_id)
                .into_iter()
                .filter(|c| actor.sees(c.tenant_id, c.project_id))
                .map(view)
                .collect()
        }))
    }
}
