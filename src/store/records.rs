//! The byte layout of every key and value in the store (docs/storage.md draws it): pure
//! functions, no RocksDB, so the layout is unit tested on its own.
//!
//! Values start with a format byte so that a later layout can be told apart from this one.

use bytes::{BufMut, Bytes, BytesMut};

use crate::clock::{instant_of, wall_ms_of};

use crate::codec::wire::{put_binary, put_str, Reader};
use crate::codec::{Properties, PropertyContext, QoS, SubscriptionOptions, Will};
use crate::message::{Delivery, Message, OutState};

const FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("undecodable {what} record: {why}")]
pub struct RecordError {
    pub what: &'static str,
    pub why: String,
}

fn bad(what: &'static str, why: impl ToString) -> RecordError {
    RecordError { what, why: why.to_string() }
}

/// Key prefix of everything a session owns in the per-session column families: its client
/// identifier with a length, so that one identifier is never a prefix of another's range.
pub fn session_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + client_id.len() + 8);
    k.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    k.extend_from_slice(client_id.as_bytes());
    k
}

/// The end (exclusive) of a session's range: no suffix we write starts with 0xFF (queue
/// sequence numbers stay below 2^56, and UTF-8 never contains the byte 0xFF).
pub fn session_range_end(client_id: &str) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.push(0xFF);
    k
}

/// Splits a per-session key into the client identifier and the suffix after it.
pub fn split_session_key(key: &[u8]) -> Result<(String, &[u8]), RecordError> {
    if key.len() < 2 {
        return Err(bad("key", "shorter than its length prefix"));
    }
    let len = usize::from(u16::from_be_bytes([key[0], key[1]]));
    let id = key.get(2..2 + len).ok_or_else(|| bad("key", "client identifier cut short"))?;
    let id = std::str::from_utf8(id).map_err(|e| bad("key", e))?;
    Ok((id.to_owned(), &key[2 + len..]))
}

/// Splits a per-session key into its session prefix (as `session_prefix` writes it) and the
/// suffix after it, without reading the client identifier.
pub fn split_prefix(key: &[u8]) -> Result<(&[u8], &[u8]), RecordError> {
    if key.len() < 2 {
        return Err(bad("key", "shorter than its length prefix"));
    }
    let end = 2 + usize::from(u16::from_be_bytes([key[0], key[1]]));
    if key.len() < end {
        return Err(bad("key", "client identifier cut short"));
    }
    Ok(key.split_at(end))
}

pub fn queue_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn subscription_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(filter.as_bytes());
    k
}

pub fn incoming_key(client_id: &str, packet_id: u16) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(&packet_id.to_be_bytes());
    k
}

pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn seq_of(suffix: &[u8]) -> Result<u64, RecordError> {
    let b: [u8; 8] = suffix.try_into().map_err(|_| bad("key", "sequence number is not 8 bytes"))?;
    Ok(u64::from_be_bytes(b))
}

fn reader(what: &'static str, value: &[u8]) -> Result<Reader, RecordError> {
    let mut r = Reader::new(Bytes::copy_from_slice(value));
    let format = r.u8().map_err(|e| bad(what, e.reason))?;
    if format != FORMAT {
        return Err(bad(what, format!("format {format}, this build reads {FORMAT}")));
    }
    Ok(r)
}

fn qos_of(what: &'static str, v: u8) -> Result<QoS, RecordError> {
    QoS::from_u8(v).ok_or_else(|| bad(what, "invalid QoS"))
}

/// A message body: topic, flags, the publisher's properties, when it was received (wall clock)
/// and its expiry interval, then the payload to the end of the value.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(32 + m.topic.len() + m.payload.len() + m.properties.wire_len());
    out.put_u8(FORMAT);
    // Bit 4: a message id follows the expiry interval (records written before issue 7 have none).
    out.put_u8(m.qos as u8 | (u8::from(m.retain) << 2) | (u8::from(m.expiry_interval.is_some()) << 3) | 0b1_0000);
    out.put_u64(wall_ms_of(m.received_at));
    out.put_u32(m.expiry_interval.unwrap_or(0));
    out.put_u64(m.id);
    put_str(&mut out, &m.topic);
    m.properties.encode(&mut out);
    out.put_slice(&m.payload);
    out.to_vec()
}

pub fn decode_message(value: &[u8]) -> Result<Message, RecordError> {
    const W: &str = "message";
    let mut r = reader(W, value)?;
    let e = |e: crate::codec::DecodeError| bad(W, e.reason);
    let flags = r.u8().map_err(e)?;
    let received_ms = r.u64_be().map_err(e)?;
    let expiry = r.u32().map_err(e)?;
    let id = if flags & 0b1_0000 != 0 { r.u64_be().map_err(e)? } else { 0 };
    let topic = r.utf8().map_err(e)?;
    let properties = Properties::decode(&mut r, PropertyContext::Publish, false).map_err(e)?;
    let payload = r.rest();
    Ok(Message {
        properties,
        expiry_interval: (flags & 0b1000 != 0).then_some(expiry),
        received_at: instant_of(received_ms),
        id,
        ..Message::new(topic, payload, qos_of(W, flags & 0b11)?, flags & 0b100 != 0)
    })
}

/// What the start-up scan needs of a stored body without decoding it: when it was received,
/// its expiry interval and its payload's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageSummary {
    pub received_ms: u64,
    pub expiry_interval: Option<u32>,
    pub payload_len: usize,
}

impl MessageSummary {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expiry_interval.is_some_and(|secs| now_ms.saturating_sub(self.received_ms) / 1000 >= u64::from(secs))
    }
}

/// Reads a body's header, skipping its topic and properties, as `encode_message` wrote them.
pub fn message_summary(value: &[u8]) -> Result<MessageSummary, RecordError> {
    const W: &str = "message";
    let short = || bad(W, "cut short");
    let take = |at: &mut usize, n: usize| -> Result<&[u8], RecordError> {
        let b = value.get(*at..*at + n).ok_or_else(short)?;
        *at += n;
        Ok(b)
    };
    let mut at = 0;
    let format = take(&mut at, 1)?[0];
    if format != FORMAT {
        return Err(bad(W, format!("format {format}, this build reads {FORMAT}")));
    }
    let flags = take(&mut at, 1)?[0];
    let received_ms = u64::from_be_bytes(take(&mut at, 8)?.try_into().expect("8 bytes"));
    let expiry = u32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
    if flags & 0b1_0000 != 0 {
        take(&mut at, 8)?;
    }
    let topic_len = u16::from_be_bytes(take(&mut at, 2)?.try_into().expect("2 bytes"));
    take(&mut at, usize::from(topic_len))?;
    let mut properties_len = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = take(&mut at, 1)?[0];
        properties_len |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            break;
        }
        if shift == 21 {
            return Err(bad(W, "property length longer than four bytes"));
        }
    }
    take(&mut at, properties_len)?;
    Ok(MessageSummary {
        received_ms,
        expiry_interval: (flags & 0b1000 != 0).then_some(expiry),
        payload_len: value.len() - at,
    })
}

/// One message in a session's queue: which body, what the subscription grants, and, once sent,
/// the packet identifier and how far the QoS 1 or 2 exchange got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    pub message_id: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Packet identifier and state while in flight; None while still queued.
    pub inflight: Option<(u16, OutState)>,
}

impl QueueEntry {
    /// The entry of a delivery, with its packet identifier and state once it is in flight.
    pub fn of(d: &Delivery, inflight: Option<(u16, OutState)>) -> QueueEntry {
        QueueEntry {
            message_id: d.message.store_id.get().copied().unwrap_or(0),
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.subscription_ids.to_vec(),
            inflight,
        }
    }
}

fn state_byte(s: Option<OutState>) -> u8 {
    match s {
        None => 0,
        Some(OutState::AwaitPubAck) => 1,
        Some(OutState::AwaitPubRec) => 2,
        Some(OutState::AwaitPubComp) => 3,
    }
}

pub fn encode_entry(e: &QueueEntry) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(16 + 5 * e.subscription_ids.len());
    out.put_u8(FORMAT);
    out.put_u64(e.message_id);
    out.put_u8(e.qos as u8 | (u8::from(e.retain) << 2));
    out.put_u8(state_byte(e.inflight.map(|(_, s)| s)));
    out.put_u16(e.inflight.map_or(0, |(id, _)| id));
    out.put_u8(e.subscription_ids.len().min(255) as u8);
    for id in e.subscription_ids.iter().take(255) {
        out.put_u32(*id);
    }
    out.to_vec()
}

pub fn decode_entry(value: &[u8]) -> Result<QueueEntry, RecordError> {
    const W: &str = "queue entry";
    // Read straight from the slice: a returning session's queue is decoded entry by entry.
    let (head, ids) = match value {
        [FORMAT, rest @ ..] if rest.len() >= 13 => rest.split_at(13),
        [FORMAT, ..] | [] => return Err(bad(W, "cut short")),
        [format, ..] => return Err(bad(W, format!("format {format}, this build reads {FORMAT}"))),
    };
    let message_id = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let (flags, state) = (head[8], head[9]);
    let packet_id = u16::from_be_bytes([head[10], head[11]]);
    let n = usize::from(head[12]);
    if ids.len() < 4 * n {
        return Err(bad(W, "subscription identifiers cut short"));
    }
    let subscription_ids =
        ids.chunks_exact(4).take(n).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))).collect();
    let inflight = match state {
        0 => None,
        1 => Some((packet_id, OutState::AwaitPubAck)),
        2 => Some((packet_id, OutState::AwaitPubRec)),
        3 => Some((packet_id, OutState::AwaitPubComp)),
        other => return Err(bad(W, format!("unknown in-flight state {other}"))),
    };
    Ok(QueueEntry { message_id, qos: qos_of(W, flags & 0b11)?, retain: flags & 0b100 != 0, subscription_ids, inflight })
}

/// The body a queue entry refers to, read without decoding the rest: what the start-up scan
/// needs of each of a million entries (issue 14: a parked queue is decoded when its session
/// returns, not at start).
pub fn entry_message_id(value: &[u8]) -> Result<u64, RecordError> {
    match value {
        [FORMAT, id @ ..] if id.len() >= 8 => Ok(u64::from_be_bytes(id[..8].try_into().expect("8 bytes"))),
        [FORMAT, ..] => Err(bad("queue entry", "cut short before its message id")),
        [format, ..] => Err(bad("queue entry", format!("format {format}, this build reads {FORMAT}"))),
        [] => Err(bad("queue entry", "empty")),
    }
}

/// What a persistent session keeps apart from its subscriptions, queue and packet identifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub expiry_interval: u32,
    /// When its last connection closed (ms since the epoch); 0 while a connection holds it, so
    /// a session that was connected when the broker died counts its expiry from the restart.
    pub disconnected_at_ms: u64,
    /// The will of its last connection, while it may still be due [MQTT-3.1.2-8].
    pub will: Option<Will>,
    /// The identity that made the session (`auth::Login::owner`); None in records written
    /// before sessions had owners: the next client to claim it becomes its owner.
    pub owner: Option<String>,
}

/// Flags bit of a session record that carries its owner, after the will.
const SESSION_HAS_OWNER: u8 = 0x10;

pub fn encode_session(s: &SessionRecord) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(32);
    out.put_u8(FORMAT);
    out.put_u32(s.expiry_interval);
    out.put_u64(s.disconnected_at_ms);
    let owned = if s.owner.is_some() { SESSION_HAS_OWNER } else { 0 };
    match &s.will {
        None => out.put_u8(owned),
        Some(w) => {
            out.put_u8(owned | 1 | ((w.qos as u8) << 1) | (u8::from(w.retain) << 3));
            put_str(&mut out, &w.topic);
            w.properties.encode(&mut out);
            put_binary(&mut out, &w.payload);
        }
    }
    if let Some(owner) = &s.owner {
        // As bytes: a token's subject may hold what an MQTT string may not (U+0000).
        put_binary(&mut out, owner.as_bytes());
    }
    out.to_vec()
}

pub fn decode_session(value: &[u8]) -> Result<SessionRecord, RecordError> {
    const W: &str = "session";
    let mut r = reader(W, value)?;
    let e = |e: crate::codec::DecodeError| bad(W, e.reason);
    let expiry_interval = r.u32().map_err(e)?;
    let disconnected_at_ms = r.u64_be().map_err(e)?;
    let flags = r.u8().map_err(e)?;
    let will = if flags & 1 == 0 {
        None
    } else {
        let topic = r.utf8().map_err(e)?;
        let properties = Properties::decode(&mut r, PropertyContext::Will, false).map_err(e)?;
        let payload = r.binary().map_err(e)?;
        Some(Will { topic, payload, qos: qos_of(W, (flags >> 1) & 0b11)?, retain: flags & 0b1000 != 0, properties })
    };
    let owner = if flags & SESSION_HAS_OWNER != 0 {
        Some(String::from_utf8(r.binary().map_err(e)?.to_vec()).map_err(|_| bad(W, "owner is not UTF-8"))?)
    } else {
        None
    };
    Ok(SessionRecord { expiry_interval, disconnected_at_ms, will, owner })
}

pub fn encode_subscription(options: &SubscriptionOptions, identifier: Option<u32>) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(6);
    out.put_u8(FORMAT);
    out.put_u8(
        options.qos as u8
            | (u8::from(options.no_local) << 2)
            | (u8::from(options.retain_as_published) << 3)
            | (options.retain_handling << 4),
    );
    out.put_u32(identifier.unwrap_or(0));
    out.to_vec()
}

pub fn decode_subscription(value: &[u8]) -> Result<(SubscriptionOptions, Option<u32>), RecordError> {
    const W: &str = "subscription";
    let mut r = reader(W, value)?;
    let e = |e: crate::codec::DecodeError| bad(W, e.reason);
    let b = r.u8().map_err(e)?;
    let id = r.u32().map_err(e)?;
    let options = SubscriptionOptions {
        qos: qos_of(W, b & 0b11)?,
        no_local: b & 0b100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling: (b >> 4) & 0b11,
    };
    Ok((options, (id != 0).then_some(id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_message_survives_encoding_with_its_properties_and_age() {
        let mut m = Message::new_for_test("news/tech/ai", b"story", QoS::ExactlyOnce, true);
        m.properties.user_properties.push(("story-id".into(), "42".into()));
        m.properties.content_type = Some("text/plain".into());
        m.expiry_interval = Some(300);
        m.received_at = Instant::now() - Duration::from_secs(10);
        m.id = 0x0000_0300_0000_002a;
        let back = decode_message(&encode_message(&m)).unwrap();
        assert_eq!(back.id, m.id, "the message id survives, for its receipt");
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.payload, m.payload);
        assert_eq!((back.qos, back.retain), (QoS::ExactlyOnce, true));
        assert_eq!(back.properties, m.properties);
        let remaining = back.remaining_expiry(Instant::now()).unwrap();
        assert!((289..=290).contains(&remaining), "remaining expiry {remaining}");
        // A record from before message ids (flag bit 4 clear) still reads, with id 0.
        let mut old = encode_message(&m);
        old[1] &= !0b1_0000;
        old.drain(14..22);
        let back = decode_message(&old).unwrap();
        assert_eq!((back.id, back.topic.as_str()), (0, "news/tech/ai"));
        let summary = message_summary(&old).unwrap();
        assert_eq!((summary.payload_len, summary.expiry_interval), (5, Some(300)), "without a message id");

        // The start-up scan's summary agrees with the full decoding.
        let summary = message_summary(&encode_message(&m)).unwrap();
        assert_eq!((summary.payload_len, summary.expiry_interval), (5, Some(300)));
        let now_ms = crate::clock::wall_ms_now();
        assert!(!summary.is_expired(now_ms) && summary.is_expired(now_ms + 291_000));
        let mut long = Message::new_for_test("news/tech/ai", &[7u8; 200], QoS::AtLeastOnce, false);
        long.properties.user_properties.push(("k".into(), "v".repeat(200)));
        let summary = message_summary(&encode_message(&long)).unwrap();
        assert_eq!(summary.payload_len, 200, "a two-byte property length is skipped whole");
        let encoded = encode_message(&long);
        for cut in 0..encoded.len() - 200 {
            assert!(message_summary(&encoded[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn entries_sessions_and_subscriptions_round_trip() {
        let e = QueueEntry {
            message_id: 7,
            qos: QoS::AtLeastOnce,
            retain: true,
            subscription_ids: vec![1, 268_435_455],
            inflight: Some((65535, OutState::AwaitPubAck)),
        };
        assert_eq!(decode_entry(&encode_entry(&e)).unwrap(), e);
        assert_eq!(entry_message_id(&encode_entry(&e)).unwrap(), e.message_id);
        let encoded = encode_entry(&e);
        for cut in 0..encoded.len() {
            assert!(decode_entry(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let plain = QueueEntry { subscription_ids: vec![], inflight: None, ..e.clone() };
        assert_eq!(decode_entry(&encode_entry(&plain)).unwrap(), plain);
        let s = SessionRecord {
            expiry_interval: u32::MAX,
            disconnected_at_ms: 1234,
            will: Some(Will {
                topic: "clients/c/status".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties { will_delay_interval: Some(5), ..Default::default() },
            }),
            owner: Some("bob".into()),
        };
        assert_eq!(decode_session(&encode_session(&s)).unwrap(), s);
        let unowned = SessionRecord { owner: None, will: None, ..s.clone() };
        assert_eq!(decode_session(&encode_session(&unowned)).unwrap(), unowned);
        let anonymous = SessionRecord { owner: Some(String::new()), ..s.clone() };
        assert_eq!(decode_session(&encode_session(&anonymous)).unwrap(), anonymous);
        let o = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        };
        assert_eq!(decode_subscription(&encode_subscription(&o, Some(9))).unwrap(), (o, Some(9)));
    }

    #[test]
    fn session_ranges_never_overlap_and_keys_split_back() {
        let (a, b) = (queue_key("ab", u64::MAX >> 8), session_prefix("abc"));
        assert!(a < session_range_end("ab"));
        assert!(!(b >= session_prefix("ab") && b < session_range_end("ab")), "abc is outside ab's range");
        let key = queue_key("phone-1", 99);
        let (id, suffix) = split_session_key(&key).unwrap();
        assert_eq!((id.as_str(), seq_of(suffix).unwrap()), ("phone-1", 99));
        let (prefix, suffix) = split_prefix(&key).unwrap();
        assert_eq!((prefix, seq_of(suffix).unwrap()), (&session_prefix("phone-1")[..], 99));
        assert!(split_prefix(&[0, 9, b'a']).is_err() && split_prefix(&[0]).is_err());
        assert!(decode_entry(&[9, 0, 0]).unwrap_err().to_string().contains("format 9"));
        assert!(entry_message_id(&[9, 0, 0]).unwrap_err().to_string().contains("format 9"));
        assert!(entry_message_id(&[FORMAT, 0, 0]).is_err(), "cut short");
        assert!(split_session_key(&[0, 9, b'a']).is_err());
    }
}
