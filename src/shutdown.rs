//! How a role stops on SIGTERM: readiness goes false at once, the server keeps answering for
//! `delay` (load balancers notice and send no more), then stops accepting connections and gives
//! the requests and streams in flight up to `timeout` to finish. Only then does the role stop its
//! background work, flush its events and commit its projections.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use loom_gateway::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a role drains (`--shutdown-delay`, `--shutdown-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// How long a stopping server keeps answering after its readiness turned false.
    pub delay: Duration,
    /// How long requests and streams in flight may take to finish once the server stops
    /// accepting; past it they are cut.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener`, ready from now on, until `shutdown`; then drains as `drain` says.
/// Returns when every connection is done or the timeout cut them. Handlers know the client's
/// address (`ConnectInfo<SocketAddr>`).
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    readiness: &Readiness,
    drain: Drain,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    // Streams write small frames one after another: without TCP_NODELAY each one after the
    // first waits for the client's delayed ACK (40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let stop = stopping(readiness, drain, shutdown);
    readiness.ready();
    let served = axum::serve(listener, app).with_graceful_shutdown(stop);
    finish(served.into_future(), drain, shutdown).await
}

/// Resolves when the server should stop accepting: `delay` after `shutdown`, readiness false
/// from `shutdown` on.
fn stopping(
    readiness: &Readiness,
    drain: Drain,
    shutdown: &CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
    async move {
        shutdown.cancelled().await;
        readiness.draining();
        tracing::info!(
            delay = ?drain.delay,
            timeout = ?drain.timeout,
            "draining: not ready; stopping to accept connections after the delay"
        );
        tokio::time::sleep(drain.delay).await;
    }
}

/// Waits for the server; once shutting down, no longer than the delay and the timeout.
async fn finish(
    served: impl Future<Output = std::io::Result<()>>,
    drain: Drain,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain.delay + drain.timeout).await;
    };
    tokio::select! {
        served = served => served,
        () = deadline => {
            tracing::warn!(
                timeout = ?drain.timeout,
                "requests were still in flight at the shutdown timeout: cutting them"
            );
            Ok(())
        }
    }
}
