//! Password files in Mosquitto's format, so an operator can bring the file of an existing
//! Mosquitto unchanged: one `user:hash` per line, the hash either `$7$ITERATIONS$SALT$HASH`
//! (PBKDF2-HMAC-SHA512, what `mosquitto_passwd` writes since 2.0 and what `herald passwd`
//! writes) or `$6$SALT$HASH` (SHA-512 of password then salt, Mosquitto 1.x), salt and hash in
//! base64.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha512};

use super::AuthError;

/// Iterations `herald passwd` uses. Mosquitto's default is 101; more is safer against an offline
/// attack on a stolen file, at the cost of CPU per CONNECT (about 10 ms here, done off the
/// connection's task). Existing hashes keep their own count.
pub const DEFAULT_ITERATIONS: u32 = 20_000;
const SALT_LEN: usize = 12;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Hash {
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

/// Compared against when the user is unknown, so an unknown user costs the same work as a known
/// one and the answer's timing does not tell which users exist.
fn decoy() -> Hash {
    Hash::Pbkdf2Sha512 { iterations: DEFAULT_ITERATIONS, salt: vec![0; SALT_LEN], hash: vec![0; 64] }
}

fn parse_hash(text: &str) -> Result<Hash, String> {
    let parts: Vec<&str> = text.split('$').collect();
    let b64 = |s: &str| B64.decode(s).map_err(|e| format!("invalid base64: {e}"));
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => Ok(Hash::Pbkdf2Sha512 {
            iterations: iterations
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("invalid iteration count {iterations:?}"))?,
            salt: b64(salt)?,
            hash: b64(hash)?,
        }),
        ["", "6", salt, hash] => Ok(Hash::Sha512 { salt: b64(salt)?, hash: b64(hash)? }),
        _ => Err("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash; plain-text passwords are refused".into()),
    }
}

fn derive(hash: &Hash, password: &[u8]) -> Vec<u8> {
    match hash {
        Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
            let mut out = vec![0u8; hash.len().max(1)];
            pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
            out
        }
        Hash::Sha512 { salt, .. } => {
            let mut h = Sha512::new();
            h.update(password);
            h.update(salt);
            h.finalize().to_vec()
        }
    }
}

fn expected(hash: &Hash) -> &[u8] {
    match hash {
        Hash::Pbkdf2Sha512 { hash, .. } | Hash::Sha512 { hash, .. } => hash,
    }
}

/// Equal in time whatever the contents: no early exit at the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        super::load_file(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or((n + 1, "expected user:hash".to_string()))?;
            users.insert(user.to_owned(), parse_hash(hash).map_err(|e| (n + 1, e))?);
        }
        Ok(PasswordFile { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether `password` is `user`'s. CPU-bound (PBKDF2): call it off the async workers.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.clone(), true),
            None => (decoy(), false),
        };
        let ok = constant_time_eq(&derive(&hash, password), expected(&hash));
        ok && known
    }
}

/// A `$7$` line for `herald passwd`, readable by Mosquitto as well.
pub fn hash_password(password: &[u8], iterations: u32) -> String {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).expect("the operating system's random source");
    let hash = Hash::Pbkdf2Sha512 { iterations, salt: salt.to_vec(), hash: vec![0; 64] };
    format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(derive(&hash, password)))
}

/// Adds or replaces `user` in the password file at `path` (created if missing).
pub fn set_password(path: &Path, user: &str, password: &[u8], iterations: u32) -> Result<(), AuthError> {
    if user.is_empty() || user.contains(':') {
        return Err(AuthError::File {
            path: path.into(),
            line: 0,
            why: "a user name cannot be empty or contain ':'".into(),
        });
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(AuthError::File { path: path.into(), line: 0, why: e.to_string() }),
    };
    let mut lines: Vec<String> =
        text.lines().filter(|l| l.split_once(':').map(|(u, _)| u) != Some(user)).map(str::to_owned).collect();
    lines.push(format!("{user}:{}", hash_password(password, iterations)));
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).map_err(|e| AuthError::File { path: path.into(), line: 0, why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_hashes_verify_and_wrong_passwords_and_unknown_users_do_not() {
        let line = format!("editor:{}\n", hash_password(b"s3cret", 1000));
        let f = PasswordFile::parse(&line).unwrap();
        assert!(f.verify("editor", b"s3cret"));
        assert!(!f.verify("editor", b"s3cret "));
        assert!(!f.verify("nobody", b"s3cret"));
    }

    #[test]
    fn mosquitto_1_x_sha512_hashes_verify() {
        // Built the way mosquitto_passwd 1.x does: base64(sha512(password + salt)).
        let salt = b"0123456789ab";
        let mut h = Sha512::new();
        h.update(b"pw");
        h.update(salt);
        let line = format!("old:$6${}${}", B64.encode(salt), B64.encode(h.finalize()));
        let f = PasswordFile::parse(&line).unwrap();
        assert!(f.verify("old", b"pw") && !f.verify("old", b"px"));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let (line, why) = PasswordFile::parse("# comment\nalice:plain\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("plain-text"), "{why}");
        assert_eq!(PasswordFile::parse("bob\n").unwrap_err().0, 1);
    }
}
