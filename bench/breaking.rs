//! Breaking news to every phone (issue 26): `--subscribers` phones (TCP, or TLS with `--tls
//! true --ca PEM`) subscribed to `news/breaking`; a story every 1/`--rate` seconds for
//! `--duration` seconds, published over `--plain-port` (the broker's plain listener); for each
//! story, the time until the last phone has it.
//!
//! What is measured is the broker, not the generator: every phone's socket has
//! `SO_TIMESTAMPNS`, and a story's arrival is the kernel's timestamp of the segment that carried
//! it (on loopback, taken while the broker's write is in the kernel), not the moment the
//! generator got round to reading that socket; the generator reads 19,000 sockets on one core
//! as slowly as it must. The floor beside the figures: how many small writes to distinct
//! sockets one core makes a second here (the generator measures it on its own sockets after),
//! so the time one core needs to write the story to every phone.

use std::os::fd::{AsRawFd, RawFd};

use super::*;

fn realtime_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn timestamp_arrivals(fd: RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One `recvmsg`: the bytes, and the kernel's receive time (CLOCK_REALTIME) of the last segment
/// they came in.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; zeroed is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the control messages the kernel wrote within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// A phone's connection, its TLS (if any) driven here so that each read is a `recvmsg`.
struct Phone {
    tcp: TcpStream,
    tls: Option<rustls::ClientConnection>,
    decoder: Decoder,
    buf: BytesMut,
    raw: Vec<u8>,
}

impl Phone {
    async fn open(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>, id: &str) -> std::io::Result<Phone> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (tcp, tls) = match tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
                let (tcp, conn) = stream.into_inner();
                (tcp, Some(conn))
            }
            None => (tcp, None),
        };
        timestamp_arrivals(tcp.as_raw_fd())?;
        let mut decoder = Decoder::new(Role::Client, u32::MAX);
        decoder.version = Some(ProtocolVersion::V3_1_1);
        let mut p = Phone { tcp, tls, decoder, buf: BytesMut::with_capacity(512), raw: vec![0; 4096] };
        p.send(&connect_packet(id, true)).await?;
        match p.next().await?.0 {
            Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS => {}
            other => return Err(std::io::Error::other(format!("CONNACK {other:?}"))),
        }
        Ok(p)
    }

    async fn send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        packet.encode(ProtocolVersion::V3_1_1, &mut out);
        let bytes = match &mut self.tls {
            Some(conn) => {
                std::io::Write::write_all(&mut conn.writer(), &out)?;
                let mut records = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut records)?;
                }
                records
            }
            None => out.to_vec(),
        };
        self.tcp.write_all(&bytes).await
    }

    /// The next packet and the kernel's arrival time of the read that completed it.
    async fn next(&mut self) -> std::io::Result<(Packet, Option<u64>)> {
        let mut stamp = None;
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf).map_err(|e| std::io::Error::other(format!("{e:?}")))? {
                return Ok((p, stamp));
            }
            let fd = self.tcp.as_raw_fd();
            let raw = &mut self.raw;
            let (n, s) = self.tcp.async_io(tokio::io::Interest::READABLE, || recv_stamped(fd, raw)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            stamp = s.or(stamp);
            match &mut self.tls {
                Some(conn) => {
                    let mut input = &self.raw[..n];
                    while !input.is_empty() {
                        conn.read_tls(&mut input)?;
                        conn.process_new_packets().map_err(std::io::Error::other)?;
                        let mut plain = [0u8; 4096];
                        loop {
                            match std::io::Read::read(&mut conn.reader(), &mut plain) {
                                Ok(0) => break,
                                Ok(k) => self.buf.extend_from_slice(&plain[..k]),
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e),
                            }
                        }
                    }
                }
                None => self.buf.extend_from_slice(&self.raw[..n]),
            }
        }
    }
}

/// Small writes to distinct sockets one core makes a second here: `conns` connected pairs on
/// loopback, `rounds` writes of `size` bytes to each, round-robin, none read meanwhile.
fn write_floor(conns: usize, rounds: usize, size: usize) -> f64 {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..conns {
        clients.push(std::net::TcpStream::connect(addr).unwrap());
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        servers.push(s);
    }
    let msg = vec![b'n'; size];
    let start = Instant::now();
    for _ in 0..rounds {
        for s in &mut servers {
            s.write_all(&msg).unwrap();
        }
    }
    (conns * rounds) as f64 / start.elapsed().as_secs_f64()
}

pub async fn breaking(addr: SocketAddr, o: &Opts, pid: Option<u32>) {
    let count: u32 = o.get("subscribers", 19_000);
    let tls: bool = o.get("tls", false);
    let rate: f64 = o.get("rate", 2.0);
    let secs: f64 = o.get("duration", 10.0);
    let qos = QoS::from_u8(o.get("qos", 0)).unwrap();
    let parallel: usize = o.get("parallel", 200);
    let plain = SocketAddr::from(([127, 0, 0, 1], o.get::<u16>("plain-port", addr.port())));
    let config = tls.then(|| Arc::new(phones::tls_client(&o.get("ca", String::new()))));

    // The phones, `parallel` connecting at a time, each subscribed before the first story.
    let sem = Arc::new(Semaphore::new(parallel));
    let mut opening = Vec::new();
    for i in 0..count {
        let (config, sem) = (config.clone(), sem.clone());
        opening.push(tokio::spawn(async move {
            let _turn = sem.acquire_owned().await.unwrap();
            let mut p = Phone::open(addr, config, &format!("breaking-{i}")).await.expect("a phone connects");
            let s = Subscribe {
                packet_id: 1,
                properties: Properties::default(),
                filters: vec![("news/breaking".into(), SubscriptionOptions { qos, ..Default::default() })],
            };
            p.send(&Packet::Subscribe(s)).await.unwrap();
            loop {
                match p.next().await.expect("SUBACK").0 {
                    Packet::SubAck(a) if a.reasons[0].0 < 0x80 => break,
                    Packet::SubAck(a) => panic!("SUBSCRIBE refused: {a:?}"),
                    _ => {}
                }
            }
            p
        }));
    }
    let mut phones = Vec::new();
    for p in opening {
        phones.push(p.await.expect("a phone"));
    }
    let stories = (secs * rate).round().max(1.0) as u64;
    // Each phone's arrivals: (story, kernel time), read as slowly as the generator can.
    let readers: Vec<_> = phones
        .into_iter()
        .map(|mut p| {
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(stories as usize);
                while (got.len() as u64) < stories {
                    let next = tokio::time::timeout(Duration::from_secs(15), p.next()).await;
                    let Ok(Ok((packet, stamp))) = next else { break };
                    if let Packet::Publish(m) = packet {
                        let seq = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                        got.push((seq, stamp.unwrap_or_else(realtime_ns)));
                        if m.qos == QoS::AtLeastOnce {
                            let _ = p.send(&Packet::PubAck(PubResponse::new(m.packet_id, ReasonCode::SUCCESS))).await;
                        }
                    }
                }
                (got, p)
            })
        })
        .collect();

    let mut editor = Conn::open(plain, "breaking-editor").await;
    let cpu0 = pid.and_then(broker_cpu_us);
    let mut sent = Vec::with_capacity(stories as usize);
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(period);
    for seq in 0..stories {
        tick.tick().await;
        let mut body = BytesMut::with_capacity(PAYLOAD);
        body.put_u64(seq);
        body.resize(PAYLOAD, b'b');
        let packet_id = if qos == QoS::AtMostOnce { 0 } else { (seq % 65535 + 1) as u16 };
        sent.push(realtime_ns());
        editor.send(&[publish("news/breaking", qos, packet_id, false, body.freeze())]).await;
    }
    let mut arrivals: Vec<Vec<u64>> = vec![Vec::with_capacity(count as usize); stories as usize];
    let mut held = Vec::new();
    for r in readers {
        let (got, p) = r.await.expect("a reader");
        for (seq, t) in got {
            if let Some(a) = arrivals.get_mut(seq as usize) {
                a.push(t);
            }
        }
        held.push(p);
    }
    let cpu1 = pid.and_then(broker_cpu_us);
    let delivered: u64 = arrivals.iter().map(|a| a.len() as u64).sum();
    let to_us = |t: u64, s: u64| (t.saturating_sub(s) / 1000).min(u64::from(u32::MAX)) as u32;
    let mut last: Vec<u32> = arrivals
        .iter()
        .zip(&sent)
        .filter(|(a, _)| !a.is_empty())
        .map(|(a, s)| to_us(*a.iter().max().unwrap(), *s))
        .collect();
    let mut all: Vec<u32> = arrivals.iter().zip(&sent).flat_map(|(a, s)| a.iter().map(|t| to_us(*t, *s))).collect();
    last.sort_unstable();
    all.sort_unstable();
    drop(held);
    drop(editor);
    // The floor, on the generator's own core with the broker's connections gone.
    let size = PAYLOAD + 2 + 2 + "news/breaking".len() + 2;
    let floor = tokio::task::spawn_blocking(move || write_floor(500, 40, size)).await.unwrap();
    let mut r = Report::new("breaking");
    r.num("subscribers", f64::from(count)).num("tls", f64::from(u8::from(tls))).num("qos", f64::from(qos as u8));
    r.num("stories", stories as f64).num("delivered", delivered as f64);
    r.num("lost", (stories * u64::from(count)).saturating_sub(delivered) as f64);
    r.num("last_p50_ms", percentile(&last, 0.5)).num("last_p99_ms", percentile(&last, 0.99));
    r.num("last_max_ms", percentile(&last, 1.0));
    r.num("all_p50_ms", percentile(&all, 0.5)).num("all_p99_ms", percentile(&all, 0.99));
    r.num("floor_writes_per_s", floor).num("floor_ms", f64::from(count) / floor * 1000.0);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.num("cpu_us_per_delivery", (b - a) as f64 / delivered.max(1) as f64);
    }
    r.print();
}
