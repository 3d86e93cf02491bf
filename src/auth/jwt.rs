//! JSON Web Tokens as the CONNECT password, so that an app's existing login can connect without
//! a broker account: HS256 with a shared secret or RS256 with the issuer's public key, `exp`
//! required and checked, one claim (`sub` by default) taken as the user name for the ACL.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};

use super::AuthError;
use crate::config::JwtConfig;

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    username_claim: String,
}

impl JwtVerifier {
    pub fn new(c: &JwtConfig) -> Result<JwtVerifier, AuthError> {
        let bad = |why: String| AuthError::Jwt(why);
        let (key, algorithm) = match (&c.hs256_secret, &c.rs256_public_key) {
            (Some(secret), None) => (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                (key, Algorithm::RS256)
            }
            _ => return Err(bad("[auth.jwt] needs exactly one of hs256_secret and rs256_public_key".into())),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 0;
        validation.validate_aud = false;
        Ok(JwtVerifier { key, validation, username_claim: c.username_claim.clone() })
    }

    /// The user name the token vouches for, or why it does not.
    pub fn verify(&self, token: &[u8]) -> Result<String, String> {
        let token = std::str::from_utf8(token).map_err(|_| "token is not UTF-8".to_string())?;
        let data = decode::<serde_json::Map<String, serde_json::Value>>(token, &self.key, &self.validation)
            .map_err(|e| e.to_string())?;
        match data.claims.get(&self.username_claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(format!("token has no string claim {:?}", self.username_claim)),
        }
    }
}

/// Whether a password looks like a JWT (three base64url parts), to try it as one.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    password.iter().filter(|&&b| b == b'.').count() == 2
        && password.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'='))
}
