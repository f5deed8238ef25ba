//! The keys of an archive file. Each file gets fresh data keys (DEKs): one for its footer, one for
//! its metadata columns, one for its record column. Each DEK is wrapped with a key-encryption key
//! derived from the tenant's data key (`loom_schemas::crypto::derive_kek`), and the wrapped DEK
//! travels in the file as Parquet key metadata in the format of Parquet's key tools (PKMT1, as
//! pyarrow's `CryptoFactory` and parquet-mr write and read it):
//!
//! ```json
//! {"keyMaterialType": "PKMT1", "internalStorage": true, "isFooterKey": false,
//!  "masterKeyID": "loom:<tenant>:v<version>:records", "wrappedDEK": "<base64>", "doubleWrapping": false}
//! ```
//!
//! The master key id names the tenant, the version of its data key and the purpose (`metadata`
//! or `records`). A reader resolves it through the key store ([`ArchiveKeys`]), or any KMS client
//! that can unwrap with the same KEK. A reader given only the `metadata` purpose aggregates over
//! the metadata columns but cannot read records (which hold the events, sealed bodies included);
//! erasing the tenant's keys makes every file unreadable.

use std::sync::Arc;

use loom_schemas::crypto::{self, derive_kek, random_bytes, wrap_key};
pub use loom_schemas::crypto::{MasterKeyId, Purpose};
use loom_schemas::keystore::{KeyStore, KeyStoreError};
use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::errors::ParquetError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Parquet key tools' key material (PKMT1), stored in the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyMaterial {
    key_material_type: String,
    internal_storage: bool,
    is_footer_key: bool,
    #[serde(
        rename = "kmsInstanceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    kms_instance_id: Option<String>,
    #[serde(
        rename = "kmsInstanceURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    kms_instance_url: Option<String>,
    #[serde(rename = "masterKeyID")]
    master_key_id: String,
    #[serde(rename = "wrappedDEK")]
    wrapped_dek: String,
    double_wrapping: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    KeyStore(#[from] KeyStoreError),
    #[error("{0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error("key metadata is not Loom's PKMT1 key material: {0}")]
    Material(String),
    #[error("the file's key belongs to tenant {found}, not to {expected}")]
    OtherTenant { found: Uuid, expected: Uuid },
    #[error("this reader may not read {0} (it holds the metadata key only)")]
    NotGranted(&'static str),
    #[error("building the encryption properties: {0}")]
    Parquet(#[from] ParquetError),
}

/// A DEK and the key material that names and wraps it.
struct WrappedKey {
    dek: Vec<u8>,
    metadata: Vec<u8>,
}

fn wrapped(keys: &KeyStore, id: MasterKeyId, footer: bool) -> Result<WrappedKey, KeyError> {
    let dek = random_bytes::<32>()?.to_vec();
    let kek = derive_kek(&keys.data_key(id.tenant, id.version)?, id.purpose.name());
    let label = id.to_string();
    let material = KeyMaterial {
        key_material_type: "PKMT1".into(),
        internal_storage: true,
        is_footer_key: footer,
        kms_instance_id: footer.then(|| "DEFAULT".into()),
        kms_instance_url: footer.then(|| "DEFAULT".into()),
        wrapped_dek: wrap_key(&kek, &dek, &label)?,
        master_key_id: label,
        double_wrapping: false,
    };
    let metadata = serde_json::to_vec(&material).map_err(|e| KeyError::Material(e.to_string()))?;
    Ok(WrappedKey { dek, metadata })
}

/// Encryption properties for a new file of `tenant`: fresh DEKs, the footer and `metadata_columns`
/// under the tenant's current metadata key, `record_column` under its records key. Every column
/// is encrypted, and so is the footer.
pub fn encryption_properties(
    keys: &KeyStore,
    tenant: Uuid,
    metadata_columns: &[&str],
    record_column: &str,
) -> Result<Arc<FileEncryptionProperties>, KeyError> {
    let version = keys.current_key(tenant)?.version;
    let id = |purpose| MasterKeyId {
        tenant,
        version,
        purpose,
    };
    let footer = wrapped(keys, id(Purpose::Metadata), true)?;
    let metadata = wrapped(keys, id(Purpose::Metadata), false)?;
    let records = wrapped(keys, id(Purpose::Records), false)?;
    let mut builder = FileEncryptionProperties::builder(footer.dek)
        .with_footer_key_metadata(footer.metadata)
        .with_column_key_and_metadata(record_column, records.dek, records.metadata);
    for column in metadata_columns {
        builder = builder.with_column_key_and_metadata(
            column,
            metadata.dek.clone(),
            metadata.metadata.clone(),
        );
    }
    Ok(builder.build()?)
}

/// Resolves an archive file's keys through the key store, for one tenant: a file of another
/// tenant, or a key of a purpose not granted, is refused.
pub struct ArchiveKeys {
    keys: Arc<KeyStore>,
    tenant: Uuid,
    records: bool,
    /// Keys unwrapped so far, by their key metadata: a reader is asked for the same few keys
    /// by every column chunk of every row group of a file.
    unwrapped: std::sync::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl ArchiveKeys {
    /// A reader of everything in `tenant`'s files.
    pub fn full(keys: Arc<KeyStore>, tenant: Uuid) -> ArchiveKeys {
        ArchiveKeys {
            keys,
            tenant,
            records: true,
            unwrapped: std::sync::Mutex::default(),
        }
    }

    /// A reader of the metadata columns only.
    pub fn metadata_only(keys: Arc<KeyStore>, tenant: Uuid) -> ArchiveKeys {
        ArchiveKeys {
            keys,
            tenant,
            records: false,
            unwrapped: std::sync::Mutex::default(),
        }
    }

    /// Whether the tenant's keys are destroyed (nothing of its files can be read).
    pub fn is_erased(&self) -> bool {
        self.keys.is_erased(self.tenant)
    }

    /// The DEK named by one piece of key metadata.
    pub fn unwrap(&self, key_metadata: &[u8]) -> Result<Vec<u8>, KeyError> {
        let material: KeyMaterial =
            serde_json::from_slice(key_metadata).map_err(|e| KeyError::Material(e.to_string()))?;
        if material.key_material_type != "PKMT1" || material.double_wrapping {
            return Err(KeyError::Material(format!(
                "{} with double wrapping {}",
                material.key_material_type, material.double_wrapping
            )));
        }
        let id = MasterKeyId::parse(&material.master_key_id)
            .ok_or_else(|| KeyError::Material(format!("master key {}", material.master_key_id)))?;
        if id.tenant != self.tenant {
            return Err(KeyError::OtherTenant {
                found: id.tenant,
                expected: self.tenant,
            });
        }
        if id.purpose == Purpose::Records && !self.records {
            return Err(KeyError::NotGranted("records"));
        }
        Ok(self.keys.unwrap_archive_key(&id, &material.wrapped_dek)?)
    }

    /// Decryption properties that resolve every key of a file through this reader.
    pub fn decryption_properties(self) -> Result<Arc<FileDecryptionProperties>, KeyError> {
        Ok(FileDecryptionProperties::with_key_retriever(Arc::new(self)).build()?)
    }
}

impl KeyRetriever for ArchiveKeys {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        let mut unwrapped = self
            .unwrapped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, key)) = unwrapped.iter().find(|(m, _)| m == key_metadata) {
            return Ok(key.clone());
        }
        let key = self
            .unwrap(key_metadata)
            .map_err(|e| ParquetError::General(e.to_string()))?;
        unwrapped.push((key_metadata.to_vec(), key.clone()));
        Ok(key)
    }
}
