//! Loom's events read by another Avro implementation (fastavro, from PyPI), from the `.avsc`
//! files alone: the wire format is standard Avro single-object encoding.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use loom_schemas::codec::Registry;
use loom_schemas::crypto::{DataKey, KeyBytes};
use loom_schemas::event::{EVENT_TYPES, Event};
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
    let mut checked = std::collections::BTreeSet::new();
    for (event, read) in events.iter().zip(&decoded) {
        assert_eq!(read["event_type"], event.payload.event_type());
        let version = registry
            .current_version(event.payload.event_type())
            .unwrap();
        assert_eq!(read["schema_version"], version);
        assert_eq!(read["event_id"], event.envelope.event_id.to_string());
        assert_eq!(read["tenant_id"], event.envelope.tenant_id.to_string());
        // Every field of every payload, as Loom's own codec reads it back, is what fastavro read.
        let (_, _, ours) = registry
            .decode_value(&registry.encode(event).unwrap())
            .unwrap();
        let ours = serde_json::Value::try_from(ours).unwrap();
        assert!(
            same(&ours["payload"], &read["payload"]),
            "{}: Loom wrote {} and fastavro read {}",
            event.payload.event_type(),
            ours["payload"],
            read["payload"]
        );
        checked.insert(event.payload.event_type());
    }
    assert_eq!(
        checked.len(),
        EVENT_TYPES.len(),
        "every event type is checked"
    );
}

/// Equal JSON, where `theirs` prints bytes as hex and `ours` as arrays of numbers.
fn same(ours: &serde_json::Value, theirs: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Array(bytes), Value::String(hex)) => {
            let bytes: Option<Vec<u8>> = bytes
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            bytes.is_some_and(|bytes| hex::encode(bytes) == *hex)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
        }
        _ => ours == theirs,
    }
}
