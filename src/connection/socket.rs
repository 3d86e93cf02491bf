//! The socket a connection task drives with readiness and non-blocking I/O, whatever the
//! transport: plain TCP, TLS (rustls driven in place), WebSocket framing over either. Every
//! layer sits on the one TCP stream, so a connection is one task and one file descriptor on
//! every listener, and a layer keeps no buffer while it has nothing in it.
//!
//! A layer returns `WouldBlock` only when the TCP stream itself did: tokio clears the stream's
//! readiness then, and the task sleeps until the kernel has more. Output a layer holds (TLS
//! records, a pong, a frame header) is reported by `wants_write`, so the task waits for the
//! socket to take it even when the connection has nothing queued of its own.

use std::io::{self, IoSlice, Read, Write};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub enum Socket {
    Tcp(TcpStream),
    Tls(Box<Tls>),
    Ws(Box<Ws<TcpStream>>),
    Wss(Box<Ws<Tls>>),
}

/// One layer of a connection's stream.
pub trait Layer {
    fn tcp(&self) -> &TcpStream;
    /// Whether a read can make progress without more input from the TCP stream.
    fn has_buffered_input(&self) -> bool;
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Takes bytes of the connection's output; `WouldBlock` when it takes none.
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Whether the layer holds output of its own that the TCP stream has not taken.
    fn wants_write(&self) -> bool;
    /// Writes what the layer holds as far as the TCP stream takes it now.
    fn flush_buffered(&mut self) -> io::Result<()>;
}

impl Layer for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn has_buffered_input(&self) -> bool {
        false
    }
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
    fn wants_write(&self) -> bool {
        false
    }
    fn flush_buffered(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `Read` and `Write` over a TCP stream's non-blocking calls, for rustls.
struct Nonblocking<'a>(&'a TcpStream);

impl Read for Nonblocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Nonblocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS session after its handshake, driven in the connection's task. Plaintext is read only
/// after what was decrypted before has been taken, so rustls holds at most one read's worth.
pub struct Tls {
    tcp: TcpStream,
    conn: rustls::ServerConnection,
    /// Decrypted bytes not yet taken.
    plaintext: usize,
    /// The peer closed (close_notify or end of stream).
    closed: bool,
}

impl Tls {
    pub fn new(tcp: TcpStream, mut conn: rustls::ServerConnection) -> Self {
        // What the client sent right behind its Finished (its CONNECT, often) may already have
        // been read with the handshake: it is waiting, and the socket will not say so.
        let (plaintext, closed) = match conn.process_new_packets() {
            Ok(state) => (state.plaintext_bytes_to_read(), state.peer_has_closed()),
            Err(_) => (0, true),
        };
        Self { tcp, conn, plaintext, closed }
    }
}

impl Layer for Tls {
    fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn has_buffered_input(&self) -> bool {
        self.plaintext > 0 || self.closed
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.plaintext > 0 {
                let n = self.conn.reader().read(buf)?;
                self.plaintext -= n.min(self.plaintext);
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            if self.conn.read_tls(&mut Nonblocking(&self.tcp))? == 0 {
                self.closed = true;
                return Ok(0);
            }
            let state = match self.conn.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // The alert rustls queued for the peer, if the socket takes it.
                    let _ = self.flush_buffered();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            };
            self.plaintext = state.plaintext_bytes_to_read();
            if state.peer_has_closed() && self.plaintext == 0 {
                self.closed = true;
            }
            // Key updates and the like answer at once.
            self.flush_buffered()?;
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Records already made go first; new plaintext only when the socket took them, so that
        // rustls holds at most one write's records for a client that does not read.
        self.flush_buffered()?;
        if self.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write_vectored(bufs)?;
        self.flush_buffered()?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn flush_buffered(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Nonblocking(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The largest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;
/// The largest control frame payload [RFC 6455 5.5].
const MAX_CONTROL: usize = 125;
/// Input read ahead while looking for a frame header; payload beyond it is read straight into
/// the connection's buffer.
const HEADER_READ: usize = 256;

/// RFC 6455 framing of the MQTT byte stream, in the connection's task [MQTT-6.0.0-2]: a data
/// frame's payload goes to the connection as it arrives (unmasked in place), so no message is
/// ever assembled; output is sent as binary frames whose header is written in front of the
/// connection's own bytes. What is kept between frames is a few bytes of state.
pub struct Ws<T> {
    inner: T,
    /// Input not yet parsed: part of a frame header or of a control frame (freed when empty).
    raw: BytesMut,
    /// Payload bytes left in the current incoming data frame, and its mask.
    in_left: u64,
    mask: [u8; 4],
    mask_at: usize,
    /// A fragmented binary message is open: continuation frames are expected.
    fragmented: bool,
    /// Payload bytes left of the outgoing frame whose header went (or is going) out.
    out_left: usize,
    head: [u8; 10],
    head_len: u8,
    head_sent: u8,
    /// A pong or close frame to send between data frames (the latest ping's pong only).
    control: Option<Box<BytesMut>>,
    /// A close frame was sent or received.
    closing: bool,
    /// `raw` holds only part of a frame and the socket had nothing more: the next read waits
    /// for the socket.
    starved: bool,
    /// Bytes the client may still send before the first answer (the CONNACK): a stranger's
    /// frame headers and pings count, not only its CONNECT. `usize::MAX` once lifted.
    budget: usize,
}

impl<T: Layer> Ws<T> {
    /// `raw` holds what arrived behind the upgrade request.
    pub fn new(inner: T, raw: BytesMut, budget: usize) -> Self {
        Self {
            inner,
            raw,
            in_left: 0,
            mask: [0; 4],
            mask_at: 0,
            fragmented: false,
            out_left: 0,
            head: [0; 10],
            head_len: 0,
            head_sent: 0,
            control: None,
            closing: false,
            starved: false,
            budget,
        }
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.budget == usize::MAX {
            return self.inner.try_read(buf);
        }
        if self.budget == 0 {
            return Err(io::Error::other("more input than a CONNECT may take before it is answered"));
        }
        let limit = buf.len().min(self.budget);
        let n = self.inner.try_read(&mut buf[..limit])?;
        self.budget -= n;
        Ok(n)
    }

    fn queue_control(&mut self, opcode: u8, payload: &[u8]) {
        let mut frame = BytesMut::with_capacity(2 + payload.len());
        frame.extend_from_slice(&[0x80 | opcode, payload.len() as u8]);
        frame.extend_from_slice(payload);
        self.control = Some(Box::new(frame));
    }

    /// Queues a close frame with `code`, once.
    pub fn close(&mut self, code: u16) {
        if !self.closing {
            self.closing = true;
            self.queue_control(0x8, &code.to_be_bytes());
        }
    }

    fn fail(&mut self, why: &'static str) -> io::Error {
        // 1002: protocol error [RFC 6455 7.4.1].
        self.close(1002);
        let _ = self.flush_buffered();
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Parses the frame at the front of `raw`. Ok(true): a frame was taken (a data frame's
    /// header, or a whole control frame); Ok(false): more input is needed.
    fn parse_frame(&mut self) -> io::Result<bool> {
        // A copy of the header's bytes: `fail` needs `self` while they are looked at.
        let mut raw = [0u8; MAX_HEADER];
        let available = self.raw.len();
        raw[..available.min(MAX_HEADER)].copy_from_slice(&self.raw[..available.min(MAX_HEADER)]);
        if available < 2 {
            return Ok(false);
        }
        let (b0, b1) = (raw[0], raw[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x70 != 0 {
            return Err(self.fail("a reserved bit is set without an extension"));
        }
        // A client masks every frame it sends [RFC 6455 5.1].
        if b1 & 0x80 == 0 {
            return Err(self.fail("an unmasked frame from a client"));
        }
        let (len, at) = match b1 & 0x7F {
            126 if available >= 4 => (u64::from(u16::from_be_bytes([raw[2], raw[3]])), 4),
            127 if available >= 10 => (u64::from_be_bytes(raw[2..10].try_into().expect("8 bytes")), 10),
            126 | 127 => return Ok(false),
            n => (u64::from(n), 2),
        };
        if available < at + 4 {
            return Ok(false);
        }
        let mask: [u8; 4] = raw[at..at + 4].try_into().expect("4 bytes");
        let header = at + 4;
        match opcode {
            0x0 | 0x2 => {
                if (opcode == 0x0) != self.fragmented {
                    return Err(self.fail("a continuation frame out of place"));
                }
                self.fragmented = !fin;
                self.raw.advance(header);
                self.in_left = len;
                self.mask = mask;
                self.mask_at = 0;
                Ok(true)
            }
            // [MQTT-6.0.0-1] MQTT travels in binary frames; a text frame ends the connection.
            0x1 => Err(self.fail("a text frame")),
            0x8..=0xA => {
                if !fin || len > MAX_CONTROL as u64 {
                    return Err(self.fail("a fragmented or oversized control frame"));
                }
                let end = header + len as usize;
                if self.raw.len() < end {
                    return Ok(false);
                }
                let mut payload = [0u8; MAX_CONTROL];
                let payload = &mut payload[..len as usize];
                payload.copy_from_slice(&self.raw[header..end]);
                unmask(payload, mask, 0);
                self.raw.advance(end);
                match opcode {
                    0x9 if !self.closing => self.queue_control(0xA, payload),
                    0x8 => {
                        // The closing handshake's answer [RFC 6455 5.5.1]: a normal closure.
                        self.close(1000);
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    _ => {}
                }
                Ok(true)
            }
            _ => Err(self.fail("an unknown opcode")),
        }
    }

    fn free_raw_if_empty(&mut self) {
        if self.raw.is_empty() && self.raw.capacity() > 0 {
            self.raw = BytesMut::new();
        }
    }
}

/// XORs `data` with the frame's mask, starting `at` bytes into the payload.
fn unmask(data: &mut [u8], mask: [u8; 4], at: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(at + i) & 3];
    }
}

impl<T: Layer> Layer for Ws<T> {
    fn tcp(&self) -> &TcpStream {
        self.inner.tcp()
    }

    fn has_buffered_input(&self) -> bool {
        // Input read and not yet looked at (frames behind the upgrade request, a payload read
        // with its header), unless it is known to be incomplete; or a lower layer's.
        (!self.raw.is_empty() && !self.starved) || self.inner.has_buffered_input()
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_left > 0 {
                let want = (buf.len() as u64).min(self.in_left) as usize;
                let n = if self.raw.is_empty() {
                    match self.read_inner(&mut buf[..want])? {
                        0 => return Ok(0),
                        n => n,
                    }
                } else {
                    let n = want.min(self.raw.len());
                    buf[..n].copy_from_slice(&self.raw[..n]);
                    self.raw.advance(n);
                    self.free_raw_if_empty();
                    n
                };
                unmask(&mut buf[..n], self.mask, self.mask_at);
                self.mask_at = (self.mask_at + n) & 3;
                self.in_left -= n as u64;
                return Ok(n);
            }
            match self.parse_frame() {
                Ok(true) => {
                    self.free_raw_if_empty();
                    continue;
                }
                Ok(false) => {}
                // The client's close: the end of its stream.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let mut chunk = [0u8; HEADER_READ];
            // Never more than a header and a control frame need to wait here.
            let room = (MAX_HEADER + MAX_CONTROL + HEADER_READ).saturating_sub(self.raw.len()).min(HEADER_READ);
            match self.read_inner(&mut chunk[..room]) {
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.starved = false;
                    self.raw.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    self.starved = e.kind() == io::ErrorKind::WouldBlock;
                    return Err(e);
                }
            }
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.out_left == 0 {
            self.flush_control()?;
            if self.control.is_some() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if total == 0 {
                return Ok(0);
            }
            // The first answer lifts the stranger's budget.
            self.budget = usize::MAX;
            let len = total.min(u32::MAX as usize);
            self.head[0] = 0x82; // FIN, binary
            self.head_len = if len < 126 {
                self.head[1] = len as u8;
                2
            } else if len <= 0xFFFF {
                self.head[1] = 126;
                self.head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            } else {
                self.head[1] = 127;
                self.head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            };
            self.head_sent = 0;
            self.out_left = len;
        }
        let mut slices = [IoSlice::new(&[]); 65];
        let mut n = 0;
        let head_rest = &self.head[self.head_sent as usize..self.head_len as usize];
        if !head_rest.is_empty() {
            slices[0] = IoSlice::new(head_rest);
            n = 1;
        }
        let mut left = self.out_left;
        for b in bufs {
            if left == 0 || n == slices.len() {
                break;
            }
            let take = b.len().min(left);
            slices[n] = IoSlice::new(&b[..take]);
            n += 1;
            left -= take;
        }
        let written = match self.inner.try_write_vectored(&slices[..n])? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            w => w,
        };
        let head_part = written.min(head_rest.len());
        self.head_sent += head_part as u8;
        let payload = written - head_part;
        self.out_left -= payload;
        if payload == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(payload)
    }

    fn wants_write(&self) -> bool {
        self.control.is_some() || self.inner.wants_write()
    }

    fn flush_buffered(&mut self) -> io::Result<()> {
        if self.out_left == 0 {
            match self.flush_control() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                r => r?,
            }
        }
        self.inner.flush_buffered()
    }
}

impl<T: Layer> Ws<T> {
    fn flush_control(&mut self) -> io::Result<()> {
        let Some(frame) = self.control.as_mut() else { return Ok(()) };
        while !frame.is_empty() {
            match self.inner.try_write_vectored(&[IoSlice::new(frame)])? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => frame.advance(n),
            }
        }
        self.control = None;
        Ok(())
    }
}

impl Socket {
    fn layer(&self) -> &dyn Layer {
        match self {
            Socket::Tcp(s) => s,
            Socket::Tls(s) => &**s,
            Socket::Ws(s) => &**s,
            Socket::Wss(s) => &**s,
        }
    }

    fn layer_mut(&mut self) -> &mut dyn Layer {
        match self {
            Socket::Tcp(s) => s,
            Socket::Tls(s) => &mut **s,
            Socket::Ws(s) => &mut **s,
            Socket::Wss(s) => &mut **s,
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.readable().await,
            other => {
                let layer = other.layer();
                if layer.has_buffered_input() {
                    return Ok(());
                }
                layer.tcp().readable().await
            }
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.layer().tcp().writable().await
    }

    /// Output a TLS or WebSocket layer holds (records, a pong, a close frame).
    pub fn wants_write(&self) -> bool {
        match self {
            Socket::Tcp(_) => false,
            other => other.layer().wants_write(),
        }
    }

    pub fn flush_buffered(&mut self) -> io::Result<()> {
        self.layer_mut().flush_buffered()
    }

    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read_buf(buf),
            other => {
                // Layers read into initialised memory; the buffer's spare part is zeroed once
                // per read, which is small beside decryption or unmasking.
                let start = buf.len();
                let room = buf.capacity() - start;
                buf.resize(start + room.max(1024), 0);
                let read = other.layer_mut().try_read(&mut buf[start..]);
                buf.truncate(start + *read.as_ref().unwrap_or(&0));
                read
            }
        }
    }

    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_write_vectored(bufs),
            other => other.layer_mut().try_write_vectored(bufs),
        }
    }

    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.readable().await?;
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Reads and drops input until the peer closes or the socket fails. The buffer is on the
    /// heap, and only while this runs: an array here would sit in every connection's future.
    /// Raw TCP input: what a TLS or WebSocket client sends after our close is not looked at.
    pub async fn discard_until_closed(&mut self) {
        let tcp = self.layer().tcp();
        let mut sink = vec![0u8; 2048];
        loop {
            if tcp.readable().await.is_err() {
                return;
            }
            match tcp.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }

    /// Ends our side: a WebSocket close frame, TLS close_notify, then the TCP half-close.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        // The close frame goes out before TLS's close_notify, after which nothing can.
        match self {
            Socket::Ws(s) => s.close(1000),
            Socket::Wss(s) => s.close(1000),
            _ => {}
        }
        self.flush_everything().await?;
        match self {
            Socket::Tls(s) => s.conn.send_close_notify(),
            Socket::Wss(s) => s.inner.conn.send_close_notify(),
            _ => {}
        }
        self.flush_everything().await?;
        match self {
            Socket::Tcp(s) => s.shutdown().await,
            Socket::Tls(s) => s.tcp.shutdown().await,
            Socket::Ws(s) => s.inner.shutdown().await,
            Socket::Wss(s) => s.inner.tcp.shutdown().await,
        }
    }

    async fn flush_everything(&mut self) -> io::Result<()> {
        while self.wants_write() {
            self.flush_buffered()?;
            if self.wants_write() {
                self.writable().await?;
            }
        }
        Ok(())
    }
}
