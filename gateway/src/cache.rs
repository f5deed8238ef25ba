//! The exact-match response cache of projects with the `cache` feature flag (docs/cache.md): an
//! answer is kept under a keyed digest of its normalized request, and the same request, within
//! the flag's TTL, is answered with it — JSON or stream, replayed as the client first got it — with
//! no upstream call; `cache.hit` records what that saved. Bounded per project by the flag's
//! `max_entries` and [`MAX_PROJECT_BYTES`]; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use loom_schemas::project::CacheFlag;
use serde_json::Value;
use uuid::Uuid;

use crate::flow::Flow;
use crate::record::Usage;

/// The most one project's cached answers may hold (bytes).
pub const MAX_PROJECT_BYTES: usize = 64 << 20;

/// Fields that do not change the answer: who asked. (`stream_options` does: a stream replayed
/// to a client that asked for usage must carry it.)
const IGNORED_FIELDS: [&str; 2] = ["user", "metadata"];

/// An answer, as the client got it.
#[derive(Debug)]
pub struct Cached {
    pub body: Bytes,
    pub stream: bool,
    pub model: Option<String>,
    pub usage: Usage,
    pub cost_micro_usd: Option<i64>,
    /// The request that got it from an upstream.
    pub trace_id: String,
    stored: Instant,
}

impl Cached {
    pub fn new(
        body: Bytes,
        stream: bool,
        model: Option<String>,
        usage: Usage,
        cost_micro_usd: Option<i64>,
        trace_id: String,
    ) -> Cached {
        Cached {
            body,
            stream,
            model,
            usage,
            cost_micro_usd,
            trace_id,
            stored: Instant::now(),
        }
    }

    pub fn age(&self) -> Duration {
        self.stored.elapsed()
    }
}

/// One project's cache.
struct Store {
    flag: CacheFlag,
    /// Each key's answer, with the number of the put that kept it.
    entries: HashMap<Vec<u8>, (u64, Arc<Cached>)>,
    /// Keys by put, oldest first; a key put again is here twice, its older put stale.
    order: VecDeque<(u64, Vec<u8>)>,
    puts: u64,
    bytes: usize,
}

impl Store {
    fn new(flag: CacheFlag) -> Store {
        Store {
            flag,
            entries: HashMap::new(),
            order: VecDeque::new(),
            puts: 0,
            bytes: 0,
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some((_, old)) = self.entries.remove(key) {
            self.bytes -= old.body.len();
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((put, key)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|(p, _)| *p == put) {
                self.remove(&key);
                return;
            }
        }
    }

    fn put(&mut self, key: Vec<u8>, cached: Cached) {
        let size = cached.body.len();
        self.remove(&key);
        let max_entries = usize::try_from(self.flag.max_entries).unwrap_or(usize::MAX);
        while !self.order.is_empty()
            && (self.entries.len() >= max_entries || self.bytes + size > MAX_PROJECT_BYTES)
        {
            self.evict_oldest();
        }
        // Stale keys (put again since) are dropped once they are most of the queue.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(put, key)| entries.get(key).is_some_and(|(p, _)| p == put));
        }
        self.puts += 1;
        self.bytes += size;
        self.order.push_back((self.puts, key.clone()));
        self.entries.insert(key, (self.puts, Arc::new(cached)));
    }
}

/// Every project's cache.
#[derive(Default)]
pub struct ResponseCache {
    projects: Mutex<HashMap<Uuid, Store>>,
}

impl ResponseCache {
    /// The answer kept under `key` in `project`, if it is younger than the flag's TTL.
    pub fn get(&self, project: Uuid, flag: CacheFlag, key: &[u8]) -> Option<Arc<Cached>> {
        let mut projects = self.projects.lock().unwrap_or_else(PoisonError::into_inner);
        let store = projects.get_mut(&project)?;
        if store.flag != flag {
            // The flag changed: what was kept under the old one goes.
            *store = Store::new(flag);
            return None;
        }
        let (_, cached) = store.entries.get(key)?;
        (cached.age() < Duration::from_secs(flag.ttl_seconds)).then(|| Arc::clone(cached))
    }

    /// Keeps `cached` under `key`, making room by dropping the oldest.
    pub fn put(&self, project: Uuid, flag: CacheFlag, key: Vec<u8>, cached: Cached) {
        let size = cached.body.len();
        if size > MAX_PROJECT_BYTES {
            return;
        }
        let mut projects = self.projects.lock().unwrap_or_else(PoisonError::into_inner);
        let store = projects.entry(project).or_insert_with(|| Store::new(flag));
        if store.flag != flag {
            *store = Store::new(flag);
        }
        store.put(key, cached);
    }
}

/// Feeds `value` to `out` with object keys sorted and `IGNORED_FIELDS` left out at the top
/// level: two requests that differ only in key order or who sent them are the same request.
fn normalized(value: &Value, top: bool, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map
                .keys()
                .filter(|k| !(top && IGNORED_FIELDS.contains(&k.as_str())))
                .collect();
            keys.sort_unstable();
            out.push(b'{');
            for key in keys {
                // Keys and scalars as JSON: unambiguous, and the same for the same value.
                out.extend_from_slice(Value::String(key.clone()).to_string().as_bytes());
                out.push(b':');
                normalized(&map[key], false, out);
                out.push(b',');
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for item in items {
                normalized(item, false, out);
                out.push(b',');
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

impl Flow {
    /// The project's cache flag, if its key's project has the cache on.
    pub fn cache_flag(&self) -> Option<(Uuid, CacheFlag)> {
        let project = self.key.as_ref()?.project_id?;
        let flag = self.control.read(|s| s.project(project)?.flags.cache)?;
        Some((project, flag))
    }

    /// The cache key of `request` to `endpoint`: HMAC-SHA-256 of it, normalized, under the
    /// tenant's digest key (no other tenant's request can share it; the event's digest says
    /// nothing of the prompt without the key).
    pub fn cache_key(&self, endpoint: &str, request: &Value) -> Option<Vec<u8>> {
        let mut text = Vec::with_capacity(1024);
        text.extend_from_slice(endpoint.as_bytes());
        text.push(b'\n');
        normalized(request, true, &mut text);
        self.keys.body_digest(self.tenant_id, &text).ok()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        normalized(value, true, &mut out);
        out
    }

    #[test]
    fn the_same_request_in_another_order_or_from_another_user_is_the_same() {
        let a = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "a"});
        let b = json!({"user": "b", "messages": [{"content": "hi", "role": "user"}], "model": "m",
                       "metadata": {"run": 7}});
        assert_eq!(key(&a), key(&b));
        let c = json!({"model": "m", "messages": [{"role": "user", "content": "hi!"}]});
        assert_ne!(key(&a), key(&c));
        // Nested `user` fields are content, and stay.
        let d = json!({"model": "m", "messages": [{"role": "user", "content": "hi", "user": 1}]});
        assert_ne!(key(&a), key(&d));
        assert_ne!(key(&json!({"a": ["x", "y"]})), key(&json!({"a": ["x,y"]})));
    }

    fn answer(bytes: usize) -> Cached {
        Cached::new(
            Bytes::from(vec![b'x'; bytes]),
            false,
            None,
            Usage::default(),
            None,
            "t".into(),
        )
    }

    #[test]
    fn entries_live_their_ttl_within_their_bounds_and_go_when_the_flag_changes() {
        let cache = ResponseCache::default();
        let project = Uuid::now_v7();
        let flag = CacheFlag {
            ttl_seconds: 60,
            max_entries: 2,
        };
        for k in 0..3u8 {
            cache.put(project, flag, vec![k], answer(10));
        }
        // Two entries at most: the oldest went.
        assert!(cache.get(project, flag, &[0]).is_none());
        assert!(cache.get(project, flag, &[1]).is_some());
        assert!(cache.get(project, flag, &[2]).is_some());
        // Bytes are bounded too.
        cache.put(project, flag, vec![9], answer(MAX_PROJECT_BYTES - 5));
        assert!(cache.get(project, flag, &[2]).is_none());
        assert!(cache.get(project, flag, &[9]).is_some());
        cache.put(project, flag, vec![10], answer(MAX_PROJECT_BYTES + 1));
        assert!(cache.get(project, flag, &[10]).is_none());
        // Another flag: a fresh cache.
        let shorter = CacheFlag {
            ttl_seconds: 1,
            ..flag
        };
        assert!(cache.get(project, shorter, &[9]).is_none());
        cache.put(project, shorter, vec![1], answer(1));
        assert!(cache.get(project, shorter, &[1]).is_some());
        // Past its TTL, an entry is not served.
        let none = CacheFlag {
            ttl_seconds: 0,
            ..flag
        };
        cache.put(project, none, vec![1], answer(1));
        assert!(cache.get(project, none, &[1]).is_none());
    }
}
