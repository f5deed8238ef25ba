//! Field encryption, keyed digests and API-key hashing.
//!
//! A sealed field is AES-256-GCM ciphertext with a self-describing header:
//!
//! ```text
//! [format u8 = 1][key id: 16 bytes][key version: u32 BE][nonce: 12 bytes][ciphertext][tag: 16]
//! ```
//!
//! The associated data binds the header, the tenant id, the event id and the field name, so a
//! ciphertext copied into another field, event or tenant fails to open.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::event::Sealed;

/// Version of the sealed-field format.
pub const SEALED_FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const SEALED_HEADER_LEN: usize = 1 + 16 + 4 + NONCE_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("sealed field is malformed ({0})")]
    Malformed(&'static str),
    #[error("sealed field has format {0}; this build reads format {SEALED_FORMAT}")]
    UnknownFormat(u8),
    #[error("no key {key_id} version {version} for this tenant (erased, or never existed here)")]
    KeyUnavailable { key_id: Uuid, version: u32 },
    #[error(
        "decryption failed: wrong key, or the ciphertext was altered or moved to another field, event or tenant"
    )]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
    #[error("the operating system's random number generator failed")]
    Random,
}

/// Fills a fresh array from the thread's CSPRNG (`rand`'s ChaCha12, seeded and reseeded from the
/// operating system): for nonces, which every sealed field needs, without a system call each.
fn nonce() -> [u8; NONCE_LEN] {
    let mut bytes = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    bytes
}

/// Fills a fresh array from the operating system's CSPRNG: for keys.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|_| CryptoError::Random)?;
    Ok(bytes)
}

/// 32 bytes of secret key material, wiped on drop and never printed.
#[derive(Clone)]
pub struct KeyBytes(Zeroizing<[u8; 32]>);

impl KeyBytes {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self::new(random_bytes()?))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(<redacted>)")
    }
}

/// AES-256-GCM with a random nonce; returns `nonce || ciphertext || tag`.
pub(crate) fn aead_seal(
    key: &KeyBytes,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce_bytes = nonce();
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(plaintext);
    let cipher = Aes256Gcm::new(key.expose().into());
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::from(nonce_bytes),
            aad,
            (&mut out[NONCE_LEN..]).into(),
        )
        .map_err(|_| CryptoError::Encrypt)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens what [`aead_seal`] produced.
pub(crate) fn aead_open(key: &KeyBytes, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("too short"));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| CryptoError::Malformed("nonce"))?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Malformed("tag"))?;
    let mut plaintext = ciphertext.to_vec();
    let cipher = Aes256Gcm::new(key.expose().into());
    cipher
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            aad,
            plaintext.as_mut_slice().into(),
            &tag.into(),
        )
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(plaintext)
}

/// One version of a tenant's data key.
#[derive(Clone, Debug)]
pub struct DataKey {
    pub tenant_id: Uuid,
    pub key_id: Uuid,
    pub version: u32,
    pub key: KeyBytes,
}

/// Where a sealed field lives: bound into its associated data.
#[derive(Debug, Clone, Copy)]
pub struct FieldContext<'a> {
    pub tenant_id: Uuid,
    pub event_id: Uuid,
    pub field: &'a str,
}

fn field_aad(header: &[u8], ctx: &FieldContext<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 32 + 4 + ctx.field.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(ctx.tenant_id.as_bytes());
    aad.extend_from_slice(ctx.event_id.as_bytes());
    aad.extend_from_slice(&(ctx.field.len() as u32).to_be_bytes());
    aad.extend_from_slice(ctx.field.as_bytes());
    aad
}

/// Seals `plaintext` for the field `ctx` with the tenant's data key.
pub fn seal(
    key: &DataKey,
    ctx: &FieldContext<'_>,
    plaintext: &[u8],
) -> Result<Sealed, CryptoError> {
    let mut header = Vec::with_capacity(SEALED_HEADER_LEN - NONCE_LEN);
    header.push(SEALED_FORMAT);
    header.extend_from_slice(key.key_id.as_bytes());
    header.extend_from_slice(&key.version.to_be_bytes());
    let body = aead_seal(&key.key, &field_aad(&header, ctx), plaintext)?;
    header.extend_from_slice(&body);
    Ok(Sealed(header))
}

/// The key a sealed field names: (key id, key version).
pub fn sealed_key_ref(sealed: &Sealed) -> Result<(Uuid, u32), CryptoError> {
    let bytes = &sealed.0;
    if bytes.len() < SEALED_HEADER_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("too short"));
    }
    if bytes[0] != SEALED_FORMAT {
        return Err(CryptoError::UnknownFormat(bytes[0]));
    }
    let key_id = Uuid::from_slice(&bytes[1..17]).map_err(|_| CryptoError::Malformed("key id"))?;
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[17..21]);
    Ok((key_id, u32::from_be_bytes(version)))
}

/// Opens a sealed field with `key`, which must be the version the header names.
pub fn open(
    key: &DataKey,
    ctx: &FieldContext<'_>,
    sealed: &Sealed,
) -> Result<Vec<u8>, CryptoError> {
    let (key_id, version) = sealed_key_ref(sealed)?;
    if key_id != key.key_id || version != key.version || key.tenant_id != ctx.tenant_id {
        return Err(CryptoError::KeyUnavailable { key_id, version });
    }
    let header = &sealed.0[..SEALED_HEADER_LEN - NONCE_LEN];
    aead_open(&key.key, &field_aad(header, ctx), &sealed.0[header.len()..])
}

/// HMAC-SHA256 of a body under a tenant's digest key: equal bodies of different tenants differ.
pub fn body_digest(digest_key: &KeyBytes, body: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(digest_key.expose())
        .map_err(|_| CryptoError::Malformed("digest key"))?;
    mac.update(body);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// A tag authenticating `message` under `key`: HMAC-SHA256, its first 16 bytes.
pub fn tag(key: &KeyBytes, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut tag = body_digest(key, message)?;
    tag.truncate(16);
    Ok(tag)
}

/// Whether `tag` is [`tag`] of `message` under `key`, compared in constant time.
pub fn verify_tag(key: &KeyBytes, message: &[u8], tag: &[u8]) -> bool {
    let Ok(mut mac) = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.expose()) else {
        return false;
    };
    mac.update(message);
    tag.len() == 16 && mac.verify_truncated_left(tag).is_ok()
}

/// A key-encryption key derived from one version of a tenant's data key for `purpose`
/// (HKDF-SHA256): the archive wraps its files' data keys with it, so that erasing the tenant's
/// keys leaves every file unreadable.
pub fn derive_kek(data_key: &DataKey, purpose: &str) -> KeyBytes {
    let mut okm = [0u8; 32];
    let hkdf =
        hkdf::Hkdf::<Sha256>::new(Some(data_key.tenant_id.as_bytes()), data_key.key.expose());
    let info = format!("loom.kek.v1/{purpose}");
    // 32 bytes is far below HKDF-SHA256's output limit: expand cannot fail here.
    let _ = hkdf.expand(info.as_bytes(), &mut okm);
    KeyBytes::new(okm)
}

/// `key` wrapped under `kek` (AES-256-GCM, bound to `label`), as base64 of nonce ‖ ciphertext ‖
/// tag: how a key-management service hands out a wrapped data key.
pub fn wrap_key(kek: &KeyBytes, key: &[u8], label: &str) -> Result<String, CryptoError> {
    let wrapped = aead_seal(kek, label.as_bytes(), key)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(wrapped))
}

/// What an archive key protects. The archive's key-encryption keys are derived from a tenant's
/// data key per purpose; [`MasterKeyId`] names one (`loom:<tenant>:v<version>:<purpose>`, the
/// master key id of Parquet's key tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The footer and the metadata columns: enough to filter and aggregate.
    Metadata,
    /// The record column: every event whole, sealed bodies included.
    Records,
}

impl Purpose {
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Metadata => "metadata",
            Purpose::Records => "records",
        }
    }

    fn parse(text: &str) -> Option<Purpose> {
        match text {
            "metadata" => Some(Purpose::Metadata),
            "records" => Some(Purpose::Records),
            _ => None,
        }
    }
}

/// Which of a tenant's keys wraps a DEK: `loom:<tenant>:v<version>:<purpose>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterKeyId {
    pub tenant: Uuid,
    pub version: u32,
    pub purpose: Purpose,
}

impl MasterKeyId {
    pub fn parse(text: &str) -> Option<MasterKeyId> {
        let mut parts = text.split(':');
        let (Some("loom"), Some(tenant), Some(version), Some(purpose), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        Some(MasterKeyId {
            tenant: tenant.parse().ok()?,
            version: version.strip_prefix('v')?.parse().ok()?,
            purpose: Purpose::parse(purpose)?,
        })
    }
}

impl std::fmt::Display for MasterKeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loom:{}:v{}:{}",
            self.tenant,
            self.version,
            self.purpose.name()
        )
    }
}

/// The key [`wrap_key`] wrapped; fails on another KEK or label, or an altered text.
pub fn unwrap_key(kek: &KeyBytes, wrapped: &str, label: &str) -> Result<Vec<u8>, CryptoError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(wrapped)
        .map_err(|_| CryptoError::Malformed("wrapped key is not base64"))?;
    aead_open(kek, label.as_bytes(), &bytes)
}

/// Prefix of every Loom API key.
pub const API_KEY_PREFIX: &str = "loom-";
/// How many characters of a key are kept for display.
pub const API_KEY_DISPLAY_LEN: usize = 12;

/// A freshly generated API key: the secret is shown to the user once; only hash and prefix are kept.
pub struct NewApiKey {
    pub secret: Zeroizing<String>,
    pub hash: [u8; 32],
    pub prefix: String,
}

impl NewApiKey {
    pub fn generate() -> Result<NewApiKey, CryptoError> {
        let random: Zeroizing<[u8; 32]> = Zeroizing::new(random_bytes()?);
        let secret = Zeroizing::new(format!(
            "{API_KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*random)
        ));
        Ok(NewApiKey {
            hash: hash_api_key(&secret),
            prefix: display_prefix(&secret),
            secret,
        })
    }
}

/// SHA-256 of an API key, the only form in which keys are stored.
pub fn hash_api_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The first characters of a key, safe to show in listings.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(API_KEY_DISPLAY_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant_id: Uuid, version: u32) -> DataKey {
        DataKey {
            tenant_id,
            key_id: Uuid::now_v7(),
            version,
            key: KeyBytes::generate().unwrap(),
        }
    }

    #[test]
    fn wrapped_keys_open_only_with_their_kek_and_label() {
        let data = key(Uuid::now_v7(), 1);
        let kek = derive_kek(&data, "records");
        assert_ne!(kek.expose(), derive_kek(&data, "metadata").expose());
        assert_eq!(kek.expose(), derive_kek(&data, "records").expose());
        let wrapped = wrap_key(&kek, b"0123456789abcdef", "label-a").unwrap();
        assert_eq!(
            unwrap_key(&kek, &wrapped, "label-a").unwrap(),
            b"0123456789abcdef"
        );
        assert!(unwrap_key(&kek, &wrapped, "label-b").is_err());
        assert!(unwrap_key(&derive_kek(&data, "metadata"), &wrapped, "label-a").is_err());
        assert!(unwrap_key(&kek, "not base64!", "label-a").is_err());
    }

    #[test]
    fn seal_and_open_round_trip() {
        let tenant = Uuid::now_v7();
        let key = key(tenant, 3);
        let ctx = FieldContext {
            tenant_id: tenant,
            event_id: Uuid::now_v7(),
            field: "body",
        };
        let sealed = seal(&key, &ctx, b"hello prompt").unwrap();
        assert!(!sealed.0.windows(12).any(|w| w == b"hello prompt"));
        assert_eq!(sealed_key_ref(&sealed).unwrap(), (key.key_id, 3));
        assert_eq!(open(&key, &ctx, &sealed).unwrap(), b"hello prompt");
    }

    #[test]
    fn ciphertext_moved_to_another_field_event_or_tenant_fails() {
        let tenant = Uuid::now_v7();
        let key = key(tenant, 1);
        let ctx = FieldContext {
            tenant_id: tenant,
            event_id: Uuid::now_v7(),
            field: "request_body",
        };
        let sealed = seal(&key, &ctx, b"secret").unwrap();

        let other_field = FieldContext {
            field: "response_body",
            ..ctx
        };
        assert!(matches!(
            open(&key, &other_field, &sealed),
            Err(CryptoError::Decrypt)
        ));
        let other_event = FieldContext {
            event_id: Uuid::now_v7(),
            ..ctx
        };
        assert!(matches!(
            open(&key, &other_event, &sealed),
            Err(CryptoError::Decrypt)
        ));
        // Another tenant holding the very same key bytes still cannot open it.
        let other_tenant = Uuid::now_v7();
        let stolen = DataKey {
            tenant_id: other_tenant,
            ..key.clone()
        };
        let other_ctx = FieldContext {
            tenant_id: other_tenant,
            ..ctx
        };
        assert!(matches!(
            open(&stolen, &other_ctx, &sealed),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn tampered_or_truncated_ciphertext_fails_cleanly() {
        let tenant = Uuid::now_v7();
        let key = key(tenant, 1);
        let ctx = FieldContext {
            tenant_id: tenant,
            event_id: Uuid::now_v7(),
            field: "body",
        };
        let sealed = seal(&key, &ctx, b"some body").unwrap();
        for i in 0..sealed.0.len() {
            let mut bad = sealed.clone();
            bad.0[i] ^= 0x01;
            assert!(
                open(&key, &ctx, &bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        let short = Sealed(sealed.0[..20].to_vec());
        assert!(matches!(
            open(&key, &ctx, &short),
            Err(CryptoError::Malformed(_))
        ));
        let mut future = sealed.clone();
        future.0[0] = 9;
        assert!(matches!(
            open(&key, &ctx, &future),
            Err(CryptoError::UnknownFormat(9))
        ));
    }

    #[test]
    fn digests_are_keyed_per_tenant() {
        let a = KeyBytes::generate().unwrap();
        let b = KeyBytes::generate().unwrap();
        let prompt = b"what is the capital of France?";
        assert_eq!(
            body_digest(&a, prompt).unwrap(),
            body_digest(&a, prompt).unwrap()
        );
        assert_ne!(
            body_digest(&a, prompt).unwrap(),
            body_digest(&b, prompt).unwrap()
        );
        assert_ne!(
            body_digest(&a, prompt).unwrap(),
            Sha256::digest(prompt).to_vec()
        );
    }

    #[test]
    fn api_keys_are_stored_as_hash_and_prefix() {
        let key = NewApiKey::generate().unwrap();
        assert!(key.secret.starts_with(API_KEY_PREFIX));
        assert!(key.secret.len() > 40);
        assert_eq!(key.hash, hash_api_key(&key.secret));
        assert_eq!(key.prefix.len(), API_KEY_DISPLAY_LEN);
        assert!(key.secret.starts_with(&key.prefix));
        assert_ne!(NewApiKey::generate().unwrap().hash, key.hash);
    }
}
