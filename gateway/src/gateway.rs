//! The data plane's shared state: configuration, the upstream HTTP client, the event queue and
//! the deployments' cool-downs.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::events::Emitter;

pub struct Gateway {
    pub config: Arc<GatewayConfig>,
    pub http: reqwest::Client,
    pub emitter: Emitter,
    /// Background work of requests (events of a stream whose client went away), drained on
    /// shutdown.
    pub tasks: TaskTracker,
    /// Per deployment: skipped until this time (µs since the epoch); see `routing`.
    pub(crate) cooldown_until: Vec<AtomicI64>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        emitter: Emitter,
        tasks: TaskTracker,
    ) -> Result<Gateway, reqwest::Error> {
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
        Ok(Gateway {
            config: Arc::new(config),
            http,
            emitter,
            tasks,
            cooldown_until,
        })
    }
}
