//! Tenant data keys, kept outside the log and wrapped by a master key.
//!
//! Each tenant has a data key (versioned: rotation adds a version, old versions still decrypt)
//! and a digest key (for keyed body digests). Both are stored wrapped with AES-256-GCM under the
//! master key — in a file in the data directory (embedded default) or in Postgres (production) —
//! and held unwrapped in memory, so the request path never does I/O for keys. Erasing a tenant
//! destroys its keys, which makes every body sealed for it unreadable wherever it was copied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{self, CryptoError, DataKey, FieldContext, KeyBytes};
use crate::event::Sealed;

/// The Postgres migrations (`migrations/postgres`), shared by every Loom component.
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

const MASTER_CHECK_AAD: &[u8] = b"loom.master-key-check.v1";
const MASTER_CHECK_PLAINTEXT: &[u8] = b"loom master key check";
const KEYS_FILE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(
        "the master key does not match the one this key store was created with; set LOOM_MASTER_KEY (or <data dir>/master.key) to the original key"
    )]
    WrongMasterKey,
    #[error("invalid master key: {0}")]
    InvalidMasterKey(String),
    #[error("tenant {0} has no keys")]
    UnknownTenant(Uuid),
    #[error("tenant {0} was erased; its keys are destroyed")]
    Erased(Uuid),
    #[error("key store {0} is damaged: {1}")]
    Damaged(String, String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key store database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("key store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("key store task failed: {0}")]
    Task(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeyStoreError {
    let context = context.into();
    move |source| KeyStoreError::Io { context, source }
}

/// Where the master key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    Environment,
    File(PathBuf),
    Generated(PathBuf),
}

/// The key that wraps every data key. Never printed.
#[derive(Clone, Debug)]
pub struct MasterKey(KeyBytes);

impl MasterKey {
    /// Parses 64 hex characters, or the standard base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<MasterKey, KeyStoreError> {
        use base64::Engine;
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())
            .ok_or_else(|| {
                KeyStoreError::InvalidMasterKey(
                    "expected 64 hex characters or base64 of 32 bytes".into(),
                )
            })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            KeyStoreError::InvalidMasterKey(format!("expected 32 bytes, got {}", b.len()))
        })?;
        Ok(MasterKey(KeyBytes::new(bytes)))
    }

    pub fn generate() -> Result<MasterKey, KeyStoreError> {
        Ok(MasterKey(KeyBytes::generate()?))
    }

    /// The key that authenticates the embedded log's chain heads (checkpoints and anchors):
    /// HKDF-SHA256 of the master key, so that neither reveals the other.
    pub fn chain_key(&self) -> crate::log::ChainKey {
        let mut okm = [0u8; 32];
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, self.0.expose());
        // 32 bytes is far below HKDF-SHA256's output limit: expand cannot fail here.
        let _ = hkdf.expand(b"loom.log.chain-key.v1", &mut okm);
        crate::log::ChainKey::new(okm)
    }

    /// The key that signs the query service's cursors: HKDF-SHA256 of the master key, the same
    /// on every instance that shares it.
    fn cursor_key(&self) -> KeyBytes {
        let mut okm = [0u8; 32];
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, self.0.expose());
        let _ = hkdf.expand(b"loom.query.cursor-key.v1", &mut okm);
        KeyBytes::new(okm)
    }

    /// The key from `from_env` if given, else from the file at `path` (`<data dir>/master.key`);
    /// `None` if neither exists (for readers, which never generate one).
    pub fn load(path: &Path, from_env: Option<&str>) -> Result<Option<MasterKey>, KeyStoreError> {
        if let Some(text) = from_env {
            return Ok(Some(Self::parse(text)?));
        }
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path)
            .map_err(io_error(format!("reading {}", path.display())))?;
        Ok(Some(Self::parse(&text)?))
    }

    /// The key from `from_env` (the value of `LOOM_MASTER_KEY`) if given, else from the file at
    /// `path`, generating that file (mode 0600) on first run.
    pub fn load_or_generate(
        path: &Path,
        from_env: Option<&str>,
    ) -> Result<(MasterKey, MasterKeySource), KeyStoreError> {
        if let Some(key) = Self::load(path, from_env)? {
            let source = match from_env {
                Some(_) => MasterKeySource::Environment,
                None => MasterKeySource::File(path.to_owned()),
            };
            return Ok((key, source));
        }
        let key = Self::generate()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        write_private_file(
            path,
            format!("{}\n", hex::encode(key.0.expose())).as_bytes(),
        )?;
        Ok((key, MasterKeySource::Generated(path.to_owned())))
    }

    fn wrap_aad(tenant_id: Uuid, key_id: Uuid, purpose: Purpose, version: u32) -> Vec<u8> {
        let mut aad = b"loom.key-wrap.v1".to_vec();
        aad.extend_from_slice(tenant_id.as_bytes());
        aad.extend_from_slice(key_id.as_bytes());
        aad.push(purpose as u8);
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }
}

/// Writes a file readable only by its owner, durably (temp file, fsync, rename).
fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), KeyStoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .map_err(io_error(format!("creating {}", tmp.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_error(format!("renaming {}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(format!("syncing {}", dir.display())))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
enum Purpose {
    Data = 1,
    Digest = 2,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Data => "data",
            Purpose::Digest => "digest",
        }
    }

    fn parse(s: &str) -> Option<Purpose> {
        match s {
            "data" => Some(Purpose::Data),
            "digest" => Some(Purpose::Digest),
            _ => None,
        }
    }
}

/// A key as persisted: wrapped under the master key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    tenant_id: Uuid,
    purpose: Purpose,
    version: u32,
    key_id: Uuid,
    #[serde(with = "hex_bytes")]
    wrapped: Vec<u8>,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// The key file of the embedded key store (`<data dir>/keys.json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    format: u32,
    #[serde(with = "hex_bytes")]
    master_check: Vec<u8>,
    keys: Vec<StoredKey>,
    erased: Vec<Uuid>,
}

enum Backend {
    File(PathBuf),
    Postgres(PgPool),
}

#[derive(Default)]
struct TenantKeys {
    data: BTreeMap<u32, DataKey>,
    digest: Option<KeyBytes>,
}

#[derive(Default)]
struct Keys {
    tenants: HashMap<Uuid, TenantKeys>,
    erased: HashSet<Uuid>,
}

/// Tenant keys, unwrapped in memory and persisted wrapped.
pub struct KeyStore {
    master: MasterKey,
    backend: Backend,
    keys: RwLock<Keys>,
    /// Serializes changes so the persisted state and the cache move together.
    changes: tokio::sync::Mutex<()>,
}

impl KeyStore {
    /// Opens the key file at `path`, creating it if absent.
    pub async fn open_file(path: PathBuf, master: MasterKey) -> Result<KeyStore, KeyStoreError> {
        let store = KeyStore {
            master,
            backend: Backend::File(path),
            keys: RwLock::default(),
            changes: tokio::sync::Mutex::new(()),
        };
        store.reload().await?;
        Ok(store)
    }

    /// Opens the key store in Postgres, applying Loom's migrations first.
    pub async fn open_postgres(pool: PgPool, master: MasterKey) -> Result<KeyStore, KeyStoreError> {
        POSTGRES_MIGRATOR.run(&pool).await?;
        let check = crypto::aead_seal(&master.0, MASTER_CHECK_AAD, MASTER_CHECK_PLAINTEXT)?;
        sqlx::query("INSERT INTO loom_key_store_meta (id, master_check) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
            .bind(check)
            .execute(&pool)
            .await?;
        let store = KeyStore {
            master,
            backend: Backend::Postgres(pool),
            keys: RwLock::default(),
            changes: tokio::sync::Mutex::new(()),
        };
        store.reload().await?;
        Ok(store)
    }

    /// Re-reads every key from the backend (another instance may have added some).
    pub async fn reload(&self) -> Result<(), KeyStoreError> {
        let (check, stored, erased) = self.load().await?;
        crypto::aead_open(&self.master.0, MASTER_CHECK_AAD, &check)
            .map_err(|_| KeyStoreError::WrongMasterKey)?;
        let mut keys = Keys {
            erased: erased.into_iter().collect(),
            ..Keys::default()
        };
        for key in stored {
            self.unwrap_into(&mut keys, &key)?;
        }
        *self.write_keys()? = keys;
        Ok(())
    }

    async fn load(&self) -> Result<(Vec<u8>, Vec<StoredKey>, Vec<Uuid>), KeyStoreError> {
        match &self.backend {
            Backend::File(path) => {
                let file = match read_keys_file(path.clone()).await? {
                    Some(file) => file,
                    None => {
                        let file = KeysFile {
                            format: KEYS_FILE_FORMAT,
                            master_check: crypto::aead_seal(
                                &self.master.0,
                                MASTER_CHECK_AAD,
                                MASTER_CHECK_PLAINTEXT,
                            )?,
                            keys: Vec::new(),
                            erased: Vec::new(),
                        };
                        write_keys_file(path.clone(), &file).await?;
                        file
                    }
                };
                Ok((file.master_check, file.keys, file.erased))
            }
            Backend::Postgres(pool) => {
                let check: Vec<u8> =
                    sqlx::query_scalar("SELECT master_check FROM loom_key_store_meta WHERE id = 1")
                        .fetch_one(pool)
                        .await?;
                let rows: Vec<(Uuid, String, i32, Uuid, Vec<u8>)> = sqlx::query_as(
                    "SELECT tenant_id, purpose, version, key_id, wrapped FROM loom_tenant_keys ORDER BY tenant_id, purpose, version",
                )
                .fetch_all(pool)
                .await?;
                let mut keys = Vec::with_capacity(rows.len());
                for (tenant_id, purpose, version, key_id, wrapped) in rows {
                    let damaged = || {
                        KeyStoreError::Damaged(
                            "loom_tenant_keys".into(),
                            format!("bad row for tenant {tenant_id}"),
                        )
                    };
                    keys.push(StoredKey {
                        tenant_id,
                        purpose: Purpose::parse(&purpose).ok_or_else(damaged)?,
                        version: u32::try_from(version).map_err(|_| damaged())?,
                        key_id,
                        wrapped,
                    });
                }
                let erased: Vec<Uuid> =
                    sqlx::query_scalar("SELECT tenant_id FROM loom_erased_tenants")
                        .fetch_all(pool)
                        .await?;
                Ok((check, keys, erased))
            }
        }
    }

    fn unwrap_into(&self, keys: &mut Keys, stored: &StoredKey) -> Result<(), KeyStoreError> {
        let aad = MasterKey::wrap_aad(
            stored.tenant_id,
            stored.key_id,
            stored.purpose,
            stored.version,
        );
        let raw = crypto::aead_open(&self.master.0, &aad, &stored.wrapped)
            .map_err(|_| KeyStoreError::WrongMasterKey)?;
        let raw: [u8; 32] = raw.try_into().map_err(|_| {
            KeyStoreError::Damaged(
                "key".into(),
                format!("tenant {} key is not 32 bytes", stored.tenant_id),
            )
        })?;
        let tenant = keys.tenants.entry(stored.tenant_id).or_default();
        match stored.purpose {
            Purpose::Digest => tenant.digest = Some(KeyBytes::new(raw)),
            Purpose::Data => {
                tenant.data.insert(
                    stored.version,
                    DataKey {
                        tenant_id: stored.tenant_id,
                        key_id: stored.key_id,
                        version: stored.version,
                        key: KeyBytes::new(raw),
                    },
                );
            }
        }
        Ok(())
    }

    fn wrap(
        &self,
        tenant_id: Uuid,
        key_id: Uuid,
        purpose: Purpose,
        version: u32,
        key: &KeyBytes,
    ) -> Result<StoredKey, KeyStoreError> {
        let aad = MasterKey::wrap_aad(tenant_id, key_id, purpose, version);
        Ok(StoredKey {
            tenant_id,
            purpose,
            version,
            key_id,
            wrapped: crypto::aead_seal(&self.master.0, &aad, key.expose())?,
        })
    }

    fn read_keys(&self) -> Result<std::sync::RwLockReadGuard<'_, Keys>, KeyStoreError> {
        self.keys
            .read()
            .map_err(|_| KeyStoreError::Task("key cache lock poisoned".into()))
    }

    fn write_keys(&self) -> Result<std::sync::RwLockWriteGuard<'_, Keys>, KeyStoreError> {
        self.keys
            .write()
            .map_err(|_| KeyStoreError::Task("key cache lock poisoned".into()))
    }

    /// Creates a tenant's data and digest keys; does nothing if it has them already.
    pub async fn create_tenant_keys(&self, tenant_id: Uuid) -> Result<(), KeyStoreError> {
        let _change = self.changes.lock().await;
        {
            let keys = self.read_keys()?;
            if keys.erased.contains(&tenant_id) {
                return Err(KeyStoreError::Erased(tenant_id));
            }
            if keys.tenants.contains_key(&tenant_id) {
                return Ok(());
            }
        }
        let key_id = Uuid::now_v7();
        let new = vec![
            self.wrap(tenant_id, key_id, Purpose::Data, 1, &KeyBytes::generate()?)?,
            self.wrap(
                tenant_id,
                key_id,
                Purpose::Digest,
                1,
                &KeyBytes::generate()?,
            )?,
        ];
        self.persist_new(&new).await
    }

    /// Adds a new version of the tenant's data key; new seals use it, old versions still open.
    pub async fn rotate(&self, tenant_id: Uuid) -> Result<u32, KeyStoreError> {
        let _change = self.changes.lock().await;
        let (key_id, version) = {
            let keys = self.read_keys()?;
            if keys.erased.contains(&tenant_id) {
                return Err(KeyStoreError::Erased(tenant_id));
            }
            let current = keys
                .tenants
                .get(&tenant_id)
                .and_then(|t| t.data.last_key_value())
                .ok_or(KeyStoreError::UnknownTenant(tenant_id))?;
            (current.1.key_id, current.0 + 1)
        };
        let new = vec![self.wrap(
            tenant_id,
            key_id,
            Purpose::Data,
            version,
            &KeyBytes::generate()?,
        )?];
        self.persist_new(&new).await?;
        Ok(version)
    }

    /// Destroys every key of the tenant. Irreversible: its sealed bodies become unreadable.
    pub async fn erase(&self, tenant_id: Uuid) -> Result<(), KeyStoreError> {
        let _change = self.changes.lock().await;
        match &self.backend {
            Backend::File(path) => {
                let mut file = read_keys_file(path.clone()).await?.ok_or_else(|| {
                    KeyStoreError::Damaged(path.display().to_string(), "file disappeared".into())
                })?;
                file.keys.retain(|k| k.tenant_id != tenant_id);
                if !file.erased.contains(&tenant_id) {
                    file.erased.push(tenant_id);
                }
                write_keys_file(path.clone(), &file).await?;
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM loom_tenant_keys WHERE tenant_id = $1")
                    .bind(tenant_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO loom_erased_tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(tenant_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        let mut keys = self.write_keys()?;
        keys.tenants.remove(&tenant_id);
        keys.erased.insert(tenant_id);
        Ok(())
    }

    async fn persist_new(&self, new: &[StoredKey]) -> Result<(), KeyStoreError> {
        match &self.backend {
            Backend::File(path) => {
                let mut file = read_keys_file(path.clone()).await?.ok_or_else(|| {
                    KeyStoreError::Damaged(path.display().to_string(), "file disappeared".into())
                })?;
                file.keys.extend(new.iter().cloned());
                write_keys_file(path.clone(), &file).await?;
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                for key in new {
                    // Another instance may have created the same version first: keep theirs.
                    sqlx::query(
                        "INSERT INTO loom_tenant_keys (tenant_id, purpose, version, key_id, wrapped) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(key.tenant_id)
                    .bind(key.purpose.as_str())
                    .bind(i32::try_from(key.version).unwrap_or(i32::MAX))
                    .bind(key.key_id)
                    .bind(&key.wrapped)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                return self.reload().await;
            }
        }
        let mut keys = self.write_keys()?;
        for key in new {
            self.unwrap_into(&mut keys, key)?;
        }
        Ok(())
    }

    pub fn is_erased(&self, tenant_id: Uuid) -> bool {
        self.read_keys()
            .is_ok_and(|k| k.erased.contains(&tenant_id))
    }

    /// The version new seals for this tenant use. In memory: no I/O.
    pub fn current_key(&self, tenant_id: Uuid) -> Result<DataKey, KeyStoreError> {
        let keys = self.read_keys()?;
        if keys.erased.contains(&tenant_id) {
            return Err(KeyStoreError::Erased(tenant_id));
        }
        keys.tenants
            .get(&tenant_id)
            .and_then(|t| t.data.last_key_value())
            .map(|(_, key)| key.clone())
            .ok_or(KeyStoreError::UnknownTenant(tenant_id))
    }

    /// An archive file's data key, `wrapped` under the tenant's key `id` names (what a KMS client
    /// of Parquet's key tools asks for: pyarrow's `KmsClient.unwrap_key`).
    pub fn unwrap_archive_key(
        &self,
        id: &crypto::MasterKeyId,
        wrapped: &str,
    ) -> Result<Vec<u8>, KeyStoreError> {
        let kek = crypto::derive_kek(&self.data_key(id.tenant, id.version)?, id.purpose.name());
        Ok(crypto::unwrap_key(&kek, wrapped, &id.to_string())?)
    }

    /// Version `version` of the tenant's data key (what older seals and archive files need).
    pub fn data_key(&self, tenant_id: Uuid, version: u32) -> Result<DataKey, KeyStoreError> {
        let keys = self.read_keys()?;
        if keys.erased.contains(&tenant_id) {
            return Err(KeyStoreError::Erased(tenant_id));
        }
        let tenant = keys
            .tenants
            .get(&tenant_id)
            .ok_or(KeyStoreError::UnknownTenant(tenant_id))?;
        let missing = CryptoError::KeyUnavailable {
            key_id: Uuid::nil(),
            version,
        };
        tenant.data.get(&version).cloned().ok_or(missing.into())
    }

    /// The key pagination cursors are signed with ([`crypto::tag`]), derived from the master
    /// key: a cursor one instance gave is good on every other.
    pub fn cursor_key(&self) -> KeyBytes {
        self.master.cursor_key()
    }

    /// The tenant's digest key, for [`crypto::body_digest`].
    pub fn digest_key(&self, tenant_id: Uuid) -> Result<KeyBytes, KeyStoreError> {
        let keys = self.read_keys()?;
        if keys.erased.contains(&tenant_id) {
            return Err(KeyStoreError::Erased(tenant_id));
        }
        keys.tenants
            .get(&tenant_id)
            .and_then(|t| t.digest.clone())
            .ok_or(KeyStoreError::UnknownTenant(tenant_id))
    }

    /// Seals a field of an event with the tenant's current data key.
    pub fn seal(&self, ctx: &FieldContext<'_>, plaintext: &[u8]) -> Result<Sealed, KeyStoreError> {
        let key = self.current_key(ctx.tenant_id)?;
        Ok(crypto::seal(&key, ctx, plaintext)?)
    }

    /// Opens a sealed field with whichever key version sealed it.
    pub fn open(&self, ctx: &FieldContext<'_>, sealed: &Sealed) -> Result<Vec<u8>, KeyStoreError> {
        let (key_id, version) = crypto::sealed_key_ref(sealed)?;
        let key = {
            let keys = self.read_keys()?;
            if keys.erased.contains(&ctx.tenant_id) {
                return Err(KeyStoreError::Erased(ctx.tenant_id));
            }
            keys.tenants
                .get(&ctx.tenant_id)
                .and_then(|t| t.data.get(&version))
                .filter(|k| k.key_id == key_id)
                .cloned()
                .ok_or(CryptoError::KeyUnavailable { key_id, version })?
        };
        Ok(crypto::open(&key, ctx, sealed)?)
    }

    /// The body digest of `body` under the tenant's digest key.
    pub fn body_digest(&self, tenant_id: Uuid, body: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        Ok(crypto::body_digest(&self.digest_key(tenant_id)?, body)?)
    }
}

async fn read_keys_file(path: PathBuf) -> Result<Option<KeysFile>, KeyStoreError> {
    tokio::task::spawn_blocking(move || {
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
        };
        let file: KeysFile = serde_json::from_slice(&text)
            .map_err(|e| KeyStoreError::Damaged(path.display().to_string(), e.to_string()))?;
        if file.format != KEYS_FILE_FORMAT {
            return Err(KeyStoreError::Damaged(
                path.display().to_string(),
                format!("format {} is not {KEYS_FILE_FORMAT}", file.format),
            ));
        }
        Ok(Some(file))
    })
    .await
    .map_err(|e| KeyStoreError::Task(e.to_string()))?
}

async fn write_keys_file(path: PathBuf, file: &KeysFile) -> Result<(), KeyStoreError> {
    let json = serde_json::to_vec_pretty(file)
        .map_err(|e| KeyStoreError::Damaged(path.display().to_string(), e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        write_private_file(&path, &json)
    })
    .await
    .map_err(|e| KeyStoreError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;

    use super::*;

    type Opener =
        Box<dyn Fn(MasterKey) -> Pin<Box<dyn Future<Output = Result<KeyStore, KeyStoreError>>>>>;

    fn ctx(tenant_id: Uuid, event_id: Uuid) -> FieldContext<'static> {
        FieldContext {
            tenant_id,
            event_id,
            field: "body",
        }
    }

    /// The behaviour every backend must have; `open` opens the same store again each time.
    async fn backend_suite(open: Opener) {
        let master = MasterKey::generate().unwrap();
        let store = open(master.clone()).await.unwrap();
        let (acme, globex) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(matches!(
            store.current_key(acme),
            Err(KeyStoreError::UnknownTenant(_))
        ));
        store.create_tenant_keys(acme).await.unwrap();
        store.create_tenant_keys(acme).await.unwrap();
        store.create_tenant_keys(globex).await.unwrap();

        let event = Uuid::now_v7();
        let v1 = store.seal(&ctx(acme, event), b"prompt one").unwrap();
        assert_eq!(crypto::sealed_key_ref(&v1).unwrap().1, 1);
        assert_eq!(store.rotate(acme).await.unwrap(), 2);
        let v2 = store.seal(&ctx(acme, event), b"prompt two").unwrap();
        assert_eq!(crypto::sealed_key_ref(&v2).unwrap().1, 2);
        let digest = store.body_digest(acme, b"same prompt").unwrap();
        assert_ne!(digest, store.body_digest(globex, b"same prompt").unwrap());
        // Another tenant's key cannot open it, even when asked to.
        assert!(store.open(&ctx(globex, event), &v1).is_err());

        // Everything survives a restart: old versions still open, digests stay the same.
        drop(store);
        let store = open(master.clone()).await.unwrap();
        assert_eq!(store.open(&ctx(acme, event), &v1).unwrap(), b"prompt one");
        assert_eq!(store.open(&ctx(acme, event), &v2).unwrap(), b"prompt two");
        assert_eq!(store.body_digest(acme, b"same prompt").unwrap(), digest);
        assert_eq!(store.current_key(acme).unwrap().version, 2);

        // Erasure destroys the keys: nothing of the tenant opens again, before or after restart.
        let globex_sealed = store.seal(&ctx(globex, event), b"globex prompt").unwrap();
        store.erase(acme).await.unwrap();
        assert!(matches!(
            store.open(&ctx(acme, event), &v1),
            Err(KeyStoreError::Erased(_))
        ));
        assert!(matches!(
            store.create_tenant_keys(acme).await,
            Err(KeyStoreError::Erased(_))
        ));
        assert!(matches!(
            store.rotate(acme).await,
            Err(KeyStoreError::Erased(_))
        ));
        drop(store);
        let store = open(master).await.unwrap();
        assert!(store.is_erased(acme));
        assert!(store.open(&ctx(acme, event), &v2).is_err());
        assert_eq!(
            store.open(&ctx(globex, event), &globex_sealed).unwrap(),
            b"globex prompt"
        );

        // A different master key is refused at open.
        drop(store);
        let wrong = open(MasterKey::generate().unwrap()).await;
        assert!(
            matches!(wrong, Err(KeyStoreError::WrongMasterKey)),
            "{:?}",
            wrong.err()
        );
    }

    #[tokio::test]
    async fn file_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let opener_path = path.clone();
        backend_suite(Box::new(move |master| {
            Box::pin(KeyStore::open_file(opener_path.clone(), master))
        }))
        .await;
        // Only wrapped keys are on disk, and the erased tenant's are gone from the file.
        let text = std::fs::read_to_string(&path).unwrap();
        let file: KeysFile = serde_json::from_str(&text).unwrap();
        assert_eq!(file.erased.len(), 1);
        assert!(file.keys.iter().all(|k| k.tenant_id != file.erased[0]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[tokio::test]
    async fn postgres_backend() {
        let db = crate::testing::TestDatabase::create().await;
        let url = db.url.clone();
        backend_suite(Box::new(move |master| {
            let url = url.clone();
            Box::pin(
                async move { KeyStore::open_postgres(PgPool::connect(&url).await?, master).await },
            )
        }))
        .await;
        let pool = PgPool::connect(&db.url).await.unwrap();
        let erased: i64 = sqlx::query_scalar("SELECT count(*) FROM loom_erased_tenants")
            .fetch_one(&pool)
            .await
            .unwrap();
        let orphaned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM loom_tenant_keys k JOIN loom_erased_tenants e USING (tenant_id)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((erased, orphaned), (1, 0));
        pool.close().await;
        db.drop().await;
    }

    #[test]
    fn master_keys_load_generate_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (generated, source) =
            MasterKey::load_or_generate(&dir.path().join("master.key"), None).unwrap();
        assert_eq!(
            source,
            MasterKeySource::Generated(dir.path().join("master.key"))
        );
        let (loaded, source) =
            MasterKey::load_or_generate(&dir.path().join("master.key"), None).unwrap();
        assert_eq!(source, MasterKeySource::File(dir.path().join("master.key")));
        assert_eq!(generated.0.expose(), loaded.0.expose());

        let hex_key = "00".repeat(32);
        let (from_env, source) =
            MasterKey::load_or_generate(&dir.path().join("master.key"), Some(&hex_key)).unwrap();
        assert_eq!(source, MasterKeySource::Environment);
        assert_eq!(from_env.0.expose(), &[0u8; 32]);
        assert!(MasterKey::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        for bad in ["", "abc", &"00".repeat(31), "not a key at all"] {
            assert!(
                matches!(
                    MasterKey::parse(bad),
                    Err(KeyStoreError::InvalidMasterKey(_))
                ),
                "{bad}"
            );
        }
        assert!(!format!("{generated:?}").contains(&hex::encode(generated.0.expose())));
    }
}
