//! What the end-to-end tests share: the real `loom` binary, started and stopped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub mod gateway;
pub mod load;

pub const LOOM: &str = env!("CARGO_BIN_EXE_loom");

/// A `loom serve` process on a free port, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    stderr: std::sync::mpsc::Receiver<String>,
    /// What it logged before listening.
    startup: Vec<String>,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        Self::start_as("serve", data_dir, extra, env)
    }

    /// Starts `loom <role>` (`serve` or `gateway`).
    pub fn start_as(
        role: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let mut command = Command::new(LOOM);
        command
            .args([role, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env_remove("LOOM_MASTER_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawning loom");
        let (lines_tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            match lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        // The address ends the line, or a JSON string (--log-format json).
                        let addr: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                            .collect();
                        let base = format!("http://{addr}");
                        seen.push(line);
                        return Ok(Server {
                            child,
                            base,
                            stderr: lines,
                            startup: seen,
                        });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    // Exited, or silent for a minute: either way it is not coming up.
                    let _ = child.kill();
                    let status = child.wait().expect("waiting for loom");
                    return Err(format!(
                        "loom {role} did not start listening ({status}):\n{}",
                        seen.join("\n")
                    ));
                }
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(self) -> std::process::ExitStatus {
        self.stop_with_log().0
    }

    /// Sends SIGTERM and returns at once.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// [`Server::stop`], and everything the server logged.
    pub fn stop_with_log(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.terminate();
        let status = self.child.wait().unwrap();
        // The pipe is closed now: this reads what is left, then ends.
        let rest: Vec<String> = self.stderr.iter().collect();
        assert!(
            rest.iter().any(|l| l.contains("stopped")),
            "no clean stop in:\n{}",
            rest.join("\n")
        );
        let mut log = std::mem::take(&mut self.startup);
        log.extend(rest);
        (status, log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a tenant and a key for it through `server`'s admin API; returns (tenant id, key).
pub async fn tenant_and_key(server: &Server, admin_token: &str, name: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        let request = client
            .post(server.url(path))
            .bearer_auth(admin_token)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let tenant = post("/admin/tenants", serde_json::json!({"name": name})).await;
    let tenant_id = tenant["tenant_id"].as_str().unwrap().to_owned();
    let key = post("/admin/keys", serde_json::json!({"tenant_id": tenant_id})).await;
    (tenant_id, key["key"].as_str().unwrap().to_owned())
}

/// Requests for a model nobody serves: refused (404), and recorded all the same.
pub async fn refused_requests(server: &Server, key: &str, count: usize) {
    let client = reqwest::Client::new();
    for _ in 0..count {
        let response = client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
    }
}

/// The embedded log of a data directory a real `loom` wrote (no server may hold it), opened with
/// the chain key of its `master.key`.
pub async fn open_data_dir_log(data_dir: &Path) -> loom_schemas::log::EmbeddedLog {
    let data_dir = loom::DataDir::new(data_dir);
    let master = loom_schemas::keystore::MasterKey::load(&data_dir.master_key_file(), None)
        .unwrap()
        .expect("the data directory has a master key");
    loom_schemas::log::EmbeddedLog::open(loom_schemas::log::EmbeddedLogConfig::new(
        data_dir.log(),
        master.chain_key(),
    ))
    .await
    .unwrap()
}

pub fn loom(args: &[&str]) -> Output {
    Command::new(LOOM)
        .args(args)
        .env_remove("LOOM_MASTER_KEY")
        .output()
        .expect("running loom")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a gateway config at `path` routing the model `fast` to the mock upstream at `mock_url`.
pub fn write_mock_config(path: &Path, mock_url: &str) {
    std::fs::write(
        path,
        format!(
            "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"{mock_url}/v1\"\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n"
        ),
    )
    .unwrap();
}

/// The versions `loom replay` printed: `(new, old)` from "… readers now use version N (was M)".
pub fn replayed_versions(stdout: &str) -> (u32, u32) {
    let versions: Vec<u32> = stdout
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (versions[versions.len() - 2], versions[versions.len() - 1])
}
