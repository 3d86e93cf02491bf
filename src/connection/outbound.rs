//! The outgoing side of a connection: PUBLISH encoding per subscriber (payload by reference),
//! small packets batched into one buffer, and non-blocking vectored writes of the queued frames
//! straight from the connection's own task.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::wire::{put_varint, varint_len};
use crate::codec::{properties, put_fixed_header, Packet, ProtocolVersion, QoS};
use crate::message::Delivery;

/// Payloads up to this size are copied into the batch buffer: cheaper than one more iovec entry
/// and reference count for a few bytes. Larger ones are written from the shared `Bytes`.
const COPY_PAYLOAD_UP_TO: usize = 64;

/// Frames waiting for the socket, oldest first, and the buffer small packets are encoded into.
pub struct Outbound {
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    scratch: BytesMut,
    pub version: ProtocolVersion,
    /// The client's Maximum Packet Size [MQTT-3.1.2-24].
    pub max_packet_size: usize,
    /// Topic aliases the client accepts from us, and those assigned so far.
    pub topic_alias_maximum: u16,
    aliases: std::collections::HashMap<String, u16>,
    /// Packets encoded since the connection last added them to the broker's counter.
    pub packets_encoded: u64,
    /// The front frame is partly written: the client has its first bytes.
    partial: bool,
}

pub enum Written {
    Sent,
    TooLarge,
}

impl Outbound {
    pub fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            queued_bytes: 0,
            scratch: BytesMut::new(),
            version: ProtocolVersion::V3_1_1,
            max_packet_size: usize::MAX,
            topic_alias_maximum: 0,
            aliases: Default::default(),
            packets_encoded: 0,
            partial: false,
        }
    }

    pub fn packet(&mut self, packet: &Packet) {
        self.packets_encoded += 1;
        packet.encode(self.version, &mut self.scratch);
    }

    /// Frees the buffers' capacity when nothing is queued and it is more than a few small
    /// packets need (before hibernating).
    pub fn release(&mut self) {
        if self.has_pending() {
            return;
        }
        if self.queue.capacity() > 8 {
            self.queue = VecDeque::new();
        }
        if self.scratch.capacity() > 256 {
            self.scratch = BytesMut::new();
        }
    }

    pub fn has_pending(&self) -> bool {
        self.queued_bytes > 0 || !self.scratch.is_empty()
    }

    /// Bytes encoded and not yet taken by the socket.
    pub fn pending_bytes(&self) -> usize {
        self.queued_bytes + self.scratch.len()
    }

    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            let frame = self.scratch.split().freeze();
            self.queued_bytes += frame.len();
            self.queue.push_back(frame);
        }
    }

    fn push(&mut self, frame: Bytes) {
        self.seal();
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Writes as much as the socket takes now, without waiting; returns the bytes written.
    pub fn try_flush(&mut self, stream: &mut super::Socket) -> std::io::Result<usize> {
        self.seal();
        // What a TLS or WebSocket layer holds goes before anything new.
        stream.flush_buffered()?;
        let mut total = 0;
        while !self.queue.is_empty() {
            // On the stack: no allocation per write.
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let mut written = match stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            total += written;
            self.queued_bytes -= written;
            while written > 0 {
                let front = self.queue.front_mut().expect("written bytes came from the queue");
                if written >= front.len() {
                    written -= front.len();
                    self.queue.pop_front();
                    self.partial = false;
                } else {
                    let _ = front.split_to(written);
                    self.partial = true;
                    written = 0;
                }
            }
        }
        Ok(total)
    }

    /// Drops every packet not yet begun (a fenced node sends nothing more for the session,
    /// `cluster::fence`); a packet partly written stays, so the stream stays well framed.
    pub fn discard_unsent(&mut self) {
        let keep = if self.partial { self.queue.pop_front() } else { None };
        self.queue.clear();
        self.scratch.clear();
        self.queued_bytes = 0;
        if let Some(front) = keep {
            self.queued_bytes = front.len();
            self.queue.push_back(front);
        }
    }

    /// Writes everything queued, waiting for the socket as needed.
    pub async fn flush_all(&mut self, stream: &mut super::Socket) -> std::io::Result<()> {
        loop {
            self.try_flush(stream)?;
            if !self.has_pending() && !stream.wants_write() {
                return Ok(());
            }
            stream.writable().await?;
        }
    }

    /// Encodes one PUBLISH for this client, unless it exceeds the client's maximum packet size,
    /// in which case it is dropped for this client alone [MQTT-3.1.2-25].
    pub fn publish(&mut self, d: &Delivery, packet_id: u16, dup: bool, expiry: Option<u32>) -> Written {
        let msg = &d.message;
        let v5 = self.version.is_v5();
        // A QoS 0 delivery of a message that went to several sessions, with nothing particular
        // to this client (no subscription identifier, alias or remaining expiry), is the same
        // bytes for every subscriber: encode it once per message and share it.
        let shareable = d.qos == QoS::AtMostOnce
            && d.subscription_ids.is_empty()
            && expiry.is_none()
            && !(v5 && self.topic_alias_maximum > 0)
            && msg.fanout.load(std::sync::atomic::Ordering::Relaxed) > 1;
        if shareable {
            let frame = msg.shared_frames[v5 as usize][d.retain as usize].get_or_init(|| {
                let fields = PublishFields::plain(msg.topic.as_bytes(), d.retain);
                let (body, props_len) = fields.lengths(msg, v5);
                let mut out = BytesMut::with_capacity(crate::codec::packet_len(body));
                fields.encode_header(&mut out, msg, v5, body, props_len);
                out.extend_from_slice(&msg.payload);
                out.freeze()
            });
            if frame.len() > self.max_packet_size {
                return Written::TooLarge;
            }
            if frame.len() <= COPY_PAYLOAD_UP_TO {
                self.scratch.extend_from_slice(frame);
            } else {
                self.push(frame.clone());
            }
            self.packets_encoded += 1;
            return Written::Sent;
        }
        let mut alias = None;
        let mut send_topic = true;
        if v5 && self.topic_alias_maximum > 0 {
            if let Some(&a) = self.aliases.get(msg.topic.as_str()) {
                alias = Some(a);
                send_topic = false;
            } else if self.aliases.len() < usize::from(self.topic_alias_maximum) {
                let a = self.aliases.len() as u16 + 1;
                self.aliases.insert(msg.topic.clone(), a);
                alias = Some(a);
            }
        }
        let fields = PublishFields {
            topic: if send_topic { msg.topic.as_bytes() } else { b"" },
            qos: d.qos,
            retain: d.retain,
            dup,
            packet_id,
            expiry,
            subscription_ids: &d.subscription_ids,
            alias,
        };
        let (body, props_len) = fields.lengths(msg, v5);
        if crate::codec::packet_len(body) > self.max_packet_size {
            if alias.is_some() && send_topic {
                self.aliases.remove(msg.topic.as_str());
            }
            return Written::TooLarge;
        }
        fields.encode_header(&mut self.scratch, msg, v5, body, props_len);
        if msg.payload.len() <= COPY_PAYLOAD_UP_TO {
            self.scratch.put_slice(&msg.payload);
        } else {
            self.push(msg.payload.clone());
        }
        self.packets_encoded += 1;
        Written::Sent
    }
}

/// What one client's copy of a PUBLISH adds to the message itself.
struct PublishFields<'a> {
    topic: &'a [u8],
    qos: QoS,
    retain: bool,
    dup: bool,
    packet_id: u16,
    expiry: Option<u32>,
    subscription_ids: &'a [u32],
    alias: Option<u16>,
}

impl<'a> PublishFields<'a> {
    fn plain(topic: &'a [u8], retain: bool) -> Self {
        Self {
            topic,
            qos: QoS::AtMostOnce,
            retain,
            dup: false,
            packet_id: 0,
            expiry: None,
            subscription_ids: &[],
            alias: None,
        }
    }

    /// The remaining length (payload included) and the property length.
    fn lengths(&self, msg: &crate::message::Message, v5: bool) -> (usize, usize) {
        let props_len = if v5 {
            msg.properties.encoded_len()
                + self.expiry.map_or(0, |_| 5)
                + self.subscription_ids.iter().map(|&i| 1 + varint_len(i)).sum::<usize>()
                + self.alias.map_or(0, |_| 3)
        } else {
            0
        };
        let body = 2
            + self.topic.len()
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if v5 { varint_len(props_len as u32) + props_len } else { 0 }
            + msg.payload.len();
        (body, props_len)
    }

    /// Everything before the payload.
    fn encode_header(
        &self,
        out: &mut BytesMut,
        msg: &crate::message::Message,
        v5: bool,
        body: usize,
        props_len: usize,
    ) {
        let first = 0x30 | ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | self.retain as u8;
        put_fixed_header(out, first, body);
        out.put_u16(self.topic.len() as u16);
        out.put_slice(self.topic);
        if self.qos != QoS::AtMostOnce {
            out.put_u16(self.packet_id);
        }
        if v5 {
            put_varint(out, props_len as u32);
            msg.properties.encode_fields(out);
            if let Some(e) = self.expiry {
                out.put_u8(properties::MESSAGE_EXPIRY_INTERVAL);
                out.put_u32(e);
            }
            for &i in self.subscription_ids {
                out.put_u8(properties::SUBSCRIPTION_IDENTIFIER);
                put_varint(out, i);
            }
            if let Some(a) = self.alias {
                out.put_u8(properties::TOPIC_ALIAS);
                out.put_u16(a);
            }
        }
    }
}

impl Default for Outbound {
    fn default() -> Self {
        Self::new()
    }
}
