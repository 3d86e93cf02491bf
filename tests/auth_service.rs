//! Logins from the site's own services [issue 24]: `[auth.http]` (a real HTTP(S) server, a
//! Python one started by the test, that answers, refuses, answers slowly, fails, or is not
//! there) and `[auth.jwt] jwks_url` (an identity provider's key set over HTTPS, rotated
//! mid-test, with RS256, ES256 and EdDSA tokens). Clients are raw CONNECTs, mosquitto_pub and
//! curl against a real broker.

mod common;

use std::time::{Duration, Instant};

use common::auth::*;
use common::*;
use herald::codec::{Packet, ProtocolVersion, QoS};

fn connect(version: ProtocolVersion, client_id: &str, user: Option<&str>, password: Option<&str>) -> Packet {
    let mut c = connect_packet(version, client_id, true);
    c.username = user.map(str::to_owned);
    c.password = password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    Packet::Connect(Box::new(c))
}

/// Connects and returns the client with the CONNACK's code.
async fn login(b: &TestBroker, v: ProtocolVersion, id: &str, user: Option<&str>, pw: Option<&str>) -> (RawClient, u8) {
    let mut c = RawClient::connect_tcp(b.addr).await;
    c.send(&connect(v, id, user, pw)).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, a.code.0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn suback(c: &mut RawClient, filter: &str) -> u8 {
    c.send(&subscribe(1, filter, QoS::AtMostOnce)).await;
    expect_suback(c).await[0]
}

/// The service says who a client is: its user (for the ACL and the session's owner) and, when
/// it gives one, the client's ACL in place of the file's rules for that user. A refusal is
/// 0x86 / 0x04; an answer is cached (the service is asked once for the same credentials); the
/// HTTP readers log in the same way. Over HTTPS with a private CA (`ca_file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sites_auth_service_says_who_a_client_is() {
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let service = Fixture::start(&["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user carol\ntopic read news/#\npattern read users/%u/#\n").unwrap();
    let b = start_toml(&format!(
        "[http]\nbind = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = false\nacl_file = {}\n\
         [auth.http]\nurl = \"{}\"\nca_file = {}\ncache_secs = 60\n",
        toml_path(&acl),
        service.url("/auth"),
        toml_path(&dir.path().join("ca.pem"))
    ));
    let v5 = ProtocolVersion::V5;

    let (mut bob, code) = login(&b, v5, "bob-phone", Some("bob@example.com"), Some("tok-bob")).await;
    assert_eq!(code, 0, "the service allowed the token");
    let asked = service.stats()["last"].clone();
    assert_eq!(asked["client_id"], "bob-phone", "{asked}");
    assert_eq!(asked["username"], "bob@example.com", "{asked}");
    assert_eq!(asked["password"], "tok-bob", "{asked}");
    assert_eq!(asked["protocol"], "mqtt5", "{asked}");
    assert!(asked["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{asked}");
    assert_eq!(suback(&mut bob, "users/bob/inbox").await, 0, "the service's user is the ACL's %u");
    assert_eq!(suback(&mut bob, "users/alice/inbox").await, 0x87);
    assert_eq!(b.broker.registry().get("bob-phone").unwrap().owner().as_deref(), Some("bob"));
    drop(bob);

    // The service's ACL replaces the file's rules for carol (news/#), the patterns stay.
    let (mut carol, code) = login(&b, v5, "carol-1", Some("carol"), Some("tok-carol")).await;
    assert_eq!(code, 0);
    assert_eq!(suback(&mut carol, "desk/x").await, 0);
    assert_eq!(suback(&mut carol, "news/x").await, 0x87);
    assert_eq!(suback(&mut carol, "users/carol/inbox").await, 0);
    drop(carol);

    assert_eq!(login(&b, v5, "x", Some("mallory"), Some("tok-made-up")).await.1, 0x86);
    assert_eq!(login(&b, ProtocolVersion::V3_1_1, "x", Some("mallory"), Some("tok-made-up")).await.1, 0x04);

    // The same credentials again: answered from the cache.
    let calls = service.stats()["auth"].as_u64().unwrap();
    for _ in 0..3 {
        assert_eq!(login(&b, v5, "bob-phone", Some("bob@example.com"), Some("tok-bob")).await.1, 0);
    }
    assert_eq!(service.stats()["auth"].as_u64().unwrap(), calls, "cached");
    assert!(b.broker.metrics().auth_service_cached.load(std::sync::atomic::Ordering::Relaxed) >= 3);

    // An HTTP reader logs in the same way.
    let http = b.broker.http_addr().unwrap();
    let path = "/api/v1/poll?client_id=bob-web&filter=users/bob/inbox&wait=0";
    let (status, _, body) = http_request(http, "GET", path, &[("authorization", "Bearer tok-bob")], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(service.stats()["last"]["protocol"], "poll");
    let (status, _, _) = http_request(http, "GET", path, &[("authorization", "Bearer tok-nobody")], b"");
    assert_eq!(status, 401);
    // alice's token is good, bob-web is bob's.
    let (status, _, _) = http_request(http, "GET", path, &[("authorization", "Bearer tok-alice")], b"");
    assert_eq!(status, 403);
}

/// A slow service: no CONNECT waits longer than `timeout_ms` (then `on_error` decides), at most
/// `max_in_flight` calls run at once (20 CONNECTs at once cost the service 2 to 4 calls), and a
/// client the password file knows connects at once meanwhile. A failing service (500) and one that is not there refuse with `on_error =
/// "deny"`; with `"allow"` the client is let in as anonymous, never as the user it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_a_failing_and_a_dead_auth_service() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    mosquitto_passwd(&passwd, "editor", "pw");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic read news/#\nuser editor\ntopic readwrite #\npattern read users/%u/#\n").unwrap();
    let service = Fixture::start(&[]);
    service.control("slow", 5.0);
    let config = |url: &str, on_error: &str| {
        format!(
            "[auth]\nallow_anonymous = false\npassword_file = {}\nacl_file = {}\n\
             [auth.http]\nurl = \"{url}\"\ntimeout_ms = 800\nmax_in_flight = 2\non_error = \"{on_error}\"\n",
            toml_path(&passwd),
            toml_path(&acl)
        )
    };
    let b = start_toml(&config(&service.url("/auth"), "deny"));
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..20 {
        let addr = b.addr;
        slow.push(tokio::spawn(async move {
            let mut c = RawClient::connect_tcp(addr).await;
            c.send(&connect(ProtocolVersion::V5, &format!("slow-{i}"), Some("u"), Some(&format!("tok-{i}")))).await;
            let code = match c.recv_within(Duration::from_secs(30)).await {
                Ok(Some(Packet::ConnAck(a))) => a.code.0,
                other => panic!("{other:?}"),
            };
            (code, Instant::now())
        }));
    }
    // The editor is the password file's: it does not wait behind the service.
    let (_editor, code) = login(&b, ProtocolVersion::V5, "editor-1", Some("editor"), Some("pw")).await;
    assert_eq!(code, 0);
    let editor_at = Instant::now();
    let mut last = started;
    for s in slow {
        let (code, at) = s.await.unwrap();
        assert_eq!(code, 0x87, "on_error = deny: not authorized");
        assert!(editor_at < at, "the editor connected while the service was still being waited for");
        last = last.max(at);
    }
    assert!(
        last.duration_since(started) < Duration::from_millis(800 + 1500),
        "every CONNECT answered within timeout_ms (and some scheduling): {:?}",
        last.duration_since(started)
    );
    // Two calls at a time, each given up at its CONNECT's deadline: 20 CONNECTs cost the
    // service two calls, or four when the later CONNECTs' deadlines fall after the first two.
    let stats = service.stats();
    let calls = stats["auth"].as_u64().unwrap();
    assert!((2..=4).contains(&calls), "at most max_in_flight calls per timeout_ms: {stats}");
    assert!(b.broker.metrics().auth_service_errors.load(std::sync::atomic::Ordering::Relaxed) >= 20);
    drop(b);

    // 500, then a service that is not there: refused with deny.
    service.control("error", 0.0);
    let b = start_toml(&config(&service.url("/auth"), "deny"));
    assert_eq!(login(&b, ProtocolVersion::V5, "c", Some("bob"), Some("tok-bob")).await.1, 0x87);
    assert_eq!(login(&b, ProtocolVersion::V3_1_1, "c", Some("bob"), Some("tok-bob")).await.1, 0x05);
    drop(b);
    let dead = format!("http://127.0.0.1:{}/auth", free_port());
    let b = start_toml(&config(&dead, "deny"));
    let asked = Instant::now();
    assert_eq!(login(&b, ProtocolVersion::V5, "c", Some("bob"), Some("tok-bob")).await.1, 0x87);
    assert!(asked.elapsed() < Duration::from_millis(800 + 1500), "{:?}", asked.elapsed());
    drop(b);

    // allow: in as anonymous, so bob's inbox stays bob's.
    let b = start_toml(&config(&service.url("/auth"), "allow"));
    let (mut c, code) = login(&b, ProtocolVersion::V5, "c", Some("bob"), Some("tok-bob")).await;
    assert_eq!(code, 0, "on_error = allow");
    assert_eq!(suback(&mut c, "news/x").await, 0, "the anonymous rules apply");
    assert_eq!(suback(&mut c, "users/bob/inbox").await, 0x87, "not bob: nothing vouched for the name");
    assert_eq!(b.broker.registry().get("c").unwrap().owner().as_deref(), Some(""), "an anonymous session");
}

/// An identity provider's key set over HTTPS: RS256, ES256 and EdDSA tokens with `iss` and
/// `aud` are accepted by their `kid`; the provider rotates to a new key and removes the old
/// one; a token of the new key is accepted without a restart and one of the removed key is
/// refused. Then a stranger sends 200 tokens with made-up `kid`s: all refused, and the provider
/// is asked no more than once per `jwks_refresh_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_from_an_identity_provider_rotated_without_a_restart() {
    use jsonwebtoken::Algorithm::{EdDSA, ES256, RS256};
    let dir = tempfile::tempdir().unwrap();
    generate_certs(dir.path());
    let (rsa1, rsa1_jwk) = keypair(dir.path(), "RSA", "rsa-1");
    let (ec1, ec1_jwk) = keypair(dir.path(), "EC", "ec-1");
    let (ed1, ed1_jwk) = keypair(dir.path(), "ED25519", "ed-1");
    let (rsa2, rsa2_jwk) = keypair(dir.path(), "RSA", "rsa-2");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&rsa1_jwk, &ec1_jwk, &ed1_jwk]);
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let provider = Fixture::start(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
    ]);
    let config = |refresh: u64| {
        format!(
            "[auth]\nallow_anonymous = false\n[auth.jwt]\njwks_url = \"{}\"\nca_file = {}\njwks_refresh_secs = {refresh}\n\
             issuer = \"https://id.example\"\naudience = \"herald\"\n",
            provider.url("/jwks.json"),
            toml_path(&dir.path().join("ca.pem"))
        )
    };
    let refresh = 2;
    let b = start_toml(&config(refresh));
    let v5 = ProtocolVersion::V5;
    wait_until("the key set fetched at start", || provider.stats()["jwks"].as_u64().unwrap_or(0) >= 1).await;
    for (pem, alg, kid, sub) in
        [(&rsa1, RS256, "rsa-1", "rita"), (&ec1, ES256, "ec-1", "emma"), (&ed1, EdDSA, "ed-1", "ed")]
    {
        let (_c, code) = login(&b, v5, sub, None, Some(&token(pem, alg, kid, sub))).await;
        assert_eq!(code, 0, "{alg:?}");
        assert_eq!(b.broker.registry().get(sub).unwrap().owner().as_deref(), Some(sub), "the sub claim owns it");
    }
    // A token of a known key with another algorithm, or for another audience: refused.
    let forged = token(&ec1, ES256, "rsa-1", "rita");
    assert_eq!(login(&b, v5, "f", None, Some(&forged)).await.1, 0x86);

    // The provider rotates: rsa-2 in, rsa-1 out. Once the last fetch is older than
    // jwks_refresh_secs, the first rsa-2 token makes Herald fetch again (or the periodic
    // refresh already has).
    write_jwks(&jwks, &[&rsa2_jwk, &ec1_jwk, &ed1_jwk]);
    tokio::time::sleep(Duration::from_secs(refresh) + Duration::from_millis(200)).await;
    let (_c, code) = login(&b, v5, "rita-2", None, Some(&token(&rsa2, RS256, "rsa-2", "rita"))).await;
    assert_eq!(code, 0, "a token of the new key, no restart");
    assert_eq!(login(&b, v5, "rita-1", None, Some(&token(&rsa1, RS256, "rsa-1", "rita"))).await.1, 0x86, "removed key");
    drop(b);

    // A stranger's made-up kids: one fetch at start, none for them within the interval.
    let fetched = provider.stats()["jwks"].as_u64().unwrap();
    let b = start_toml(&config(3600));
    wait_until("the key set fetched at start", || provider.stats()["jwks"].as_u64().unwrap_or(0) > fetched).await;
    let before = provider.stats()["jwks"].as_u64().unwrap();
    for i in 0..200 {
        let t = token(&rsa2, RS256, &format!("made-up-{i}"), "x");
        assert_eq!(login(&b, v5, "s", None, Some(&t)).await.1, 0x86);
    }
    assert_eq!(provider.stats()["jwks"].as_u64().unwrap(), before, "the provider was not asked for them");
    let (_c, code) = login(&b, v5, "ok", None, Some(&token(&rsa2, RS256, "rsa-2", "rita"))).await;
    assert_eq!(code, 0, "known keys still work");
}
