//! What the data plane looks up in the read models, always in the version readers use: which
//! deployment made a response an upstream stores (`llm_calls.response_id`), for one tenant.

use tokio::sync::Mutex;
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::store::{ReadStore, StoreError, StoreLocation};

pub struct Lookup {
    location: StoreLocation,
    /// The catalog and the active version's store, opened on first use (and the store again
    /// after a replay switched versions).
    open: Mutex<Option<(Catalog, Option<ReadStore>)>>,
}

impl Lookup {
    pub fn new(location: StoreLocation) -> Lookup {
        Lookup {
            location,
            open: Mutex::new(None),
        }
    }

    /// The name of the deployment that made `response_id` for `tenant`, if the read models
    /// have it.
    pub async fn response_deployment(
        &self,
        tenant: Uuid,
        response_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut open = self.open.lock().await;
        if open.is_none() {
            *open = Some((Catalog::open(&self.location).await?, None));
        }
        let Some((catalog, store)) = open.as_mut() else {
            return Ok(None);
        };
        let active = catalog.active().await?;
        if store.as_ref().is_none_or(|s| s.version() != active) {
            *store = Some(ReadStore::open_migrated(&self.location, active).await?);
        }
        let Some(store) = store.as_ref() else {
            return Ok(None);
        };
        Ok(store.response_deployment(tenant, response_id).await?)
    }
}
