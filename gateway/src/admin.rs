//! Control-plane operations: each appends control events to the log and returns once the node's
//! control state has applied them. Used by the admin HTTP API and by `loom admin` on a data dir.

use base64::Engine;
use loom_schemas::codec::{CodecError, Registry};
use loom_schemas::crypto::{CryptoError, MasterKeyId, NewApiKey};
use loom_schemas::event::{
    ApiKeyIssued, ApiKeyRevoked, Envelope, Event, Payload, TenantCreated, TenantErased,
};
use loom_schemas::keystore::KeyStoreError;
use loom_schemas::log::{LogError, Topic};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::services::Services;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("no tenant {0}")]
    UnknownTenant(Uuid),
    #[error("tenant {0} was erased")]
    TenantErased(Uuid),
    #[error("no API key {0}")]
    UnknownKey(Uuid),
    #[error("tenant {tenant} has no project {project}")]
    UnknownProject { tenant: Uuid, project: Uuid },
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    #[error(
        "the change is on the log, but this node did not apply it in time (is the control follower running?)"
    )]
    NotApplied,
}

/// How long an operation waits for its control events to be applied.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedTenant {
    pub tenant_id: Uuid,
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub tenant_id: Uuid,
    #[serde(default)]
    pub project_id: Option<Uuid>,
    #[serde(default)]
    pub name: Option<String>,
}

/// A new key: `key` is the secret, shown this once and never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub prefix: String,
    pub key: String,
}

/// A tenant as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant_id: Uuid,
    pub name: String,
    pub erased: bool,
}

/// A key as listed: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub name: Option<String>,
    pub prefix: String,
    pub revoked: bool,
}

impl Services {
    /// Every tenant, by id.
    pub fn list_tenants(&self) -> Vec<TenantView> {
        let mut tenants: Vec<TenantView> = self.control.read(|s| {
            s.tenants()
                .map(|t| TenantView {
                    tenant_id: t.tenant_id,
                    name: t.name.clone(),
                    erased: t.erased,
                })
                .collect()
        });
        tenants.sort_by_key(|t| t.tenant_id);
        tenants
    }

    /// Every API key (of one tenant, if given), by id.
    pub fn list_keys(&self, tenant_id: Option<Uuid>) -> Vec<KeyView> {
        let mut keys: Vec<KeyView> = self.control.read(|s| {
            s.keys()
                .filter(|k| tenant_id.is_none_or(|t| t == k.tenant_id))
                .map(|k| KeyView {
                    key_id: k.key_id,
                    tenant_id: k.tenant_id,
                    project_id: k.project_id,
                    name: k.name.clone(),
                    prefix: k.prefix.clone(),
                    revoked: k.revoked,
                })
                .collect()
        });
        keys.sort_by_key(|k| k.key_id);
        keys
    }

    /// Appends control events and waits until the control state has applied them.
    async fn append_control(&self, events: Vec<Event>) -> Result<(), AdminError> {
        let registry = Registry::builtin()?;
        let records = events
            .iter()
            .map(|e| registry.encode_record(e))
            .collect::<Result<Vec<_>, _>>()?;
        let positions = self.log.append(Topic::Control, records).await?;
        let Some(last) = positions.last() else {
            return Ok(());
        };
        let applied = self.control.wait_for(last.offset + 1);
        tokio::time::timeout(APPLY_TIMEOUT, applied)
            .await
            .map_err(|_| AdminError::NotApplied)
    }

    fn control_event(&self, tenant_id: Uuid, payload: impl Into<Payload>) -> Event {
        Event {
            envelope: Envelope::new(tenant_id, None, &*self.producer),
            payload: payload.into(),
        }
    }

    /// Creates a tenant with its data and digest keys.
    pub async fn create_tenant(&self, name: &str) -> Result<CreatedTenant, AdminError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(AdminError::Invalid(
                "a tenant name is 1 to 200 characters".into(),
            ));
        }
        let tenant_id = Uuid::now_v7();
        self.keys.create_tenant_keys(tenant_id).await?;
        self.append_control(vec![self.control_event(
            tenant_id,
            TenantCreated {
                name: name.to_owned(),
            },
        )])
        .await?;
        Ok(CreatedTenant {
            tenant_id,
            name: name.to_owned(),
        })
    }

    /// Issues an API key for a tenant (optionally scoped to a project).
    pub async fn create_key(&self, request: &KeyRequest) -> Result<CreatedKey, AdminError> {
        let tenant = self.control.read(|s| s.tenant(request.tenant_id).cloned());
        match tenant {
            None => return Err(AdminError::UnknownTenant(request.tenant_id)),
            Some(tenant) if tenant.erased => {
                return Err(AdminError::TenantErased(request.tenant_id));
            }
            Some(_) => {}
        }
        // The rules refuse a key in a project that is not the tenant's: say so here.
        if let Some(project) = request.project_id
            && self.control.read(|s| s.project_tenant(project)) != Some(request.tenant_id)
        {
            return Err(AdminError::UnknownProject {
                tenant: request.tenant_id,
                project,
            });
        }
        let new = NewApiKey::generate()?;
        let key_id = Uuid::now_v7();
        let issued = ApiKeyIssued {
            key_id,
            project_id: request.project_id,
            name: request.name.clone(),
            key_hash: new.hash.to_vec(),
            prefix: new.prefix.clone(),
            roles: vec!["inference".into()],
            expires_at: None,
        };
        self.append_control(vec![self.control_event(request.tenant_id, issued)])
            .await?;
        Ok(CreatedKey {
            key_id,
            tenant_id: request.tenant_id,
            prefix: new.prefix,
            key: new.secret.to_string(),
        })
    }

    /// Revokes an API key; every node refuses it once it has read the event.
    pub async fn revoke_key(&self, key_id: Uuid, reason: Option<String>) -> Result<(), AdminError> {
        let tenant_id = self
            .control
            .read(|s| s.key(key_id).map(|k| k.tenant_id))
            .ok_or(AdminError::UnknownKey(key_id))?;
        self.append_control(vec![
            self.control_event(tenant_id, ApiKeyRevoked { key_id, reason }),
        ])
        .await
    }

    /// The key service of the archive: an archive file's data key, `wrapped` under the tenant's
    /// key named by `master_key_id` (`loom:<tenant>:v<version>:<purpose>`), unwrapped — what a
    /// Parquet reader's KMS client (pyarrow's `KmsClient.unwrap_key`) asks for. Base64 in and out.
    pub fn unwrap_archive_key(
        &self,
        master_key_id: &str,
        wrapped: &str,
    ) -> Result<String, AdminError> {
        let id = MasterKeyId::parse(master_key_id).ok_or_else(|| {
            AdminError::Invalid(format!(
                "master_key_id: {master_key_id:?} is not a Loom archive key \
                 (loom:<tenant>:v<version>:metadata|records)"
            ))
        })?;
        match self.keys.unwrap_archive_key(&id, wrapped) {
            Ok(key) => Ok(base64::engine::general_purpose::STANDARD.encode(key)),
            Err(KeyStoreError::Erased(tenant)) => Err(AdminError::TenantErased(tenant)),
            Err(KeyStoreError::UnknownTenant(tenant)) => Err(AdminError::UnknownTenant(tenant)),
            Err(KeyStoreError::Crypto(_)) => Err(AdminError::Invalid(format!(
                "wrapped_key: not a key wrapped under {id} (or altered)"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Erases a tenant: destroys its keys (crypto-shredding: its sealed bodies and archive files
    /// become unreadable for good), then records `tenant.erased`; every node refuses its API keys
    /// once it has read the event, and the projectors drop its rows. Irreversible. Erasing an
    /// erased tenant again changes nothing.
    pub async fn erase_tenant(
        &self,
        tenant_id: Uuid,
        reason: Option<String>,
    ) -> Result<(), AdminError> {
        let tenant = self.control.read(|s| s.tenant(tenant_id).cloned());
        match tenant {
            None => return Err(AdminError::UnknownTenant(tenant_id)),
            Some(tenant) if tenant.erased => return Ok(()),
            Some(_) => {}
        }
        // Keys first: if the event cannot be written, the tenant is shredded all the same, and
        // erasing again writes it.
        self.keys.erase(tenant_id).await?;
        self.append_control(vec![self.control_event(tenant_id, TenantErased { reason })])
            .await
    }
}
