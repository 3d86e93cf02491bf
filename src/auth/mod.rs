//! Authentication and authorization: who may connect (password file, JWT, TLS client
//! certificate, anonymous), and what they may publish, subscribe to and receive (ACL file).
//! docs/security.md describes the model.
//!
//! The whole of it is one immutable `Auth`, swapped as a unit on reload, so a connection sees
//! either the old files or the new ones, never half of each.

pub mod acl;
pub mod jwt;
pub mod password;

use std::path::PathBuf;

use crate::config::AuthConfig;
use acl::{Acl, ClientAcl};
use jwt::JwtVerifier;
use password::PasswordFile;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{}:{line}: {why}", path.display())]
    File { path: PathBuf, line: usize, why: String },
    #[error("JWT: {0}")]
    Jwt(String),
}

/// Reads one of the auth files and parses it with `parse`, which reports a line number.
fn load_file<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, (usize, String)>,
) -> Result<T, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
        path: path.into(),
        line: 0,
        why: e.to_string(),
    })?;
    parse(&text).map_err(|(line, why)| AuthError::File { path: path.into(), line, why })
}

pub struct Auth {
    /// None: anonymous clients are allowed on loopback listeners only.
    pub allow_anonymous: Option<bool>,
    pub passwords: Option<PasswordFile>,
    pub jwt: Option<JwtVerifier>,
    pub acl: Option<Acl>,
}

/// The answer to a CONNECT's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, with the user name the ACL knows the client by.
    Allowed(Option<String>),
    /// CONNACK 0x86 bad user name or password (3.1.1: 0x04).
    BadCredentials(String),
    /// CONNACK 0x87 not authorized (3.1.1: 0x05).
    NotAuthorized(String),
}

impl Auth {
    pub fn load(c: &AuthConfig) -> Result<Auth, AuthError> {
        Ok(Auth {
            allow_anonymous: c.allow_anonymous,
            passwords: c.password_file.as_deref().map(PasswordFile::load).transpose()?,
            jwt: c.jwt.as_ref().map(JwtVerifier::new).transpose()?,
            acl: c.acl_file.as_deref().map(Acl::load).transpose()?,
        })
    }

    /// Open: anonymous allowed everywhere, no ACL. For tests and embedding.
    pub fn open() -> Auth {
        Auth { allow_anonymous: Some(true), passwords: None, jwt: None, acl: None }
    }

    /// Checks a CONNECT's credentials. `certificate_name` is the CN of a verified TLS client
    /// certificate on a listener that takes it as the user name. CPU-bound (PBKDF2, RSA): run it
    /// off the async workers.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        certificate_name: Option<&str>,
        loopback: bool,
    ) -> Verdict {
        if let Some(name) = certificate_name {
            return Verdict::Allowed(Some(name.to_owned()));
        }
        if let (Some(jwt), Some(pw)) = (&self.jwt, password) {
            let known_user = username.is_some_and(|u| self.passwords.as_ref().is_some_and(|p| p.contains(u)));
            if !known_user && jwt::looks_like_jwt(pw) {
                return match jwt.verify(pw) {
                    Ok(user) => Verdict::Allowed(Some(user)),
                    Err(why) => Verdict::BadCredentials(format!("token refused: {why}")),
                };
            }
        }
        match (username, &self.passwords) {
            (Some(user), Some(file)) => {
                if file.verify(user, password.unwrap_or_default()) {
                    Verdict::Allowed(Some(user.to_owned()))
                } else {
                    Verdict::BadCredentials(format!("wrong password or unknown user {user:?}"))
                }
            }
            _ if password.is_some() && (self.passwords.is_some() || self.jwt.is_some()) => {
                Verdict::BadCredentials("a password without a known user name".into())
            }
            // No way to check a name: the client counts as anonymous, keeping its name for the ACL.
            _ if self.allow_anonymous.unwrap_or(loopback) => Verdict::Allowed(username.map(str::to_owned)),
            _ => Verdict::NotAuthorized("anonymous clients are not allowed".into()),
        }
    }

    /// The rules of one client; None when no ACL file is configured (everything allowed).
    pub fn client_acl(&self, username: Option<&str>, client_id: &str) -> Option<ClientAcl> {
        self.acl.as_ref().map(|a| a.for_client(username, client_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_passwords() -> Auth {
        let line = format!("editor:{}\n", password::hash_password(b"pw", 100));
        Auth { allow_anonymous: None, passwords: Some(PasswordFile::parse(&line).unwrap()), jwt: None, acl: None }
    }

    #[test]
    fn passwords_anonymous_and_loopback_default() {
        let a = with_passwords();
        assert_eq!(a.authenticate(Some("editor"), Some(b"pw"), None, false), Verdict::Allowed(Some("editor".into())));
        assert!(matches!(a.authenticate(Some("editor"), Some(b"px"), None, false), Verdict::BadCredentials(_)));
        assert!(matches!(a.authenticate(Some("ghost"), Some(b"pw"), None, false), Verdict::BadCredentials(_)));
        assert!(matches!(a.authenticate(None, None, None, false), Verdict::NotAuthorized(_)), "not on loopback");
        assert_eq!(a.authenticate(None, None, None, true), Verdict::Allowed(None), "on loopback by default");
        assert_eq!(a.authenticate(None, None, Some("device-7"), false), Verdict::Allowed(Some("device-7".into())));
    }
}
