//! PUBLISH and its four acknowledgements, PUBACK, PUBREC, PUBREL and PUBCOMP [MQTT-3.3 .. 3.7].

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{Properties, PropertyContext};
use super::wire::{put_str, str_len, Reader};
use super::{put_fixed_header, DecodeError, QoS, ReasonCode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in 5.0 when a topic alias stands for it.
    pub topic: String,
    /// 0 for QoS 0, which carries no packet identifier.
    pub packet_id: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

impl Publish {
    /// `from_server` allows several subscription identifiers [MQTT-3.3.4-3]; a client sends none
    /// that matter, and Mosquitto accepts and ignores one, so we do too.
    pub fn decode(flags: u8, r: &mut Reader, v5: bool, from_server: bool) -> Result<Publish, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos =
            QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::malformed("[MQTT-3.3.1-4] PUBLISH with QoS 3"))?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::malformed("[MQTT-3.3.1-2] DUP set on a QoS 0 PUBLISH"));
        }
        let topic = r.topic_name()?;
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            let id = r.u16()?;
            if id == 0 {
                return Err(DecodeError::protocol("[MQTT-2.2.1-3] PUBLISH with packet identifier 0"));
            }
            id
        };
        let properties =
            if v5 { Properties::decode(r, PropertyContext::Publish, from_server)? } else { Properties::default() };
        if !v5 && topic.is_empty() {
            return Err(DecodeError::malformed("[MQTT-4.7.3-1] empty topic name"));
        }
        let payload = r.rest();
        Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload })
    }

    pub fn first_byte(&self) -> u8 {
        0x30 | ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | self.retain as u8
    }

    /// Length of everything but the payload, fixed header excluded.
    pub fn header_body_len(&self, v5: bool) -> usize {
        str_len(self.topic.as_bytes())
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if v5 { self.properties.wire_len() } else { 0 }
    }

    /// The encoded size of the whole packet.
    pub fn encoded_len(&self, v5: bool) -> usize {
        super::packet_len(self.header_body_len(v5) + self.payload.len())
    }

    /// Writes the fixed header, topic, packet identifier and properties: everything before the
    /// payload, which the caller appends (or writes as its own buffer, sparing a copy).
    pub fn encode_header(&self, out: &mut BytesMut, v5: bool) {
        let body = self.header_body_len(v5);
        put_fixed_header(out, self.first_byte(), body + self.payload.len());
        put_str(out, &self.topic);
        if self.qos != QoS::AtMostOnce {
            out.put_u16(self.packet_id);
        }
        if v5 {
            self.properties.encode(out);
        }
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: a packet identifier, and in 5.0 a reason code and properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: u16,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl PubResponse {
    pub fn new(packet_id: u16, reason: ReasonCode) -> Self {
        Self { packet_id, reason, properties: Properties::default() }
    }

    pub fn decode(kind: u8, flags: u8, r: &mut Reader, v5: bool) -> Result<PubResponse, DecodeError> {
        let expected_flags = if kind == 6 { 0x02 } else { 0x00 };
        if flags != expected_flags {
            return Err(DecodeError::malformed("[MQTT-3.6.1-1] reserved flags of a publish response are wrong"));
        }
        let packet_id = r.u16()?;
        if !v5 {
            if !r.is_empty() {
                return Err(DecodeError::malformed("[MQTT-3.4.2] publish response longer than two bytes"));
            }
            if packet_id == 0 {
                return Err(DecodeError::protocol("[MQTT-2.2.1-3] packet identifier 0"));
            }
            return Ok(PubResponse::new(packet_id, ReasonCode::SUCCESS));
        }
        let (reason, properties) = super::reason_and_properties(r, PropertyContext::PubResponse)?;
        if packet_id == 0 {
            return Err(DecodeError::protocol("[MQTT-2.2.1-3] packet identifier 0"));
        }
        let valid: &[u8] = match kind {
            4 | 5 => &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
            _ => &[0x00, 0x92],
        };
        if !valid.contains(&reason.0) {
            return Err(DecodeError::protocol("[MQTT-3.4.2.1] reason code not allowed in this packet"));
        }
        Ok(PubResponse { packet_id, reason, properties })
    }

    pub fn encode(&self, kind: u8, out: &mut BytesMut, v5: bool) {
        let first = (kind << 4) | if kind == 6 { 0x02 } else { 0x00 };
        // [MQTT-3.4.2.1] the reason code and property length may be left out when they are 0.
        if !v5 || (self.reason == ReasonCode::SUCCESS && self.properties.is_empty()) {
            out.put_u8(first);
            out.put_u8(2);
            out.put_u16(self.packet_id);
        } else if self.properties.is_empty() {
            out.put_u8(first);
            out.put_u8(3);
            out.put_u16(self.packet_id);
            out.put_u8(self.reason.0);
        } else {
            put_fixed_header(out, first, 3 + self.properties.wire_len());
            out.put_u16(self.packet_id);
            out.put_u8(self.reason.0);
            self.properties.encode(out);
        }
    }
}
