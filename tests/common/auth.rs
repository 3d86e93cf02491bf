//! A site's auth service and identity provider for the tests (tests/tools/auth_fixture.py),
//! and key pairs and tokens for the JWT tests.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use base64::Engine;

/// tests/tools/auth_fixture.py on a port of its own; stopped when dropped.
pub struct Fixture {
    child: Child,
    port: u16,
    https: bool,
}

impl Fixture {
    pub fn start(args: &[&str]) -> Fixture {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/auth_fixture.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("auth_fixture.py: {line:?}"));
        Fixture { child, port, https: args.contains(&"--cert") }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let host = if self.https { "localhost" } else { "127.0.0.1" };
        format!("{scheme}://{host}:{}{path}", self.port)
    }

    pub fn curl(&self, args: &[&str], path: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-sS", "-k", "--max-time", "10"])
            .args(args)
            .arg(self.url(path))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn control(&self, mode: &str, delay: f64) {
        let body = serde_json::json!({ "mode": mode, "delay": delay }).to_string();
        self.curl(&["-X", "POST", "-d", &body], "/control");
    }

    pub fn stats(&self) -> serde_json::Value {
        self.curl(&[], "/stats")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An openssl key pair: the private key's PEM, and its public key as a JWK with `kid`.
pub fn keypair(dir: &Path, kind: &str, kid: &str) -> (Vec<u8>, serde_json::Value) {
    let key = dir.join(format!("{kid}.key"));
    let args: &[&str] = match kind {
        "RSA" => &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "EC" => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        _ => &["genpkey", "-algorithm", "ED25519"],
    };
    let out = Command::new("openssl").args(args).args(["-out", key.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // PKCS#8 for jsonwebtoken's EC and Ed keys.
    let pk8 = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-in", key.to_str().unwrap()])
        .output()
        .unwrap()
        .stdout;
    let der = Command::new("openssl")
        .args(["pkey", "-in", key.to_str().unwrap(), "-pubout", "-outform", "DER"])
        .output()
        .unwrap()
        .stdout;
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).unwrap();
    let jwk = match spki.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            let n = rsa.modulus.iter().skip_while(|b| **b == 0).copied().collect::<Vec<_>>();
            serde_json::json!({ "kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&n), "e": b64(rsa.exponent) })
        }
        x509_parser::public_key::PublicKey::EC(point) => {
            let xy = &point.data()[1..];
            serde_json::json!({ "kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&xy[..32]), "y": b64(&xy[32..]) })
        }
        _ => serde_json::json!({ "kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(&spki.subject_public_key.data) }),
    };
    (pk8, jwk)
}

pub fn token(pem: &[u8], alg: jsonwebtoken::Algorithm, kid: &str, sub: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header};
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
        jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_ed_pem(pem),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({ "sub": sub, "exp": now + 600, "iss": "https://id.example", "aud": "herald" });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

pub fn write_jwks(path: &Path, keys: &[&serde_json::Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(serde_json::json!({ "keys": keys }).to_string().as_bytes()).unwrap();
}
