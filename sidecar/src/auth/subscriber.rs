//! Subscriber authentication for `/v1/subscribe` (WebSocket and SSE), `/v1/tickets` and the
//! status API: who may read which topics, and through which forced filter.
//!
//! Two kinds of bearer token, either or both configured:
//! - **static tokens** from `--subscriber-tokens-file`, one per line like ingest secrets:
//!   `<token> [topics]` (no list: every topic). No expiry, no forced filter.
//! - **JWTs** signed with a key of `--subscriber-jwks-file` (a JWKS: `oct` keys verify HS256,
//!   `RSA` keys RS256, `EC` P-256 keys ES256). `exp` is required, `nbf` checked when present,
//!   `aud` / `iss` when `--subscriber-jwt-audience` / `--subscriber-jwt-issuer` are set, all
//!   with `--subscriber-jwt-leeway-s`. The claim `topics` (array of names or `*`-prefixes)
//!   lists what the token may read (none: nothing); the optional claim `filter` (a
//!   Subscriptions API filter) is forced onto every subscription it opens.
//!
//! Both files are read again when they change, so keys rotate without a restart. With
//! neither configured the push side is open.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use super::ingest::{self, Secret};
use super::{TopicPattern, Watched, bearer};
use crate::subscription_filter::Filter;

/// The WebSocket subprotocol the sidecar answers with; a browser offers it together with
/// `bearer.<token>`, since it cannot set `Authorization` on a WebSocket.
pub const WS_PROTOCOL: &str = "eventwire";
const WS_TOKEN_PREFIX: &str = "bearer.";

#[derive(Debug, Clone, Default)]
pub struct SubscriberAuthConfig {
    pub tokens_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
}

/// What a subscriber's credentials allow.
#[derive(Debug, Clone)]
pub struct Access {
    /// `None`: every topic (open push side, or a static token without a list).
    topics: Option<Vec<TopicPattern>>,
    /// Forced onto every subscription, together with the subscriber's own filter.
    pub filter: Option<Filter>,
    /// When the credentials stop being good (a JWT's `exp` plus the leeway).
    pub expires: Option<SystemTime>,
    /// For logs: the token's `sub`, or which static token line.
    pub principal: Option<String>,
}

impl Access {
    pub fn open() -> Access {
        Access {
            topics: None,
            filter: None,
            expires: None,
            principal: None,
        }
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(topic)))
    }
}

/// Why credentials were refused; the detail tells the holder what to fix, never a key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccessError {
    #[error(
        "subscribing needs a token: `Authorization: Bearer <token>`, the WebSocket subprotocols `eventwire` + `bearer.<token>`, or `ticket=` from POST /v1/tickets"
    )]
    Missing,
    #[error("the token is not accepted")]
    Unknown,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not for this audience")]
    Audience,
    #[error("the token is not from an accepted issuer")]
    Issuer,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token names no key or algorithm this sidecar accepts")]
    UnknownKey,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the ticket is unknown, used or expired")]
    Ticket,
}

#[derive(Debug, Error)]
#[error("{0}")]
pub struct SubscriberAuthError(String);

/// One JWKS key with the one algorithm it verifies.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

pub struct SubscriberAuth {
    tokens: Option<Watched<Vec<Secret>>>,
    keys: Option<Watched<Vec<Key>>>,
    validation: Validation,
}

impl SubscriberAuth {
    pub fn load(config: &SubscriberAuthConfig) -> Result<SubscriberAuth, SubscriberAuthError> {
        let tokens = config
            .tokens_file
            .as_deref()
            .map(|p| Watched::load(p, ingest::read_file))
            .transpose()
            .map_err(SubscriberAuthError)?;
        let keys = config
            .jwks_file
            .as_deref()
            .map(|p| Watched::load(p, read_jwks))
            .transpose()
            .map_err(SubscriberAuthError)?;
        Ok(SubscriberAuth {
            tokens,
            keys,
            validation: validation(config),
        })
    }

    /// An open push side: every credential (or none) reads every topic.
    #[cfg(test)]
    pub fn open() -> SubscriberAuth {
        SubscriberAuth {
            tokens: None,
            keys: None,
            validation: validation(&SubscriberAuthConfig::default()),
        }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && self.keys.is_none()
    }

    pub fn reload(&self) {
        self.tokens.iter().for_each(|w| w.reload());
        self.keys.iter().for_each(|w| w.reload());
    }

    /// The access of the bearer token in `Authorization`.
    pub fn check_header(&self, headers: &HeaderMap) -> Result<Access, AccessError> {
        if self.is_open() {
            return Ok(Access::open());
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .ok_or(AccessError::Missing)?;
        self.check(token)
    }

    /// The access of a bearer token, however it was presented.
    pub fn check(&self, token: &[u8]) -> Result<Access, AccessError> {
        if self.is_open() {
            return Ok(Access::open());
        }
        if let Some(tokens) = &self.tokens {
            let tokens = tokens.get();
            if let Some(i) = ingest::matching(&tokens, token) {
                return Ok(Access {
                    topics: tokens[i].topics.clone(),
                    filter: None,
                    expires: None,
                    principal: Some(format!("static token {}", i + 1)),
                });
            }
        }
        match &self.keys {
            // Three dot-separated parts: a JWT; anything else was a static token that did not match.
            Some(keys) if token.iter().filter(|&&b| b == b'.').count() == 2 => {
                self.check_jwt(&keys.get(), token)
            }
            _ => Err(AccessError::Unknown),
        }
    }

    fn check_jwt(&self, keys: &[Key], token: &[u8]) -> Result<Access, AccessError> {
        let text = std::str::from_utf8(token).map_err(|_| AccessError::Unknown)?;
        let header = jsonwebtoken::decode_header(text).map_err(jwt_error)?;
        let candidates = keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || header.kid == k.kid));
        let mut last = AccessError::UnknownKey;
        for key in candidates {
            let mut validation = self.validation.clone();
            validation.algorithms = vec![key.alg];
            match jsonwebtoken::decode::<Claims>(text, &key.key, &validation) {
                Ok(data) => return self.access(data.claims),
                // Another key of the same algorithm may have signed it (rotation without kid).
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => {
                    last = AccessError::Signature;
                }
                Err(e) => return Err(jwt_error(e)),
            }
        }
        Err(last)
    }

    fn access(&self, claims: Claims) -> Result<Access, AccessError> {
        let topics = claims
            .topics
            .unwrap_or_default()
            .iter()
            .map(|t| TopicPattern::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AccessError::Malformed(format!("claim `topics`: {e}")))?;
        let filter = claims
            .filter
            .as_ref()
            .map(|f| Filter::from_value(f, "token.filter"))
            .transpose()
            .map_err(|e| AccessError::Malformed(format!("claim `filter`: {e}")))?;
        Ok(Access {
            topics: Some(topics),
            filter,
            // Checked: a signed `exp` beyond what the clock can hold means no expiry, not a panic.
            expires: UNIX_EPOCH.checked_add(Duration::from_secs(
                claims.exp.saturating_add(self.validation.leeway),
            )),
            principal: claims.sub,
        })
    }
}

/// The token a browser offers as the subprotocol `bearer.<token>`.
pub fn ws_protocol_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|p| p.trim_ascii())
        .find_map(|p| p.strip_prefix(WS_TOKEN_PREFIX.as_bytes()))
        .filter(|t| !t.is_empty())
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    sub: Option<String>,
    topics: Option<Vec<String>>,
    filter: Option<Value>,
}

fn validation(config: &SubscriberAuthConfig) -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = config.leeway.as_secs();
    v.validate_nbf = true;
    v.validate_aud = config.audience.is_some();
    if let Some(aud) = &config.audience {
        v.set_audience(&[aud]);
    }
    if let Some(iss) = &config.issuer {
        v.set_issuer(&[iss]);
    }
    v
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> AccessError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AccessError::Expired,
        ErrorKind::ImmatureSignature => AccessError::NotYetValid,
        ErrorKind::InvalidAudience => AccessError::Audience,
        ErrorKind::InvalidIssuer => AccessError::Issuer,
        ErrorKind::InvalidSignature => AccessError::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => AccessError::UnknownKey,
        _ => AccessError::Malformed(e.to_string()),
    }
}

/// A JWKS file: every key must be one this sidecar can use, so a typo fails at load.
fn read_jwks(path: &Path) -> Result<Vec<Key>, String> {
    let what = path.display();
    let set: JwkSet = serde_json::from_str(&super::read_text(path)?)
        .map_err(|e| format!("{what}: not a JWKS (`{{\"keys\": [...]}}`): {e}"))?;
    if set.keys.is_empty() {
        return Err(format!("{what}: no key in `keys`"));
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => {
                    return Err(format!(
                        "{what}, keys[{i}]: only `oct` (HS256), `RSA` (RS256) and `EC` P-256 (ES256) keys are supported"
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{what}, keys[{i}]: {e}"))?;
            Ok(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const STATIC: &str = "static-subscriber-token-0001";
    /// The test keys of `tests/fixtures/jwt` (made with OpenSSL for these tests only).
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/jwt/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn auth(aud: Option<&str>) -> (SubscriberAuth, tempfile::NamedTempFile) {
        let tokens = file(&format!("{STATIC} orders\n"));
        let config = SubscriberAuthConfig {
            tokens_file: Some(tokens.path().into()),
            jwks_file: Some(format!("{FIXTURES}jwks.json").into()),
            audience: aud.map(str::to_string),
            issuer: None,
            leeway: Duration::ZERO,
        };
        (SubscriberAuth::load(&config).unwrap(), tokens)
    }

    fn sign(alg: Algorithm, claims: &Value) -> String {
        let (kid, key) = match alg {
            Algorithm::RS256 => (
                "test-rs256",
                EncodingKey::from_rsa_pem(&fixture("rs256.pem")),
            ),
            Algorithm::ES256 => (
                "test-es256",
                EncodingKey::from_ec_pem(&fixture("es256.pem")),
            ),
            _ => (
                "test-hs256",
                EncodingKey::from_secret(&fixture("hs256.key")),
            ),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, claims, &key.unwrap()).unwrap()
    }

    fn hs(claims: Value) -> String {
        sign(Algorithm::HS256, &claims)
    }

    #[test]
    fn each_algorithm_verifies_with_its_jwks_key() {
        let (auth, _file) = auth(None);
        let claims = json!({"exp": now() + 60, "topics": ["orders"]});
        for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
            let access = auth.check(sign(alg, &claims).as_bytes());
            assert!(access.unwrap().allows("orders"), "{alg:?}");
        }
        // An RS256 token whose header names the HMAC key: never verified with that key.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("test-hs256".into());
        let confused = encode(
            &header,
            &claims,
            &EncodingKey::from_rsa_pem(&fixture("rs256.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            auth.check(confused.as_bytes()).err(),
            Some(AccessError::UnknownKey)
        );
    }

    #[test]
    fn jwt_claims_are_checked_and_give_topics_and_a_forced_filter() {
        let (auth, _file) = auth(Some("dashboard"));
        let good = json!({"exp": now() + 60, "aud": "dashboard", "sub": "c-42",
            "topics": ["orders", "payment-*"], "filter": {"exact": {"subject": "c-42"}}});
        let access = auth.check(hs(good.clone()).as_bytes()).unwrap();
        assert!(access.allows("orders") && access.allows("payment-done"));
        assert!(!access.allows("audit"));
        assert!(access.filter.is_some());
        assert_eq!(access.principal.as_deref(), Some("c-42"));

        let with = |change: Value| {
            let mut c = good.clone();
            c.as_object_mut()
                .unwrap()
                .extend(change.as_object().unwrap().clone());
            auth.check(hs(c).as_bytes()).map(|_| ())
        };
        assert_eq!(with(json!({"exp": now() - 5})), Err(AccessError::Expired));
        assert_eq!(
            with(json!({"nbf": now() + 60})),
            Err(AccessError::NotYetValid)
        );
        assert_eq!(with(json!({"aud": "other"})), Err(AccessError::Audience));
        assert!(matches!(
            with(json!({"filter": {"nope": 1}})),
            Err(AccessError::Malformed(_))
        ));
        let no_topics = json!({"exp": now() + 60, "aud": "dashboard"});
        assert!(
            !auth
                .check(hs(no_topics).as_bytes())
                .unwrap()
                .allows("orders")
        );

        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another-secret-of-enough-length!").unwrap(),
        )
        .unwrap();
        assert_eq!(
            auth.check(forged.as_bytes()).err(),
            Some(AccessError::Signature)
        );
        let other_alg = encode(
            &Header::new(Algorithm::HS384),
            &good,
            &EncodingKey::from_secret(&fixture("hs256.key")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            auth.check(other_alg.as_bytes()).err(),
            Some(AccessError::UnknownKey)
        );
    }

    #[test]
    fn static_tokens_and_where_a_token_is_found() {
        let (auth, _file) = auth(None);
        let access = auth.check(STATIC.as_bytes()).unwrap();
        assert!(access.allows("orders") && !access.allows("audit"));
        assert!(access.expires.is_none());
        assert_eq!(
            auth.check(b"nothing-like-it").err(),
            Some(AccessError::Unknown)
        );

        let mut h = HeaderMap::new();
        assert_eq!(auth.check_header(&h).err(), Some(AccessError::Missing));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {STATIC}")).unwrap(),
        );
        assert!(auth.check_header(&h).is_ok());

        let mut ws = HeaderMap::new();
        ws.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("eventwire, bearer.abc.def.ghi"),
        );
        assert_eq!(ws_protocol_token(&ws), Some(&b"abc.def.ghi"[..]));
        assert!(
            SubscriberAuth::open()
                .check(b"anything")
                .unwrap()
                .allows("x")
        );
    }

    #[test]
    fn a_jwks_with_an_unusable_key_is_refused_at_load() {
        for (jwks, why) in [
            (json!({"keys": []}), "no key"),
            (json!({"kty": "oct"}), "not a JWKS"),
            (
                json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}),
                "keys[0]",
            ),
        ] {
            let f = file(&jwks.to_string());
            let config = SubscriberAuthConfig {
                jwks_file: Some(f.path().into()),
                ..Default::default()
            };
            let e = SubscriberAuth::load(&config).err().unwrap();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}
