//! A client's request body on its way to an upstream that speaks the client's API: the bytes as
//! the client sent them, with only the top-level fields Loom must set (`model`, and for a chat
//! stream `stream_options`) replaced. Key order, number spelling, escapes and whitespace are
//! kept: the upstream reads what a direct client would have sent.

use std::fmt;
use std::ops::Range;

use axum::body::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// A client's request: the body as it came, and parsed.
pub(crate) struct ClientBody {
    pub raw: Bytes,
    pub json: Value,
    /// Top-level fields Loom sets besides the model, by name, as JSON.
    overrides: Vec<(&'static str, String)>,
}

impl ClientBody {
    pub fn new(raw: Bytes, json: Value) -> ClientBody {
        ClientBody {
            raw,
            json,
            overrides: Vec::new(),
        }
    }

    /// Sets a top-level field, both in the parsed body (what translations start from) and in
    /// what an upstream of the client's API is sent.
    pub fn set(&mut self, key: &'static str, value: Value) {
        self.overrides.push((key, value.to_string()));
        self.json[key] = value;
    }

    /// The body for an upstream of the client's API, for `model`.
    pub fn native(&self, model: &str) -> Option<Bytes> {
        let model = serde_json::to_string(model).ok()?;
        let mut fields = Vec::with_capacity(1 + self.overrides.len());
        fields.push(("model", model.as_str()));
        fields.extend(self.overrides.iter().map(|(k, v)| (*k, v.as_str())));
        patched(&self.raw, &fields)
    }
}

/// `raw` (a JSON object) with each `(key, json)` of `fields` as that key's value: replaced where
/// the key is, added first where it is not. `None` if `raw` is not a JSON object.
pub fn patched(raw: &Bytes, fields: &[(&str, &str)]) -> Option<Bytes> {
    let entries = top_level(raw).ok()?;
    let mut spans: Vec<(Range<usize>, &str)> = Vec::new();
    let mut missing: Vec<(&str, &str)> = Vec::new();
    for &(key, json) in fields {
        let found: Vec<Range<usize>> = entries
            .values
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, span)| span.clone())
            .collect();
        if found.is_empty() {
            missing.push((key, json));
        }
        spans.extend(found.into_iter().map(|span| (span, json)));
    }
    let unchanged = spans
        .iter()
        .all(|(span, json)| &raw[span.clone()] == json.as_bytes());
    if missing.is_empty() && unchanged {
        return Some(raw.clone());
    }
    spans.sort_by_key(|(span, _)| span.start);
    let extra: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(raw.len() + extra);
    // New keys go right after the opening brace.
    out.extend_from_slice(&raw[..=entries.open]);
    for (i, (key, json)) in missing.iter().enumerate() {
        out.extend_from_slice(serde_json::to_string(key).ok()?.as_bytes());
        out.push(b':');
        out.extend_from_slice(json.as_bytes());
        if i + 1 < missing.len() || !entries.values.is_empty() {
            out.push(b',');
        }
    }
    let mut at = entries.open + 1;
    for (span, json) in spans {
        out.extend_from_slice(&raw[at..span.start]);
        out.extend_from_slice(json.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(&raw[at..]);
    Some(Bytes::from(out))
}

/// The top-level keys of a JSON object, each with the byte range of its value, and where its
/// opening brace is.
struct Entries {
    open: usize,
    values: Vec<(String, Range<usize>)>,
}

fn top_level(raw: &[u8]) -> serde_json::Result<Entries> {
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let values = deserializer.deserialize_map(Spans { base: raw })?;
    deserializer.end()?;
    let open = raw
        .iter()
        .position(|b| *b == b'{')
        .ok_or_else(|| de::Error::custom("not an object"))?;
    Ok(Entries { open, values })
}

/// Collects each key and the range of its raw value within `base`.
struct Spans<'a> {
    base: &'a [u8],
}

impl<'de> Visitor<'de> for Spans<'de> {
    type Value = Vec<(String, Range<usize>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: &'de RawValue = map.next_value()?;
            let text = value.get().as_bytes();
            // The raw value borrows from `base`: its offset is where it starts there.
            let start = (text.as_ptr() as usize).wrapping_sub(self.base.as_ptr() as usize);
            if start > self.base.len() {
                return Err(de::Error::custom("a value outside the body"));
            }
            values.push((key, start..start + text.len()));
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(raw: &str, fields: &[(&str, &str)]) -> String {
        let out = patched(&Bytes::from(raw.to_owned()), fields).unwrap();
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn only_the_named_fields_change_and_every_other_byte_stays() {
        let raw = r#"{ "z": 1.0e3, "model" : "alias",  "messages":[{"content":"caf\u00e9"}], "seed": 18446744073709551616 }"#;
        assert_eq!(
            patch(raw, &[("model", r#""claude-sonnet-4-5""#)]),
            r#"{ "z": 1.0e3, "model" : "claude-sonnet-4-5",  "messages":[{"content":"caf\u00e9"}], "seed": 18446744073709551616 }"#
        );
        // Unchanged: the very same bytes.
        assert_eq!(patch(raw, &[("model", r#""alias""#)]), raw);
    }

    #[test]
    fn missing_fields_go_first_and_every_duplicate_is_replaced() {
        assert_eq!(
            patch(
                r#"{"a":1}"#,
                &[
                    ("model", r#""m""#),
                    ("stream_options", r#"{"include_usage":true}"#)
                ]
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"a":1}"#
        );
        assert_eq!(patch("{}", &[("model", r#""m""#)]), r#"{"model":"m"}"#);
        assert_eq!(
            patch(
                r#"{"model":"a","x":{"model":"keep"},"model":"b"}"#,
                &[("model", r#""m""#)]
            ),
            r#"{"model":"m","x":{"model":"keep"},"model":"m"}"#
        );
        assert_eq!(
            patch(r#"{"mod\u0065l":"a"}"#, &[("model", r#""m""#)]),
            r#"{"mod\u0065l":"m"}"#
        );
    }

    #[test]
    fn what_is_not_an_object_is_refused() {
        for raw in ["[1]", "\"x\"", "{", r#"{"a":1} x"#, ""] {
            assert!(
                patched(&Bytes::from(raw), &[("model", "\"m\"")]).is_none(),
                "{raw}"
            );
        }
    }
}
