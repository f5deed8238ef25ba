//! `docs/reference/events.md`, written from the `.avsc` files: every event type, its newest
//! schema's fields with their types and docs, and the version each field arrived in. A test
//! checks that the file in the repository is current (`LOOM_UPDATE_DOCS=1` rewrites it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::codec::builtin_schemas;

/// Where the catalogue lives, from the workspace root.
const PATH: &str = "docs/reference/events.md";

/// The catalogue as Markdown.
fn catalogue() -> String {
    let mut versions: BTreeMap<String, BTreeMap<u32, Value>> = BTreeMap::new();
    for def in builtin_schemas() {
        let schema: Value = serde_json::from_str(&def.json).unwrap();
        versions
            .entry(def.event_type)
            .or_default()
            .insert(def.version, schema);
    }
    let mut text = String::from(
        "# Event catalogue\n\n\
         Generated from `schemas/avro/*.avsc` by `LOOM_UPDATE_DOCS=1 cargo nextest run \
         --workspace -E 'test(event_catalogue)'`; a test fails when this file is not current. \
         [events.md](../events.md) explains the wire format, the envelope and sealed fields.\n\n\
         Every event is a record of `envelope` and `payload`. Types: `T?` may be null; \
         `sealed` is a body encrypted with the tenant's data key (docs/events.md); times are \
         microseconds since the Unix epoch (UTC); money is micro-USD. A field marked *vN* \
         arrived in version N: events of older versions decode with its default.\n\n",
    );
    let any = versions.values().next().and_then(|v| v.values().next());
    if let Some(schema) = any {
        text.push_str("## Envelope (every event)\n\n| Field | Type | Meaning |\n|---|---|---|\n");
        let mut rows = Vec::new();
        fields(&schema["fields"][0]["type"], "", &mut rows);
        for (name, kind, doc) in rows {
            let _ = writeln!(text, "| `{name}` | {kind} | {doc} |");
        }
        text.push('\n');
    }
    for (event_type, by_version) in &versions {
        let (_, schema) = by_version.iter().next_back().unwrap();
        let listed: Vec<String> = by_version.keys().map(|v| format!("v{v}")).collect();
        let _ = writeln!(text, "## `{event_type}`\n");
        if let Some(doc) = schema["doc"].as_str() {
            let _ = writeln!(text, "{}\n", one_line(doc));
        }
        let _ = writeln!(text, "Versions: {}.\n", listed.join(", "));
        // The version each field first appears in.
        let mut since: BTreeMap<String, u32> = BTreeMap::new();
        for (version, older) in by_version {
            let mut rows = Vec::new();
            fields(&older["fields"][1]["type"], "", &mut rows);
            for (name, ..) in rows {
                since.entry(name).or_insert(*version);
            }
        }
        let mut rows = Vec::new();
        fields(&schema["fields"][1]["type"], "", &mut rows);
        if rows.is_empty() {
            text.push_str("No payload fields.\n\n");
            continue;
        }
        text.push_str("| Field | Type | Meaning |\n|---|---|---|\n");
        for (name, kind, doc) in rows {
            let arrived = match since.get(&name) {
                Some(v) if v > by_version.keys().next().unwrap() => format!(" *v{v}*"),
                _ => String::new(),
            };
            let _ = writeln!(text, "| `{name}`{arrived} | {kind} | {doc} |");
        }
        text.push('\n');
    }
    text
}

/// Rows (name, type, doc) of a record's fields; nested records' fields under `parent.` (and
/// `parent[].` inside arrays).
fn fields(record: &Value, prefix: &str, rows: &mut Vec<(String, String, String)>) {
    let Some(list) = record["fields"].as_array() else {
        return;
    };
    for field in list {
        let name = format!("{prefix}{}", field["name"].as_str().unwrap_or("?"));
        let kind = &field["type"];
        let doc = field["doc"]
            .as_str()
            .or_else(|| inner(kind)["doc"].as_str())
            .map(one_line)
            .unwrap_or_default();
        rows.push((name.clone(), type_name(kind), doc));
        let inner = inner(kind);
        match inner["type"].as_str() {
            Some("record") => fields(inner, &format!("{name}."), rows),
            Some("array") if inner["items"]["type"] == "record" => {
                fields(&inner["items"], &format!("{name}[]."), rows);
            }
            _ => {}
        }
    }
}

/// The type inside a nullable union.
fn inner(kind: &Value) -> &Value {
    match kind.as_array() {
        Some(union) => union.iter().find(|t| *t != "null").unwrap_or(kind),
        None => kind,
    }
}

fn type_name(kind: &Value) -> String {
    if let Some(union) = kind.as_array() {
        let others: Vec<String> = union
            .iter()
            .filter(|t| *t != "null")
            .map(type_name)
            .collect();
        let nullable = union.len() > others.len();
        return format!(
            "{}{}",
            others.join(" \\| "),
            if nullable { "?" } else { "" }
        );
    }
    if let Some(name) = kind.as_str() {
        return format!("`{name}`");
    }
    if let Some(logical) = kind["logicalType"].as_str() {
        return format!("`{logical}`");
    }
    match kind["type"].as_str() {
        Some("record") => match kind["name"].as_str() {
            Some("Sealed") => "`sealed`".to_owned(),
            Some(name) => format!("`{name}` (record)"),
            None => "record".to_owned(),
        },
        Some("enum") => {
            let symbols: Vec<&str> = kind["symbols"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!("enum: {}", symbols.join(", "))
        }
        Some("array") => format!("array of {}", type_name(&kind["items"])),
        Some("map") => format!("map of {}", type_name(&kind["values"])),
        Some(other) => format!("`{other}`"),
        None => "?".to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[test]
fn event_catalogue_is_current() {
    let text = catalogue();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(PATH);
    if std::env::var_os("LOOM_UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{PATH} is not current: run `LOOM_UPDATE_DOCS=1 cargo nextest run --workspace -E \
         'test(event_catalogue)'` and commit it"
    );
    for event_type in ["request.completed", "session.started", "quota.reserved"] {
        assert!(text.contains(&format!("## `{event_type}`")), "{event_type}");
    }
}
