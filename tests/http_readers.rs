//! News for clients without MQTT (docs/http-api.md, "Delivery over HTTP"): Server-Sent Events
//! on `/api/v1/stream` and polling on `/api/v1/poll`, each a session like an MQTT client's.
//! Publishers are mosquitto_pub (v5, with properties) and curl is a poller; the SSE reader here
//! reads the raw bytes of the chunked response so that every field, comment and heartbeat can
//! be checked (the browser's EventSource has its own test in tests/browser.rs).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One event of a stream: its fields, or a comment.
#[derive(Debug, Default, Clone)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
    retry: Option<u64>,
    comment: bool,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.data))
    }
}

/// A Server-Sent Events reader over a real socket: the head, then the chunked body decoded and
/// split into events.
struct Sse {
    stream: std::net::TcpStream,
    status: u16,
    headers: Vec<(String, String)>,
    /// Decoded body bytes not yet split into events.
    text: Vec<u8>,
    /// Raw bytes not yet de-chunked.
    raw: Vec<u8>,
    body_only: Vec<u8>,
}

impl Sse {
    fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut raw = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        let split = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            assert!(Instant::now() < deadline, "no response head");
            let mut buf = [0u8; 8192];
            match stream.read(&mut buf) {
                Ok(0) => panic!("closed before a head: {:?}", String::from_utf8_lossy(&raw)),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        };
        let (status, headers) = parse_head(&raw[..split]);
        let rest = raw[split + 4..].to_vec();
        Sse { stream, status, headers, text: Vec::new(), raw: rest, body_only: Vec::new() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// De-chunks what has arrived; false once the body has ended.
    fn dechunk(&mut self) -> bool {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else { return true };
            let size = usize::from_str_radix(std::str::from_utf8(&self.raw[..line_end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                return false;
            }
            if self.raw.len() < line_end + 2 + size + 2 {
                return true;
            }
            self.text.extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..line_end + 2 + size + 2);
        }
    }

    /// The next event or comment within `wait`; None if none came.
    fn next_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = Instant::now() + wait;
        // What arrived with the head (or an earlier read) may hold whole chunks already.
        let mut open = self.dechunk();
        loop {
            if let Some(end) = self.text.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8(self.text.drain(..end + 2).collect()).unwrap();
                let mut e = Event::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        e.comment = true;
                        e.data = c.trim().to_owned();
                    } else if let Some((k, v)) = line.split_once(": ") {
                        match k {
                            "id" => e.id = Some(v.to_owned()),
                            "event" => e.event = Some(v.to_owned()),
                            "data" => e.data.push_str(v),
                            "retry" => e.retry = Some(v.parse().unwrap()),
                            other => panic!("unknown field {other:?} in {block:?}"),
                        }
                    }
                }
                return Some(e);
            }
            if Instant::now() > deadline || !open {
                return None;
            }
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    self.raw.extend_from_slice(&buf[..n]);
                    self.body_only.extend_from_slice(&buf[..n]);
                    open = self.dechunk();
                }
                Err(_) => {}
            }
        }
    }

    /// The next message event (heartbeats and the session event skipped).
    fn message(&mut self) -> Event {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next_within(left).expect("a message event within the patience");
            if !e.comment && e.event.is_none() {
                return e;
            }
        }
    }

    /// The session event the stream starts with, with its `retry:`.
    fn session(&mut self) -> Value {
        let e = self.next_within(PATIENCE).expect("session event");
        assert_eq!(e.event.as_deref(), Some("session"), "{e:?}");
        assert_eq!(e.retry, Some(3000), "{e:?}");
        e.json()
    }
}

fn http_addr(b: &TestBroker) -> SocketAddr {
    b.broker.http_addr().expect("HTTP server")
}

const HTTP: &str = "[http]\nbind = \"127.0.0.1:0\"\n";

fn pub_v5(b: &TestBroker, topic: &str, payload: &str, extra: &[&str]) {
    let port = b.port().to_string();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "5", "-q", "1", "-t", topic])
        .args(if extra.contains(&"-f") { vec![] } else { vec!["-m", payload] })
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
}

/// Retained messages first (retain true), then live ones with their properties; a payload that
/// is not UTF-8 travels as base64; heartbeat comments while idle; the reader shows in the API
/// and counts as a connected client.
#[test]
fn a_stream_sends_retained_then_live_stories_with_their_properties() {
    let b = start_toml(&format!("{HTTP}[http.readers]\nheartbeat_secs = 1\n"));
    let http = http_addr(&b);
    pub_v5(&b, "news/tech/old", "the retained story", &["-r"]);
    pub_v5(&b, "sport/x", "not matched", &["-r"]);
    let mut s = Sse::open(http, "/api/v1/stream?filter=news/tech/%23&filter=news/breaking", &[]);
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("cache-control"), Some("no-store"));
    let session = s.session();
    let client_id = session["client_id"].as_str().unwrap().to_owned();
    assert!(client_id.starts_with("herald-sse-"), "{session}");
    assert_eq!(session["session_present"], false);

    let retained = s.message();
    let r = retained.json();
    assert_eq!(
        (r["topic"].as_str(), r["payload"].as_str(), r["retain"].as_bool()),
        (Some("news/tech/old"), Some("the retained story"), Some(true))
    );
    assert_eq!(retained.id.as_deref(), r["id"].as_str(), "the event id is the message id");

    pub_v5(
        &b,
        "news/breaking",
        "live: quake",
        &["-D", "publish", "user-property", "story-id", "quake-1", "-D", "publish", "content-type", "text/plain"],
    );
    let live = s.message().json();
    assert_eq!(live["topic"], "news/breaking");
    assert_eq!(live["payload"], "live: quake");
    assert_eq!(live["payload_encoding"], "utf8");
    assert_eq!(live["retain"], false);
    assert_eq!(live["qos"], 1);
    assert_eq!(live["story_id"], "quake-1");
    assert_eq!(live["content_type"], "text/plain");
    assert_eq!(live["user_properties"], serde_json::json!([["story-id", "quake-1"]]));

    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("photo");
    std::fs::write(&binary, [0xff, 0xd8, 0xff, 0x00, b'\n', 0x80]).unwrap();
    pub_v5(&b, "news/tech/photo", "", &["-f", binary.to_str().unwrap()]);
    let photo = s.message().json();
    assert_eq!(photo["payload_encoding"], "base64");
    assert_eq!(photo["payload"], "/9j/AAqA");
    // A newline in a payload cannot end an event or start a forged one.
    pub_v5(&b, "news/tech/forge", "x\n\nid: 1\ndata: {\"topic\":\"forged\"}\n\n", &[]);
    let forged = s.message().json();
    assert_eq!(forged["topic"], "news/tech/forge");

    // Idle: heartbeats every second.
    let heartbeat = s.next_within(Duration::from_secs(5)).expect("a heartbeat while idle");
    assert!(heartbeat.comment, "{heartbeat:?}");

    let (status, overview) = http_json(http, "GET", "/api/v1/overview", "");
    assert_eq!(status, 200);
    let sse: u64 = overview["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["protocol"] == "sse")
        .map(|c| c["connected"].as_u64().unwrap())
        .sum();
    assert_eq!(sse, 1, "{overview}");
    let (_, client) = http_json(http, "GET", &format!("/api/v1/clients/{client_id}"), "");
    assert_eq!(client["protocol_version"], "sse");
    assert_eq!(client["persistent"], false, "no client_id: a clean session");

    drop(s);
    // The anonymous stream's session ends with it.
    wait_until_blocking("the stream's session to end", || b.broker.registry().get(&client_id).is_none());
}

/// A named stream is a persistent session: what it missed while away arrives when it comes
/// back, and `Last-Event-ID` confirms what it got, so nothing it saw comes again and nothing it
/// did not is lost. A broker restart in between keeps it (the queue is in the store).
#[test]
fn a_named_stream_resumes_from_last_event_id_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_at(dir.path(), HTTP);
    let http = http_addr(&b);
    let path = "/api/v1/stream?filter=news/%23&client_id=kiosk-7";
    let mut s = Sse::open(http, path, &[]);
    assert_eq!(s.session()["session_present"], false);
    for i in 1..=3 {
        pub_v5(&b, "news/a", &format!("story {i}"), &[]);
    }
    let got: Vec<Event> = (0..3).map(|_| s.message()).collect();
    assert_eq!(
        got.iter().map(|e| e.json()["payload"].as_str().unwrap().to_owned()).collect::<Vec<_>>(),
        ["story 1", "story 2", "story 3"]
    );
    drop(s);
    wait_until_blocking("the stream to park", || b.broker.registry().get("kiosk-7").is_some_and(|s| !s.is_online()));
    pub_v5(&b, "news/a", "story 4", &[]);
    pub_v5(&b, "news/a", "story 5", &[]);
    let (_, client) = http_json(http, "GET", "/api/v1/clients/kiosk-7", "");
    assert_eq!(client["persistent"], true);
    assert_eq!(client["queued"], 5, "3 unconfirmed and 2 missed: {client}");
    drop(b);

    let b = start_at(dir.path(), HTTP);
    let http = http_addr(&b);
    // The browser says it got story 2 (story 3 was on the wire when the page lost its network).
    let last = got[1].id.clone().unwrap();
    let mut s = Sse::open(http, path, &[("last-event-id", &last)]);
    assert_eq!(s.session()["session_present"], true);
    let resumed: Vec<String> = (0..3).map(|_| s.message().json()["payload"].as_str().unwrap().to_owned()).collect();
    assert_eq!(resumed, ["story 3", "story 4", "story 5"]);
    assert!(
        s.next_within(Duration::from_millis(300)).is_none_or(|e| e.comment),
        "nothing else: the retained-free filter sends no more"
    );
}

/// Readers authenticate as MQTT clients do: basic auth against the password file, a JWT as a
/// bearer token, the ACL on the filters; refusals are 401 and 403 with a JSON error.
#[test]
fn readers_authenticate_like_mqtt_clients_and_obey_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let (passwd, acl) = (dir.path().join("passwd"), dir.path().join("acl"));
    for user in ["alice", "editor"] {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["passwd", passwd.to_str().unwrap(), user, "pw"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    std::fs::write(
        &acl,
        "user alice\ntopic read news/public/#\nuser editor\ntopic write #\n\npattern read users/%u/#\n",
    )
    .unwrap();
    let secret = "hs-secret";
    let config = format!(
        "{HTTP}[auth]\nallow_anonymous = false\npassword_file = {:?}\nacl_file = {:?}\n[auth.jwt]\nhs256_secret = \"{secret}\"\n",
        passwd.display().to_string(),
        acl.display().to_string()
    );
    let b = start_at(&dir.path().join("data"), &config);
    let http = http_addr(&b);
    let basic = |user: &str, pw: &str| {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")))
    };
    let path = "/api/v1/poll?filter=news/public/%23";
    let (status, headers, _) = http_request(http, "GET", path, &[], b"");
    assert_eq!(status, 401, "anonymous readers are refused here");
    assert!(headers.iter().any(|(k, v)| k == "www-authenticate" && v.starts_with("Basic")));
    let (status, _, _) = http_request(http, "GET", path, &[("authorization", &basic("alice", "wrong"))], b"");
    assert_eq!(status, 401);
    let (status, _, body) = http_request(http, "GET", path, &[("authorization", &basic("alice", "pw"))], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = http_request(
        http,
        "GET",
        "/api/v1/poll?filter=news/secret/%23",
        &[("authorization", &basic("alice", "pw"))],
        b"",
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let s = Sse::open(http, "/api/v1/stream?filter=news/%23", &[("authorization", &basic("alice", "pw"))]);
    assert_eq!(s.status, 403, "news/# reaches beyond what alice may read");

    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": "bob", "exp": now + 600 }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    let mut s = Sse::open(http, "/api/v1/stream?filter=users/bob/%23", &[("authorization", &bearer)]);
    assert_eq!(s.status, 200, "the token's sub is the user name for the ACL");
    s.session();
    let port = b.port().to_string();
    let out = Command::new("mosquitto_pub")
        .args(["-p", &port, "-u", "editor", "-P", "pw", "-t", "users/bob/inbox", "-m", "for bob", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(s.message().json()["payload"], "for bob");
    let s = Sse::open(http, "/api/v1/stream?filter=users/alice/%23", &[("authorization", &bearer)]);
    assert_eq!(s.status, 403, "bob may not read alice's");
    let s = Sse::open(http, "/api/v1/stream?filter=users/bob/%23", &[("authorization", "Bearer not.a.token")]);
    assert_eq!(s.status, 401);
}

fn curl_json(url: &str) -> Value {
    let out = Command::new("curl").args(["-sS", "--max-time", "60", url]).output().unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Polling with curl: the first answer holds the retained messages; `wait` holds an empty
/// answer open until the next story (long polling) and `wait=0` answers at once (short
/// polling); a cursor from an answer that was lost gets the same messages again.
#[test]
fn polling_short_and_long_with_a_cursor() {
    let b = start_toml(HTTP);
    let http = http_addr(&b);
    pub_v5(&b, "news/tech/old", "retained", &["-r"]);
    let base = format!("http://{http}/api/v1/poll?filter=news/tech/%23");
    let first = curl_json(&format!("{base}&wait=0"));
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{first}");
    assert_eq!(messages[0]["retain"], true);
    let cursor = first["next"].as_str().unwrap().to_owned();
    assert!(cursor.ends_with(messages[0]["id"].as_str().unwrap()), "{cursor}");

    let t = Instant::now();
    let empty = curl_json(&format!("{base}&wait=0&after={cursor}"));
    assert_eq!(empty["messages"].as_array().unwrap().len(), 0, "{empty}");
    assert!(t.elapsed() < Duration::from_secs(5), "a short poll answers at once");
    assert_eq!(empty["next"], cursor.as_str());

    // A long poll: answered when the story arrives, not at the end of its wait.
    let url = format!("{base}&wait=30&after={cursor}");
    let waiting = std::thread::spawn(move || {
        let t = Instant::now();
        (curl_json(&url), t.elapsed())
    });
    let client_id = first["client_id"].as_str().unwrap().to_owned();
    wait_until_blocking("the long poll to hold its session", || {
        b.broker.registry().get(&client_id).is_some_and(|s| s.is_online())
    });
    pub_v5(&b, "news/tech/ai", "long-polled", &[]);
    let (answer, took) = waiting.join().unwrap();
    assert!(took < Duration::from_secs(25), "answered by the story, after {took:?}");
    assert_eq!(answer["messages"][0]["payload"], "long-polled", "{answer}");
    let next = answer["next"].as_str().unwrap().to_owned();

    // The answer was lost: the previous cursor gets the same message again.
    let again = curl_json(&format!("{base}&wait=0&after={cursor}"));
    assert_eq!(again["messages"][0]["payload"], "long-polled", "{again}");
    let done = curl_json(&format!("{base}&wait=0&after={next}"));
    assert_eq!(done["messages"].as_array().unwrap().len(), 0, "confirmed by the newer cursor: {done}");
    let (_, client) = http_json(http, "GET", &format!("/api/v1/clients/{client_id}"), "");
    assert_eq!(client["protocol_version"], "poll");

    let (status, _, _) = http_request(http, "GET", "/api/v1/poll?filter=news/%23&wait=x", &[], b"");
    assert_eq!(status, 400);
    let (status, _, _) = http_request(http, "GET", "/api/v1/poll", &[], b"");
    assert_eq!(status, 400, "a filter is required");
    let (status, _, _) = http_request(http, "GET", "/api/v1/poll?filter=news/%23&after=nocolon", &[], b"");
    assert_eq!(status, 400);
    let (status, _, _) = http_request(http, "GET", "/api/v1/stream?filter=news/%2B%2B", &[], b"");
    assert_eq!(status, 400, "an invalid filter");
}

/// A stream that stops reading is closed once its buffer has stayed full for `stall_ms`, and
/// counted; an MQTT subscriber of the same stories gets every one meanwhile. The connection
/// limits apply to readers like to MQTT clients.
#[test]
fn a_stalled_stream_is_dropped_and_counted_and_limits_apply() {
    let b = start_toml(&format!(
        "{HTTP}[http.readers]\nbuffer_events = 4\nstall_ms = 300\n[limits]\nmax_connections_per_ip = 3\n"
    ));
    let http = http_addr(&b);
    let port = b.port().to_string();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &port, "-t", "news/#", "-q", "1", "-C", "300", "-i", "steady-reader"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_blocking("mosquitto_sub to subscribe", || b.broker.subscriber_count("news/x") == 1);
    let stalled = Sse::open(http, "/api/v1/stream?filter=news/%23", &[]);
    assert_eq!(stalled.status, 200);
    wait_until_blocking("the stream to subscribe", || b.broker.subscriber_count("news/x") == 2);
    // Two connections (mosquitto_sub and the stream) are open: one more reader is allowed,
    // the one after is refused.
    let third = Sse::open(http, "/api/v1/stream?filter=news/%23", &[]);
    assert_eq!(third.status, 200);
    let fourth = Sse::open(http, "/api/v1/stream?filter=news/%23", &[]);
    assert_eq!(fourth.status, 429, "limits.max_connections_per_ip");
    drop((third, fourth));

    wait_until_blocking("the two readers to be gone", || {
        b.broker.registry().list().iter().filter(|s| s.is_online()).count() == 2
    });
    // 300 stories of 64 KiB from one mosquitto_pub (-l: a message per line of its input).
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-p", &port, "-t", "news/big", "-q", "1", "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = format!("{}\n", "x".repeat(64 * 1024));
    {
        let stdin = publisher.stdin.as_mut().unwrap();
        for _ in 0..300 {
            stdin.write_all(line.as_bytes()).unwrap();
        }
    }
    drop(publisher.stdin.take());
    assert!(publisher.wait().unwrap().success());
    wait_until_blocking("the stalled stream to be dropped", || {
        b.broker.metrics().http_readers_dropped.load(std::sync::atomic::Ordering::Relaxed) == 1
    });
    let mut out = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(sub.wait().unwrap().success());
    assert_eq!(out.lines().count(), 300, "the MQTT subscriber got every story");
    drop(stalled);
}

/// The dashboard sits behind the API's token: a sign-in page, then a cookie that the API and
/// the stream accept as they accept the bearer token.
#[test]
fn the_dashboard_signs_in_with_the_token_and_its_api_answers() {
    let b = start_toml("[http]\nbind = \"127.0.0.1:0\"\ntoken = \"newsroom-token\"\n");
    let http = http_addr(&b);
    let (status, _, body) = http_request(http, "GET", "/", &[], b"");
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("<form"), "a sign-in form");
    let (status, _, body) = http_request(http, "GET", "/?token=wrong", &[], b"");
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("not the API's token"));
    let (status, headers, _) = http_request(http, "GET", "/?token=newsroom-token", &[], b"");
    assert_eq!(status, 303);
    let cookie = headers.iter().find(|(k, _)| k == "set-cookie").map(|(_, v)| v.clone()).expect("a cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let (status, headers, body) = http_request(http, "GET", "/", &[("cookie", &cookie)], b"");
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/html")));
    assert!(String::from_utf8_lossy(&body).contains("EventSource"));
    let (status, _, body) = http_request(http, "GET", "/api/v1/overview", &[("cookie", &cookie)], b"");
    assert_eq!(status, 200);
    let overview: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(overview["degraded"], false);
    assert!(overview["figures"]["publish/messages/received"].is_u64(), "{overview}");
    let (status, _, _) = http_request(http, "GET", "/api/v1/overview", &[("cookie", "herald_token=nope")], b"");
    assert_eq!(status, 401);
    // The operator's cookie opens a stream of everything, as the dashboard's.
    let mut s = Sse::open(http, "/api/v1/stream?filter=%23", &[("cookie", &cookie)]);
    assert_eq!(s.status, 200);
    s.session();
}

/// Readers' requests are framed outside hyper (`http::lean`) and the rest by hyper on the same
/// connection: curl, keeping one connection for four requests, gets two polls answered
/// (keep-alive, RFC 9112 section 9.3), then `/healthz` and a poll that hyper answers once it
/// has the connection; a poll with a body goes to hyper too.
#[test]
fn polls_keep_their_connection_and_hand_it_to_hyper_for_the_rest() {
    let b = start_toml(HTTP);
    let http = http_addr(&b);
    let base = format!("http://{http}");
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code} %{num_connects}\n"])
        .arg(format!("{base}/api/v1/poll?filter=news/a"))
        .arg(format!("{base}/api/v1/poll?filter=news/b"))
        .arg(format!("{base}/healthz"))
        .arg(format!("{base}/api/v1/poll?filter=news/c"))
        .output()
        .expect("curl (scripts/install-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<&str> = text.lines().filter(|l| l.starts_with("200 ")).collect();
    // One connection made for the first request, none for the three after it.
    assert_eq!(codes, ["200 1", "200 0", "200 0", "200 0"], "{text}");
    assert_eq!(text.matches("\"next\"").count(), 3, "three poll answers: {text}");
    // A GET with a body is not a reader's plain request: hyper reads the body and answers.
    let (status, _, body) = http_request(http, "GET", "/api/v1/poll?filter=news/d", &[], b"abc");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Only the readers' own paths are theirs: below them is hyper's router, which knows nothing.
    for path in ["/api/v1/stream/elsewhere?filter=a", "/api/v1/poll/x?filter=a", "/api/v1/streams"] {
        let (status, _, _) = http_request(http, "GET", path, &[], b"");
        assert_eq!(status, 404, "{path}");
    }
}
