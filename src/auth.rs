//! Who may do what: signed connection tokens (JWT) with per-room grants, and the `Origin`
//! allow-list.
//!
//! A token is checked against every configured key that could have signed it: HS256 secrets,
//! RS256 or ES256 public keys, narrowed to the key whose id is the token's `kid` when one
//! matches. Only those three algorithms exist here: `none`, anything unconfigured, unsigned and
//! tampered tokens fail, and tokens are never logged. The `rooms` claim maps room patterns (an
//! exact name, or a prefix ending in `*`) to operations; `join`/`SUBSCRIBE` need `subscribe`,
//! `chat`/`sendMessage` need `publish`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Whether connections must prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// No tokens: everyone may do everything (the original behaviour). The default.
    #[default]
    Off,
    /// A token is optional; without one a connection has `anonymous_grants`.
    Optional,
    /// A token at the handshake, or as the first message within the auth timeout.
    Required,
}

/// The token settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Off, optional or required. Default off.
    pub mode: AuthMode,
    /// HS256 secrets, each with an optional key id; several for rotation.
    pub secrets: Vec<Key>,
    /// RS256 or ES256 public keys (PEM text), each with an optional key id.
    pub public_keys: Vec<Key>,
    /// The `aud` a token must carry, when set.
    pub audience: Option<String>,
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// What a connection without a token may do under `optional` (the `rooms` claim's JSON).
    /// Default: nothing.
    pub anonymous_grants: Grants,
    /// How long a connection may wait before its first message `auth`. Default 5 s.
    pub timeout: Duration,
    /// Open connections per user (`sub`) on this node; 0 is no limit. Default 0.
    pub max_connections_per_user: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Off,
            secrets: Vec::new(),
            public_keys: Vec::new(),
            audience: None,
            issuer: None,
            anonymous_grants: Grants::default(),
            timeout: Duration::from_secs(5),
            max_connections_per_user: 0,
        }
    }
}

/// A key and the id (`kid`) tokens may name it by.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// The id a token's `kid` header names, if any.
    pub id: Option<String>,
    /// The secret, or the public key's PEM text.
    pub material: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log, not even through `{:?}` of the config.
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// `KID=MATERIAL` or just `MATERIAL`. An `=` inside a secret is kept when what is left of
    /// the first `=` is not a plausible id (letters, digits, `-`, `_`, `.`).
    pub fn parse(text: &str) -> Self {
        match text.split_once('=') {
            Some((id, material))
                if !id.is_empty()
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                Self {
                    id: Some(id.to_owned()),
                    material: material.to_owned(),
                }
            }
            _ => Self {
                id: None,
                material: text.to_owned(),
            },
        }
    }
}

/// What went wrong with auth settings or a token. Token errors say what, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A configured public key is neither an RSA nor an EC public key in PEM.
    #[error("--auth-public-key {0}: not an RSA or EC public key in PEM")]
    BadKey(String),
    /// `optional` or `required` without any key to check tokens with.
    #[error("--auth {0} needs --auth-secret or --auth-public-key")]
    NoKeys(&'static str),
    /// The grants JSON (`--anonymous-grants` or a `rooms` claim) does not parse.
    #[error("bad grants: {0}")]
    BadGrants(String),
    /// The token is missing, malformed, unsigned, badly signed, expired or not yet valid.
    #[error("token refused: {0}")]
    Refused(String),
}

/// Operations a grant can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `join` and `SUBSCRIBE`.
    Subscribe,
    /// `chat` and `sendMessage`.
    Publish,
}

const SUBSCRIBE: u8 = 1;
const PUBLISH: u8 = 2;
/// Reserved for resume: accepted in tokens now so they need not change later.
const HISTORY: u8 = 4;
/// Most patterns one grant set may hold: checked per command, so it must stay short.
const MAX_GRANTS: usize = 256;

impl Op {
    fn bit(self) -> u8 {
        match self {
            Op::Subscribe => SUBSCRIBE,
            Op::Publish => PUBLISH,
        }
    }
}

/// Room patterns and what each allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    exact: HashMap<String, u8>,
    prefixes: Vec<(String, u8)>,
    everything: bool,
}

impl Grants {
    /// Everything allowed: what every connection has when auth is off.
    pub fn all() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    /// Parses the `rooms` JSON: `{"chat:*":["subscribe","publish"],"news":"subscribe"}`.
    pub fn parse(json: &str) -> Result<Self, AuthError> {
        let raw: HashMap<String, OpsClaim> =
            serde_json::from_str(json).map_err(|e| AuthError::BadGrants(e.to_string()))?;
        Self::from_claim(raw)
    }

    fn from_claim(raw: HashMap<String, OpsClaim>) -> Result<Self, AuthError> {
        if raw.len() > MAX_GRANTS {
            return Err(AuthError::BadGrants(format!(
                "more than {MAX_GRANTS} patterns"
            )));
        }
        let mut grants = Self::default();
        for (pattern, ops) in raw {
            let bits = ops.bits()?;
            match pattern.strip_suffix('*') {
                Some(prefix) => grants.prefixes.push((prefix.to_owned(), bits)),
                None => {
                    grants.exact.insert(pattern, bits);
                }
            }
        }
        Ok(grants)
    }

    /// True when `room` may be used for `op`.
    pub fn allows(&self, room: &str, op: Op) -> bool {
        if self.everything {
            return true;
        }
        let bit = op.bit();
        self.exact.get(room).is_some_and(|b| b & bit != 0)
            || self
                .prefixes
                .iter()
                .any(|(prefix, b)| b & bit != 0 && room.starts_with(prefix.as_str()))
    }
}

/// Operations as a token writes them: a list, or one name.
#[derive(Deserialize)]
#[serde(untagged)]
enum OpsClaim {
    One(String),
    Many(Vec<String>),
}

impl OpsClaim {
    fn bits(self) -> Result<u8, AuthError> {
        let names = match self {
            OpsClaim::One(name) => vec![name],
            OpsClaim::Many(names) => names,
        };
        names.iter().try_fold(0, |bits, name| {
            Ok(bits
                | match name.as_str() {
                    "subscribe" => SUBSCRIBE,
                    "publish" => PUBLISH,
                    "history" => HISTORY,
                    other => {
                        return Err(AuthError::BadGrants(format!("unknown operation `{other}`")))
                    }
                })
        })
    }
}

/// The claims roomcast reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: HashMap<String, OpsClaim>,
}

/// Who a connection is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`; `None` for an anonymous connection.
    pub user: Option<Arc<str>>,
    /// What it may do.
    pub grants: Arc<Grants>,
    /// When its token expires, as seconds since the Unix epoch.
    pub expires: Option<u64>,
}

/// Longest token accepted: a header or query parameter past this is refused before decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Checks tokens against the configured keys.
pub struct Verifier {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    anonymous: Arc<Grants>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier; fails on a key that does not parse.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        for secret in &config.secrets {
            let key = DecodingKey::from_secret(secret.material.as_bytes());
            keys.push((secret.id.clone(), Algorithm::HS256, key));
        }
        for public in &config.public_keys {
            let pem = public.material.as_bytes();
            let name = || public.id.clone().unwrap_or_else(|| "(no id)".to_owned());
            let (alg, key) = match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (Algorithm::RS256, key),
                Err(_) => (
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(pem).map_err(|_| AuthError::BadKey(name()))?,
                ),
            };
            keys.push((public.id.clone(), alg, key));
        }
        Ok(Self {
            keys,
            anonymous: Arc::new(config.anonymous_grants.clone()),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        })
    }

    /// What a connection without a token may do (auth optional).
    pub fn anonymous(&self) -> &Arc<Grants> {
        &self.anonymous
    }

    /// The identity a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let refused = |why: &str| AuthError::Refused(why.to_owned());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(refused("too long"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused("malformed"))?;
        let named = header
            .kid
            .as_deref()
            .filter(|kid| self.keys.iter().any(|(id, ..)| id.as_deref() == Some(*kid)));
        let candidates = self.keys.iter().filter(|(id, alg, _)| {
            *alg == header.alg && (named.is_none() || id.as_deref() == named)
        });
        let mut last = refused("no key for its algorithm");
        for (_, alg, key) in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation(*alg)) {
                Ok(data) => return identity(data.claims),
                Err(e) => last = refused(&describe(&e)),
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        // Expiry is exact: the connection itself is closed at `exp`, so a token must not be
        // accepted a minute after it (jsonwebtoken's default leeway).
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = self.audience.is_some();
        if let Some(aud) = &self.audience {
            validation.set_audience(&[aud]);
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        validation
    }
}

fn identity(claims: Claims) -> Result<Identity, AuthError> {
    Ok(Identity {
        user: Some(Arc::from(claims.sub)),
        grants: Arc::new(Grants::from_claim(claims.rooms)?),
        expires: Some(claims.exp),
    })
}

/// Why a token failed, in words that cannot leak it.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAlgorithm => "algorithm not allowed",
        ErrorKind::MissingRequiredClaim(_) => "missing exp or sub",
        _ => "malformed",
    }
    .to_owned()
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token a handshake carries: `Authorization: Bearer` first, else the `token` query
/// parameter (browsers cannot set headers on a WebSocket).
pub fn handshake_token<'a>(
    authorization: Option<&'a str>,
    query: Option<&'a str>,
) -> Option<String> {
    if let Some(bearer) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
        return Some(bearer.trim().to_owned());
    }
    query_param(query?, "token")
}

/// The value of `name` in a URL query string, decoded.
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .map(percent_decode)
}

/// Decodes `%XX` escapes and `+` (a JWT is base64url with dots, so this is rarely needed).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One entry of `--allowed-origins`: an exact origin (`https://app.example.com`), or a host
/// pattern `*.example.com` with or without a scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Option<String>,
    host: HostPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `host[:port]` exactly.
    Exact(String),
    /// Any subdomain of this suffix (the suffix starts with `.`).
    Subdomains(String),
}

impl OriginPattern {
    /// Parses one entry (lower-cased: origins compare case-insensitively).
    pub fn parse(text: &str) -> Self {
        let text = text.trim().to_ascii_lowercase();
        let (scheme, host) = match text.split_once("://") {
            Some((scheme, host)) => (Some(scheme.to_owned()), host.to_owned()),
            None => (None, text),
        };
        let host = match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostPattern::Subdomains(suffix.to_owned()),
            _ => HostPattern::Exact(host),
        };
        Self { scheme, host }
    }

    /// True when the `Origin` header value `origin` matches.
    pub fn matches(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        if self.scheme.as_deref().is_some_and(|s| s != scheme) {
            return false;
        }
        match &self.host {
            HostPattern::Exact(exact) => host == exact,
            HostPattern::Subdomains(suffix) => {
                let name = host.split(':').next().unwrap_or(host);
                name.ends_with(suffix.as_str()) && name.len() > suffix.len()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn config(secrets: &[&str]) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Required,
            secrets: secrets.iter().map(|s| Key::parse(s)).collect(),
            ..AuthConfig::default()
        }
    }

    fn token(secret: &str, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        let exp = unix_now() as i64 + exp_in;
        json!({"sub":"ann","exp":exp,"rooms":{"chat:*":["subscribe","publish"],"news":"subscribe"}})
    }

    #[test]
    fn grants_match_exact_names_and_prefixes() {
        let grants =
            Grants::parse(r#"{"chat:*":["subscribe","publish"],"news":"subscribe"}"#).unwrap();
        assert!(grants.allows("chat:1", Op::Publish));
        assert!(grants.allows("chat:", Op::Subscribe));
        assert!(grants.allows("news", Op::Subscribe));
        assert!(!grants.allows("news", Op::Publish));
        assert!(!grants.allows("admin", Op::Subscribe));
        assert!(Grants::parse(r#"{"x":["fly"]}"#).is_err());
        assert!(Grants::all().allows("anything", Op::Publish));
    }

    #[test]
    fn a_good_token_proves_its_user_and_grants() {
        let verifier = Verifier::new(&config(&["s1"])).unwrap();
        let identity = verifier.verify(&token("s1", None, claims(60))).unwrap();
        assert_eq!(identity.user.as_deref(), Some("ann"));
        assert!(identity.grants.allows("chat:9", Op::Publish));
    }

    #[test]
    fn expired_tampered_wrongly_signed_and_none_tokens_are_refused() {
        let verifier = Verifier::new(&config(&["s1"])).unwrap();
        let refused = |t: &str| verifier.verify(t).unwrap_err().to_string();
        assert_eq!(
            refused(&token("s1", None, claims(-5))),
            "token refused: expired"
        );
        assert_eq!(
            refused(&token("s2", None, claims(60))),
            "token refused: bad signature"
        );
        let good = token("s1", None, claims(60));
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = base64_url(&json!({"sub":"root","exp":unix_now() + 60}).to_string());
        parts[1] = &forged;
        assert_eq!(refused(&parts.join(".")), "token refused: bad signature");
        let none = format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            forged
        );
        assert_eq!(refused(&none), "token refused: malformed");
        assert!(!refused(&good[..good.len() - 2]).is_empty());
    }

    #[test]
    fn rotation_accepts_every_configured_secret_and_kid_picks_one() {
        let verifier = Verifier::new(&config(&["old=s1", "new=s2"])).unwrap();
        assert!(verifier.verify(&token("s1", None, claims(60))).is_ok());
        assert!(verifier
            .verify(&token("s2", Some("new"), claims(60)))
            .is_ok());
        // Named `new` but signed with the old secret: only `new` is tried.
        assert!(verifier
            .verify(&token("s1", Some("new"), claims(60)))
            .is_err());
        let rotated = Verifier::new(&config(&["new=s2"])).unwrap();
        assert!(rotated.verify(&token("s1", None, claims(60))).is_err());
    }

    #[test]
    fn keys_print_no_secret() {
        let key = Key::parse("k1=very-secret");
        assert_eq!(key.id.as_deref(), Some("k1"));
        assert!(!format!("{key:?}").contains("very-secret"));
        assert_eq!(Key::parse("a+b/c=").material, "a+b/c=");
    }

    #[test]
    fn tokens_come_from_bearer_or_query() {
        assert_eq!(
            handshake_token(Some("Bearer abc"), Some("token=zzz")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            handshake_token(None, Some("x=1&token=a%2Eb")).as_deref(),
            Some("a.b")
        );
        assert_eq!(handshake_token(None, Some("x=1")), None);
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let exact = OriginPattern::parse("https://App.example.com");
        assert!(exact.matches("https://app.example.com"));
        assert!(!exact.matches("http://app.example.com"));
        let any = OriginPattern::parse("*.example.com");
        assert!(any.matches("https://a.example.com:8443"));
        assert!(!any.matches("https://example.com"));
        assert!(!any.matches("https://evil-example.com"));
        assert!(!any.matches("null"));
    }

    fn base64_url(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}
