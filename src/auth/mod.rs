//! Access control (README, "Securing a server"): tokens signed with the server's key (HS256
//! JWTs, `jsonwebtoken`), naming a session (or `*`), a role, optionally the user name they
//! bind, and an expiry; the revocations of sessions' tokens, kept in `--data-dir`; and the
//! check of a request's `Origin`.
//!
//! Without a key the server is open, as before: every connection edits ([`Access::OPEN`]).
//! The HTTP side (where a token is carried, which endpoint needs what) is [`http`]; the
//! session applies the role it was granted (`collab_core::session::Access`).

pub mod api;
pub mod cli;
pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use collab_core::session::{Access, CloseReason, Role, CLOSE_TOKEN_EXPIRED, CLOSE_TOKEN_REVOKED};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, KeyArgs};

/// Shortest key accepted: HS256's own output size (RFC 7518 §3.2).
pub const MIN_KEY_BYTES: usize = 32;

/// The session claim of a token good for every session.
pub const ALL_SESSIONS: &str = "*";

/// The name of the revocations file in `--data-dir`.
const REVOCATIONS_FILE: &str = "revocations.json";

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The session it is good for, or `*`.
    pub session: String,
    pub role: Role,
    /// The user name it binds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Issued at, milliseconds since the epoch: a revocation refuses the session's tokens
    /// issued before it.
    pub iat_ms: u64,
    /// Expiry, seconds since the epoch (RFC 7519).
    pub exp: u64,
}

impl Claims {
    /// Whether the token is good for `session`.
    pub fn covers(&self, session: &str) -> bool {
        self.session == ALL_SESSIONS || self.session == session
    }

    /// When it expires.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }

    /// What a connection under `user` gets in the session (the shell checked that a bound
    /// name is `user`).
    pub fn access(&self) -> Access {
        Access {
            role: self.role,
            holds_name: self.user.is_some() || self.role == Role::Admin,
        }
    }
}

/// Why a token was refused (HTTP 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("token revoked")]
    Revoked,
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub session: String,
    pub role: Role,
    pub user: Option<String>,
    pub ttl: Duration,
}

/// The server's signing key.
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Keys {
    /// Keys from secret bytes; refused when shorter than [`MIN_KEY_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Keys, String> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the auth key has {} bytes; at least {MIN_KEY_BYTES} are needed",
                secret.len()
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is exact: the connection is closed at `exp` too.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// The key the flags name (`--auth-key-file` or `--auth-key`), if any.
    pub fn from_args(args: &KeyArgs) -> Result<Option<Keys>, String> {
        let secret = match (&args.auth_key_file, &args.auth_key) {
            (Some(path), _) => std::fs::read(path)
                .map_err(|e| format!("cannot read the auth key file {}: {e}", path.display()))
                .map(trim_line_end)?,
            (None, Some(key)) => key.expose().as_bytes().to_vec(),
            (None, None) => return Ok(None),
        };
        Keys::new(&secret).map(Some)
    }

    /// A signed token for `request`, issued `now`.
    pub fn mint(&self, request: &MintRequest, now: SystemTime) -> Result<(String, Claims), String> {
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let expires = since_epoch
            .checked_add(request.ttl)
            .ok_or("the time to live is too long")?;
        // Rounded up: a token lives at least its time to live.
        let exp = expires.as_secs() + u64::from(expires.subsec_nanos() > 0);
        let claims = Claims {
            session: request.session.clone(),
            role: request.role,
            user: request.user.clone(),
            iat_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| format!("cannot sign the token: {e}"))?;
        Ok((token, claims))
    }

    /// The claims of a token signed with this key and not expired.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}

/// A key file's content without the line end an editor or `echo` leaves.
fn trim_line_end(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        bytes.pop();
    }
    bytes
}

/// The time of each session's last revocation (ms since the epoch), published to every
/// connection and kept in `--data-dir/revocations.json`.
pub type RevocationMap = Arc<HashMap<String, u64>>;

/// The revocations: a file, and a channel every live connection watches.
pub struct Revocations {
    file: PathBuf,
    current: watch::Sender<RevocationMap>,
    /// One revocation writes the file at a time.
    writing: tokio::sync::Mutex<()>,
}

impl Revocations {
    /// Loads `dir/revocations.json` (none yet: nothing revoked).
    pub fn load(dir: &Path) -> Result<Revocations, String> {
        let file = dir.join(REVOCATIONS_FILE);
        let map: HashMap<String, u64> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not valid: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        Ok(Revocations {
            file,
            current: watch::Sender::new(Arc::new(map)),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether a token with these claims was revoked for `session`. Tokens for every session
    /// (`*`) are not affected (a leaked one is revoked by changing the key).
    pub fn is_revoked(map: &HashMap<String, u64>, session: &str, claims: &Claims) -> bool {
        revokes(map, session, claims.session == session, claims.iat_ms)
    }

    pub fn check(&self, session: &str, claims: &Claims) -> bool {
        Revocations::is_revoked(&self.current.borrow(), session, claims)
    }

    /// A receiver that wakes on every revocation.
    pub fn subscribe(&self) -> watch::Receiver<RevocationMap> {
        self.current.subscribe()
    }

    /// Revokes every token of `session` issued up to `at`, its millisecond included (tokens
    /// carry their issue time in milliseconds, so one minted just before `at` may carry the
    /// same one): written to the file first, then published (live connections close). Returns
    /// once that millisecond is past, so a token minted after the answer is not revoked. The
    /// result is the time every earlier token was issued before.
    pub async fn revoke(&self, session: &str, at: SystemTime) -> Result<SystemTime, String> {
        let at_ms = u64::try_from(
            at.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
        .saturating_add(1);
        let revoked_before = UNIX_EPOCH + Duration::from_millis(at_ms);
        let _writing = self.writing.lock().await;
        let mut map = HashMap::clone(&self.current.borrow());
        let entry = map.entry(session.to_owned()).or_default();
        *entry = (*entry).max(at_ms);
        let bytes = serde_json::to_vec_pretty(&map).map_err(|e| e.to_string())?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_atomically(&file, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot write the revocations: {e}"))?;
        self.current.send_replace(Arc::new(map));
        if let Ok(left) = revoked_before.duration_since(SystemTime::now()) {
            tokio::time::sleep(left).await;
        }
        Ok(revoked_before)
    }
}

/// Whether `map` revokes, for `session`, a token issued at `iat_ms` (`named`: the token names
/// the session, rather than `*`).
fn revokes(map: &HashMap<String, u64>, session: &str, named: bool, iat_ms: u64) -> bool {
    named && map.get(session).is_some_and(|&at| iat_ms < at)
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// The server's access control: the key (none: open mode), the revocations, the origins a
/// browser may connect from.
pub struct AccessControl {
    pub keys: Option<Keys>,
    pub revocations: Option<Revocations>,
    /// Origins besides the server's own, as `scheme://host[:port]`, lower case.
    pub allowed_origins: Vec<String>,
}

impl AccessControl {
    pub fn from_config(config: &Config) -> Result<AccessControl, String> {
        let keys = Keys::from_args(&config.key)?;
        let revocations = match keys {
            Some(_) => Some(Revocations::load(&config.data_dir)?),
            None => None,
        };
        Ok(AccessControl {
            keys,
            revocations,
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| normalize_origin(o))
                .collect(),
        })
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// The claims of `token` if it is valid and, for `session`, not revoked.
    pub fn verify(&self, token: &str, session: Option<&str>) -> Result<Claims, TokenError> {
        let Some(keys) = &self.keys else {
            return Err(TokenError::Invalid);
        };
        let claims = keys.verify(token)?;
        if let (Some(session), Some(revocations)) = (session, &self.revocations) {
            if revocations.check(session, &claims) {
                return Err(TokenError::Revoked);
            }
        }
        Ok(claims)
    }
}

/// An origin as compared: lower case, no trailing `/`.
pub fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// A token's life as its connection watches it: closed at expiry (4401) or when the session's
/// tokens are revoked (4403). Only what those need is kept (every live connection holds one).
pub struct LiveGrant {
    session: String,
    /// The token names this session (not `*`): a revocation of the session covers it.
    revocable: bool,
    iat_ms: u64,
    expires: tokio::time::Instant,
    revocations: watch::Receiver<RevocationMap>,
}

impl LiveGrant {
    pub fn new(session: &str, claims: &Claims, revocations: &Revocations) -> LiveGrant {
        let left = claims
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        LiveGrant {
            session: session.to_owned(),
            revocable: claims.session == session,
            iat_ms: claims.iat_ms,
            expires: tokio::time::Instant::now() + left,
            revocations: revocations.subscribe(),
        }
    }

    /// Whether the token is revoked now.
    pub fn is_revoked(&mut self) -> bool {
        let map = self.revocations.borrow_and_update();
        revokes(&map, &self.session, self.revocable, self.iat_ms)
    }

    /// Waits until the token expires or is revoked; the close that says which. The
    /// connection boxes this future once (its timer included), so an unauthenticated
    /// connection's task holds none of it.
    pub async fn ended(self: Box<Self>) -> CloseReason {
        let LiveGrant {
            session,
            revocable,
            iat_ms,
            expires,
            mut revocations,
        } = *self;
        let revoked = async {
            while revocations.changed().await.is_ok() {
                if revokes(
                    &revocations.borrow_and_update(),
                    &session,
                    revocable,
                    iat_ms,
                ) {
                    return;
                }
            }
            // The server is stopping: the session closes its members.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = tokio::time::sleep_until(expires) => CLOSE_TOKEN_EXPIRED,
            () = revoked => CLOSE_TOKEN_REVOKED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn request(ttl: Duration) -> MintRequest {
        MintRequest {
            session: "lab".into(),
            role: Role::Edit,
            user: Some("ann".into()),
            ttl,
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_key_only() {
        let keys = Keys::new(KEY).unwrap();
        let (token, claims) = keys
            .mint(&request(Duration::from_secs(60)), SystemTime::now())
            .unwrap();
        assert_eq!(keys.verify(&token), Ok(claims));
        let other = Keys::new(b"another key of thirty-two bytes!").unwrap();
        assert_eq!(other.verify(&token), Err(TokenError::Invalid));
        assert_eq!(keys.verify("not.a.token"), Err(TokenError::Invalid));
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let keys = Keys::new(KEY).unwrap();
        let past = SystemTime::now() - Duration::from_secs(120);
        let (token, _) = keys.mint(&request(Duration::from_secs(60)), past).unwrap();
        assert_eq!(keys.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Keys::new(b"short").is_err());
        assert!(Keys::new(&KEY[..31]).is_err());
    }

    #[test]
    fn revocation_covers_the_sessions_tokens_issued_before_it() {
        let keys = Keys::new(KEY).unwrap();
        let t0 = SystemTime::now();
        let (_, old) = keys.mint(&request(Duration::from_secs(60)), t0).unwrap();
        let later = t0 + Duration::from_secs(1);
        let (_, new) = keys.mint(&request(Duration::from_secs(60)), later).unwrap();
        let mut all = request(Duration::from_secs(60));
        all.session = ALL_SESSIONS.into();
        let (_, star) = keys.mint(&all, t0).unwrap();
        let map = HashMap::from([("lab".to_owned(), old.iat_ms + 1)]);
        assert!(Revocations::is_revoked(&map, "lab", &old));
        assert!(!Revocations::is_revoked(&map, "lab", &new));
        assert!(!Revocations::is_revoked(&map, "lab", &star));
        assert!(!Revocations::is_revoked(&map, "other", &old));
    }

    #[tokio::test]
    async fn a_token_minted_in_the_revocations_millisecond_is_revoked_and_one_after_the_answer_is_not(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let revocations = Revocations::load(dir.path()).unwrap();
        let keys = Keys::new(KEY).unwrap();
        let at = SystemTime::now();
        let (_, same_instant) = keys.mint(&request(Duration::from_secs(60)), at).unwrap();
        let revoked_before = revocations.revoke("lab", at).await.unwrap();
        assert!(revocations.check("lab", &same_instant));
        let (_, after) = keys
            .mint(&request(Duration::from_secs(60)), SystemTime::now())
            .unwrap();
        assert!(SystemTime::now() >= revoked_before);
        assert!(!revocations.check("lab", &after));
        let reloaded = Revocations::load(dir.path()).unwrap();
        assert!(reloaded.check("lab", &same_instant));
    }
}
