//! `loom admin`: tenants and API keys, on a data directory no server holds (`--data-dir`) or
//! through a running server's admin API (`--url` with `--admin-token`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use loom::{KeyStoreLocation, Node, NodeConfig};
use loom_gateway::{CreatedKey, CreatedTenant, KeyRequest};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Args)]
pub struct AdminArgs {
    /// Data directory to work on directly (it must not be held by a running server).
    #[arg(
        long,
        global = true,
        env = "LOOM_DATA_DIR",
        default_value = "./loom-data",
        conflicts_with = "url"
    )]
    data_dir: PathBuf,

    /// Keep tenant data keys in this Postgres (as `loom serve --key-store-url`).
    #[arg(
        long,
        global = true,
        env = "LOOM_KEY_STORE_URL",
        hide_env_values = true,
        value_name = "POSTGRES_URL",
        conflicts_with = "url"
    )]
    key_store_url: Option<String>,

    #[command(flatten)]
    kafka: crate::KafkaArgs,

    /// A running server to manage through its admin API instead, e.g. http://127.0.0.1:8080.
    #[arg(long, global = true, env = "LOOM_ADMIN_URL", requires = "admin_token")]
    url: Option<String>,

    /// The server's admin token (its LOOM_ADMIN_TOKEN).
    #[arg(long, global = true, env = "LOOM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    #[command(subcommand)]
    what: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant (with its encryption keys); prints its id.
    Create { name: String },
    /// List tenants as JSON.
    List,
    /// Erase a tenant for good: destroys its keys (its sealed bodies and archive files become
    /// unreadable), records `tenant.erased`, and from then on its API keys are refused and its
    /// rows leave the read models. Irreversible.
    Erase {
        tenant_id: Uuid,
        #[arg(long)]
        reason: Option<String>,
        /// Confirms that the erasure is meant (it cannot be undone).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issue an API key; prints the key, which is shown this once and never stored.
    Create {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        project: Option<Uuid>,
        /// A label for listings.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke an API key by id; running servers refuse it from then on.
    Revoke {
        key_id: Uuid,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List API keys (never their secrets) as JSON.
    List {
        #[arg(long)]
        tenant: Option<Uuid>,
    },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let target = match (&args.url, &args.admin_token) {
        (Some(url), Some(token)) => Target::Remote {
            client: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.clone(),
        },
        _ => {
            let config = NodeConfig {
                key_store: args
                    .key_store_url
                    .clone()
                    .map_or(KeyStoreLocation::DataDir, |url| {
                        KeyStoreLocation::Postgres(url.as_str().into())
                    }),
                master_key: crate::master_key_from_env(),
                role: "admin",
                log: args.kafka.location(loom::LogLocation::default()),
                ..NodeConfig::new(loom::DataDir::new(&args.data_dir))
            };
            let node = Node::open(&config)
                .await
                .context("opening the data directory")?;
            let shutdown = CancellationToken::new();
            let background = tokio::spawn(node.clone().run_background(shutdown.clone()));
            Target::Local {
                node,
                shutdown,
                background,
            }
        }
    };
    let mut out = std::io::stdout().lock();
    match args.what {
        AdminCommand::Tenant(TenantCommand::Create { name }) => {
            let created = target.create_tenant(&name).await?;
            writeln!(out, "{}", created.tenant_id)?;
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&target.list_tenants().await?)?
            )?;
        }
        AdminCommand::Tenant(TenantCommand::Erase {
            tenant_id,
            reason,
            yes,
        }) => {
            if !yes {
                anyhow::bail!(
                    "erasing tenant {tenant_id} destroys its keys and cannot be undone: add --yes"
                );
            }
            target.erase_tenant(tenant_id, reason).await?;
            writeln!(std::io::stderr(), "erased {tenant_id}")?;
        }
        AdminCommand::Key(KeyCommand::Create {
            tenant,
            project,
            name,
        }) => {
            let request = KeyRequest {
                tenant_id: tenant,
                project_id: project,
                name,
            };
            let created = target.create_key(&request).await?;
            writeln!(
                std::io::stderr(),
                "key id {} (prefix {}); the key is shown only now:",
                created.key_id,
                created.prefix
            )?;
            writeln!(out, "{}", created.key)?;
        }
        AdminCommand::Key(KeyCommand::Revoke { key_id, reason }) => {
            target.revoke_key(key_id, reason).await?;
            writeln!(std::io::stderr(), "revoked {key_id}")?;
        }
        AdminCommand::Key(KeyCommand::List { tenant }) => {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&target.list_keys(tenant).await?)?
            )?;
        }
    }
    if let Target::Local {
        node,
        shutdown,
        background,
    } = target
    {
        shutdown.cancel();
        background.await?;
        node.close().await?;
    }
    Ok(())
}

enum Target {
    /// The data directory, with the node's background work (the control follower) running.
    Local {
        node: Node,
        shutdown: CancellationToken,
        background: tokio::task::JoinHandle<()>,
    },
    Remote {
        client: reqwest::Client,
        url: String,
        token: String,
    },
}

/// The message of a Loom error body (OpenAI's shape), or the body itself.
pub(crate) fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

impl Target {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let Target::Remote { client, url, token } = self else {
            anyhow::bail!("not a remote target");
        };
        let mut request = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            anyhow::bail!("{status}: {}", error_message(text.as_bytes()));
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    async fn create_tenant(&self, name: &str) -> anyhow::Result<CreatedTenant> {
        match self {
            Target::Local { node, .. } => Ok(node.services.create_tenant(name).await?),
            Target::Remote { .. } => {
                let value = self
                    .call(
                        reqwest::Method::POST,
                        "/admin/tenants",
                        Some(json!({ "name": name })),
                    )
                    .await?;
                Ok(serde_json::from_value(value)?)
            }
        }
    }

    async fn create_key(&self, request: &KeyRequest) -> anyhow::Result<CreatedKey> {
        match self {
            Target::Local { node, .. } => Ok(node.services.create_key(request).await?),
            Target::Remote { .. } => {
                let value = self
                    .call(
                        reqwest::Method::POST,
                        "/admin/keys",
                        Some(serde_json::to_value(request)?),
                    )
                    .await?;
                Ok(serde_json::from_value(value)?)
            }
        }
    }

    async fn revoke_key(&self, key_id: Uuid, reason: Option<String>) -> anyhow::Result<()> {
        match self {
            Target::Local { node, .. } => Ok(node.services.revoke_key(key_id, reason).await?),
            Target::Remote { .. } => {
                let path = format!("/admin/keys/{key_id}/revoke");
                self.call(
                    reqwest::Method::POST,
                    &path,
                    Some(json!({ "reason": reason })),
                )
                .await?;
                Ok(())
            }
        }
    }

    async fn erase_tenant(&self, tenant_id: Uuid, reason: Option<String>) -> anyhow::Result<()> {
        match self {
            Target::Local { node, .. } => Ok(node.services.erase_tenant(tenant_id, reason).await?),
            Target::Remote { .. } => {
                let path = format!("/admin/tenants/{tenant_id}/erase");
                self.call(
                    reqwest::Method::POST,
                    &path,
                    Some(json!({ "reason": reason })),
                )
                .await?;
                Ok(())
            }
        }
    }

    async fn list_tenants(&self) -> anyhow::Result<Value> {
        match self {
            Target::Local { node, .. } => Ok(serde_json::to_value(node.services.list_tenants())?),
            Target::Remote { .. } => {
                self.call(reqwest::Method::GET, "/admin/tenants", None)
                    .await
            }
        }
    }

    async fn list_keys(&self, tenant: Option<Uuid>) -> anyhow::Result<Value> {
        match self {
            Target::Local { node, .. } => {
                Ok(serde_json::to_value(node.services.list_keys(tenant))?)
            }
            Target::Remote { .. } => {
                let path = tenant.map_or_else(
                    || "/admin/keys".to_owned(),
                    |t| format!("/admin/keys?tenant_id={t}"),
                );
                self.call(reqwest::Method::GET, &path, None).await
            }
        }
    }
}
