//! Authentication and authorization: who may connect (password file, JWT, TLS client
//! certificate, anonymous), and what they may publish, subscribe to and receive (ACL file).
//! docs/security.md describes the model.
//!
//! The whole of it is one immutable `Auth`, swapped as a unit on reload, so a connection sees
//! either the old files or the new ones, never half of each.

pub mod acl;
pub mod jwt;
pub mod password;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::AuthConfig;
use crate::metrics::Metrics;
use acl::{Acl, ClientAcl, Rule};
use jwt::JwtVerifier;
use password::PasswordFile;
use service::AuthService;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{}:{line}: {why}", path.display())]
    File { path: PathBuf, line: usize, why: String },
    #[error("JWT: {0}")]
    Jwt(String),
    #[error("auth.http: {0}")]
    Service(String),
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
    /// The site's auth service (`[auth.http]`).
    pub service: Option<AuthService>,
    /// Whether a session belongs to the identity that made it (`auth.session_owner`).
    pub session_owner: bool,
}

/// What a client presents, over MQTT or HTTP.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<bytes::Bytes>,
    /// The CN of a verified TLS client certificate on a listener that takes it as the user name.
    pub certificate_name: Option<String>,
    pub peer: std::net::SocketAddr,
    /// `mqtt3`, `mqtt4` (3.1.1), `mqtt5`, `sse` or `poll`: what the auth service is told.
    pub protocol: &'static str,
    pub loopback: bool,
}

/// An admitted client: who it is for the ACL and whose sessions it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// The user name the ACL knows the client by.
    pub user: Option<String>,
    /// Whether something vouched for `user` (a password, a token, a certificate, the auth
    /// service); an anonymous client may still give a name for the ACL, but owns nothing by it.
    pub verified: bool,
    /// The auth service's ACL rules for this client, in place of the ACL file's user section.
    pub rules: Option<Arc<Vec<Rule>>>,
}

/// The owner of the sessions of anonymous clients (and of clients whose name nothing vouched
/// for), in the store and the directory. Shown as "anonymous".
pub const ANONYMOUS_OWNER: &str = "";

impl Login {
    pub fn user(user: &str) -> Login {
        Login { user: Some(user.to_owned()), verified: true, rules: None }
    }

    pub fn anonymous() -> Login {
        Login { user: None, verified: false, rules: None }
    }

    /// The identity that owns the sessions this client makes.
    pub fn owner(&self) -> &str {
        match (&self.user, self.verified) {
            (Some(u), true) => u,
            _ => ANONYMOUS_OWNER,
        }
    }
}

/// An owner as logs and answers show it.
pub fn owner_name(owner: &str) -> &str {
    if owner == ANONYMOUS_OWNER {
        "anonymous"
    } else {
        owner
    }
}

/// The answer to a CONNECT's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed(Login),
    /// CONNACK 0x86 bad user name or password (3.1.1: 0x04).
    BadCredentials(String),
    /// CONNACK 0x87 not authorized (3.1.1: 0x05).
    NotAuthorized(String),
}

/// What the local sources (certificate, password file, JWT) make of credentials.
enum Local {
    Done(Verdict),
    /// A token naming a key the JWT key set does not hold (yet).
    UnknownKey(String),
    /// None of them takes these credentials: the auth service decides.
    AskService,
}

impl Auth {
    pub fn load(c: &AuthConfig, metrics: Arc<Metrics>) -> Result<Auth, AuthError> {
        let auth = Auth {
            allow_anonymous: c.allow_anonymous,
            passwords: c.password_file.as_deref().map(PasswordFile::load).transpose()?,
            jwt: c.jwt.as_ref().map(JwtVerifier::new).transpose()?,
            acl: c.acl_file.as_deref().map(Acl::load).transpose()?,
            service: c.http.as_ref().map(|h| AuthService::new(h, metrics)).transpose().map_err(AuthError::Service)?,
            session_owner: c.session_owner,
        };
        if let Some(jwt) = &auth.jwt {
            jwt.start();
        }
        Ok(auth)
    }

    /// Open: anonymous allowed everywhere, no ACL. For tests and embedding.
    pub fn open() -> Auth {
        Auth { allow_anonymous: Some(true), passwords: None, jwt: None, acl: None, service: None, session_owner: true }
    }

    /// Checks a client's credentials: a verified certificate's name; a user of the password
    /// file; a JWT (with the key set refreshed once for an unknown `kid`); otherwise, with
    /// credentials and `[auth.http]`, the auth service; otherwise anonymous where allowed.
    /// PBKDF2 and RSA run off the async workers.
    pub async fn login(self: &Arc<Self>, c: Credentials) -> Verdict {
        let c = Arc::new(c);
        let mut retried = false;
        loop {
            let local = if self.passwords.is_none() && self.jwt.is_none() {
                self.check_local(&c)
            } else {
                let (auth, creds) = (self.clone(), c.clone());
                match tokio::task::spawn_blocking(move || auth.check_local(&creds)).await {
                    Ok(local) => local,
                    Err(_) => return Verdict::NotAuthorized("authentication failed".into()),
                }
            };
            match local {
                Local::Done(v) => return v,
                Local::UnknownKey(kid) => {
                    let jwt = self.jwt.as_ref().expect("an unknown key comes from the JWT settings");
                    if retried || !jwt.refresh_for(&kid).await {
                        return Verdict::BadCredentials("token refused: its key (kid) is not in the key set".into());
                    }
                    retried = true;
                }
                Local::AskService => {
                    let service = self.service.as_ref().expect("asked only with a service");
                    return service.check(&c).await;
                }
            }
        }
    }

    fn check_local(&self, c: &Credentials) -> Local {
        let (username, password) = (c.username.as_deref(), c.password.as_deref());
        if let Some(name) = &c.certificate_name {
            return Local::Done(Verdict::Allowed(Login::user(name)));
        }
        let known_user = username.is_some_and(|u| self.passwords.as_ref().is_some_and(|p| p.contains(u)));
        if let (Some(jwt), Some(pw)) = (&self.jwt, password) {
            if !known_user && jwt::looks_like_jwt(pw) {
                return match jwt.verify(pw) {
                    Ok(user) => Local::Done(Verdict::Allowed(Login::user(&user))),
                    Err(jwt::Refusal::UnknownKey(kid)) => Local::UnknownKey(kid),
                    Err(jwt::Refusal::Invalid(why)) => {
                        Local::Done(Verdict::BadCredentials(format!("token refused: {why}")))
                    }
                };
            }
        }
        if !known_user && self.service.is_some() && (username.is_some() || password.is_some()) {
            return Local::AskService;
        }
        Local::Done(match (username, &self.passwords) {
            (Some(user), Some(file)) => {
                if file.verify(user, password.unwrap_or_default()) {
                    Verdict::Allowed(Login::user(user))
                } else {
                    Verdict::BadCredentials(format!("wrong password or unknown user {user:?}"))
                }
            }
            _ if password.is_some() && (self.passwords.is_some() || self.jwt.is_some()) => {
                Verdict::BadCredentials("a password without a known user name".into())
            }
            // No way to check a name: the client counts as anonymous, keeping its name for the ACL.
            _ if self.allow_anonymous.unwrap_or(c.loopback) => {
                Verdict::Allowed(Login { user: username.map(str::to_owned), verified: false, rules: None })
            }
            _ => Verdict::NotAuthorized("anonymous clients are not allowed".into()),
        })
    }

    /// The rules of one client; None when neither an ACL file nor the auth service gives any
    /// (everything allowed).
    pub fn client_acl(&self, login: &Login, client_id: &str) -> Option<ClientAcl> {
        let user = login.user.as_deref();
        match (&self.acl, &login.rules) {
            (Some(acl), Some(rules)) => Some(acl.for_client_with(user, client_id, rules)),
            (Some(acl), None) => Some(acl.for_client(user, client_id)),
            (None, Some(rules)) => Some(ClientAcl::from_rules(rules.to_vec())),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_passwords() -> Arc<Auth> {
        let line = format!("editor:{}\n", password::hash_password(b"pw", 100));
        Arc::new(Auth { passwords: Some(PasswordFile::parse(&line).unwrap()), allow_anonymous: None, ..Auth::open() })
    }

    fn creds(user: Option<&str>, pw: Option<&[u8]>, cert: Option<&str>, loopback: bool) -> Credentials {
        Credentials {
            client_id: "c".into(),
            username: user.map(Into::into),
            password: pw.map(bytes::Bytes::copy_from_slice),
            certificate_name: cert.map(Into::into),
            peer: "127.0.0.1:1".parse().unwrap(),
            protocol: "mqtt5",
            loopback,
        }
    }

    #[tokio::test]
    async fn passwords_anonymous_and_loopback_default() {
        let a = with_passwords();
        assert_eq!(
            a.login(creds(Some("editor"), Some(b"pw"), None, false)).await,
            Verdict::Allowed(Login::user("editor"))
        );
        assert!(matches!(a.login(creds(Some("editor"), Some(b"px"), None, false)).await, Verdict::BadCredentials(_)));
        assert!(matches!(a.login(creds(Some("ghost"), Some(b"pw"), None, false)).await, Verdict::BadCredentials(_)));
        assert!(matches!(a.login(creds(None, None, None, false)).await, Verdict::NotAuthorized(_)), "not on loopback");
        assert_eq!(a.login(creds(None, None, None, true)).await, Verdict::Allowed(Login::anonymous()), "on loopback");
        assert_eq!(
            a.login(creds(None, None, Some("device-7"), false)).await,
            Verdict::Allowed(Login::user("device-7"))
        );
    }

    #[tokio::test]
    async fn an_unverified_name_owns_nothing() {
        let a = Arc::new(Auth::open());
        let Verdict::Allowed(login) = a.login(creds(Some("bob"), None, None, false)).await else { panic!() };
        assert_eq!(login.user.as_deref(), Some("bob"), "kept for the ACL");
        assert_eq!(login.owner(), ANONYMOUS_OWNER, "but its sessions are anonymous ones");
        assert_eq!(Login::user("bob").owner(), "bob");
    }
}
