//! A gateway node in process on a temporary data dir, with every upstream pointing at one mock,
//! for tests that send it requests over HTTP and then read the events back from the log.

use std::time::Duration;

use loom::{DataDir, NodeConfig, ServeConfig};
use loom_dashboard::DashboardConfig;
use loom_gateway::config::{GatewayConfig, RawConfig};
use loom_mock::{MockConfig, MockServer};
use loom_projector::StoreLocation;
use loom_projector::archive::{ArchiveConfig, ArchiveLocation};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{Event, Payload};
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Topic};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const MASTER: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
pub const ADMIN: &str = "admin-token";

pub struct Harness {
    pub mock: MockServer,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub key: String,
    pub tenant: Uuid,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<()>,
}

/// A gateway whose upstreams all point at one mock; `extra` is appended to the config file.
pub async fn start(mock_config: MockConfig, extra: &str) -> Harness {
    start_with(mock_config, extra, false).await
}

/// As [`start`], folding the read models (SQLite, in the data dir) in process when
/// `read_models` is set, as `loom serve` does.
pub async fn start_with(mock_config: MockConfig, extra: &str, read_models: bool) -> Harness {
    start_full(
        mock_config,
        extra,
        read_models,
        DashboardConfig::default(),
        false,
    )
    .await
}

/// As [`start_with`], with the dashboard configured as `dashboard`, and archiving (in the data
/// dir, files rolled every second) when `archive` is set.
pub async fn start_full(
    mock_config: MockConfig,
    extra: &str,
    read_models: bool,
    dashboard: DashboardConfig,
    archive: bool,
) -> Harness {
    let mock = MockServer::start(mock_config).await.unwrap();
    let text = format!(
        r#"
[routing]
retries = 1
backoff = "5ms"
attempt_timeout = "2s"
cooldown = "60s"

[upstreams.primary]
provider = "openai"
base_url = "{url}/v1"
api_key_env = "MOCK_KEY"

[upstreams.azure]
provider = "azure"
base_url = "{url}"
api_key_env = "MOCK_KEY"
api_version = "2024-10-21"

[upstreams.local]
provider = "openai_compatible"
base_url = "{url}/v1"

[models.fast]
deployments = [{{ upstream = "primary", model = "gpt-4o-mini" }}, {{ upstream = "azure", model = "eu-deployment" }}]

[models.embed]
deployments = [{{ upstream = "local", model = "text-embedding-3-small" }}]

[models.unpriced]
deployments = [{{ upstream = "primary", model = "my-finetune-xyz" }}]

[upstreams.claude]
provider = "anthropic"
base_url = "{url}/v1"
api_key_env = "MOCK_KEY"

[models.claude]
deployments = [{{ upstream = "claude", model = "claude-sonnet-4-5" }}]
{extra}
"#,
        url = mock.url()
    );
    let raw: RawConfig = toml::from_str(&text).unwrap();
    let gateway = GatewayConfig::validate(raw, |_| Some("mock-key".into())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        node: NodeConfig {
            master_key: Some(MASTER.into()),
            ..NodeConfig::new(DataDir::new(dir.path()))
        },
        gateway,
        admin_token: Some(ADMIN.into()),
        read_models: read_models.then(|| StoreLocation::Sqlite(dir.path().join("read-models"))),
        lookup_read_models: None,
        projector: Default::default(),
        archive: archive.then(|| {
            let location = ArchiveLocation::Directory(dir.path().join("archive"));
            let config = ArchiveConfig {
                roll_after: Duration::from_secs(1),
                ..ArchiveConfig::default()
            };
            (location, config)
        }),
        exports: None,
        dashboard,
        drain: loom::Drain::default(),
        otlp_endpoint: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move { loom::serve(config, listener, token).await.unwrap() });
    let client = reqwest::Client::new();
    let mut harness = Harness {
        mock,
        dir,
        base,
        key: String::new(),
        tenant: Uuid::nil(),
        client,
        shutdown,
        server,
    };
    let tenant: Value = harness
        .admin("/admin/tenants", json!({"name": "acme"}))
        .await;
    harness.tenant = tenant["tenant_id"].as_str().unwrap().parse().unwrap();
    let key: Value = harness
        .admin("/admin/keys", json!({"tenant_id": harness.tenant}))
        .await;
    harness.key = key["key"].as_str().unwrap().to_owned();
    harness
}

impl Harness {
    pub async fn admin(&self, path: &str, body: Value) -> Value {
        for _ in 0..100 {
            let sent = self
                .client
                .post(format!("{}{path}", self.base))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await;
            if let Ok(response) = sent {
                assert!(
                    response.status().is_success(),
                    "{path}: {}",
                    response.status()
                );
                return response.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not start");
    }

    /// A project of the harness's tenant, created with `fields` (its `name` among them), and a
    /// key bound to it: the project's id and the key.
    pub async fn project_with_key(&self, fields: Value) -> (Value, String) {
        let mut body = fields;
        body["tenant_id"] = json!(self.tenant);
        let project = self.admin("/admin/projects", body).await["project_id"].clone();
        let key = self
            .admin(
                "/admin/keys",
                json!({"tenant_id": self.tenant, "project_id": project}),
            )
            .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
        (project, key)
    }

    /// `method path` with `token`: the status and the JSON answer (`null` if none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn chat(&self, body: Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(&self.key)
            .json(&body)
    }

    pub async fn faults(&self, faults: Value) {
        let response = self
            .client
            .post(format!("{}/mock/faults", self.mock.url()))
            .json(&json!({ "faults": faults }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    pub async fn upstream_requests(&self) -> Vec<Value> {
        self.client
            .get(format!("{}/mock/requests", self.mock.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Stops the gateway (draining its event queue) and returns every data-plane event, then
    /// the quota ledger's, and apart the control topic's.
    pub async fn stop(self) -> Recorded {
        self.shutdown.cancel();
        self.server.await.unwrap();
        let chain_key = MasterKey::parse(MASTER).unwrap().chain_key();
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(
            self.dir.path().join("log"),
            chain_key,
        ))
        .await
        .unwrap();
        let registry = Registry::builtin().unwrap();
        let (mut events, mut control) = (Vec::new(), Vec::new());
        for topic in [Topic::Data, Topic::Quota, Topic::Control] {
            let into = if topic == Topic::Control {
                &mut control
            } else {
                &mut events
            };
            let mut reader = log.read_from(topic, 0, 0).await.unwrap();
            loop {
                let batch = reader.poll(1000).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                into.extend(
                    batch
                        .iter()
                        .map(|e| registry.decode(&e.record.value).unwrap()),
                );
            }
        }
        let keys = KeyStore::open_file(
            self.dir.path().join("keys.json"),
            MasterKey::parse(MASTER).unwrap(),
        )
        .await
        .unwrap();
        Recorded {
            events,
            control,
            keys,
            tenant: self.tenant,
            _dir: self.dir,
        }
    }
}

pub struct Recorded {
    /// The data and quota topics' events.
    pub events: Vec<Event>,
    /// The control topic's.
    pub control: Vec<Event>,
    pub keys: KeyStore,
    pub tenant: Uuid,
    pub _dir: tempfile::TempDir,
}

impl Recorded {
    pub fn of_trace(&self, trace: &str) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.envelope.trace_id.as_deref() == Some(trace))
            .collect()
    }

    pub fn types(&self, trace: &str) -> Vec<&'static str> {
        self.of_trace(trace)
            .iter()
            .map(|e| e.payload.event_type())
            .collect()
    }

    pub fn completed(&self, trace: &str) -> &loom_schemas::event::RequestCompleted {
        self.of_trace(trace)
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::RequestCompleted(c) => Some(c),
                _ => None,
            })
            .expect("request.completed")
    }

    pub fn calls(&self, trace: &str) -> Vec<&loom_schemas::event::LlmCallCompleted> {
        self.of_trace(trace)
            .into_iter()
            .filter_map(|e| match &e.payload {
                Payload::LlmCallCompleted(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    pub fn open(
        &self,
        event: &Event,
        field: &str,
        sealed: &loom_schemas::event::Sealed,
    ) -> Vec<u8> {
        let ctx = FieldContext {
            tenant_id: self.tenant,
            event_id: event.envelope.event_id,
            field,
        };
        self.keys.open(&ctx, sealed).unwrap()
    }
}

pub fn trace_of(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// The pieces at `pointer` of every JSON chunk of a stream, joined.
pub fn deltas(frames: &[String], pointer: &str) -> String {
    frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|c| {
            c.pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

pub async fn read_sse(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.trim_start_matches("data: ").to_owned())
        .collect()
}
