//! Loom's events read by another Avro implementation (fastavro, from PyPI), from the `.avsc`
//! files alone: the wire format is standard Avro single-object encoding.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use loom_schemas::codec::Registry;
use loom_schemas::crypto::{DataKey, KeyBytes};
use loom_schemas::event::{Event, Payload};
use loom_schemas::samples;
use uuid::Uuid;

/// The Python with the test requirements, as `./infra/test.sh` exports it.
fn python() -> String {
    std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn fastavro_reads_every_event_from_the_schema_files() {
    let key = DataKey {
        tenant_id: Uuid::now_v7(),
        key_id: Uuid::now_v7(),
        version: 1,
        key: KeyBytes::generate().unwrap(),
    };
    let events: Vec<Event> = samples::one_of_each(&key, &KeyBytes::generate().unwrap()).unwrap();
    let registry = Registry::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let events_file = dir.path().join("events.hex");
    let lines: Vec<String> = events
        .iter()
        .map(|e| hex::encode(registry.encode(e).unwrap()))
        .collect();
    std::fs::write(&events_file, lines.join("\n")).unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(python())
        .arg(root.join("tests/interop/read_events.py"))
        .arg(root.join("schemas/avro"))
        .arg(&events_file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (run ./infra/test.sh, which sets up fastavro): {e}",
                python()
            )
        });
    assert!(
        output.status.success(),
        "fastavro could not read Loom's events (run ./infra/test.sh, which installs it):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let decoded: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(decoded.len(), events.len());
    for (event, read) in events.iter().zip(&decoded) {
        assert_eq!(read["event_type"], event.payload.event_type());
        assert_eq!(read["schema_version"], 1);
        assert_eq!(read["event_id"], event.envelope.event_id.to_string());
        assert_eq!(read["tenant_id"], event.envelope.tenant_id.to_string());
        let payload = &read["payload"];
        match &event.payload {
            Payload::LlmCallCompleted(call) => {
                assert_eq!(payload["model"], call.model.as_str());
                assert_eq!(payload["tokens_in"], call.tokens_in.unwrap());
                assert_eq!(payload["cost_micro_usd"], call.cost_micro_usd.unwrap());
                assert_eq!(payload["status"], "ok");
                let sealed = call.request_body.as_ref().unwrap();
                assert_eq!(payload["request_body"], hex::encode(&sealed.0));
            }
            Payload::RoutingDecided(routing) => {
                assert_eq!(
                    payload["candidates"][1]["skipped"],
                    routing.candidates[1].skipped.as_deref().unwrap()
                );
            }
            Payload::ApiKeyIssued(issued) => {
                assert_eq!(payload["key_hash"], hex::encode(&issued.key_hash));
                assert_eq!(payload["roles"][0], "inference");
            }
            _ => {}
        }
    }
}
