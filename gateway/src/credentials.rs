//! Tenants' and projects' own upstream credentials (docs/credentials.md): a request uses its
//! project's credential for an upstream, else its tenant's, else the upstream's configured key.
//! They come from `upstream_credential.set` on the control topic, sealed with the tenant's data
//! key: opened (and the upstream target built) on first use of each version, so setting a new one
//! takes effect on every gateway without a restart, and erasing the tenant makes it unreadable.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use loom_schemas::SecretString;
use loom_schemas::control::{ApiKeyInfo, ControlState, CredentialInfo};
use loom_schemas::crypto::FieldContext;
use uuid::Uuid;

use crate::flow::Flow;
use crate::providers::Target;

/// The field an upstream key is sealed under.
pub const API_KEY_FIELD: &str = "api_key";

/// Targets opened more than this (credential versions × deployments) are dropped and opened
/// again as they are used.
const MAX_TARGETS: usize = 10_000;

/// The upstream targets of credentials, by (the event that set the credential, deployment).
#[derive(Default)]
pub struct Credentials {
    targets: RwLock<HashMap<(Uuid, usize), Arc<Target>>>,
}

impl Flow {
    /// Where `deployment`'s requests go for this request's tenant and project, if their own
    /// credential replaces the upstream's (`Err`: it cannot be opened; the request must not fall
    /// back to the operator's key).
    pub fn credential_target(&self, deployment: usize) -> Result<Option<Arc<Target>>, String> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let config = &self.gateway.config;
        let Some(deployment_config) = config.deployments.get(deployment) else {
            return Ok(None);
        };
        let upstream = &config.upstreams[deployment_config.upstream];
        fn find<'s>(
            s: &'s ControlState,
            key: &ApiKeyInfo,
            upstream: &str,
        ) -> Option<&'s CredentialInfo> {
            s.credential(key.tenant_id, key.project_id, upstream)
        }
        // Which version is in force; the credential itself is copied only to open it.
        let Some(version) = self
            .control
            .read(|s| find(s, key, &upstream.name).map(|c| c.event_id))
        else {
            return Ok(None);
        };
        let cache = &self.gateway.credentials.targets;
        let slot = (version, deployment);
        if let Some(target) = cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&slot)
        {
            return Ok(Some(Arc::clone(target)));
        }
        let Some(credential) = self.control.read(|s| find(s, key, &upstream.name).cloned()) else {
            return Ok(None);
        };
        let refused = |why: &str| {
            format!(
                "the credential of this {} for upstream `{}` {why}",
                if credential.project_id.is_some() {
                    "project"
                } else {
                    "tenant"
                },
                upstream.name
            )
        };
        let context = FieldContext {
            tenant_id: credential.tenant_id,
            event_id: credential.event_id,
            field: API_KEY_FIELD,
        };
        let opened = self.keys.open(&context, &credential.api_key).map_err(|error| {
            tracing::warn!(%error, tenant = %credential.tenant_id, upstream = %upstream.name, "opening an upstream credential");
            refused("cannot be opened")
        })?;
        let api_key = String::from_utf8(opened).map_err(|_| refused("is not text"))?;
        let mut own = upstream.clone();
        own.api_key = Some(SecretString::from(api_key));
        if let Some(base_url) = &credential.base_url {
            own.base_url = base_url.trim_end_matches('/').to_owned();
        }
        let target = Target::new(&own, &deployment_config.model)
            .map(Arc::new)
            .map_err(|error| refused(&format!("makes no valid request: {error}")))?;
        let mut targets = cache.write().unwrap_or_else(PoisonError::into_inner);
        if targets.len() >= MAX_TARGETS {
            targets.clear();
        }
        targets.insert(slot, Arc::clone(&target));
        Ok(Some(target))
    }
}
