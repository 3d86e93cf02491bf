//! JSON Web Tokens as the CONNECT password, so that an app's existing login can connect without
//! a broker account: HS256 with a shared secret, RS256 with the issuer's public key, or RS256,
//! ES256 and EdDSA with an identity provider's published key set (`jwks_url`, keys by `kid`).
//! `exp` is required and checked (and `nbf` when present) with `leeway_secs`; `iss` and `aud`
//! when configured; one claim (`sub` by default) is taken as the user name.
//!
//! The key set is fetched at start, every `jwks_refresh_secs`, and when a token names a `kid`
//! the set does not hold, at most once per `jwks_refresh_secs` whatever the tokens say: a
//! stranger sending made-up `kid`s costs the provider one request per interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use tracing::{info, warn};

use super::AuthError;
use crate::config::JwtConfig;

/// A key set larger than this is refused: the provider's answer is read into memory.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long one fetch of the key set may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// One verification key and the one algorithm it verifies: a token cannot pick another.
struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

/// The provider's key set and when it was last asked for.
struct KeySet {
    url: hyper::Uri,
    client: crate::tls::HttpsClient,
    refresh: Duration,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    /// When the last fetch started (successful or not); single-flight with the lock held.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches made, for the tests and `/metrics`.
    fetches: AtomicU64,
}

pub struct JwtVerifier {
    /// The configured secret or PEM key, for tokens without a `kid` (or without a key set).
    fixed: Option<Key>,
    jwks: Option<Arc<KeySet>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    username_claim: String,
    /// Tokens refused for naming a `kid` the set does not hold, even after a refresh.
    pub unknown_kids: AtomicU64,
    /// Logged once per refresh interval, not once per stranger's token.
    last_unknown_log: Mutex<Option<Instant>>,
}

/// Why a token was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token names a `kid` the key set does not hold (yet): refresh, then try again.
    UnknownKey(String),
    Invalid(String),
}

impl JwtVerifier {
    pub fn new(c: &JwtConfig) -> Result<JwtVerifier, AuthError> {
        let bad = |why: String| AuthError::Jwt(why);
        let fixed = match (&c.hs256_secret, &c.rs256_public_key) {
            (Some(secret), None) => {
                Some(Key { key: DecodingKey::from_secret(secret.as_bytes()), algorithm: Algorithm::HS256 })
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                Some(Key { key, algorithm: Algorithm::RS256 })
            }
            (None, None) => None,
            _ => return Err(bad("[auth.jwt] takes at most one of hs256_secret and rs256_public_key".into())),
        };
        let jwks = match &c.jwks_url {
            None => None,
            Some(url) => {
                let url: hyper::Uri = url.parse().map_err(|e| bad(format!("jwks_url: {e}")))?;
                let tls = crate::tls::client_config(c.ca_file.as_deref()).map_err(bad)?;
                Some(Arc::new(KeySet {
                    url,
                    client: crate::tls::https_client(tls),
                    refresh: Duration::from_secs(c.jwks_refresh_secs.max(1)),
                    keys: RwLock::default(),
                    last_fetch: tokio::sync::Mutex::new(None),
                    fetches: AtomicU64::new(0),
                }))
            }
        };
        if fixed.is_none() && jwks.is_none() {
            return Err(bad("[auth.jwt] needs one of hs256_secret, rs256_public_key and jwks_url".into()));
        }
        Ok(JwtVerifier {
            fixed,
            jwks,
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            leeway: c.leeway_secs,
            username_claim: c.username_claim.clone(),
            unknown_kids: AtomicU64::new(0),
            last_unknown_log: Mutex::new(None),
        })
    }

    /// Fetches the key set now and then every `jwks_refresh_secs`, for as long as this verifier
    /// is in use (a reload makes a new one). Needs a Tokio runtime; without one, the set is
    /// fetched on the first token instead.
    pub fn start(&self) {
        let (Some(set), Ok(runtime)) = (&self.jwks, tokio::runtime::Handle::try_current()) else { return };
        let weak: Weak<KeySet> = Arc::downgrade(set);
        runtime.spawn(async move {
            loop {
                let Some(set) = weak.upgrade() else { return };
                set.fetch_if_due(true).await;
                let wait = set.refresh;
                drop(set);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// Fetches made of the key set so far.
    pub fn jwks_fetches(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |s| s.fetches.load(Ordering::Relaxed))
    }

    /// The user name the token vouches for, or why it does not. CPU-bound (RSA): off the async
    /// workers.
    pub fn verify(&self, token: &[u8]) -> Result<String, Refusal> {
        let invalid = |why: String| Refusal::Invalid(why);
        let token = std::str::from_utf8(token).map_err(|_| invalid("token is not UTF-8".into()))?;
        let header = decode_header(token).map_err(|e| invalid(e.to_string()))?;
        let found;
        let key = match (&header.kid, &self.jwks) {
            (Some(kid), Some(set)) => {
                found = set.keys.read().expect("jwks lock").get(kid).cloned();
                match &found {
                    Some(k) => k.as_ref(),
                    None => return Err(Refusal::UnknownKey(kid.clone())),
                }
            }
            _ => match &self.fixed {
                Some(k) => k,
                None => return Err(invalid("token has no kid".into())),
            },
        };
        if header.alg != key.algorithm {
            return Err(invalid(format!("token is signed with {:?}, its key is for {:?}", header.alg, key.algorithm)));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation)
            .map_err(|e| invalid(e.to_string()))?;
        match data.claims.get(&self.username_claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(invalid(format!("token has no string claim {:?}", self.username_claim))),
        }
    }

    /// A token named `kid`, unknown to the key set: fetches the set again unless it was
    /// fetched within `jwks_refresh_secs`. Returns whether the set now holds `kid`.
    pub async fn refresh_for(&self, kid: &str) -> bool {
        let Some(set) = &self.jwks else { return false };
        set.fetch_if_due(false).await;
        let known = set.keys.read().expect("jwks lock").contains_key(kid);
        if !known {
            self.unknown_kids.fetch_add(1, Ordering::Relaxed);
            let mut last = self.last_unknown_log.lock().expect("log lock");
            if last.is_none_or(|at| at.elapsed() >= set.refresh) {
                *last = Some(Instant::now());
                // The kid is a stranger's text: a string field, quoted and escaped.
                warn!(kid, "a token names a key the key set does not hold (logged once per refresh interval)");
            }
        }
        known
    }
}

impl KeySet {
    /// Fetches the set unless a fetch started within `refresh` (`scheduled`: the periodic
    /// refresh, which is due by definition). One fetch at a time; a CONNECT that finds one
    /// under way waits for it and uses its result.
    async fn fetch_if_due(&self, scheduled: bool) {
        let mut last = self.last_fetch.lock().await;
        if !scheduled && last.is_some_and(|at| at.elapsed() < self.refresh) {
            return;
        }
        *last = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(JWKS_TIMEOUT, self.fetch()).await {
            Ok(Ok(keys)) => {
                info!(url = %self.url, keys = keys.len(), "JWT key set fetched");
                *self.keys.write().expect("jwks lock") = keys;
            }
            Ok(Err(why)) => warn!(url = %self.url, error = why.as_str(), "fetching the JWT key set failed"),
            Err(_) => warn!(url = %self.url, "fetching the JWT key set timed out"),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let request = hyper::Request::get(self.url.clone())
            .header(hyper::header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| crate::tls::error_text(&e))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the key set: {e}"))?
            .to_bytes();
        parse_key_set(&body)
    }
}

/// The usable keys of a JWKS document, by `kid`: RSA (RS256/384/512), EC P-256 and P-384
/// (ES256, ES384) and Ed25519 (EdDSA). Keys without a `kid`, symmetric keys and keys of other
/// types are left out; one bad key does not spoil the others.
fn parse_key_set(body: &[u8]) -> Result<HashMap<String, Arc<Key>>, String> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err("no \"keys\" array".into());
    };
    let mut out = HashMap::new();
    for value in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else { continue };
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let Some(algorithm) = algorithm_of(&jwk) else { continue };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            out.insert(kid, Arc::new(Key { key, algorithm }));
        }
    }
    Ok(out)
}

/// The one algorithm a published key verifies: its `alg` when it names one that fits its type,
/// otherwise its type's usual one.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let named = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(match named {
            Some(KeyAlgorithm::RS384) => Algorithm::RS384,
            Some(KeyAlgorithm::RS512) => Algorithm::RS512,
            Some(KeyAlgorithm::PS256) => Algorithm::PS256,
            Some(KeyAlgorithm::PS384) => Algorithm::PS384,
            Some(KeyAlgorithm::PS512) => Algorithm::PS512,
            _ => Algorithm::RS256,
        }),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(p) => (p.curve == EllipticCurve::Ed25519).then_some(Algorithm::EdDSA),
        AlgorithmParameters::OctetKey(_) => None,
    }
}

/// Whether a password looks like a JWT (three base64url parts), to try it as one.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    password.iter().filter(|&&b| b == b'.').count() == 2
        && password.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> JwtConfig {
        let text = format!("[auth.jwt]\nhs256_secret = \"s\"\n{extra}");
        crate::config::Config::parse(&text).unwrap().auth.jwt.unwrap()
    }

    fn signed(claims: serde_json::Value) -> Vec<u8> {
        let key = jsonwebtoken::EncodingKey::from_secret(b"s");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap().into_bytes()
    }

    #[test]
    fn issuer_audience_not_before_and_leeway() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let v =
            JwtVerifier::new(&config("issuer = \"https://id\"\naudience = \"herald\"\nleeway_secs = 30\n")).unwrap();
        let ok = serde_json::json!({"sub": "bob", "exp": now + 60, "iss": "https://id", "aud": "herald"});
        assert_eq!(v.verify(&signed(ok.clone())), Ok("bob".into()));
        let mut other = ok.clone();
        other["aud"] = "other".into();
        assert!(v.verify(&signed(other)).is_err(), "another audience");
        let mut other = ok.clone();
        other["iss"] = "https://evil".into();
        assert!(v.verify(&signed(other)).is_err(), "another issuer");
        let mut late = ok.clone();
        late["exp"] = (now - 10).into();
        assert_eq!(v.verify(&signed(late)), Ok("bob".into()), "expired 10 s ago, within the 30 s leeway");
        let mut late = ok.clone();
        late["exp"] = (now - 100).into();
        assert!(v.verify(&signed(late)).is_err(), "expired beyond the leeway");
        let mut early = ok.clone();
        early["nbf"] = (now + 100).into();
        assert!(v.verify(&signed(early)).is_err(), "not valid before nbf");
        let mut no_exp = ok;
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(v.verify(&signed(no_exp)).is_err(), "exp is required");
    }

    #[test]
    fn a_key_set_keeps_the_keys_it_can_use() {
        let set = br#"{"keys": [
            {"kty": "RSA", "kid": "r1", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "OKP", "kid": "d1", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "oct", "kid": "s1", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "XYZ", "kid": "x1"}
        ]}"#;
        let keys = parse_key_set(set).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["d1", "e1", "r1"], "no symmetric key, no key without kid, no unknown type");
        assert_eq!(keys["r1"].algorithm, Algorithm::RS256);
        assert_eq!(keys["e1"].algorithm, Algorithm::ES256);
        assert_eq!(keys["d1"].algorithm, Algorithm::EdDSA);
        assert!(parse_key_set(b"[1,2]").is_err());
    }
}
