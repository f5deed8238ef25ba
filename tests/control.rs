//! The gateway's in-memory control state and the projector's read models fold the control topic
//! by the same rules: for generated histories full of what no one may do, they agree key by key
//! and tenant by tenant, on SQLite and Postgres.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_gateway::Control;
use loom_projector::{Projector, ProjectorConfig, ReadStore, StoreLocation, stored_positions};
use loom_schemas::codec::Registry;
use loom_schemas::control::{ControlState, Refused};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Topic};
use loom_schemas::samples;
use loom_schemas::testing::{TestDatabase, chain_key};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

/// key id → (tenant id, project id, revoked)
type Keys = BTreeMap<String, (String, Option<String>, bool)>;
/// tenant id → erased
type Tenants = BTreeMap<String, bool>;

async fn projected(log: &Arc<dyn Log>, location: &StoreLocation) -> (Keys, Tenants) {
    let store = ReadStore::open(location, 1).await.unwrap();
    let shutdown = CancellationToken::new();
    let config = ProjectorConfig {
        batch: 7,
        ..ProjectorConfig::default()
    };
    let running =
        tokio::spawn(Projector::new(Arc::clone(log), store.clone(), config).run(shutdown.clone()));
    let end = log.end_offset(Topic::Control, 0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = stored_positions(&store, Topic::Control).await.unwrap();
        if stored.first().is_some_and(|p| p.offset >= end) {
            break;
        }
        assert!(Instant::now() < deadline, "the projector did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let keys = sqlx::query(
        "SELECT key_id, tenant_id, project_id, CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END FROM api_keys",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|row| {
        (
            row.get::<String, _>(0),
            (
                row.get::<String, _>(1),
                row.get::<Option<String>, _>(2),
                row.get::<i32, _>(3) == 1,
            ),
        )
    })
    .collect();
    let tenants =
        sqlx::query("SELECT tenant_id, CASE WHEN erased_at IS NULL THEN 0 ELSE 1 END FROM tenants")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<i32, _>(1) == 1))
            .collect();
    store.close().await;
    (keys, tenants)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_and_the_read_models_agree_on_every_key_and_tenant() {
    let registry = Registry::builtin().unwrap();
    let mut refusals = BTreeSet::new();
    for seed in 1..=4 {
        let events = samples::control_history(4, 400, seed);
        let mut rules = ControlState::default();
        for event in &events {
            if let Err(refused) = rules.apply(event) {
                refusals.insert(format!("{refused:?}"));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn Log> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"), chain_key()))
                .await
                .unwrap(),
        );
        let records: Vec<_> = events
            .iter()
            .map(|e| registry.encode_record(e).unwrap())
            .collect();
        let (first, rest) = records.split_at(records.len() / 2);
        log.append(Topic::Control, first.to_vec()).await.unwrap();
        let database = TestDatabase::create().await;
        let locations = [
            StoreLocation::Sqlite(dir.path().join("read-models")),
            StoreLocation::Postgres(database.url.clone().into()),
        ];
        // Half the history projected, then the rest by a projector that starts again from the
        // stored position: it must judge the rest against the state the first half left.
        for location in &locations {
            projected(&log, location).await;
        }
        log.append(Topic::Control, rest.to_vec()).await.unwrap();

        // The gateway's state, as a node folds it when it opens.
        let control = Control::load(log.as_ref()).await.unwrap();
        let (gateway_keys, gateway_tenants): (Keys, Tenants) = control.read(|state| {
            (
                state
                    .keys()
                    .map(|k| {
                        (
                            k.key_id.to_string(),
                            (
                                k.tenant_id.to_string(),
                                k.project_id.map(|p| p.to_string()),
                                k.revoked,
                            ),
                        )
                    })
                    .collect(),
                state
                    .tenants()
                    .map(|t| (t.tenant_id.to_string(), t.erased))
                    .collect(),
            )
        });
        assert!(gateway_keys.values().any(|k| k.2) && gateway_keys.values().any(|k| !k.2));
        // An erased tenant's keys leave the read models (its `tenants` row stays, marked); the
        // gateway keeps them in memory only to refuse them.
        let erased: BTreeSet<&String> = gateway_tenants
            .iter()
            .filter_map(|(tenant, erased)| erased.then_some(tenant))
            .collect();
        let gateway_keys: Keys = gateway_keys
            .into_iter()
            .filter(|(_, (tenant, _, _))| !erased.contains(tenant))
            .collect();

        for location in &locations {
            let (keys, tenants) = projected(&log, location).await;
            assert_eq!(keys, gateway_keys, "seed {seed}: keys");
            assert_eq!(tenants, gateway_tenants, "seed {seed}: tenants");
        }
        database.drop().await;
    }
    // The histories did probe every rule.
    for refused in [
        Refused::DuplicateTenant,
        Refused::UnknownTenant,
        Refused::ErasedTenant,
        Refused::DuplicateKey,
        Refused::UnknownKey,
        Refused::OtherTenantsKey,
        Refused::AlreadyRevoked,
        Refused::UnknownProject,
    ] {
        assert!(
            refusals.contains(&format!("{refused:?}")),
            "no {refused:?} in the histories: {refusals:?}"
        );
    }
}
