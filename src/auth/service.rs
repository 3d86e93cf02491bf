//! `[auth.http]`: the site's own auth service. Herald POSTs a client's credentials as JSON and
//! the service answers who the client is:
//!
//! ```text
//! POST <url>  {"client_id": "...", "username": "...", "password": "...", "peer": "1.2.3.4:5678",
//!              "protocol": "mqtt5", "certificate_cn": null}
//! 200 {"allow": true, "user": "bob", "acl": [{"topic": "users/bob/#", "access": "read"}]}
//! ```
//!
//! `allow: false`, 401 and 403 refuse the client. A timeout, another status or an unreachable
//! service is an error: `on_error` says whether that refuses or admits (as anonymous, never as
//! the user the client claims to be). Answers are cached for `cache_secs` by a hash of the
//! credentials (never the password itself), and at most `max_in_flight` calls run at once: a
//! reconnect storm of a million phones becomes a bounded trickle of calls, and a CONNECT that
//! cannot get a call within `timeout_ms` is answered by `on_error` rather than queued longer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::acl::{Access, Rule};
use super::{Credentials, Login, Verdict};
use crate::config::{AuthHttpConfig, OnError};
use crate::metrics::Metrics;

/// An answer larger than this is an error: the service's answer is read into memory.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

pub struct AuthService {
    url: hyper::Uri,
    client: crate::tls::HttpsClient,
    timeout: Duration,
    cache_for: Duration,
    cache_entries: usize,
    on_error: OnError,
    calls: tokio::sync::Semaphore,
    cache: Mutex<HashMap<[u8; 32], (Instant, Answer)>>,
    metrics: Arc<Metrics>,
}

/// What the service said of one set of credentials.
#[derive(Clone, Debug)]
enum Answer {
    Allowed { user: Option<String>, rules: Option<Arc<Vec<Rule>>> },
    Refused(String),
}

#[derive(Deserialize)]
struct Reply {
    allow: bool,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    acl: Option<Vec<ReplyRule>>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ReplyRule {
    topic: String,
    access: String,
}

impl AuthService {
    pub fn new(c: &AuthHttpConfig, metrics: Arc<Metrics>) -> Result<AuthService, String> {
        let url: hyper::Uri = c.url.parse().map_err(|e| format!("auth.http.url: {e}"))?;
        let tls = crate::tls::client_config(c.ca_file.as_deref())?;
        Ok(AuthService {
            url,
            client: crate::tls::https_client(tls),
            timeout: Duration::from_millis(c.timeout_ms),
            cache_for: Duration::from_secs(c.cache_secs),
            cache_entries: c.cache_entries,
            on_error: c.on_error,
            calls: tokio::sync::Semaphore::new(c.max_in_flight),
            cache: Mutex::default(),
            metrics,
        })
    }

    /// Asks the service about `c` (or answers from the cache). Never takes longer than
    /// `timeout_ms`, waiting for a call slot included.
    pub async fn check(&self, c: &Credentials) -> Verdict {
        let key = cache_key(c);
        if let Some(answer) = self.cached(&key) {
            self.metrics.auth_service_cached.fetch_add(1, Ordering::Relaxed);
            return verdict(answer, c);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let asked = tokio::time::timeout_at(deadline, async {
            let _slot = self.calls.acquire().await.map_err(|_| "closed".to_owned())?;
            self.metrics.auth_service_calls.fetch_add(1, Ordering::Relaxed);
            self.ask(c).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms (timeout_ms)", self.timeout.as_millis())));
        match asked {
            Ok(answer) => {
                self.remember(key, answer.clone());
                verdict(answer, c)
            }
            Err(why) => {
                self.metrics.auth_service_errors.fetch_add(1, Ordering::Relaxed);
                // Sampled like every connection line: a dead service under a reconnect storm
                // would otherwise write a line per phone; the counter has every one.
                if crate::logging::connection_line() {
                    warn!(
                        url = %self.url,
                        client_id = c.client_id.as_str(),
                        error = why.as_str(),
                        on_error = ?self.on_error,
                        "the auth service did not answer"
                    );
                }
                match self.on_error {
                    OnError::Deny => Verdict::NotAuthorized(format!("the auth service did not answer: {why}")),
                    OnError::Allow => Verdict::Allowed(Login::anonymous()),
                }
            }
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Answer> {
        if self.cache_for.is_zero() {
            return None;
        }
        let mut cache = self.cache.lock().expect("auth cache lock");
        match cache.get(key) {
            Some((at, answer)) if at.elapsed() < self.cache_for => Some(answer.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], answer: Answer) {
        if self.cache_for.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().expect("auth cache lock");
        if cache.len() >= self.cache_entries {
            let ttl = self.cache_for;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= self.cache_entries {
                // Still full of live answers: one makes room (asked again when next needed).
                if let Some(k) = cache.keys().next().copied() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(key, (Instant::now(), answer));
    }

    async fn ask(&self, c: &Credentials) -> Result<Answer, String> {
        let (password, encoding) = match c.password.as_deref().map(std::str::from_utf8) {
            None => (None, None),
            Some(Ok(text)) => (Some(text.to_owned()), None),
            Some(Err(_)) => (
                Some(base64::engine::general_purpose::STANDARD.encode(c.password.as_deref().unwrap_or_default())),
                Some("base64"),
            ),
        };
        let body = serde_json::json!({
            "client_id": c.client_id,
            "username": c.username,
            "password": password,
            "password_encoding": encoding,
            "peer": c.peer.to_string(),
            "protocol": c.protocol,
            "certificate_cn": c.certificate_name,
        });
        let request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize"))))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| crate::tls::error_text(&e))?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Ok(Answer::Refused(format!("the auth service refused (status {status})")));
        }
        if status != 200 {
            return Err(format!("status {status}"));
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        let reply: Reply = serde_json::from_slice(&body).map_err(|e| format!("an answer that is not ours: {e}"))?;
        if !reply.allow {
            let reason = reply.reason.unwrap_or_else(|| "no reason given".into());
            return Ok(Answer::Refused(format!("the auth service refused: {reason}")));
        }
        let rules = match reply.acl {
            None => None,
            Some(given) => {
                let mut rules = Vec::with_capacity(given.len());
                for r in given {
                    let access = match r.access.as_str() {
                        "read" => Access::Read,
                        "write" => Access::Write,
                        "readwrite" => Access::ReadWrite,
                        "deny" => Access::Deny,
                        other => return Err(format!("an ACL rule with access {other:?}")),
                    };
                    if !crate::codec::is_valid_topic_filter(&r.topic) {
                        return Err(format!("an ACL rule for {:?}, not a topic filter", r.topic));
                    }
                    rules.push(Rule::new(access, r.topic));
                }
                Some(Arc::new(rules))
            }
        };
        let user = reply.user.filter(|u| !u.is_empty());
        Ok(Answer::Allowed { user, rules })
    }
}

fn verdict(answer: Answer, c: &Credentials) -> Verdict {
    match answer {
        Answer::Allowed { user, rules } => {
            Verdict::Allowed(Login { user: user.or_else(|| c.username.clone()), verified: true, rules })
        }
        Answer::Refused(why) => Verdict::BadCredentials(why),
    }
}

/// What the answer may depend on, hashed: the cache never holds a password.
fn cache_key(c: &Credentials) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        c.client_id.as_bytes(),
        c.username.as_deref().unwrap_or_default().as_bytes(),
        c.password.as_deref().unwrap_or_default(),
        c.certificate_name.as_deref().unwrap_or_default().as_bytes(),
        c.protocol.as_bytes(),
        c.peer.ip().to_string().as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}
