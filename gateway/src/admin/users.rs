//! Dashboard users and sessions: registration (a new tenant whose first user owns it), sign-in
//! with an email and a password or with an API key, sign-out. A password is kept as its argon2id
//! hash, sealed with the tenant's data key (`user.registered`); a session is a pair of control
//! events (`session.started`, `session.ended`) keyed by the SHA-256 of its cookie's secret, so
//! every node honours a sign-in and a sign-out, and the secret itself is never recorded.

use std::sync::LazyLock;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use loom_schemas::control::{SignedIn, normalize_email};
use loom_schemas::crypto::{FieldContext, random_bytes};
use loom_schemas::event::{
    Envelope, Event, RoleGranted, SessionEnded, SessionStarted, TenantCreated, UserPasswordSet,
    UserRegistered, now_micros,
};
use loom_schemas::project::MAX_NAME_BYTES;
use loom_schemas::roles::Permission;
use loom_schemas::roles::Role;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{Actor, AdminError, name};
use crate::services::Services;

/// The field a password's hash is sealed as.
const PASSWORD_FIELD: &str = "password";
/// Passwords are 8 to 1,024 bytes: long passphrases are welcome, megabytes are not.
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;

/// A new tenant and its first user, who owns it.
#[derive(Debug, Clone)]
pub struct Registration {
    pub organization: String,
    pub email: String,
    pub password: String,
}

/// The secret a session cookie carries: 256 random bits, URL-safe base64. Only its digest is
/// recorded.
#[derive(Clone)]
pub struct SessionSecret(String);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(…)")
    }
}

impl SessionSecret {
    /// 256 fresh random bits.
    pub fn generate() -> Result<SessionSecret, AdminError> {
        let bytes: [u8; 32] = random_bytes()?;
        Ok(SessionSecret(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        ))
    }

    /// The secret as a browser sent it back.
    pub fn from_cookie(value: &str) -> SessionSecret {
        SessionSecret(value.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the log and every node know the session by.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// A value derived from the secret that a form must carry back (CSRF): only a page served
    /// to the session's holder has it, and it says nothing of the secret.
    pub fn form_token(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"loom form token\0");
        hash.update(self.0.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.finalize())
    }
}

/// A session just started: the cookie's secret, and who holds it.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub secret: SessionSecret,
    pub signed_in: SignedIn,
}

/// Why a sign-in was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The same answer for an unknown email and a wrong password.
    #[error("wrong email or password")]
    WrongPassword,
    #[error("the API key is not valid")]
    InvalidKey,
    #[error("the account holds no role in its organization any more")]
    NoRole,
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// A hash to verify against when the email is unknown, so that the answer takes as long as for
/// a wrong password and says nothing of which emails exist.
static DECOY: LazyLock<Option<String>> = LazyLock::new(|| {
    Argon2::default()
        .hash_password(b"not anybody's password")
        .ok()
        .map(|hash| hash.to_string())
});

/// A password checked for length, and its argon2id PHC string (CPU-heavy: off the runtime).
async fn hash_password(password: &str) -> Result<String, AdminError> {
    let length = password.len();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&length) {
        return Err(AdminError::Invalid(format!(
            "password: {MIN_PASSWORD} to {MAX_PASSWORD} bytes (got {length})"
        )));
    }
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|error| AdminError::Invalid(format!("password: {error}")))
    })
    .await
    .map_err(|_| AdminError::Internal("hashing the password failed"))?
}

/// Whether `password` matches the PHC string `hash` (off the runtime); `None`: checked against
/// the decoy, so that an unknown email costs as much as a known one.
async fn verify_password(password: &str, hash: Option<String>) -> bool {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let Some(hash) = hash.or_else(|| DECOY.clone()) else {
            return false;
        };
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

/// An email as users are known by, checked: 3 to 256 bytes, one `@` between two non-empty
/// parts, no spaces or control characters.
fn email(value: &str) -> Result<String, AdminError> {
    let email = normalize_email(value);
    let valid = (3..=MAX_NAME_BYTES).contains(&email.len())
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && !host.is_empty() && !host.contains('@')
        });
    match valid {
        true => Ok(email),
        false => Err(AdminError::Invalid(format!(
            "email: {value:?} is not an email address"
        ))),
    }
}

impl Services {
    /// Registers a new tenant and its first user, its owner, and signs them in for `ttl`.
    pub async fn register(
        &self,
        registration: &Registration,
        ttl: Duration,
    ) -> Result<NewSession, AdminError> {
        let organization = name("organization", &registration.organization, 200)?;
        let email = email(&registration.email)?;
        if self.control.read(|s| s.user(&email).is_some()) {
            return Err(AdminError::Conflict(format!(
                "email: {email} is already registered; sign in instead"
            )));
        }
        let hash = hash_password(&registration.password).await?;
        let tenant_id = Uuid::now_v7();
        self.keys.create_tenant_keys(tenant_id).await?;
        let registered = self.user_registered(tenant_id, &email, &hash, false)?;
        let owner = RoleGranted {
            principal: email.clone(),
            role: Role::Owner.name().to_owned(),
            project_id: None,
        };
        self.append_control(vec![
            self.control_event(tenant_id, TenantCreated { name: organization }),
            registered,
            self.control_event(tenant_id, owner),
        ])
        .await?;
        // Two registrations of one email at once: the log keeps the first.
        let tenant = self.control.read(|s| s.user(&email).map(|u| u.tenant_id));
        if tenant != Some(tenant_id) {
            return Err(AdminError::Conflict(format!(
                "email: {email} is already registered; sign in instead"
            )));
        }
        self.start_session(tenant_id, email, None, ttl).await
    }

    /// A user sealed and registered in `tenant_id` (events to append).
    fn user_registered(
        &self,
        tenant_id: Uuid,
        email: &str,
        hash: &str,
        changed: bool,
    ) -> Result<Event, AdminError> {
        let envelope = Envelope::new(tenant_id, None, &*self.producer);
        let context = FieldContext {
            tenant_id,
            event_id: envelope.event_id,
            field: PASSWORD_FIELD,
        };
        let password = self.keys.seal(&context, hash.as_bytes())?;
        let email = email.to_owned();
        let payload = match changed {
            true => UserPasswordSet { email, password }.into(),
            false => UserRegistered { email, password }.into(),
        };
        Ok(Event { envelope, payload })
    }

    /// Adds a user with an initial password to the actor's organization, with `role` (admins and
    /// owners; nobody gives a role above their own). They sign in and change the password.
    pub async fn add_user(
        &self,
        actor: &Actor,
        email: &str,
        password: &str,
        role: &str,
    ) -> Result<(), AdminError> {
        let tenant_id = self.live_tenant(actor, None)?;
        actor.require(Permission::ManageTenant)?;
        actor.tenant_wide()?;
        let email = self::email(email)?;
        let role = super::role("role", role)?;
        if !actor.role().may_grant(role) {
            return Err(AdminError::Forbidden("nobody gives a role above their own"));
        }
        if self.control.read(|s| s.user(&email).is_some()) {
            return Err(AdminError::Conflict(format!(
                "email: {email} is already a user"
            )));
        }
        let hash = hash_password(password).await?;
        let grant = RoleGranted {
            principal: email.clone(),
            role: role.name().to_owned(),
            project_id: None,
        };
        self.append_control(vec![
            self.user_registered(tenant_id, &email, &hash, false)?,
            self.control_event(tenant_id, grant),
        ])
        .await
    }

    /// Changes a signed-in user's password, given their current one.
    pub async fn change_password(
        &self,
        user: &SignedIn,
        current: &str,
        new: &str,
    ) -> Result<(), SignInError> {
        let found = self.control.read(|s| s.user(&user.principal).cloned());
        let Some(found) = found.filter(|u| u.tenant_id == user.tenant_id) else {
            return Err(SignInError::Admin(AdminError::Forbidden(
                "only a user who signed in with a password has one to change",
            )));
        };
        let context = FieldContext {
            tenant_id: found.tenant_id,
            event_id: found.event_id,
            field: PASSWORD_FIELD,
        };
        let hash = self
            .keys
            .open(&context, &found.password)
            .map_err(AdminError::from)?;
        let hash = String::from_utf8(hash).map_err(|_| SignInError::WrongPassword)?;
        if !verify_password(current, Some(hash)).await {
            return Err(SignInError::WrongPassword);
        }
        let hash = hash_password(new).await?;
        let event = self.user_registered(found.tenant_id, &found.email, &hash, true)?;
        Ok(self.append_control(vec![event]).await?)
    }

    /// Signs a user in with their email and password, for `ttl`.
    pub async fn sign_in(
        &self,
        email: &str,
        password: &str,
        ttl: Duration,
    ) -> Result<NewSession, SignInError> {
        let email = normalize_email(email);
        let user = self.control.read(|s| s.user(&email).cloned());
        let Some(user) = user else {
            verify_password(password, None).await;
            return Err(SignInError::WrongPassword);
        };
        let context = FieldContext {
            tenant_id: user.tenant_id,
            event_id: user.event_id,
            field: PASSWORD_FIELD,
        };
        let hash = self
            .keys
            .open(&context, &user.password)
            .map_err(AdminError::from)?;
        let hash = String::from_utf8(hash).map_err(|_| SignInError::WrongPassword)?;
        if !verify_password(password, Some(hash)).await {
            return Err(SignInError::WrongPassword);
        }
        let holds_a_role = self.control.read(|s| {
            s.grants(user.tenant_id)
                .any(|grant| grant.principal == user.email)
        });
        if !holds_a_role {
            return Err(SignInError::NoRole);
        }
        Ok(self
            .start_session(user.tenant_id, user.email, None, ttl)
            .await?)
    }

    /// Signs in with an API key, for `ttl` or until the key expires, whichever comes first.
    pub async fn sign_in_with_key(
        &self,
        secret: &str,
        ttl: Duration,
    ) -> Result<NewSession, SignInError> {
        let key = (self.control)
            .authenticate(secret.trim())
            .ok_or(SignInError::InvalidKey)?;
        let ttl = match key.expires_at {
            Some(at) => {
                let left = u64::try_from(at.saturating_sub(now_micros())).unwrap_or(0);
                ttl.min(Duration::from_micros(left))
            }
            None => ttl,
        };
        Ok(self
            .start_session(key.tenant_id, key.principal(), Some(key.key_id), ttl)
            .await?)
    }

    async fn start_session(
        &self,
        tenant_id: Uuid,
        principal: String,
        api_key_id: Option<Uuid>,
        ttl: Duration,
    ) -> Result<NewSession, AdminError> {
        let secret = SessionSecret::generate()?;
        let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        let started = SessionStarted {
            session: secret.digest().to_vec(),
            principal,
            api_key_id,
            expires_at: now_micros().saturating_add(ttl),
        };
        self.append_control(vec![self.control_event(tenant_id, started)])
            .await?;
        let signed_in = self
            .session(&secret)
            .ok_or(AdminError::Internal("the session could not be started"))?;
        Ok(NewSession { secret, signed_in })
    }

    /// The session a cookie's secret opens, if it is valid now.
    pub fn session(&self, secret: &SessionSecret) -> Option<SignedIn> {
        let digest = secret.digest();
        self.control.read(|s| s.session(&digest, now_micros()))
    }

    /// Ends a session (signing out) on every node.
    pub async fn end_session(&self, secret: &SessionSecret) -> Result<(), AdminError> {
        let digest = secret.digest();
        let Some(tenant_id) = self
            .control
            .read(|s| s.session(&digest, now_micros()).map(|s| s.tenant_id))
        else {
            return Ok(());
        };
        let ended = SessionEnded {
            session: digest.to_vec(),
            reason: "signed_out".into(),
        };
        self.append_control(vec![self.control_event(tenant_id, ended)])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_lowercased_and_checked() {
        assert_eq!(
            email("  Ada@Example.COM ").ok(),
            Some("ada@example.com".into())
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "a da@example.com",
            "a@b@c",
        ] {
            assert!(email(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn a_form_token_is_the_sessions_own_and_not_its_secret() {
        let one = SessionSecret::generate().unwrap();
        let other = SessionSecret::generate().unwrap();
        assert_ne!(one.form_token(), other.form_token());
        assert_eq!(
            one.form_token(),
            SessionSecret::from_cookie(one.as_str()).form_token()
        );
        assert!(!one.form_token().contains(one.as_str()));
    }

    #[tokio::test]
    async fn passwords_hash_to_argon2id_and_verify() {
        assert!(hash_password("short").await.is_err());
        let hash = hash_password("correct horse battery").await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", Some(hash.clone())).await);
        assert!(!verify_password("correct horse battery!", Some(hash)).await);
        assert!(!verify_password("correct horse battery", None).await);
    }
}
