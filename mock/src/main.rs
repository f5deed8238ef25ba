//! `loom-mock`: the mock LLM upstream as a process, for benchmarks and manual runs.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use loom_mock::MockConfig;

#[derive(Parser)]
#[command(
    name = "loom-mock",
    version,
    about = "A mock OpenAI-, Azure- and Anthropic-compatible LLM server"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Milliseconds to wait before answering.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Milliseconds between streamed chunks.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Require this API key on every request.
    #[arg(long)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    writeln!(std::io::stderr(), "listening on {}", listener.local_addr()?)?;
    let config = MockConfig {
        latency: Duration::from_millis(args.latency_ms),
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        api_key: args.api_key,
    };
    axum::serve(loom_mock::nodelay(listener), loom_mock::router(config)).await?;
    Ok(())
}
