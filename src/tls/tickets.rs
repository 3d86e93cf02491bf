//! TLS session tickets whose keys come from a secret file shared by every node, so that a phone
//! resumes its TLS session on any node of a cluster and after a restart, where rustls's own
//! ticketer makes random keys that live and die with the process.
//!
//! A ticket is sealed with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from the secret
//! and the number of the rotation period it was made in; tickets of the current and the previous
//! period open, so a key lives two periods and then cannot be derived by this server again
//! without the secret (what bounds the damage a stolen ticket key does, as rustls's rotation).
//! The layout is rustls's own: key name (here the period, 8 bytes big-endian, authenticated as
//! associated data), 12-byte random nonce, ciphertext, tag.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// A ticket longer than any this server makes is refused before it is opened (rustls's own
/// ticketer does the same, against partitioning-oracle attacks on the AEAD).
const MAX_TICKET: usize = 2048;
const NAME_LEN: usize = 8;

/// The fewest bytes a secret file must hold.
pub const MIN_SECRET: usize = 32;

pub struct SharedTicketer {
    secret: Vec<u8>,
    rotate_secs: u64,
    random: SystemRandom,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("SharedTicketer").field("rotate_secs", &self.rotate_secs).finish()
    }
}

impl SharedTicketer {
    /// Reads the secret from `path` (its bytes as they are: `head -c 64 /dev/urandom > FILE`).
    pub fn from_file(path: &Path, rotate_secs: u64) -> Result<SharedTicketer, String> {
        let secret = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "{}: {} bytes; a ticket key needs at least {MIN_SECRET}",
                path.display(),
                secret.len()
            ));
        }
        Ok(SharedTicketer::new(secret, rotate_secs))
    }

    pub fn new(secret: Vec<u8>, rotate_secs: u64) -> SharedTicketer {
        SharedTicketer { secret, rotate_secs: rotate_secs.max(1), random: SystemRandom::new() }
    }

    fn period(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) / self.rotate_secs
    }

    fn key(&self, period: u64) -> Option<LessSafeKey> {
        let prk = Salt::new(HKDF_SHA256, b"herald tls ticket key").extract(&self.secret);
        let info = period.to_be_bytes();
        let info = [&info[..]];
        let okm = prk.expand(&info, &CHACHA20_POLY1305).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }

    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.key(period)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let name = period.to_be_bytes();
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut out[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET || ticket.len() < NAME_LEN + NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let period = u64::from_be_bytes(name.try_into().ok()?);
        // Only the current period's key and the one before: an older ticket, or one named for
        // the future, is a full handshake.
        if period != now && Some(period) != now.checked_sub(1) {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut out = sealed.to_vec();
        let len = self.key(period)?.open_in_place(nonce, Aad::from(name), &mut out).ok()?.len();
        out.truncate(len);
        Some(out)
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    /// One period: a ticket opens until the end of the period after the one it was made in, so
    /// at least that long whenever it was made.
    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotate_secs).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(self.period(), plain)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open(self.period(), ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_on_another_ticketer_with_the_same_secret_for_two_periods() {
        let a = SharedTicketer::new(vec![7; 32], 3600);
        let b = SharedTicketer::new(vec![7; 32], 3600);
        let ticket = a.seal(100, b"session state").unwrap();
        assert_eq!(b.open(100, &ticket).as_deref(), Some(&b"session state"[..]));
        assert_eq!(b.open(101, &ticket).as_deref(), Some(&b"session state"[..]));
        assert_eq!(b.open(102, &ticket), None, "expired with its key");
        assert_eq!(b.open(99, &ticket), None, "named for a later period");
    }

    #[test]
    fn another_secret_a_changed_byte_or_a_cut_ticket_opens_nothing() {
        let a = SharedTicketer::new(vec![7; 32], 3600);
        let other = SharedTicketer::new(vec![8; 32], 3600);
        let ticket = a.seal(5, b"state").unwrap();
        assert_eq!(other.open(5, &ticket), None);
        for i in 0..ticket.len() {
            let mut t = ticket.clone();
            t[i] ^= 1;
            assert_eq!(a.open(5, &t), None, "byte {i} changed");
        }
        for len in 0..ticket.len() {
            assert_eq!(a.open(5, &ticket[..len]), None, "cut to {len}");
        }
        assert_eq!(a.open(5, &vec![0; MAX_TICKET + 1]), None);
    }

    #[test]
    fn a_short_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, [1u8; 31]).unwrap();
        assert!(SharedTicketer::from_file(&path, 60).unwrap_err().contains("at least 32"));
        std::fs::write(&path, [1u8; 32]).unwrap();
        assert!(SharedTicketer::from_file(&path, 60).is_ok());
    }
}
