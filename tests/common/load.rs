//! Clients that keep a gateway busy with a mix of requests — chat, streams, tool calls,
//! Anthropic streams, embeddings, some answered only after an upstream retry — and note which
//! requests were answered whole, for the tests that kill processes under load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loom_schemas::codec::Registry;
use loom_schemas::event::{Payload, RequestStatus};
use loom_schemas::log::{Entry, KafkaLog, KafkaLogConfig, Log, Topic};
use serde_json::{Value, json};

/// Who to load, and how.
#[derive(Clone)]
pub struct Load {
    /// The gateway, `http://host:port`.
    pub base: String,
    pub key: String,
    /// The mock upstream, to inject faults that make the gateway retry.
    pub mock: String,
    pub clients: usize,
    /// Prefix of the trace ids, unique per run.
    pub tag: String,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Trace ids of the requests answered 2xx and received whole.
    pub answered: Vec<String>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// When each 503 came.
    pub unavailable_at: Vec<Instant>,
    pub transport_errors: u64,
    /// Requests that got no answer within the client's timeout (30 s): a hang.
    pub timeouts: u64,
    /// The slowest answer received whole.
    pub slowest: Duration,
}

const TOOLS: &str = r#"[{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]"#;

impl Load {
    /// Runs the clients until `stop` is set — or, with `until_gone`, until the gateway stops
    /// answering (it was killed).
    pub async fn run(&self, stop: Arc<AtomicBool>, until_gone: bool) -> Tally {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let clients: Vec<_> = (0..self.clients)
            .map(|id| {
                let (load, client, stop) = (self.clone(), client.clone(), Arc::clone(&stop));
                tokio::spawn(async move { load.client(id, client, stop, until_gone).await })
            })
            .collect();
        let mut tally = Tally::default();
        for client in clients {
            let one = client.await.unwrap();
            tally.answered.extend(one.answered);
            for (status, n) in one.statuses {
                *tally.statuses.entry(status).or_default() += n;
            }
            tally.unavailable_at.extend(one.unavailable_at);
            tally.transport_errors += one.transport_errors;
            tally.timeouts += one.timeouts;
            tally.slowest = tally.slowest.max(one.slowest);
        }
        tally
    }

    async fn client(
        &self,
        id: usize,
        client: reqwest::Client,
        stop: Arc<AtomicBool>,
        until_gone: bool,
    ) -> Tally {
        let mut tally = Tally::default();
        let tools: Value = serde_json::from_str(TOOLS).unwrap();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let trace = format!("{}-c{id}-{n}", self.tag);
            if n.is_multiple_of(5) {
                // The next upstream call fails once: the gateway retries it.
                let _ = client
                    .post(format!("{}/mock/faults", self.mock))
                    .json(&json!({"faults": [{"kind": "status", "status": 500}]}))
                    .send()
                    .await;
            }
            let messages =
                json!([{"role": "user", "content": format!("request {n} of client {id}")}]);
            let (path, body, stream) = match n % 5 {
                0 => (
                    "/v1/chat/completions",
                    json!({"model": "fast", "messages": messages}),
                    false,
                ),
                1 => (
                    "/v1/chat/completions",
                    json!({"model": "fast", "stream": true, "messages": messages}),
                    true,
                ),
                2 => (
                    "/v1/chat/completions",
                    json!({"model": "fast", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": tools}),
                    false,
                ),
                3 => (
                    "/v1/messages",
                    json!({"model": "fast", "max_tokens": 100, "stream": true, "messages": messages}),
                    true,
                ),
                _ => (
                    "/v1/embeddings",
                    json!({"model": "fast", "input": format!("text {n}")}),
                    false,
                ),
            };
            let started = Instant::now();
            let sent = client
                .post(format!("{}{path}", self.base))
                .bearer_auth(&self.key)
                .header("x-request-id", &trace)
                .json(&body)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(error) => {
                    tally.transport_errors += 1;
                    tally.timeouts += u64::from(error.is_timeout());
                    if until_gone {
                        return tally;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            *tally.statuses.entry(status).or_default() += 1;
            if status == 503 {
                tally.unavailable_at.push(Instant::now());
            }
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(error) => {
                    tally.transport_errors += 1;
                    tally.timeouts += u64::from(error.is_timeout());
                    if until_gone {
                        return tally;
                    }
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            let whole = if stream {
                text.ends_with("data: [DONE]\n\n") || text.contains("event: message_stop")
            } else {
                serde_json::from_slice::<Value>(&bytes).is_ok()
            };
            if (200..300).contains(&status) && whole {
                tally.answered.push(trace);
                tally.slowest = tally.slowest.max(started.elapsed());
            }
        }
        tally
    }
}

/// What the log holds of one request.
#[derive(Debug, Default)]
pub struct Trail {
    /// `request.completed` events (distinct event ids), with their status and attempts.
    pub completed: HashMap<String, (RequestStatus, i32)>,
    /// Distinct `llm_call.completed` event ids.
    pub calls: HashSet<String>,
}

/// Folds log entries into each trace's trail (duplicates, as Kafka may hold, count once).
pub fn trails(entries: &[Entry]) -> HashMap<String, Trail> {
    let registry = Registry::builtin().unwrap();
    let mut trails: HashMap<String, Trail> = HashMap::new();
    for entry in entries {
        let event = registry.decode(&entry.record.value).unwrap();
        let Some(trace) = event.envelope.trace_id.clone() else {
            continue;
        };
        let trail = trails.entry(trace).or_default();
        let id = event.envelope.event_id.to_string();
        match event.payload {
            Payload::RequestCompleted(done) => {
                trail.completed.insert(id, (done.status, done.attempts));
            }
            Payload::LlmCallCompleted(_) => {
                trail.calls.insert(id);
            }
            _ => {}
        }
    }
    trails
}

/// Asserts that every answered trace has its `request.completed` (ok) and every attempt it
/// counts in `trails`.
pub fn assert_recorded(answered: &[String], trails: &HashMap<String, Trail>) {
    let mut missing = Vec::new();
    for trace in answered {
        let Some(trail) = trails.get(trace) else {
            missing.push(format!("{trace}: no events"));
            continue;
        };
        let completed: Vec<_> = trail.completed.values().collect();
        match completed.as_slice() {
            [(RequestStatus::Ok, attempts)] if *attempts as usize == trail.calls.len() => {}
            _ => missing.push(format!(
                "{trace}: completed {completed:?}, {} attempts recorded",
                trail.calls.len()
            )),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} answered requests are not fully recorded: {missing:?}",
        missing.len(),
        answered.len()
    );
}

/// The records of `partition` of `topic` from offset `from` to its end.
pub async fn read_partition(log: &dyn Log, topic: Topic, partition: u32, from: u64) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut reader = log.read_from(topic, partition, from).await.unwrap();
    loop {
        let batch = reader.poll(2000).await.unwrap();
        if batch.is_empty() {
            return entries;
        }
        entries.extend(batch);
    }
}

/// Every record of a Kafka topic's partitions.
pub async fn kafka_entries(log: &KafkaLog, topic: Topic) -> Vec<Entry> {
    let mut entries = Vec::new();
    for partition in 0..log.partitions(topic) {
        entries.extend(read_partition(log, topic, partition, 0).await);
    }
    entries
}

/// The data topic of a Kafka log as read so far: each [`LogTail::read_on`] reads only what was
/// appended since, so that waiting on a long log does not read it whole again and again.
pub struct LogTail {
    log: KafkaLog,
    next: Vec<u64>,
    entries: Vec<Entry>,
}

impl LogTail {
    pub async fn open(brokers: &str, prefix: &str) -> LogTail {
        let mut kafka = KafkaLogConfig::new(brokers);
        kafka.topic_prefix = prefix.into();
        kafka.create_topics = false;
        let log = KafkaLog::connect(kafka).await.unwrap();
        let next = vec![0; log.partitions(Topic::Data) as usize];
        LogTail {
            log,
            next,
            entries: Vec::new(),
        }
    }

    /// Every entry of the data topic so far.
    pub async fn read_on(&mut self) -> &[Entry] {
        for (partition, next) in self.next.iter_mut().enumerate() {
            let partition = u32::try_from(partition).unwrap();
            let read = read_partition(&self.log, Topic::Data, partition, *next).await;
            if let Some(last) = read.last() {
                *next = last.position.offset + 1;
            }
            self.entries.extend(read);
        }
        &self.entries
    }
}

/// Waits until every answered request's `request.completed` is in Kafka (spools drain after a
/// restart), then asserts each has every attempt too.
pub async fn assert_in_kafka(brokers: &str, prefix: &str, answered: &[String]) {
    assert_in_log(&mut LogTail::open(brokers, prefix).await, answered).await;
}

/// [`assert_in_kafka`], reading on from where `tail` stands.
pub async fn assert_in_log(tail: &mut LogTail, answered: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let trails = trails(tail.read_on().await);
        let missing = answered
            .iter()
            .filter(|t| trails.get(*t).is_none_or(|t| t.completed.is_empty()))
            .count();
        if missing == 0 || Instant::now() > deadline {
            assert_recorded(answered, &trails);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `trace_id → (status, attempts, llm_calls rows, traces rows)` in the read models, whose tables
/// are `{schema}traces` and `{schema}llm_calls`.
pub async fn read_models(
    pool: &sqlx::AnyPool,
    schema: &str,
) -> HashMap<String, (String, i64, i64, i64)> {
    let rows: Vec<(String, Option<String>, Option<i64>, i64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT trace_id, MAX(status), MAX(attempts), COUNT(*) FROM {schema}traces GROUP BY trace_id"
        )))
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let calls: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT trace_id, COUNT(*) FROM {schema}llm_calls GROUP BY trace_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let calls: HashMap<String, i64> = calls.into_iter().collect();
    rows.into_iter()
        .map(|(trace, status, attempts, rows)| {
            let calls = calls.get(&trace).copied().unwrap_or(0);
            (
                trace,
                (
                    status.unwrap_or_default(),
                    attempts.unwrap_or(0),
                    calls,
                    rows,
                ),
            )
        })
        .collect()
}

/// Waits until the read models at `url` (tables in `schema`) hold every answered trace, each
/// once, completed, with every attempt.
pub async fn assert_in_read_models(url: &str, schema: &str, answered: &[String]) {
    sqlx::any::install_default_drivers();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let models = match sqlx::AnyPool::connect(url).await {
            Ok(pool) => {
                let models = read_models(&pool, schema).await;
                pool.close().await;
                models
            }
            Err(_) => HashMap::new(),
        };
        let wrong: Vec<_> = answered
            .iter()
            .filter(|trace| {
                !matches!(models.get(*trace), Some((status, attempts, calls, 1))
                    if status == "ok" && attempts == calls)
            })
            .map(|trace| (trace, models.get(trace)))
            .collect();
        if wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} answered requests are not (once, whole) in the read models: {:?}",
            wrong.len(),
            answered.len(),
            &wrong[..wrong.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
