//! `loom admin`: tenants, projects, keys, users, roles and quotas, on a data directory no server holds
//! (`--data-dir`, as the operator) or through a running server's admin API (`--url` with
//! `--admin-token`, or `--api-key` for a tenant's key). Each command is one admin API call; on a
//! data directory the same operation runs in process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use loom::{KeyStoreLocation, Node, NodeConfig};
use loom_gateway::config::QuotaConfig;
use loom_gateway::quota::read_ledger;
use loom_gateway::{
    Actor, CredentialRequest, GrantRequest, KeyRequest, ProjectPatch, ProjectRequest, QuotaQuery,
    QuotaRequest,
};
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
    #[arg(long, global = true, env = "LOOM_ADMIN_URL")]
    url: Option<String>,

    /// The server's admin token (its LOOM_ADMIN_TOKEN): the operator, above every tenant.
    #[arg(long, global = true, env = "LOOM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    /// Or a tenant's API key: acts in its own tenant as far as its role allows (docs/roles.md).
    #[arg(
        long,
        global = true,
        env = "LOOM_API_KEY",
        hide_env_values = true,
        conflicts_with = "admin_token"
    )]
    api_key: Option<String>,

    #[command(subcommand)]
    what: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Tenants (organizations).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Projects: routing policy, tiers and feature flags.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Roles of users, in a tenant or one of its projects.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Users: who holds which role.
    #[command(subcommand)]
    User(UserCommand),
    /// Daily budgets and per-minute rate limits of a tenant, project, user or key.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// The prompt and output security policy of a project (docs/policy.md).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// A tenant's or project's own upstream credentials (docs/credentials.md).
    #[command(subcommand)]
    Credential(CredentialCommand),
}

/// Whose credential: a tenant's, or one of its projects'.
#[derive(Args)]
struct CredentialScopeArgs {
    /// The tenant (left out with --api-key: the key's own).
    #[arg(long)]
    tenant: Option<Uuid>,
    /// One project only (else the whole tenant).
    #[arg(long)]
    project: Option<Uuid>,
    /// The upstream, by its name in the gateway's config (`[upstreams.NAME]`).
    #[arg(long)]
    upstream: String,
}

#[derive(Subcommand)]
enum CredentialCommand {
    /// Set the key the scope's requests to an upstream use (admin or owner); it is sealed with
    /// the tenant's data key, and takes effect on every gateway without a restart. The key is
    /// read from an environment variable or stdin, never from the command line.
    Set {
        #[command(flatten)]
        scope: CredentialScopeArgs,
        /// The environment variable holding the key.
        #[arg(
            long,
            value_name = "VAR",
            conflicts_with = "api_key_stdin",
            required_unless_present = "api_key_stdin"
        )]
        api_key_env: Option<String>,
        /// Read the key from stdin.
        #[arg(long)]
        api_key_stdin: bool,
        /// Send the scope's requests to this URL instead of the upstream's (the operator only).
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Remove the scope's credential: the upstream's own key applies again.
    Remove {
        #[command(flatten)]
        scope: CredentialScopeArgs,
    },
    /// List a tenant's credentials as JSON (never their keys).
    List {
        #[arg(long)]
        tenant: Option<Uuid>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Replace a project's security policy (admin or owner); prints the policy in force.
    Set {
        project_id: Uuid,
        /// The policy as JSON, e.g. '{"rules":{"openai_api_key":"block","email":"redact"}}'.
        #[arg(
            long,
            value_name = "JSON",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        json: Option<String>,
        /// … or read from this file.
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Refuse the change if the project is no longer at this version.
        #[arg(long)]
        expected_version: Option<i64>,
    },
    /// Show the security policy in force for a project (its own, or the default) as JSON.
    Show { project_id: Uuid },
}

/// The scope a quota command is about.
#[derive(Args)]
struct QuotaScopeArgs {
    /// The tenant (left out with --api-key: the key's own).
    #[arg(long)]
    tenant: Option<Uuid>,
    /// tenant, project, user or key.
    #[arg(long, default_value = "tenant")]
    scope: String,
    /// The project or key id, or the user's id (left out for the tenant itself).
    #[arg(long)]
    id: Option<String>,
}

/// A limit on the command line: a number (`0`: unlimited), or `default` for the configured
/// default.
#[derive(Debug, Clone, Copy)]
enum LimitArg {
    Default,
    Set(f64),
}

fn limit_value(text: &str) -> Result<LimitArg, String> {
    match text {
        "default" => Ok(LimitArg::Default),
        number => number
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(LimitArg::Set)
            .ok_or_else(|| format!("{number:?}: a number, or `default`")),
    }
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// Set limits on a scope (admin or owner); what is left out stays. Prints the scope's limits
    /// and usage as JSON.
    Set {
        #[command(flatten)]
        scope: QuotaScopeArgs,
        /// Tokens (input plus output) per quota day.
        #[arg(long, value_parser = limit_value)]
        tokens_per_day: Option<LimitArg>,
        /// USD per quota day, e.g. 2.5.
        #[arg(long, value_name = "USD", value_parser = limit_value)]
        usd_per_day: Option<LimitArg>,
        #[arg(long, value_parser = limit_value)]
        requests_per_minute: Option<LimitArg>,
        #[arg(long, value_parser = limit_value)]
        tokens_per_minute: Option<LimitArg>,
    },
    /// Show a scope's limits and today's usage as JSON; without --id, every scope of the kind
    /// with limits set or usage today.
    Show {
        #[command(flatten)]
        scope: QuotaScopeArgs,
    },
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
    /// Rotate a tenant's data key: new bodies are sealed with a new version, older ones still
    /// open; records `tenant.key_rotated` (every node reloads its keys). Prints the version.
    RotateKey { tenant_id: Uuid },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project; prints it as JSON.
    Create {
        /// The tenant (left out with --api-key: the key's own).
        #[arg(long)]
        tenant: Option<Uuid>,
        #[arg(long)]
        name: String,
        /// Routing policy as JSON, e.g. '{"max_tier":"L2","escalate_on_failure":true}'.
        #[arg(long, value_name = "JSON")]
        routing: Option<String>,
        /// Feature flags as JSON, e.g. '{"cache":{"ttl_seconds":600}}'.
        #[arg(long, value_name = "JSON")]
        flags: Option<String>,
    },
    /// Change a project (what is left out stays); prints it as JSON.
    Update {
        project_id: Uuid,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "JSON")]
        routing: Option<String>,
        #[arg(long, value_name = "JSON")]
        flags: Option<String>,
        /// Refuse the change if the project is no longer at this version.
        #[arg(long)]
        expected_version: Option<i64>,
    },
    /// List projects as JSON.
    List {
        #[arg(long)]
        tenant: Option<Uuid>,
    },
    /// Show one project as JSON.
    Show { project_id: Uuid },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issue an API key; prints the key, which is shown this once and never stored.
    Create {
        /// The tenant (left out with --api-key: the key's own).
        #[arg(long)]
        tenant: Option<Uuid>,
        /// Bind the key to one project.
        #[arg(long)]
        project: Option<Uuid>,
        /// A label for listings.
        #[arg(long)]
        name: Option<String>,
        /// viewer, developer, admin or owner (never above the issuer's own).
        #[arg(long, default_value = "developer")]
        role: String,
        /// The user the key acts for: its role is capped by theirs.
        #[arg(long)]
        owner: Option<String>,
        /// How long the key is valid, e.g. 90d (forever if left out).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// The most the key may spend per UTC day, in USD (0: unlimited).
        #[arg(long, value_name = "USD")]
        daily_budget_usd: Option<f64>,
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

/// A role, in a tenant or in one of its projects.
#[derive(Args)]
struct GrantArgs {
    /// The tenant (left out with --api-key: the key's own).
    #[arg(long)]
    tenant: Option<Uuid>,
    /// The user: an id or email.
    #[arg(long)]
    user: String,
    /// viewer, developer, admin or owner.
    #[arg(long)]
    role: String,
    /// In this project only (the whole tenant if left out).
    #[arg(long)]
    project: Option<Uuid>,
}

#[derive(Subcommand)]
enum RoleCommand {
    /// Grant a user a role (nobody grants above their own role).
    Grant(GrantArgs),
    /// Take a role back from a user.
    Revoke(GrantArgs),
}

#[derive(Subcommand)]
enum UserCommand {
    /// List the users of a tenant and their roles as JSON.
    List {
        #[arg(long)]
        tenant: Option<Uuid>,
    },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let credential = args.admin_token.clone().or(args.api_key.clone());
    let target = match (&args.url, credential) {
        (Some(url), Some(token)) => Target::Remote {
            client: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token,
        },
        (Some(_), None) => anyhow::bail!("--url needs --admin-token or --api-key"),
        (None, _) => {
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
    let answer = target.run(args.what).await;
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
    let (what, value) = answer?;
    let mut out = std::io::stdout().lock();
    match what {
        Shown::Id => writeln!(out, "{}", value["tenant_id"].as_str().unwrap_or_default())?,
        Shown::Json => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
        Shown::Secret => {
            writeln!(
                std::io::stderr(),
                "key id {} (prefix {}, role {}); the key is shown only now:",
                value["key_id"].as_str().unwrap_or_default(),
                value["prefix"].as_str().unwrap_or_default(),
                value["role"].as_str().unwrap_or_default(),
            )?;
            writeln!(out, "{}", value["key"].as_str().unwrap_or_default())?;
        }
        Shown::Done(message) => writeln!(std::io::stderr(), "{message}")?,
        Shown::Field(field) => writeln!(out, "{}", serde_json::to_string_pretty(&value[field])?)?,
    }
    Ok(())
}

/// How a command's answer is printed.
enum Shown {
    /// The new tenant's id.
    Id,
    Json,
    /// The new key's secret on stdout, the rest on stderr.
    Secret,
    /// A line on stderr.
    Done(String),
    /// One field of the answer, as JSON.
    Field(&'static str),
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
        /// The admin token or a tenant's API key.
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

/// A JSON document given on the command line.
fn document(flag: &str, json: Option<String>) -> anyhow::Result<Option<Value>> {
    json.map(|json| serde_json::from_str(&json).with_context(|| format!("{flag} is not JSON")))
        .transpose()
}

/// `?tenant_id=` when a tenant is named.
fn tenant_query(path: &str, tenant: Option<Uuid>) -> String {
    tenant.map_or_else(|| path.to_owned(), |t| format!("{path}?tenant_id={t}"))
}

/// An admin operation: how the API is called for it, and how its answer is shown.
struct Call {
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
    shown: Shown,
}

fn call(
    method: reqwest::Method,
    path: impl Into<String>,
    body: Option<Value>,
    shown: Shown,
) -> Call {
    Call {
        method,
        path: path.into(),
        body,
        shown,
    }
}

/// The admin API call a command makes (`loom admin` on a data dir runs the same operation in
/// process).
fn api_call(command: AdminCommand) -> anyhow::Result<Call> {
    use reqwest::Method;
    Ok(match command {
        AdminCommand::Tenant(TenantCommand::Create { name }) => call(
            Method::POST,
            "/admin/tenants",
            Some(json!({ "name": name })),
            Shown::Id,
        ),
        AdminCommand::Tenant(TenantCommand::List) => {
            call(Method::GET, "/admin/tenants", None, Shown::Json)
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
            call(
                Method::POST,
                format!("/admin/tenants/{tenant_id}/erase"),
                Some(json!({ "reason": reason })),
                Shown::Done(format!("erased {tenant_id}")),
            )
        }
        AdminCommand::Tenant(TenantCommand::RotateKey { tenant_id }) => call(
            Method::POST,
            format!("/admin/tenants/{tenant_id}/rotate-key"),
            None,
            Shown::Field("version"),
        ),
        AdminCommand::Project(ProjectCommand::Create {
            tenant,
            name,
            routing,
            flags,
        }) => call(
            Method::POST,
            "/admin/projects",
            Some(json!({
                "tenant_id": tenant,
                "name": name,
                "routing_policy": document("--routing", routing)?,
                "feature_flags": document("--flags", flags)?,
            })),
            Shown::Json,
        ),
        AdminCommand::Project(ProjectCommand::Update {
            project_id,
            name,
            routing,
            flags,
            expected_version,
        }) => call(
            Method::PATCH,
            format!("/admin/projects/{project_id}"),
            Some(json!({
                "name": name,
                "routing_policy": document("--routing", routing)?,
                "feature_flags": document("--flags", flags)?,
                "expected_version": expected_version,
            })),
            Shown::Json,
        ),
        AdminCommand::Project(ProjectCommand::List { tenant }) => call(
            Method::GET,
            tenant_query("/admin/projects", tenant),
            None,
            Shown::Json,
        ),
        AdminCommand::Policy(PolicyCommand::Set {
            project_id,
            json,
            file,
            expected_version,
        }) => {
            let json = match (json, file) {
                (Some(json), _) => json,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, None) => anyhow::bail!("give the policy with --json or --file"),
            };
            call(
                Method::PATCH,
                format!("/admin/projects/{project_id}"),
                Some(json!({
                    "security_policy": document("the policy", Some(json))?,
                    "expected_version": expected_version,
                })),
                Shown::Field("security_policy"),
            )
        }
        AdminCommand::Credential(CredentialCommand::Set {
            scope,
            api_key_env,
            api_key_stdin,
            base_url,
        }) => {
            let key = match (api_key_env, api_key_stdin) {
                (Some(var), _) => std::env::var(&var)
                    .with_context(|| format!("--api-key-env: {var} is not set"))?,
                (None, true) => {
                    let mut key = String::new();
                    std::io::stdin()
                        .read_line(&mut key)
                        .context("reading the key from stdin")?;
                    key
                }
                (None, false) => {
                    anyhow::bail!("give the key with --api-key-env or --api-key-stdin")
                }
            };
            call(
                Method::POST,
                "/admin/credentials",
                Some(json!({
                    "tenant_id": scope.tenant,
                    "project_id": scope.project,
                    "upstream": scope.upstream,
                    "api_key": key.trim(),
                    "base_url": base_url,
                })),
                Shown::Json,
            )
        }
        AdminCommand::Credential(CredentialCommand::Remove { scope }) => call(
            Method::POST,
            "/admin/credentials",
            Some(json!({
                "tenant_id": scope.tenant,
                "project_id": scope.project,
                "upstream": scope.upstream,
            })),
            Shown::Done(format!("removed the credential for {}", scope.upstream)),
        ),
        AdminCommand::Credential(CredentialCommand::List { tenant }) => call(
            Method::GET,
            tenant_query("/admin/credentials", tenant),
            None,
            Shown::Json,
        ),
        AdminCommand::Policy(PolicyCommand::Show { project_id }) => call(
            Method::GET,
            format!("/admin/projects/{project_id}"),
            None,
            Shown::Field("security_policy"),
        ),
        AdminCommand::Project(ProjectCommand::Show { project_id }) => call(
            Method::GET,
            format!("/admin/projects/{project_id}"),
            None,
            Shown::Json,
        ),
        AdminCommand::Key(KeyCommand::Create {
            tenant,
            project,
            name,
            role,
            owner,
            expires_in,
            daily_budget_usd,
        }) => {
            let budget = match daily_budget_usd {
                Some(usd) if !(0.0..=1e9).contains(&usd) => {
                    anyhow::bail!("--daily-budget-usd: 0 (unlimited) to 1,000,000,000")
                }
                Some(usd) => Some((usd * 1e6).round() as i64),
                None => None,
            };
            call(
                Method::POST,
                "/admin/keys",
                Some(json!({
                    "tenant_id": tenant,
                    "project_id": project,
                    "name": name,
                    "role": role,
                    "owner": owner,
                    "expires_in": expires_in.map(|d| humantime::format_duration(d).to_string()),
                    "daily_budget_micro_usd": budget,
                })),
                Shown::Secret,
            )
        }
        AdminCommand::Key(KeyCommand::Revoke { key_id, reason }) => call(
            Method::POST,
            format!("/admin/keys/{key_id}/revoke"),
            Some(json!({ "reason": reason })),
            Shown::Done(format!("revoked {key_id}")),
        ),
        AdminCommand::Key(KeyCommand::List { tenant }) => call(
            Method::GET,
            tenant_query("/admin/keys", tenant),
            None,
            Shown::Json,
        ),
        AdminCommand::Role(command) => {
            let (verb, grant) = match command {
                RoleCommand::Grant(grant) => ("grant", grant),
                RoleCommand::Revoke(grant) => ("revoke", grant),
            };
            let done = match verb {
                "grant" => format!("granted {} to {}", grant.role, grant.user),
                _ => format!("revoked {} from {}", grant.role, grant.user),
            };
            call(
                Method::POST,
                format!("/admin/roles/{verb}"),
                Some(json!({
                    "tenant_id": grant.tenant,
                    "user": grant.user,
                    "role": grant.role,
                    "project_id": grant.project,
                })),
                Shown::Done(done),
            )
        }
        AdminCommand::Quota(QuotaCommand::Set {
            scope,
            tokens_per_day,
            usd_per_day,
            requests_per_minute,
            tokens_per_minute,
        }) => {
            let mut limits = serde_json::Map::new();
            let whole = |name: &str, value: LimitArg| -> anyhow::Result<Value> {
                match value {
                    LimitArg::Set(n) if n.fract() != 0.0 => {
                        anyhow::bail!("--{name}: a whole number")
                    }
                    LimitArg::Set(n) => Ok(json!(n as i64)),
                    LimitArg::Default => Ok(Value::Null),
                }
            };
            for (field, flag, value) in [
                ("tokens_per_day", "tokens-per-day", tokens_per_day),
                (
                    "requests_per_minute",
                    "requests-per-minute",
                    requests_per_minute,
                ),
                ("tokens_per_minute", "tokens-per-minute", tokens_per_minute),
            ] {
                if let Some(value) = value {
                    limits.insert(field.into(), whole(flag, value)?);
                }
            }
            if let Some(usd) = usd_per_day {
                let micro = match usd {
                    LimitArg::Set(usd) => json!((usd * 1e6).round() as i64),
                    LimitArg::Default => Value::Null,
                };
                limits.insert("cost_micro_usd_per_day".into(), micro);
            }
            call(
                Method::POST,
                "/admin/quotas",
                Some(json!({
                    "tenant_id": scope.tenant,
                    "scope": scope.scope,
                    "id": scope.id,
                    "limits": limits,
                })),
                Shown::Json,
            )
        }
        AdminCommand::Quota(QuotaCommand::Show { scope }) => {
            let mut url = reqwest::Url::parse("http://loom/admin/quotas")?;
            {
                let mut query = url.query_pairs_mut();
                if let Some(tenant) = scope.tenant {
                    query.append_pair("tenant_id", &tenant.to_string());
                }
                query.append_pair("scope", &scope.scope);
                if let Some(id) = &scope.id {
                    query.append_pair("id", id);
                }
            }
            let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
            call(Method::GET, path, None, Shown::Json)
        }
        AdminCommand::User(UserCommand::List { tenant }) => call(
            Method::GET,
            tenant_query("/admin/members", tenant),
            None,
            Shown::Json,
        ),
    })
}

/// A JSON body as the operation's request type (the same parsing as the server's).
fn body<T: serde::de::DeserializeOwned>(body: Option<Value>) -> anyhow::Result<T> {
    let mut body = body.unwrap_or_else(|| json!({}));
    // Absent and null mean the same; the request types refuse unknown fields, not nulls.
    if let Some(fields) = body.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    Ok(serde_json::from_value(body)?)
}

/// The last path segment as a UUID.
fn id_in(path: &str, segment_from_end: usize) -> anyhow::Result<Uuid> {
    let path = path.split('?').next().unwrap_or(path);
    let segment = path
        .rsplit('/')
        .nth(segment_from_end)
        .context("no id in the path")?;
    Ok(Uuid::parse_str(segment)?)
}

fn query_tenant(path: &str) -> anyhow::Result<Option<Uuid>> {
    path.split_once("?tenant_id=")
        .map(|(_, t)| Uuid::parse_str(t))
        .transpose()
        .map_err(Into::into)
}

impl Target {
    async fn run(&self, command: AdminCommand) -> anyhow::Result<(Shown, Value)> {
        let Call {
            method,
            path,
            body: payload,
            shown,
        } = api_call(command)?;
        let value = match self {
            Target::Remote { client, url, token } => {
                let mut request = client
                    .request(method, format!("{url}{path}"))
                    .bearer_auth(token);
                if let Some(body) = payload {
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
                match text.is_empty() {
                    true => Value::Null,
                    false => serde_json::from_str(&text)?,
                }
            }
            Target::Local { node, .. } => local(&node.services, &method, &path, payload).await?,
        };
        Ok((shown, value))
    }
}

/// Runs an admin API call in process, as the operator.
async fn local(
    services: &loom_gateway::Services,
    method: &reqwest::Method,
    path: &str,
    payload: Option<Value>,
) -> anyhow::Result<Value> {
    use reqwest::Method;
    let actor = &Actor::Operator;
    let route = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = route.trim_start_matches("/admin/").split('/').collect();
    let reason = || -> anyhow::Result<Option<String>> {
        Ok(payload
            .as_ref()
            .and_then(|b| b.get("reason")?.as_str().map(str::to_owned)))
    };
    Ok(match (method, segments.as_slice()) {
        (&Method::POST, ["tenants"]) => {
            let name = payload
                .as_ref()
                .and_then(|b| b.get("name")?.as_str())
                .unwrap_or_default();
            serde_json::to_value(services.create_tenant(actor, name).await?)?
        }
        (&Method::GET, ["tenants"]) => serde_json::to_value(services.list_tenants(actor))?,
        (&Method::POST, ["tenants", _, "erase"]) => {
            services
                .erase_tenant(actor, id_in(path, 1)?, reason()?)
                .await?;
            Value::Null
        }
        (&Method::POST, ["tenants", _, "rotate-key"]) => {
            serde_json::to_value(services.rotate_tenant_key(actor, id_in(path, 1)?).await?)?
        }
        (&Method::POST, ["projects"]) => {
            let request: ProjectRequest = body(payload)?;
            serde_json::to_value(services.create_project(actor, &request).await?)?
        }
        (&Method::PATCH, ["projects", _]) => {
            let patch: ProjectPatch = body(payload)?;
            serde_json::to_value(
                services
                    .update_project(actor, id_in(path, 0)?, &patch)
                    .await?,
            )?
        }
        (&Method::GET, ["projects"]) => {
            serde_json::to_value(services.list_projects(actor, query_tenant(path)?)?)?
        }
        (&Method::GET, ["projects", _]) => {
            serde_json::to_value(services.get_project(actor, id_in(path, 0)?)?)?
        }
        (&Method::POST, ["keys"]) => {
            let request: KeyRequest = body(payload)?;
            serde_json::to_value(services.create_key(actor, &request).await?)?
        }
        (&Method::GET, ["keys"]) => {
            serde_json::to_value(services.list_keys(actor, query_tenant(path)?)?)?
        }
        (&Method::POST, ["keys", _, "revoke"]) => {
            services
                .revoke_key(actor, id_in(path, 1)?, reason()?)
                .await?;
            Value::Null
        }
        (&Method::POST, ["roles", "grant"]) => {
            let request: GrantRequest = body(payload)?;
            services.grant_role(actor, &request).await?;
            Value::Null
        }
        (&Method::POST, ["roles", "revoke"]) => {
            let request: GrantRequest = body(payload)?;
            services.revoke_role(actor, &request).await?;
            Value::Null
        }
        (&Method::GET, ["members"]) => {
            serde_json::to_value(services.list_members(actor, query_tenant(path)?)?)?
        }
        (&Method::POST, ["credentials"]) => {
            let request: CredentialRequest = body(payload)?;
            serde_json::to_value(services.set_credential(actor, &request, None).await?)?
        }
        (&Method::GET, ["credentials"]) => {
            serde_json::to_value(services.list_credentials(actor, query_tenant(path)?)?)?
        }
        (&Method::POST, ["quotas"]) => {
            let request: QuotaRequest = body(payload)?;
            let defaults = QuotaConfig::default().check().map_err(anyhow::Error::msg)?;
            serde_json::to_value(services.set_quota(actor, &request, None, &defaults).await?)?
        }
        (&Method::GET, ["quotas"]) => {
            let url = reqwest::Url::parse(&format!("http://loom{path}"))?;
            let query: serde_json::Map<String, Value> = url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect();
            let query: QuotaQuery = serde_json::from_value(Value::Object(query))?;
            // No gateway runs here: limits are shown with the built-in defaults, and usage as
            // the log's quota topic has it.
            let defaults = QuotaConfig::default().check().map_err(anyhow::Error::msg)?;
            let ledger = read_ledger(&*services.log, defaults.clone()).await?;
            serde_json::to_value(services.show_quotas(actor, &query, Some(&ledger), &defaults)?)?
        }
        _ => anyhow::bail!("no admin operation {method} {path}"),
    })
}
