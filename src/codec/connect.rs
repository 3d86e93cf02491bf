//! CONNECT and CONNACK [MQTT-3.1], [MQTT-3.2].

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{Properties, PropertyContext};
use super::wire::{put_binary, put_str, str_len, Reader};
use super::{put_fixed_header, DecodeError, ErrorKind, ProtocolVersion, QoS, ReasonCode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: Properties,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

impl Connect {
    pub fn decode(flags: u8, body: Bytes) -> Result<Connect, DecodeError> {
        let mut r = Reader::new(body);
        let name = r.binary().map_err(|_| DecodeError::silent("[MQTT-3.1.2-1] truncated protocol name"))?;
        let level = r.u8()?;
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) => ProtocolVersion::V3_1_1,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQIsdp", 3) => ProtocolVersion::V3_1,
            (b"MQTT", _) | (b"MQIsdp", _) => {
                return Err(DecodeError {
                    kind: ErrorKind::UnacceptableProtocolVersion,
                    reason: "[MQTT-3.1.2-2] unsupported protocol level",
                })
            }
            _ => return Err(DecodeError::malformed("[MQTT-3.1.2-1] protocol name is not MQTT")),
        };
        // MQTT 3.1 did not reserve the CONNECT flags; 3.1.1 and 5.0 do [MQTT-2.1.3-1].
        if protocol != ProtocolVersion::V3_1 && flags != 0 {
            return Err(DecodeError::malformed("[MQTT-2.1.3-1] CONNECT with reserved flags set"));
        }
        let connect_flags = r.u8()?;
        if protocol != ProtocolVersion::V3_1 && connect_flags & 0x01 != 0 {
            return Err(DecodeError::malformed("[MQTT-3.1.2-3] reserved connect flag set"));
        }
        let clean_start = connect_flags & 0x02 != 0;
        let will_flag = connect_flags & 0x04 != 0;
        let will_qos = (connect_flags >> 3) & 0x03;
        let will_retain = connect_flags & 0x20 != 0;
        let password_flag = connect_flags & 0x40 != 0;
        let username_flag = connect_flags & 0x80 != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(DecodeError::malformed("[MQTT-3.1.2-11] will QoS or retain set without a will"));
        }
        let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::malformed("[MQTT-3.1.2-14] will QoS 3"))?;
        if protocol != ProtocolVersion::V5 && password_flag && !username_flag {
            return Err(DecodeError::malformed("[MQTT-3.1.2-22] password without a user name"));
        }
        let keep_alive = r.u16()?;
        let v5 = protocol.is_v5();
        let properties =
            if v5 { Properties::decode(&mut r, PropertyContext::Connect, false)? } else { Properties::default() };
        let client_id = r.utf8()?;
        let will = if will_flag {
            let properties =
                if v5 { Properties::decode(&mut r, PropertyContext::Will, false)? } else { Properties::default() };
            let topic = r.utf8()?;
            if topic.is_empty() || !super::is_valid_topic_name(&topic) {
                return Err(DecodeError::malformed("[MQTT-3.1.3-11] will topic is not a valid topic name"));
            }
            let payload = r.binary()?;
            if properties.payload_format_indicator == Some(1) && std::str::from_utf8(&payload).is_err() {
                return Err(DecodeError::malformed("[MQTT-3.1.3-15] will payload is not UTF-8"));
            }
            Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if username_flag { Some(r.utf8()?) } else { None };
        let password = if password_flag { Some(r.binary()?) } else { None };
        if !r.is_empty() {
            return Err(DecodeError::malformed("[MQTT-3.1.2-18] bytes after the CONNECT payload"));
        }
        Ok(Connect { protocol, clean_start, keep_alive, properties, client_id, will, username, password })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let v5 = self.protocol.is_v5();
        let name: &[u8] = if self.protocol == ProtocolVersion::V3_1 { b"MQIsdp" } else { b"MQTT" };
        let mut len = str_len(name) + 1 + 1 + 2 + str_len(self.client_id.as_bytes());
        if v5 {
            len += self.properties.wire_len();
        }
        if let Some(w) = &self.will {
            len += str_len(w.topic.as_bytes()) + str_len(&w.payload);
            if v5 {
                len += w.properties.wire_len();
            }
        }
        len += self.username.as_ref().map_or(0, |u| str_len(u.as_bytes()));
        len += self.password.as_ref().map_or(0, |p| str_len(p));
        put_fixed_header(out, 0x10, len);
        put_binary(out, name);
        out.put_u8(self.protocol as u8);
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | ((w.qos as u8) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        out.put_u8(flags);
        out.put_u16(self.keep_alive);
        if v5 {
            self.properties.encode(out);
        }
        put_str(out, &self.client_id);
        if let Some(w) = &self.will {
            if v5 {
                w.properties.encode(out);
            }
            put_str(out, &w.topic);
            put_binary(out, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(out, u);
        }
        if let Some(p) = &self.password {
            put_binary(out, p);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// The 5.0 reason code, or the 3.1.1 return code.
    pub code: ReasonCode,
    pub properties: Properties,
}

impl ConnAck {
    pub fn decode(flags: u8, r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
        if flags != 0 {
            return Err(DecodeError::malformed("[MQTT-2.1.3-1] CONNACK with reserved flags set"));
        }
        let ack_flags = r.u8()?;
        if ack_flags & 0xFE != 0 {
            return Err(DecodeError::malformed("[MQTT-3.2.2-1] reserved CONNACK flags set"));
        }
        let code = ReasonCode(r.u8()?);
        let properties =
            if v5 { Properties::decode(r, PropertyContext::ConnAck, false)? } else { Properties::default() };
        if !r.is_empty() {
            return Err(DecodeError::malformed("bytes after the CONNACK"));
        }
        Ok(ConnAck { session_present: ack_flags & 1 != 0, code, properties })
    }

    pub fn encode(&self, out: &mut BytesMut, v5: bool) {
        let len = 2 + if v5 { self.properties.wire_len() } else { 0 };
        put_fixed_header(out, 0x20, len);
        out.put_u8(self.session_present as u8);
        out.put_u8(self.code.0);
        if v5 {
            self.properties.encode(out);
        }
    }
}
