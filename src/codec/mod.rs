//! Pure, strict MQTT 3.1, 3.1.1 and 5.0 packet codec: bytes in, `Packet` out and back. It knows
//! nothing of sockets; "need more bytes" (`Ok(None)`) is kept apart from "invalid packet" (`Err`).
//!
//! The remaining length is checked against the maximum packet size before the body is buffered
//! or parsed, and every error names the specification statement it breaks.

mod connect;
pub mod properties;
mod publish;
mod subscribe;
pub mod wire;

use bytes::{BufMut, Bytes, BytesMut};

pub use connect::{ConnAck, Connect, Will};
pub use properties::{Properties, PropertyContext};
pub use publish::{PubResponse, Publish};
pub use subscribe::{SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe};

use wire::{put_varint, Reader};

/// The protocol level byte of CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    V3_1 = 3,
    V3_1_1 = 4,
    V5 = 5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Which side of the connection is decoding: a server refuses packets only servers send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// How a decoding error must be answered [MQTT-4.13].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 5.0: DISCONNECT 0x81 then close; 3.1.1: close.
    Malformed,
    /// 5.0: DISCONNECT 0x82 then close; 3.1.1: close.
    ProtocolError,
    /// 5.0: DISCONNECT 0x95 then close; 3.1.1: close.
    PacketTooLarge,
    /// CONNECT with a protocol name or level we do not speak: CONNACK 0x01 then close [MQTT-3.1.2-2].
    UnacceptableProtocolVersion,
    /// Close without sending anything; used where the reference broker sends nothing either.
    CloseSilently,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    pub kind: ErrorKind,
    pub reason: &'static str,
}

impl DecodeError {
    pub fn malformed(reason: &'static str) -> Self {
        Self { kind: ErrorKind::Malformed, reason }
    }
    pub fn protocol(reason: &'static str) -> Self {
        Self { kind: ErrorKind::ProtocolError, reason }
    }
    pub fn silent(reason: &'static str) -> Self {
        Self { kind: ErrorKind::CloseSilently, reason }
    }

    /// The DISCONNECT reason code a 5.0 server sends for this error, if any.
    pub fn disconnect_reason(&self) -> Option<ReasonCode> {
        match self.kind {
            ErrorKind::Malformed => Some(ReasonCode::MALFORMED_PACKET),
            ErrorKind::ProtocolError => Some(ReasonCode::PROTOCOL_ERROR),
            ErrorKind::PacketTooLarge => Some(ReasonCode::PACKET_TOO_LARGE),
            ErrorKind::UnacceptableProtocolVersion | ErrorKind::CloseSilently => None,
        }
    }
}

/// An MQTT 5 reason code [MQTT-2.4]; for 3.1.1 the CONNACK return codes use the same byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReasonCode(pub u8);

impl ReasonCode {
    pub const SUCCESS: Self = Self(0x00);
    pub const GRANTED_QOS_1: Self = Self(0x01);
    pub const GRANTED_QOS_2: Self = Self(0x02);
    pub const DISCONNECT_WITH_WILL: Self = Self(0x04);
    pub const NO_MATCHING_SUBSCRIBERS: Self = Self(0x10);
    pub const NO_SUBSCRIPTION_EXISTED: Self = Self(0x11);
    pub const UNSPECIFIED_ERROR: Self = Self(0x80);
    pub const MALFORMED_PACKET: Self = Self(0x81);
    pub const PROTOCOL_ERROR: Self = Self(0x82);
    pub const IMPLEMENTATION_SPECIFIC_ERROR: Self = Self(0x83);
    pub const UNSUPPORTED_PROTOCOL_VERSION: Self = Self(0x84);
    pub const CLIENT_IDENTIFIER_NOT_VALID: Self = Self(0x85);
    pub const BAD_USER_NAME_OR_PASSWORD: Self = Self(0x86);
    pub const NOT_AUTHORIZED: Self = Self(0x87);
    pub const SERVER_UNAVAILABLE: Self = Self(0x88);
    pub const SERVER_BUSY: Self = Self(0x89);
    pub const BAD_AUTHENTICATION_METHOD: Self = Self(0x8C);
    pub const KEEP_ALIVE_TIMEOUT: Self = Self(0x8D);
    pub const SESSION_TAKEN_OVER: Self = Self(0x8E);
    pub const TOPIC_FILTER_INVALID: Self = Self(0x8F);
    pub const TOPIC_NAME_INVALID: Self = Self(0x90);
    pub const PACKET_IDENTIFIER_IN_USE: Self = Self(0x91);
    pub const PACKET_IDENTIFIER_NOT_FOUND: Self = Self(0x92);
    pub const RECEIVE_MAXIMUM_EXCEEDED: Self = Self(0x93);
    pub const TOPIC_ALIAS_INVALID: Self = Self(0x94);
    pub const PACKET_TOO_LARGE: Self = Self(0x95);
    pub const QUOTA_EXCEEDED: Self = Self(0x97);
    pub const SERVER_SHUTTING_DOWN: Self = Self(0x8B);
    pub const ADMINISTRATIVE_ACTION: Self = Self(0x98);
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: Self = Self(0x9E);
    pub const CONNECTION_RATE_EXCEEDED: Self = Self(0x9F);

    /// Return codes of a 3.1.1 CONNACK [MQTT-3.2.2.3].
    pub const V3_UNACCEPTABLE_PROTOCOL_VERSION: Self = Self(0x01);
    pub const V3_IDENTIFIER_REJECTED: Self = Self(0x02);
    pub const V3_SERVER_UNAVAILABLE: Self = Self(0x03);
    pub const V3_BAD_USER_NAME_OR_PASSWORD: Self = Self(0x04);
    pub const V3_NOT_AUTHORIZED: Self = Self(0x05);

    pub fn is_error(self) -> bool {
        self.0 >= 0x80
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// Most the decoder reserves beyond what has arrived, for the rest of a packet it has begun.
pub const RESERVE_AHEAD: usize = 16 * 1024;

/// Decodes packets of one connection. Before CONNECT the version is unknown and only CONNECT is
/// accepted [MQTT-3.1.0-1]; afterwards every packet is read at the negotiated version.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub role: Role,
    pub version: Option<ProtocolVersion>,
    /// Largest packet accepted, fixed header included [MQTT-3.2.2.3.6]. A server sets it lower
    /// until the CONNECT is accepted (`mqtt.max_connect_packet_size`): before that the bytes are
    /// a stranger's.
    pub max_packet_size: u32,
}

impl Decoder {
    pub fn new(role: Role, max_packet_size: u32) -> Self {
        Self { role, version: None, max_packet_size }
    }

    /// Takes one whole packet off the front of `buf`, or returns `Ok(None)` if it is not all there yet.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if self.version.is_none() && self.role == Role::Server && first >> 4 != 1 {
            return Err(DecodeError::silent("[MQTT-3.1.0-1] first packet is not CONNECT"));
        }
        let (remaining, len_bytes) = match wire::decode_varint(&buf[1..]) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(_) => return Err(DecodeError::malformed("[MQTT-2.1.4] remaining length longer than four bytes")),
        };
        let total = 1 + len_bytes + remaining as usize;
        if total > self.max_packet_size as usize {
            return Err(DecodeError {
                kind: ErrorKind::PacketTooLarge,
                reason: "[MQTT-3.1.2-24] packet exceeds the maximum packet size",
            });
        }
        if buf.len() < total {
            // Room for the rest of this packet, but never more than one read's worth ahead of the
            // bytes that arrived: a header that announces 256 MB costs nothing until it is paid for.
            buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        let _ = frame.split_to(1 + len_bytes);
        let body = frame.freeze();
        let packet = self.decode_body(first, body)?;
        if let Packet::Connect(c) = &packet {
            self.version = Some(c.protocol);
        }
        Ok(Some(packet))
    }

    fn decode_body(&self, first: u8, body: Bytes) -> Result<Packet, DecodeError> {
        let kind = first >> 4;
        let flags = first & 0x0F;
        let server = self.role == Role::Server;
        let Some(version) = self.version else {
            return match kind {
                1 => Ok(Packet::Connect(Box::new(Connect::decode(flags, body)?))),
                2 if !server => Err(DecodeError::protocol("[MQTT-3.2.0-1] CONNACK before CONNECT")),
                _ => Err(DecodeError::silent("[MQTT-3.1.0-1] first packet is not CONNECT")),
            };
        };
        let v5 = version.is_v5();
        let len = body.len();
        let mut r = Reader::new(body);
        match kind {
            0 => Err(DecodeError::protocol("[MQTT-2.1.2] reserved packet type 0")),
            1 if server => Err(DecodeError::protocol("[MQTT-3.1.0-2] second CONNECT")),
            1 => Err(DecodeError::protocol("[MQTT-3.1] CONNECT sent by a server")),
            2 if server => Err(DecodeError::protocol("[MQTT-3.2] CONNACK sent by a client")),
            2 => Ok(Packet::ConnAck(ConnAck::decode(flags, &mut r, v5)?)),
            3 => Ok(Packet::Publish(Publish::decode(flags, &mut r, v5, !server)?)),
            4 => Ok(Packet::PubAck(PubResponse::decode(kind, flags, &mut r, v5)?)),
            5 => Ok(Packet::PubRec(PubResponse::decode(kind, flags, &mut r, v5)?)),
            6 => Ok(Packet::PubRel(PubResponse::decode(kind, flags, &mut r, v5)?)),
            7 => Ok(Packet::PubComp(PubResponse::decode(kind, flags, &mut r, v5)?)),
            8 if !server => Err(DecodeError::protocol("[MQTT-3.8] SUBSCRIBE sent by a server")),
            8 => Ok(Packet::Subscribe(Subscribe::decode(flags, &mut r, v5)?)),
            9 | 11 if server => {
                if flags != 0 {
                    Err(DecodeError::malformed("[MQTT-2.1.3-1] reserved flags set"))
                } else {
                    Err(DecodeError::protocol("[MQTT-3.9] SUBACK or UNSUBACK sent by a client"))
                }
            }
            9 => Ok(Packet::SubAck(SubAck::decode(flags, &mut r, v5)?)),
            10 if !server => Err(DecodeError::protocol("[MQTT-3.10] UNSUBSCRIBE sent by a server")),
            10 => Ok(Packet::Unsubscribe(Unsubscribe::decode(flags, &mut r, v5)?)),
            11 => Ok(Packet::UnsubAck(UnsubAck::decode(flags, &mut r, v5)?)),
            12 => {
                if flags != 0 {
                    Err(DecodeError::malformed("[MQTT-2.1.3-1] PINGREQ with reserved flags set"))
                } else if len != 0 {
                    Err(DecodeError::silent("[MQTT-3.12] PINGREQ with a body"))
                } else if !server {
                    Err(DecodeError::protocol("[MQTT-3.12] PINGREQ sent by a server"))
                } else {
                    Ok(Packet::PingReq)
                }
            }
            13 => {
                if len != 0 {
                    Err(DecodeError::silent("[MQTT-3.13] PINGRESP with a body"))
                } else if server {
                    Err(DecodeError::protocol("[MQTT-3.13] PINGRESP sent by a client"))
                } else {
                    Ok(Packet::PingResp)
                }
            }
            14 => Ok(Packet::Disconnect(decode_disconnect(flags, &mut r, v5)?)),
            15 if !v5 => Err(DecodeError::malformed("[MQTT-2.1.2] AUTH does not exist before MQTT 5")),
            // Herald offers no enhanced authentication method, so an AUTH can never be expected
            // [MQTT-4.12.0-1].
            15 if server => Err(DecodeError::protocol("[MQTT-4.12.0-1] AUTH without an authentication method")),
            15 => Ok(Packet::Auth(decode_auth(flags, &mut r)?)),
            _ => unreachable!("a four bit packet type"),
        }
    }
}

fn decode_disconnect(flags: u8, r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    if flags != 0 {
        return Err(DecodeError::malformed("[MQTT-3.14.1-1] DISCONNECT with reserved flags set"));
    }
    if !v5 {
        if !r.is_empty() {
            return Err(DecodeError::malformed("[MQTT-3.14] DISCONNECT with a body"));
        }
        return Ok(Disconnect { reason: ReasonCode::SUCCESS, properties: Properties::default() });
    }
    let (reason, properties) = reason_and_properties(r, PropertyContext::Disconnect)?;
    const VALID: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    if !VALID.contains(&reason.0) {
        return Err(DecodeError::silent("[MQTT-3.14.2.1] unknown DISCONNECT reason code"));
    }
    Ok(Disconnect { reason, properties })
}

fn decode_auth(flags: u8, r: &mut Reader) -> Result<Auth, DecodeError> {
    if flags != 0 {
        return Err(DecodeError::malformed("[MQTT-3.15.1-1] AUTH with reserved flags set"));
    }
    let (reason, properties) = reason_and_properties(r, PropertyContext::Auth)?;
    Ok(Auth { reason, properties })
}

/// The tail shared by DISCONNECT, AUTH and the publish responses of 5.0: a reason code and
/// properties, each left out when it would be the default [MQTT-3.4.2.1], and nothing after.
pub(crate) fn reason_and_properties(
    r: &mut Reader,
    ctx: PropertyContext,
) -> Result<(ReasonCode, Properties), DecodeError> {
    let reason = if r.is_empty() { ReasonCode::SUCCESS } else { ReasonCode(r.u8()?) };
    let properties = if r.is_empty() { Properties::default() } else { Properties::decode(r, ctx, false)? };
    if !r.is_empty() {
        return Err(DecodeError::malformed("bytes after the properties"));
    }
    Ok((reason, properties))
}

/// Writes a fixed header: packet type and flags, then the remaining length.
pub fn put_fixed_header(out: &mut BytesMut, first: u8, remaining: usize) {
    out.put_u8(first);
    put_varint(out, remaining as u32);
}

/// The full size of a packet whose body is `remaining` bytes.
pub fn packet_len(remaining: usize) -> usize {
    1 + wire::varint_len(remaining as u32) + remaining
}

impl Packet {
    /// Encodes the packet at `version`. PUBLISH payloads are copied here; the broker's delivery
    /// path uses [`Publish::encode_header`] and writes the payload `Bytes` separately instead.
    pub fn encode(&self, version: ProtocolVersion, out: &mut BytesMut) {
        let v5 = version.is_v5();
        match self {
            Packet::Connect(c) => c.encode(out),
            Packet::ConnAck(c) => c.encode(out, v5),
            Packet::Publish(p) => {
                p.encode_header(out, v5);
                out.put_slice(&p.payload);
            }
            Packet::PubAck(p) => p.encode(4, out, v5),
            Packet::PubRec(p) => p.encode(5, out, v5),
            Packet::PubRel(p) => p.encode(6, out, v5),
            Packet::PubComp(p) => p.encode(7, out, v5),
            Packet::Subscribe(s) => s.encode(out, v5),
            Packet::SubAck(s) => s.encode(out, v5),
            Packet::Unsubscribe(u) => u.encode(out, v5),
            Packet::UnsubAck(u) => u.encode(out, v5),
            Packet::PingReq => out.put_slice(&[0xC0, 0x00]),
            Packet::PingResp => out.put_slice(&[0xD0, 0x00]),
            Packet::Disconnect(d) => {
                if !v5 {
                    out.put_slice(&[0xE0, 0x00]);
                } else if d.properties.is_empty() {
                    if d.reason == ReasonCode::SUCCESS {
                        out.put_slice(&[0xE0, 0x00]);
                    } else {
                        out.put_slice(&[0xE0, 0x01, d.reason.0]);
                    }
                } else {
                    put_fixed_header(out, 0xE0, 1 + d.properties.wire_len());
                    out.put_u8(d.reason.0);
                    d.properties.encode(out);
                }
            }
            Packet::Auth(a) => {
                put_fixed_header(out, 0xF0, 1 + a.properties.wire_len());
                out.put_u8(a.reason.0);
                a.properties.encode(out);
            }
        }
    }

    /// The encoded size, used to honour a peer's maximum packet size before writing.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let mut out = BytesMut::new();
        self.encode(version, &mut out);
        out.len()
    }
}

/// `$`-topics are for the server's own use and are not matched by a leading wildcard [MQTT-4.7.2-1].
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.contains(['+', '#'])
}

/// Every rule a PUBLISH's topic name obeys, whoever sends it: a UTF-8 string without U+0000,
/// control characters or non-characters [MQTT-1.5.4-1..3] and without wildcards [MQTT-3.3.2-2].
/// The MQTT decoder and the HTTP API's publish both call this, so a topic refused on one path is
/// refused on the other.
pub fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    check_topic_name_bytes(topic.as_bytes())
}

/// `check_topic_name` on the bytes as they arrive, for the decoder.
pub fn check_topic_name_bytes(topic: &[u8]) -> Result<(), DecodeError> {
    wire::check_utf8(topic)?;
    if topic.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(DecodeError::malformed("[MQTT-3.3.2-2] topic name contains a wildcard"));
    }
    Ok(())
}

/// The UTF-8 rules of [MQTT-1.5.4] for one string of a property (user property, content type).
pub fn check_string(s: &str) -> Result<(), DecodeError> {
    wire::check_utf8(s.as_bytes())
}

/// [MQTT-4.7.1-1..3]: `#` only as the whole last level, `+` only as a whole level.
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests;
