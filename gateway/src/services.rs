//! What the data plane and the admin API need of the node that hosts them (the node itself —
//! data dir, log, key store, spool — is the `loom` package's).

use std::sync::Arc;

use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{EmbeddedLog, Log, LogError, Topic};

use crate::control::Control;
use crate::stored::ResponseIndex;
use crate::telemetry::Spans;

#[derive(Clone)]
pub struct Services {
    pub log: Arc<dyn Log>,
    /// The log, when it is the embedded one: the event writer appends to it directly.
    pub embedded: Option<Arc<EmbeddedLog>>,
    pub keys: Arc<KeyStore>,
    pub control: Control,
    /// `role/host/pid`, the producer of the events this node writes.
    pub producer: Arc<str>,
    /// Where responses stored at upstreams are found when this gateway did not make them (the
    /// node's read models), if anywhere.
    pub response_index: Option<Arc<dyn ResponseIndex>>,
    /// Where the requests' spans are exported (`--otlp-endpoint`), if anywhere.
    pub spans: Option<Arc<Spans>>,
}

impl Services {
    /// The next offset of each topic's partition 0.
    pub async fn log_ends(&self) -> Result<Vec<(Topic, u64)>, LogError> {
        let mut ends = Vec::with_capacity(Topic::ALL.len());
        for topic in Topic::ALL {
            ends.push((topic, self.log.end_offset(topic, 0).await?));
        }
        Ok(ends)
    }
}
