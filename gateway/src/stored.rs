//! Responses stored at upstreams (OpenAI's Responses API keeps them unless `store` is false): for
//! each id, which tenant made it and through which deployment, so that `GET` and `DELETE
//! /v1/responses/{id}` and a later `previous_response_id` reach the upstream that holds it, and
//! only for the tenant that made it.
//!
//! The gateway remembers the responses made through it (the newest [`CAPACITY`]); older ones, and
//! those made through another gateway, are found in the read models (`llm_calls.response_id`)
//! when the node has them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use crate::flow::Flow;
use crate::providers::Operation;
use crate::upstream::Answer;

/// How many response ids a gateway keeps in memory.
pub const CAPACITY: usize = 65_536;

/// Finds where a response was made, in the read models: the name of the deployment that made
/// `response_id` for `tenant`, if any.
#[async_trait]
pub trait ResponseIndex: Send + Sync {
    async fn deployment_of(
        &self,
        tenant: Uuid,
        response_id: &str,
    ) -> Result<Option<String>, String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub tenant: Uuid,
    pub deployment: usize,
}

/// The response ids this gateway made, newest last.
#[derive(Default)]
pub(crate) struct StoredResponses {
    inner: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    owners: HashMap<String, Owner>,
    order: VecDeque<String>,
}

impl StoredResponses {
    pub fn remember(&self, id: &str, owner: Owner) {
        let Ok(mut recent) = self.inner.lock() else {
            return;
        };
        if recent.owners.insert(id.to_owned(), owner).is_none() {
            recent.order.push_back(id.to_owned());
        }
        while recent.order.len() > CAPACITY {
            if let Some(oldest) = recent.order.pop_front() {
                recent.owners.remove(&oldest);
            }
        }
    }

    /// The deployment that made `id`, if `tenant` made it.
    pub fn owner(&self, tenant: Uuid, id: &str) -> Option<usize> {
        let recent = self.inner.lock().ok()?;
        recent
            .owners
            .get(id)
            .filter(|owner| owner.tenant == tenant)
            .map(|owner| owner.deployment)
    }

    pub fn forget(&self, id: &str) {
        if let Ok(mut recent) = self.inner.lock() {
            recent.owners.remove(id);
        }
    }
}

impl Flow {
    /// Remembers the response an upstream made and stores, for this request's tenant.
    pub(crate) fn remember_response(&self, answer: &Answer, id: Option<&str>, request: &Value) {
        let stored = answer.leg.native()
            && answer.leg.client == Operation::Responses
            && request.get("store") != Some(&Value::Bool(false));
        if let Some(id) = id.filter(|_| stored) {
            let owner = Owner {
                tenant: self.tenant_id,
                deployment: answer.deployment,
            };
            self.gateway.stored.remember(id, owner);
        }
    }

    /// The deployment that made response `id` for this request's tenant: remembered by this
    /// gateway, else found in the read models.
    pub(crate) async fn owner_of_response(&self, id: &str) -> Option<usize> {
        if let Some(deployment) = self.gateway.stored.owner(self.tenant_id, id) {
            return Some(deployment);
        }
        let index = self.gateway.response_index.as_ref()?;
        match index.deployment_of(self.tenant_id, id).await {
            Ok(name) => {
                let name = name?;
                let deployments = &self.gateway.config.deployments;
                deployments.iter().position(|d| d.name == name)
            }
            Err(error) => {
                tracing::warn!(%error, trace_id = %self.trace_id, "could not look up a stored response");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tenant_that_made_a_response_finds_it_and_the_oldest_go_first() {
        let stored = StoredResponses::default();
        let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        stored.remember(
            "resp_1",
            Owner {
                tenant: mine,
                deployment: 2,
            },
        );
        assert_eq!(stored.owner(mine, "resp_1"), Some(2));
        assert_eq!(stored.owner(theirs, "resp_1"), None);
        for i in 0..CAPACITY {
            stored.remember(
                &format!("resp_x{i}"),
                Owner {
                    tenant: mine,
                    deployment: 0,
                },
            );
        }
        assert_eq!(stored.owner(mine, "resp_1"), None);
        assert_eq!(
            stored.owner(mine, &format!("resp_x{}", CAPACITY - 1)),
            Some(0)
        );
        stored.forget("resp_x1");
        assert_eq!(stored.owner(mine, "resp_x1"), None);
    }
}
