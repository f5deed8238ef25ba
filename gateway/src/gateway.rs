//! The data plane's shared state: configuration, the upstream HTTP client, the event queue, the
//! deployments' cool-downs and the stored responses it made.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::StartError;
use crate::cache::ResponseCache;
use crate::config::GatewayConfig;
use crate::credentials::Credentials;
use crate::events::Emitter;
use crate::meter::Meter;
use crate::policy::Policies;
use crate::quota::Quotas;
use crate::stored::{ResponseIndex, StoredResponses};
use crate::telemetry::Spans;

pub struct Gateway {
    pub config: Arc<GatewayConfig>,
    pub http: reqwest::Client,
    pub emitter: Emitter,
    /// Background work of requests (events of a stream whose client went away), drained on
    /// shutdown.
    pub tasks: TaskTracker,
    /// Per deployment: skipped until this time (µs since the epoch); see `routing`.
    pub(crate) cooldown_until: Vec<AtomicI64>,
    /// The responses made through this gateway that their upstream stores.
    pub(crate) stored: StoredResponses,
    /// Where the others are found (the read models), if the node has them.
    pub(crate) response_index: Option<Arc<dyn ResponseIndex>>,
    /// Budgets and rates: what requests have reserved and used.
    pub quotas: Quotas,
    /// The projects' security policies, compiled.
    pub policies: Policies,
    /// Tenants' and projects' own upstream credentials, opened.
    pub(crate) credentials: Credentials,
    /// Projects' exact-match response caches.
    pub(crate) cache: ResponseCache,
    /// What `/metrics` shows of the requests.
    pub(crate) meter: Meter,
    /// Where the requests' spans go, if anywhere.
    pub(crate) spans: Option<Arc<Spans>>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        emitter: Emitter,
        tasks: TaskTracker,
        response_index: Option<Arc<dyn ResponseIndex>>,
        spans: Option<Arc<Spans>>,
    ) -> Result<Gateway, StartError> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let cooldown_until = config
            .deployments
            .iter()
            .map(|_| AtomicI64::new(0))
            .collect();
        let quotas = Quotas::new(config.quotas.clone());
        Ok(Gateway {
            meter: Meter::new(&config),
            quotas,
            policies: Policies::new()?,
            credentials: Credentials::default(),
            cache: ResponseCache::default(),
            config: Arc::new(config),
            http,
            emitter,
            tasks,
            cooldown_until,
            stored: StoredResponses::default(),
            response_index,
            spans,
        })
    }
}
