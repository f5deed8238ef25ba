//! The deployment files are valid: the Kubernetes manifests against Kubernetes' own schemas
//! (kubernetes-validate, strict: an unknown field fails), the compose file against the Compose
//! specification (dclint), and every role, flag and environment variable they use is one `loom`
//! knows. What this cannot check — that the images run on a cluster — docs/deployment.md says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{loom, text};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<PathBuf> {
    let dir = root().join("infra/deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn kubernetes_manifests_pass_the_schema_check() {
    let python = std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let files = manifests();
    assert!(files.len() >= 6, "{files:?}");
    let output = Command::new(python)
        .args(["-m", "kubernetes_validate", "--strict", "--no-warn"])
        .args(&files)
        .output()
        .expect("running kubernetes-validate (./infra/test.sh installs it)");
    assert!(
        output.status.success(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    // Every manifest the kustomization lists exists, and every one is listed.
    let kustomization =
        std::fs::read_to_string(root().join("infra/deploy/kubernetes/kustomization.yaml")).unwrap();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(kustomization.contains(&format!("- {name}")), "{name}");
    }
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let modules = std::env::var("LOOM_TEST_NODE_PATH")
        .expect("LOOM_TEST_NODE_PATH (./infra/test.sh installs dclint)");
    let dclint = Path::new(&modules).join(".bin/dclint");
    let output = Command::new(dclint)
        .arg(root().join("infra/deploy/compose.yaml"))
        .output()
        .expect("running dclint");
    // Errors fail it (a schema violation among them); style warnings do not.
    assert!(
        output.status.success(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// The `loom` command lines and `LOOM_*` variables of the deployment files, checked against the
/// binary's own `--help`.
#[test]
fn the_deployment_files_use_only_flags_and_variables_loom_knows() {
    let mut files = manifests();
    files.push(root().join("infra/deploy/compose.yaml"));
    files.push(root().join("infra/deploy/Dockerfile"));
    let variable = regex::Regex::new(r"\b(LOOM_[A-Z_]+)\b").unwrap();
    let role =
        regex::Regex::new(r#"\[\s*"(serve|gateway|projector|archiver|query|migrate)"([^\]]*)\]"#)
            .unwrap();
    let flag = regex::Regex::new(r#""(--[a-z-]+)""#).unwrap();
    let mut known = String::new();
    for command in [
        "serve",
        "gateway",
        "projector",
        "archiver",
        "query",
        "migrate",
    ] {
        let help = loom(&[command, "--help"]);
        assert!(help.status.success());
        known.push_str(&text(&help.stdout));
    }
    for file in files {
        let content = std::fs::read_to_string(&file).unwrap();
        for name in variable.captures_iter(&content).map(|c| c[1].to_owned()) {
            // Read by loom itself rather than by a flag.
            if name == "LOOM_MASTER_KEY" || name == "LOOM_IMAGE" {
                continue;
            }
            assert!(
                known.contains(&format!("[env: {name}")),
                "{name} in {file:?}"
            );
        }
        for args in role.captures_iter(&content) {
            let help = text(&loom(&[&args[1], "--help"]).stdout);
            for used in flag.captures_iter(&args[2]) {
                assert!(
                    help.contains(&format!("{} ", &used[1]))
                        || help.contains(&format!("{}=", &used[1])),
                    "`loom {}` has no {} ({file:?})",
                    &args[1],
                    &used[1]
                );
            }
        }
    }
}
