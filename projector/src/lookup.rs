//! Reading the read models, always in the version readers use: what the query service answers
//! from, and what the data plane looks up (which deployment made a response an upstream stores,
//! `llm_calls.response_id`).

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

    /// The active version of the read models, opened on first use and again after a replay
    /// switched versions.
    pub async fn store(&self) -> Result<ReadStore, StoreError> {
        let mut open = self.open.lock().await;
        let (catalog, store) = match open.as_mut() {
            Some(open) => open,
            None => open.insert((Catalog::open(&self.location).await?, None)),
        };
        let active = catalog.active().await?;
        match store {
            Some(store) if store.version() == active => Ok(store.clone()),
            _ => {
                let opened = ReadStore::open_reader(&self.location, active).await?;
                *store = Some(opened.clone());
                Ok(opened)
            }
        }
    }

    /// The name of the deployment that made `response_id` for `tenant`, if the read models
    /// have it.
    pub async fn response_deployment(
        &self,
        tenant: Uuid,
        response_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .store()
            .await?
            .response_deployment(tenant, response_id)
            .await?)
    }
}
