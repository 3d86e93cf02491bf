//! The outgoing side of a connection: PUBLISH encoding per subscriber (payload by reference),
//! small packets batched into one buffer, and the writer task that drains batches to the socket
//! with vectored writes.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::codec::wire::{put_varint, varint_len};
use crate::codec::{properties, put_fixed_header, Packet, ProtocolVersion, QoS};
use crate::session::Delivery;

/// Payloads up to this size are copied into the batch buffer: cheaper than one more iovec entry
/// and reference count for a few bytes. Larger ones are written from the shared `Bytes`.
const COPY_PAYLOAD_UP_TO: usize = 64;

pub struct Outbound {
    tx: mpsc::Sender<Vec<Bytes>>,
    batch: Vec<Bytes>,
    scratch: BytesMut,
    pub version: ProtocolVersion,
    /// The client's Maximum Packet Size [MQTT-3.1.2-24].
    pub max_packet_size: usize,
    /// Topic aliases the client accepts from us, and those assigned so far.
    pub topic_alias_maximum: u16,
    aliases: std::collections::HashMap<String, u16>,
}

pub enum Written {
    Sent,
    TooLarge,
}

impl Outbound {
    pub fn new(tx: mpsc::Sender<Vec<Bytes>>) -> Self {
        Self {
            tx,
            batch: Vec::new(),
            scratch: BytesMut::new(),
            version: ProtocolVersion::V3_1_1,
            max_packet_size: usize::MAX,
            topic_alias_maximum: 0,
            aliases: Default::default(),
        }
    }

    pub fn packet(&mut self, packet: &Packet) {
        packet.encode(self.version, &mut self.scratch);
    }

    pub fn has_pending(&self) -> bool {
        !self.batch.is_empty() || !self.scratch.is_empty()
    }

    /// Hands everything encoded so far to the writer task, waiting while its queue is full.
    /// The wait can be abandoned (in a `select!`) without losing the batch: it is only taken
    /// once a slot is reserved.
    pub async fn flush(&mut self) -> Result<(), ()> {
        if !self.has_pending() {
            return Ok(());
        }
        let permit = self.tx.reserve().await.map_err(|_| ())?;
        if !self.scratch.is_empty() {
            self.batch.push(self.scratch.split().freeze());
        }
        permit.send(std::mem::take(&mut self.batch));
        Ok(())
    }

    /// Encodes one PUBLISH for this client, unless it exceeds the client's maximum packet size,
    /// in which case it is dropped for this client alone [MQTT-3.1.2-25].
    pub fn publish(&mut self, d: &Delivery, packet_id: u16, dup: bool, expiry: Option<u32>) -> Written {
        let msg = &d.message;
        let v5 = self.version.is_v5();
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
        let topic: &[u8] = if send_topic { msg.topic.as_bytes() } else { b"" };
        let props_len = if v5 {
            msg.properties.encoded_len()
                + expiry.map_or(0, |_| 5)
                + d.subscription_ids.iter().map(|&i| 1 + varint_len(i)).sum::<usize>()
                + alias.map_or(0, |_| 3)
        } else {
            0
        };
        let body = 2
            + topic.len()
            + if d.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if v5 { varint_len(props_len as u32) + props_len } else { 0 }
            + msg.payload.len();
        if crate::codec::packet_len(body) > self.max_packet_size {
            if alias.is_some() && send_topic {
                self.aliases.remove(msg.topic.as_str());
            }
            return Written::TooLarge;
        }
        let first = 0x30 | ((dup as u8) << 3) | ((d.qos as u8) << 1) | d.retain as u8;
        let out = &mut self.scratch;
        put_fixed_header(out, first, body);
        out.put_u16(topic.len() as u16);
        out.put_slice(topic);
        if d.qos != QoS::AtMostOnce {
            out.put_u16(packet_id);
        }
        if v5 {
            put_varint(out, props_len as u32);
            msg.properties.encode_fields(out);
            if let Some(e) = expiry {
                out.put_u8(properties::MESSAGE_EXPIRY_INTERVAL);
                out.put_u32(e);
            }
            for &i in &d.subscription_ids {
                out.put_u8(properties::SUBSCRIPTION_IDENTIFIER);
                put_varint(out, i);
            }
            if let Some(a) = alias {
                out.put_u8(properties::TOPIC_ALIAS);
                out.put_u16(a);
            }
        }
        if msg.payload.len() <= COPY_PAYLOAD_UP_TO {
            out.put_slice(&msg.payload);
        } else {
            self.batch.push(self.scratch.split().freeze());
            self.batch.push(msg.payload.clone());
        }
        Written::Sent
    }
}

/// Writes batches to the socket until the connection task drops its sender, then shuts the
/// socket down. Batches queued meanwhile are coalesced into one vectored write.
pub async fn writer_task(mut socket: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<Bytes>>) {
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    while let Some(batch) = rx.recv().await {
        queue.extend(batch);
        while queue.len() < 1024 {
            match rx.try_recv() {
                Ok(more) => queue.extend(more),
                Err(_) => break,
            }
        }
        while !queue.is_empty() {
            // On the stack: no allocation per write.
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(queue.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let mut written = match socket.write_vectored(&slices[..n]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while written > 0 {
                let front = queue.front_mut().expect("written bytes came from the queue");
                if written >= front.len() {
                    written -= front.len();
                    queue.pop_front();
                } else {
                    let _ = front.split_to(written);
                    written = 0;
                }
            }
        }
    }
    let _ = socket.shutdown().await;
}
