//! The event codec: Avro single-object encoding.
//!
//! Wire format (Avro specification, "Single object encoding"): the two marker bytes `C3 01`, the
//! 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of the writer schema's canonical form,
//! then the Avro binary datum. Any Avro library that knows Loom's `.avsc` files can read it.
//!
//! Every version of every schema is in the [`Registry`], keyed by fingerprint. Data written with
//! an older version is resolved into the newest one (Avro schema resolution: added optional fields
//! take their defaults, removed ones are skipped), so consumers always see the current Rust types.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Schema, from_value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{
    EVENT_TYPES, Envelope, Event, Payload, PayloadDecoder, PayloadEncoder, Plane, decode_with,
};
use crate::log::{Header, Record};

/// The marker that starts every single-object encoded datum.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Record header names, so consumers can route and filter without decoding.
pub const HEADER_EVENT_TYPE: &str = "loom.event_type";
pub const HEADER_SCHEMA_VERSION: &str = "loom.schema_version";
pub const HEADER_TENANT_ID: &str = "loom.tenant_id";

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not an Avro single-object encoded event (no C3 01 marker)")]
    NotSingleObject,
    #[error("unknown schema fingerprint {0:016x}: written by a newer Loom, or not a Loom event")]
    UnknownSchema(u64),
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error(
        "envelope says {found} v{found_version}, but the data was written with {expected} v{expected_version}"
    )]
    EnvelopeMismatch {
        found: String,
        found_version: i32,
        expected: String,
        expected_version: u32,
    },
    #[error("{0} bytes left over after the event")]
    TrailingBytes(usize),
    #[error("invalid schema {name}: {reason}")]
    InvalidSchema { name: String, reason: String },
    #[error("avro: {0}")]
    Avro(Box<apache_avro::Error>),
}

impl From<apache_avro::Error> for CodecError {
    fn from(error: apache_avro::Error) -> Self {
        CodecError::Avro(Box::new(error))
    }
}

/// One version of one event type's schema, as written in `schemas/avro/<type>.v<N>.avsc`.
#[derive(Debug, Clone)]
pub struct SchemaDef {
    pub event_type: String,
    pub version: u32,
    pub json: String,
}

macro_rules! builtin_schemas {
    ($( $type_name:literal v $version:literal ),* $(,)?) => {
        /// Every `.avsc` file Loom ships, embedded at build time.
        pub fn builtin_schemas() -> Vec<SchemaDef> {
            vec![$(
                SchemaDef {
                    event_type: $type_name.to_owned(),
                    version: $version,
                    json: include_str!(concat!("../avro/", $type_name, ".v", $version, ".avsc")).to_owned(),
                },
            )*]
        }
    };
}

builtin_schemas! {
    "request.received" v 1,
    "policy.evaluated" v 1,
    "policy.evaluated" v 2,
    "routing.decided" v 1,
    "routing.decided" v 2,
    "llm_call.completed" v 1,
    "llm_call.completed" v 2,
    "tool_call.observed" v 1,
    "cache.hit" v 1,
    "quota.reserved" v 1,
    "quota.reserved" v 2,
    "quota.consumed" v 1,
    "quota.consumed" v 2,
    "quota.released" v 1,
    "quota.denied" v 1,
    "quota.denied" v 2,
    "request.completed" v 1,
    "tenant.created" v 1,
    "project.created" v 1,
    "project.created" v 2,
    "project.updated" v 1,
    "project.updated" v 2,
    "api_key.issued" v 1,
    "api_key.issued" v 2,
    "api_key.revoked" v 1,
    "quota.limit_set" v 1,
    "quota.limit_set" v 2,
    "role.granted" v 1,
    "role.revoked" v 1,
    "upstream_credential.set" v 1,
    "user.registered" v 1,
    "user.password_set" v 1,
    "session.started" v 1,
    "session.ended" v 1,
    "tenant.erased" v 1,
    "tenant.key_rotated" v 1,
    "log.anchored" v 1,
}

struct Entry {
    event_type: String,
    version: u32,
    header: [u8; HEADER_LEN],
    writer: GenericDatumWriter<'static>,
    /// Reads data written with this version, resolving it into the current one.
    reader: GenericDatumReader<'static>,
}

/// All known schema versions, by fingerprint, and the newest version of each event type.
pub struct Registry {
    by_fingerprint: HashMap<u64, Entry>,
    /// Fingerprint of the version each event type is written with.
    current: HashMap<String, u64>,
    current_schemas: HashMap<String, &'static Schema>,
}

fn invalid(def: &SchemaDef, reason: String) -> CodecError {
    CodecError::InvalidSchema {
        name: format!("{}.v{}", def.event_type, def.version),
        reason,
    }
}

/// The CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form, as the specification and
/// other Avro implementations compute it. apache-avro 0.22 keeps logical types in its canonical
/// form (AVRO-4004), so they are stripped first, as the specification's [STRIP] rule does.
fn fingerprint(def: &SchemaDef) -> Result<[u8; 8], CodecError> {
    fn strip_logical_types(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.remove("logicalType");
                map.values_mut().for_each(strip_logical_types);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_logical_types),
            _ => {}
        }
    }
    let mut json: serde_json::Value =
        serde_json::from_str(&def.json).map_err(|e| invalid(def, e.to_string()))?;
    strip_logical_types(&mut json);
    let plain = Schema::parse(&json).map_err(|e| invalid(def, e.to_string()))?;
    plain
        .fingerprint::<Rabin>()
        .bytes
        .as_slice()
        .try_into()
        .map_err(|_| invalid(def, "Rabin fingerprint is not 8 bytes".into()))
}

fn parse(def: &SchemaDef) -> Result<&'static Schema, CodecError> {
    let schema = Schema::parse_str(&def.json).map_err(|e| invalid(def, e.to_string()))?;
    Ok(Box::leak(Box::new(schema)))
}

static BUILTIN: LazyLock<Result<Registry, String>> =
    LazyLock::new(|| Registry::new(builtin_schemas()).map_err(|e| e.to_string()));

impl Registry {
    /// The registry of the schemas this build ships.
    pub fn builtin() -> Result<&'static Registry, CodecError> {
        BUILTIN
            .as_ref()
            .map_err(|reason| CodecError::InvalidSchema {
                name: "builtin".into(),
                reason: reason.clone(),
            })
    }

    /// Builds a registry from schema definitions; the newest version of each event type is the
    /// one the Rust types mirror. Every Rust event type needs at least one.
    ///
    /// Parsed schemas live for the rest of the process (the codec borrows them for `'static`).
    pub fn new(defs: Vec<SchemaDef>) -> Result<Registry, CodecError> {
        let mut parsed = Vec::with_capacity(defs.len());
        let mut newest: HashMap<String, (u32, &'static Schema)> = HashMap::new();
        for def in &defs {
            let schema = parse(def)?;
            let slot = newest
                .entry(def.event_type.clone())
                .or_insert((def.version, schema));
            if def.version > slot.0 {
                *slot = (def.version, schema);
            }
            parsed.push((def, schema));
        }
        if let Some(missing) = EVENT_TYPES.iter().find(|t| !newest.contains_key(**t)) {
            return Err(CodecError::InvalidSchema {
                name: (*missing).to_owned(),
                reason: "no schema for this event type".into(),
            });
        }
        let mut registry = Registry {
            by_fingerprint: HashMap::new(),
            current: HashMap::new(),
            current_schemas: HashMap::new(),
        };
        for (def, schema) in parsed {
            let (newest_version, newest_schema) = newest[&def.event_type];
            let is_current = def.version == newest_version;
            if is_current {
                registry
                    .current_schemas
                    .insert(def.event_type.clone(), newest_schema);
            }
            registry.insert(def, schema, newest_schema, is_current)?;
        }
        Ok(registry)
    }

    /// Teaches the registry writer schemas it does not write itself — say, newer versions from a
    /// newer producer — without changing the versions it writes. Data written with them is
    /// resolved into this registry's current types (fields it does not know are skipped).
    pub fn learn(&mut self, defs: Vec<SchemaDef>) -> Result<(), CodecError> {
        for def in &defs {
            let schema = parse(def)?;
            let current = *self
                .current_schemas
                .get(&def.event_type)
                .ok_or_else(|| CodecError::UnknownEventType(def.event_type.clone()))?;
            if schema.canonical_form() == current.canonical_form() {
                continue;
            }
            self.insert(def, schema, current, false)?;
        }
        Ok(())
    }

    fn insert(
        &mut self,
        def: &SchemaDef,
        schema: &'static Schema,
        current: &'static Schema,
        is_current: bool,
    ) -> Result<(), CodecError> {
        let bytes = fingerprint(def)?;
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&bytes);
        let writer = GenericDatumWriter::builder(schema)
            .human_readable(true)
            .build()?;
        let reader = GenericDatumReader::builder(schema)
            .maybe_reader_schema((!is_current).then_some(current))
            .human_readable(true)
            .build()?;
        let key = u64::from_le_bytes(bytes);
        if is_current {
            self.current.insert(def.event_type.clone(), key);
        }
        let entry = Entry {
            event_type: def.event_type.clone(),
            version: def.version,
            header,
            writer,
            reader,
        };
        if self.by_fingerprint.insert(key, entry).is_some() {
            return Err(invalid(def, "same canonical form as another schema".into()));
        }
        Ok(())
    }

    /// The version new events of `event_type` are written with.
    pub fn current_version(&self, event_type: &str) -> Option<u32> {
        let fingerprint = self.current.get(event_type)?;
        self.by_fingerprint.get(fingerprint).map(|e| e.version)
    }

    fn current_entry(&self, event_type: &str) -> Result<&Entry, CodecError> {
        self.current
            .get(event_type)
            .and_then(|fp| self.by_fingerprint.get(fp))
            .ok_or_else(|| CodecError::UnknownEventType(event_type.to_owned()))
    }

    /// Encodes `event` with the current schema of its type, appending to `out`.
    pub fn encode_into(&self, event: &Event, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let entry = self.current_entry(event.payload.event_type())?;
        out.extend_from_slice(&entry.header);
        event.payload.encode_with(Encoder {
            entry,
            envelope: &event.envelope,
            out,
        })
    }

    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(256);
        self.encode_into(event, &mut out)?;
        Ok(out)
    }

    /// Encodes `event` as a log record: keyed by trace id (data plane) or tenant id (control
    /// plane), with the event type, schema version and tenant id as headers.
    pub fn encode_record(&self, event: &Event) -> Result<Record, CodecError> {
        let event_type = event.payload.event_type();
        let version = self.current_entry(event_type)?.version;
        let envelope = &event.envelope;
        let key = match (event.payload.plane(), &envelope.trace_id) {
            (Plane::Data, Some(trace_id)) => trace_id.as_bytes().to_vec(),
            _ => envelope.tenant_id.as_bytes().to_vec(),
        };
        Ok(Record {
            key,
            headers: vec![
                Header::new(HEADER_EVENT_TYPE, event_type.as_bytes()),
                Header::new(HEADER_SCHEMA_VERSION, version.to_string().as_bytes()),
                Header::new(HEADER_TENANT_ID, envelope.tenant_id.to_string().as_bytes()),
            ],
            value: self.encode(event)?,
            timestamp_us: envelope.occurred_at,
        })
    }

    fn entry_for(&self, bytes: &[u8]) -> Result<&Entry, CodecError> {
        if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
            return Err(CodecError::NotSingleObject);
        }
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&bytes[2..HEADER_LEN]);
        let fingerprint = u64::from_le_bytes(fingerprint);
        self.by_fingerprint
            .get(&fingerprint)
            .ok_or(CodecError::UnknownSchema(fingerprint))
    }

    /// Decodes one event into a generic Avro value of its type's current schema, with the event
    /// type and the version it was written with.
    pub fn decode_value(&self, bytes: &[u8]) -> Result<(&str, u32, Value), CodecError> {
        let entry = self.entry_for(bytes)?;
        let mut body = &bytes[HEADER_LEN..];
        let value = entry.reader.read_value(&mut body)?;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes(body.len()));
        }
        Ok((&entry.event_type, entry.version, value))
    }

    /// Decodes one event, resolving older schema versions into the current types.
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, CodecError> {
        let entry = self.entry_for(bytes)?;
        let mut body = &bytes[HEADER_LEN..];
        let (wire, payload) = decode_with(
            &entry.event_type,
            Decoder {
                entry,
                body: &mut body,
            },
        )
        .ok_or_else(|| CodecError::UnknownEventType(entry.event_type.clone()))??;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes(body.len()));
        }
        if wire.event_type != entry.event_type
            || u32::try_from(wire.schema_version) != Ok(entry.version)
        {
            return Err(CodecError::EnvelopeMismatch {
                found: wire.event_type,
                found_version: wire.schema_version,
                expected: entry.event_type.clone(),
                expected_version: entry.version,
            });
        }
        Ok(Event {
            envelope: Envelope {
                event_id: wire.event_id,
                occurred_at: wire.occurred_at,
                tenant_id: wire.tenant_id,
                trace_id: wire.trace_id,
                producer: wire.producer,
            },
            payload,
        })
    }
}

#[derive(Serialize)]
struct WireEnvelopeRef<'a> {
    event_id: &'a Uuid,
    event_type: &'a str,
    schema_version: i32,
    occurred_at: i64,
    tenant_id: &'a Uuid,
    trace_id: Option<&'a str>,
    producer: &'a str,
}

#[derive(Serialize)]
struct WireRef<'a, P> {
    envelope: WireEnvelopeRef<'a>,
    payload: &'a P,
}

#[derive(Deserialize)]
struct WireEnvelope {
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    occurred_at: i64,
    tenant_id: Uuid,
    trace_id: Option<String>,
    producer: String,
}

#[derive(Deserialize)]
struct Wire<P> {
    envelope: WireEnvelope,
    payload: P,
}

struct Encoder<'a> {
    entry: &'a Entry,
    envelope: &'a Envelope,
    out: &'a mut Vec<u8>,
}

impl PayloadEncoder for Encoder<'_> {
    type Output = Result<(), CodecError>;

    fn encode<P: Serialize>(self, payload: &P) -> Self::Output {
        let envelope = self.envelope;
        let wire = WireRef {
            envelope: WireEnvelopeRef {
                event_id: &envelope.event_id,
                event_type: &self.entry.event_type,
                schema_version: i32::try_from(self.entry.version).unwrap_or(i32::MAX),
                occurred_at: envelope.occurred_at,
                tenant_id: &envelope.tenant_id,
                trace_id: envelope.trace_id.as_deref(),
                producer: &envelope.producer,
            },
            payload,
        };
        self.entry.writer.write_ser(self.out, &wire)?;
        Ok(())
    }
}

struct Decoder<'a, 'b> {
    entry: &'a Entry,
    body: &'a mut &'b [u8],
}

impl PayloadDecoder for Decoder<'_, '_> {
    type Output = Result<(WireEnvelope, Payload), CodecError>;

    fn decode<P: DeserializeOwned + Into<Payload>>(self) -> Self::Output {
        // Through a `Value`: apache-avro's direct deserializer insists that Rust type names match
        // the record names, and cannot resolve between versions.
        let wire: Wire<P> = from_value(&self.entry.reader.read_value(self.body)?)?;
        Ok((wire.envelope, wire.payload.into()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use apache_avro::schema_compatibility::SchemaCompatibility;

    use super::*;
    use crate::crypto::{DataKey, KeyBytes};
    use crate::event::{TenantCreated, now_micros};
    use crate::samples;

    fn key() -> DataKey {
        DataKey {
            tenant_id: Uuid::now_v7(),
            key_id: Uuid::now_v7(),
            version: 1,
            key: KeyBytes::generate().unwrap(),
        }
    }

    #[test]
    fn every_event_type_round_trips() {
        let registry = Registry::builtin().unwrap();
        let events = samples::one_of_each(&key(), &KeyBytes::generate().unwrap()).unwrap();
        let types: BTreeSet<_> = events.iter().map(|e| e.payload.event_type()).collect();
        assert_eq!(types, EVENT_TYPES.iter().copied().collect());
        for event in events {
            let bytes = registry.encode(&event).unwrap();
            assert_eq!(bytes[..2], MAGIC);
            assert_eq!(
                registry.decode(&bytes).unwrap(),
                event,
                "{}",
                event.payload.event_type()
            );
            let (event_type, version, _) = registry.decode_value(&bytes).unwrap();
            let current = registry.current_version(event_type).unwrap();
            assert_eq!((event_type, version), (event.payload.event_type(), current));
        }
    }

    #[test]
    fn records_carry_type_version_and_tenant_headers() {
        let registry = Registry::builtin().unwrap();
        let key = key();
        let event = samples::llm_call_completed(&key, "trace-7", 2048).unwrap();
        let record = registry.encode_record(&event).unwrap();
        assert_eq!(record.key, b"trace-7");
        assert_eq!(
            record.header(HEADER_EVENT_TYPE),
            Some(&b"llm_call.completed"[..])
        );
        assert_eq!(record.header(HEADER_SCHEMA_VERSION), Some(&b"2"[..]));
        assert_eq!(
            record.header(HEADER_TENANT_ID),
            Some(key.tenant_id.to_string().as_bytes())
        );
        assert_eq!(record.timestamp_us, event.envelope.occurred_at);
        assert_eq!(registry.decode(&record.value).unwrap(), event);
    }

    #[test]
    fn every_schema_file_is_registered_and_shares_the_envelope() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
        let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".avsc"))
            .collect();
        let defs = builtin_schemas();
        let registered: BTreeSet<String> = defs
            .iter()
            .map(|d| format!("{}.v{}.avsc", d.event_type, d.version))
            .collect();
        assert_eq!(on_disk, registered);
        let envelope = |json: &str| {
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            value["fields"][0].clone()
        };
        let first = envelope(&defs[0].json);
        assert_eq!(first["name"], "envelope");
        for def in &defs {
            assert_eq!(
                envelope(&def.json),
                first,
                "{} has a different envelope",
                def.event_type
            );
        }
    }

    #[test]
    fn newer_versions_can_read_older_ones() {
        // Every schema Loom ships, plus a synthetic v2: while every type is at v1, the check
        // still runs on one pair.
        let mut defs = builtin_schemas();
        defs.push(tenant_created_v2());
        let mut checked = 0;
        for newer in &defs {
            for older in defs
                .iter()
                .filter(|d| d.event_type == newer.event_type && d.version < newer.version)
            {
                let writer = Schema::parse_str(&older.json).unwrap();
                let reader = Schema::parse_str(&newer.json).unwrap();
                SchemaCompatibility::can_read(&writer, &reader).unwrap_or_else(|e| {
                    panic!(
                        "{} v{} cannot read v{}: {e}",
                        newer.event_type, newer.version, older.version
                    )
                });
                checked += 1;
            }
        }
        assert!(checked >= 1, "no pair of versions was checked");

        // And the check is one that fails: a v2 with a new field and no default cannot read v1.
        let mut breaking: serde_json::Value =
            serde_json::from_str(&tenant_created_v2().json).unwrap();
        breaking["fields"][1]["type"]["fields"][1] =
            serde_json::json!({"name": "region", "type": "string"});
        let v1 = defs
            .iter()
            .find(|d| d.event_type == "tenant.created" && d.version == 1)
            .unwrap();
        let writer = Schema::parse_str(&v1.json).unwrap();
        let reader = Schema::parse_str(&breaking.to_string()).unwrap();
        assert!(SchemaCompatibility::can_read(&writer, &reader).is_err());
    }

    /// `tenant.created` v2: v1 plus an optional `region`.
    fn tenant_created_v2() -> SchemaDef {
        let v1 = builtin_schemas()
            .into_iter()
            .find(|d| d.event_type == "tenant.created")
            .unwrap();
        let mut schema: serde_json::Value = serde_json::from_str(&v1.json).unwrap();
        let fields = schema["fields"][1]["type"]["fields"]
            .as_array_mut()
            .unwrap();
        fields.push(
            serde_json::json!({"name": "region", "type": ["null", "string"], "default": null}),
        );
        SchemaDef {
            event_type: v1.event_type,
            version: 2,
            json: schema.to_string(),
        }
    }

    fn tenant_created() -> Event {
        Event {
            envelope: Envelope::new(Uuid::now_v7(), None, "admin/test/1"),
            payload: TenantCreated {
                name: "acme".into(),
            }
            .into(),
        }
    }

    #[test]
    fn version_n_decodes_after_an_optional_field_is_added() {
        let old = Registry::builtin().unwrap();
        let mut defs = builtin_schemas();
        defs.push(tenant_created_v2());
        let new = Registry::new(defs).unwrap();
        assert_eq!(new.current_version("tenant.created"), Some(2));

        let event = tenant_created();
        let v1_bytes = old.encode(&event).unwrap();
        assert_eq!(new.decode(&v1_bytes).unwrap(), event);
        let (_, written_with, value) = new.decode_value(&v1_bytes).unwrap();
        assert_eq!(written_with, 1);
        let Value::Record(fields) = value else {
            panic!("not a record")
        };
        let Value::Record(payload) = &fields[1].1 else {
            panic!("payload not a record")
        };
        assert_eq!(
            payload[1],
            ("region".to_owned(), Value::Union(0, Box::new(Value::Null)))
        );
    }

    #[test]
    fn version_n_plus_1_decodes_with_version_n_types() {
        #[derive(Serialize)]
        struct PayloadV2<'a> {
            name: &'a str,
            region: Option<&'a str>,
        }
        let v2 = tenant_created_v2();
        let schema: &'static Schema = parse(&v2).unwrap();
        let event = tenant_created();
        let envelope = &event.envelope;
        let mut bytes = vec![0xC3, 0x01];
        bytes.extend_from_slice(&fingerprint(&v2).unwrap());
        GenericDatumWriter::builder(schema)
            .human_readable(true)
            .build()
            .unwrap()
            .write_ser(
                &mut bytes,
                &WireRef {
                    envelope: WireEnvelopeRef {
                        event_id: &envelope.event_id,
                        event_type: "tenant.created",
                        schema_version: 2,
                        occurred_at: envelope.occurred_at,
                        tenant_id: &envelope.tenant_id,
                        trace_id: None,
                        producer: &envelope.producer,
                    },
                    payload: &PayloadV2 {
                        name: "acme",
                        region: Some("eu-west"),
                    },
                },
            )
            .unwrap();

        // A v1 consumer that does not know the v2 schema says so, with a typed error...
        let old = Registry::new(builtin_schemas()).unwrap();
        assert!(matches!(
            old.decode(&bytes),
            Err(CodecError::UnknownSchema(_))
        ));
        // ...and once it is given the v2 schema, reads the event into its v1 types.
        let mut old = old;
        old.learn(vec![tenant_created_v2()]).unwrap();
        assert_eq!(old.current_version("tenant.created"), Some(1));
        assert_eq!(old.decode(&bytes).unwrap(), event);
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let registry = Registry::builtin().unwrap();
        assert!(matches!(
            registry.decode(b""),
            Err(CodecError::NotSingleObject)
        ));
        assert!(matches!(
            registry.decode(b"{\"json\":true}"),
            Err(CodecError::NotSingleObject)
        ));
        let unknown = [0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0];
        assert!(matches!(
            registry.decode(&unknown),
            Err(CodecError::UnknownSchema(_))
        ));

        let bytes = registry.encode(&tenant_created()).unwrap();
        for cut in [HEADER_LEN, HEADER_LEN + 1, bytes.len() - 1] {
            assert!(
                registry.decode(&bytes[..cut]).is_err(),
                "cut at {cut} decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            registry.decode(&longer),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn an_envelope_that_lies_about_its_type_is_refused() {
        let registry = Registry::builtin().unwrap();
        let entry = registry.current_entry("tenant.created").unwrap();
        let event = tenant_created();
        let mut bytes = entry.header.to_vec();
        entry
            .writer
            .write_ser(
                &mut bytes,
                &WireRef {
                    envelope: WireEnvelopeRef {
                        event_id: &event.envelope.event_id,
                        event_type: "tenant.erased",
                        schema_version: 1,
                        occurred_at: now_micros(),
                        tenant_id: &event.envelope.tenant_id,
                        trace_id: None,
                        producer: "x",
                    },
                    payload: &TenantCreated {
                        name: "acme".into(),
                    },
                },
            )
            .unwrap();
        assert!(matches!(
            registry.decode(&bytes),
            Err(CodecError::EnvelopeMismatch { .. })
        ));
    }

    #[test]
    fn unknown_event_types_are_typed_errors() {
        let mut registry = Registry::new(builtin_schemas()).unwrap();
        let def = SchemaDef {
            event_type: "made.up".into(),
            version: 1,
            json: r#""string""#.into(),
        };
        assert!(matches!(
            registry.learn(vec![def]),
            Err(CodecError::UnknownEventType(_))
        ));
        let missing: Vec<_> = builtin_schemas()
            .into_iter()
            .filter(|d| d.event_type != "tenant.erased")
            .collect();
        assert!(matches!(
            Registry::new(missing),
            Err(CodecError::InvalidSchema { .. })
        ));
    }
}
