//! MQTT 5 properties [MQTT-2.2.2]: one struct for every packet, decoded against the set of
//! identifiers that packet allows, and encoded in a fixed order.

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{self, put_binary, put_str, put_varint, varint_len, Reader};
use super::{DecodeError, ErrorKind};

pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
pub const AUTHENTICATION_METHOD: u8 = 0x15;
pub const AUTHENTICATION_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub const RESPONSE_INFORMATION: u8 = 0x1A;
pub const SERVER_REFERENCE: u8 = 0x1C;
pub const REASON_STRING: u8 = 0x1F;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// Which packet a property block belongs to; decides which identifiers are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubResponse,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyContext {
    fn allows(self, id: u8) -> bool {
        use PropertyContext::*;
        let allowed: &[u8] = match self {
            Connect => &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27],
            Will => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26],
            ConnAck => {
                &[0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A]
            }
            Publish => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26],
            PubResponse | SubAck | UnsubAck => &[0x1F, 0x26],
            Subscribe => &[0x0B, 0x26],
            Unsubscribe => &[0x26],
            Disconnect => &[0x11, 0x1C, 0x1F, 0x26],
            Auth => &[0x15, 0x16, 0x1F, 0x26],
        };
        allowed.contains(&id)
    }

    /// Mosquitto, whose answers the conformance vectors record, treats a known but misplaced
    /// property as a malformed SUBSCRIBE or UNSUBSCRIBE and as a protocol error everywhere else.
    fn misplaced_kind(self) -> ErrorKind {
        match self {
            PropertyContext::Subscribe | PropertyContext::Unsubscribe => ErrorKind::Malformed,
            _ => ErrorKind::ProtocolError,
        }
    }
}

/// Every MQTT 5 property; a packet uses the ones its context allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::protocol("[MQTT-2.2.2-2] property included more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn boolean(value: u8) -> Result<u8, DecodeError> {
    if value > 1 {
        return Err(DecodeError::protocol("property that must be 0 or 1 has another value"));
    }
    Ok(value)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads the property length and then exactly that many bytes of properties.
    /// `multiple_subscription_ids` is true only for a PUBLISH travelling from server to client.
    pub fn decode(
        r: &mut Reader,
        ctx: PropertyContext,
        multiple_subscription_ids: bool,
    ) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        if len > r.remaining() {
            return Err(DecodeError::malformed("property length exceeds the packet"));
        }
        let mut r = Reader::new(r.take(len)?);
        let mut p = Properties::default();
        let mut deferred: Option<DecodeError> = None;
        while !r.is_empty() {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::malformed("unknown property identifier"))?;
            if !is_known(id) {
                return Err(DecodeError::malformed("unknown property identifier"));
            }
            // Every value is read before it is judged, and only a malformed block stops the
            // reading at once: Mosquitto, whose answers the vectors record, reports a malformed
            // property block (0x81) before a misplaced or repeated property (0x82).
            let mut one = || -> Result<(), DecodeError> {
                match id {
                    PAYLOAD_FORMAT_INDICATOR => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.payload_format_indicator, boolean(v)?)?
                    }
                    MESSAGE_EXPIRY_INTERVAL => {
                        let v = r.u32()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.message_expiry_interval, v)?
                    }
                    CONTENT_TYPE => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.content_type, v)?
                    }
                    RESPONSE_TOPIC => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        if v.is_empty() || v.contains(['+', '#']) {
                            return Err(DecodeError::protocol(
                                "[MQTT-3.3.2-14] response topic is not a valid topic name",
                            ));
                        }
                        set_once(&mut p.response_topic, v)?
                    }
                    CORRELATION_DATA => {
                        let v = r.binary()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.correlation_data, v)?
                    }
                    SUBSCRIPTION_IDENTIFIER => {
                        let v = r.varint()?;
                        check_allowed(ctx, id)?;
                        if v == 0 {
                            return Err(DecodeError::malformed("[MQTT-3.8.2.1.2] subscription identifier 0"));
                        }
                        if !p.subscription_identifiers.is_empty() && !multiple_subscription_ids {
                            return Err(DecodeError::protocol("[MQTT-2.2.2-2] subscription identifier given twice"));
                        }
                        p.subscription_identifiers.push(v);
                    }
                    SESSION_EXPIRY_INTERVAL => {
                        let v = r.u32()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.session_expiry_interval, v)?
                    }
                    ASSIGNED_CLIENT_IDENTIFIER => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.assigned_client_identifier, v)?
                    }
                    SERVER_KEEP_ALIVE => {
                        let v = r.u16()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.server_keep_alive, v)?
                    }
                    AUTHENTICATION_METHOD => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.authentication_method, v)?
                    }
                    AUTHENTICATION_DATA => {
                        let v = r.binary()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.authentication_data, v)?
                    }
                    REQUEST_PROBLEM_INFORMATION => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.request_problem_information, boolean(v)?)?
                    }
                    WILL_DELAY_INTERVAL => {
                        let v = r.u32()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.will_delay_interval, v)?
                    }
                    REQUEST_RESPONSE_INFORMATION => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.request_response_information, boolean(v)?)?
                    }
                    RESPONSE_INFORMATION => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.response_information, v)?
                    }
                    SERVER_REFERENCE => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.server_reference, v)?
                    }
                    REASON_STRING => {
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.reason_string, v)?
                    }
                    RECEIVE_MAXIMUM => {
                        let v = r.u16()?;
                        check_allowed(ctx, id)?;
                        if v == 0 {
                            return Err(DecodeError::protocol("[MQTT-3.1.2.11.3] receive maximum of 0"));
                        }
                        set_once(&mut p.receive_maximum, v)?
                    }
                    TOPIC_ALIAS_MAXIMUM => {
                        let v = r.u16()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.topic_alias_maximum, v)?
                    }
                    TOPIC_ALIAS => {
                        let v = r.u16()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.topic_alias, v)?
                    }
                    MAXIMUM_QOS => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.maximum_qos, boolean(v)?)?
                    }
                    RETAIN_AVAILABLE => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.retain_available, boolean(v)?)?
                    }
                    USER_PROPERTY => {
                        let k = r.utf8()?;
                        let v = r.utf8()?;
                        check_allowed(ctx, id)?;
                        p.user_properties.push((k, v));
                    }
                    MAXIMUM_PACKET_SIZE => {
                        let v = r.u32()?;
                        check_allowed(ctx, id)?;
                        if v == 0 {
                            return Err(DecodeError::protocol("[MQTT-3.1.2.11.4] maximum packet size of 0"));
                        }
                        set_once(&mut p.maximum_packet_size, v)?
                    }
                    WILDCARD_SUBSCRIPTION_AVAILABLE => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.wildcard_subscription_available, boolean(v)?)?
                    }
                    SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.subscription_identifier_available, boolean(v)?)?
                    }
                    SHARED_SUBSCRIPTION_AVAILABLE => {
                        let v = r.u8()?;
                        check_allowed(ctx, id)?;
                        set_once(&mut p.shared_subscription_available, boolean(v)?)?
                    }
                    _ => unreachable!("is_known covers every identifier matched here"),
                }
                Ok(())
            };
            match one() {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::Malformed => return Err(e),
                Err(e) => {
                    deferred.get_or_insert(e);
                }
            }
        }
        match deferred {
            Some(e) => Err(e),
            None => Ok(p),
        }
    }

    /// Size of the encoded properties, without the property length prefix.
    pub fn encoded_len(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 1 + wire::str_len(v.as_bytes()));
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 1 + wire::str_len(v));
        let n1 = |o: &Option<u8>| o.map_or(0, |_| 2);
        let n2 = |o: &Option<u16>| o.map_or(0, |_| 3);
        let n4 = |o: &Option<u32>| o.map_or(0, |_| 5);
        n1(&self.payload_format_indicator)
            + n4(&self.message_expiry_interval)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self.subscription_identifiers.iter().map(|&v| 1 + varint_len(v)).sum::<usize>()
            + n4(&self.session_expiry_interval)
            + s(&self.assigned_client_identifier)
            + n2(&self.server_keep_alive)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n1(&self.request_problem_information)
            + n4(&self.will_delay_interval)
            + n1(&self.request_response_information)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n2(&self.receive_maximum)
            + n2(&self.topic_alias_maximum)
            + n2(&self.topic_alias)
            + n1(&self.maximum_qos)
            + n1(&self.retain_available)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 1 + wire::str_len(k.as_bytes()) + wire::str_len(v.as_bytes()))
                .sum::<usize>()
            + n4(&self.maximum_packet_size)
            + n1(&self.wildcard_subscription_available)
            + n1(&self.subscription_identifier_available)
            + n1(&self.shared_subscription_available)
    }

    /// Writes the property length and the properties. Topic Alias Maximum goes before Receive
    /// Maximum so that our CONNACK matches Mosquitto's byte for byte.
    pub fn encode(&self, out: &mut BytesMut) {
        put_varint(out, self.encoded_len() as u32);
        self.encode_fields(out);
    }

    /// Writes the properties without their length prefix.
    pub fn encode_fields(&self, out: &mut BytesMut) {
        let put_s = |out: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                out.put_u8(id);
                put_str(out, v);
            }
        };
        let put_b = |out: &mut BytesMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                out.put_u8(id);
                put_binary(out, v);
            }
        };
        let put_1 = |out: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        };
        let put_2 = |out: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        };
        let put_4 = |out: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        };
        put_1(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        put_4(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        put_s(out, CONTENT_TYPE, &self.content_type);
        put_s(out, RESPONSE_TOPIC, &self.response_topic);
        put_b(out, CORRELATION_DATA, &self.correlation_data);
        for &id in &self.subscription_identifiers {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(out, id);
        }
        put_4(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        put_s(out, ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        put_2(out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        put_s(out, AUTHENTICATION_METHOD, &self.authentication_method);
        put_b(out, AUTHENTICATION_DATA, &self.authentication_data);
        put_1(out, REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        put_4(out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        put_1(out, REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        put_s(out, RESPONSE_INFORMATION, &self.response_information);
        put_s(out, SERVER_REFERENCE, &self.server_reference);
        put_s(out, REASON_STRING, &self.reason_string);
        put_2(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_2(out, RECEIVE_MAXIMUM, self.receive_maximum);
        put_2(out, TOPIC_ALIAS, self.topic_alias);
        put_1(out, MAXIMUM_QOS, self.maximum_qos);
        put_1(out, RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(USER_PROPERTY);
            put_str(out, k);
            put_str(out, v);
        }
        put_4(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_1(out, WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        put_1(out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        put_1(out, SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
    }

    /// Length on the wire including the property length prefix.
    pub fn wire_len(&self) -> usize {
        let n = self.encoded_len();
        varint_len(n as u32) + n
    }
}

fn is_known(id: u8) -> bool {
    matches!(
        id,
        0x01 | 0x02
            | 0x03
            | 0x08
            | 0x09
            | 0x0B
            | 0x11
            | 0x12
            | 0x13
            | 0x15
            | 0x16
            | 0x17
            | 0x18
            | 0x19
            | 0x1A
            | 0x1C
            | 0x1F
            | 0x21
            | 0x22
            | 0x23
            | 0x24
            | 0x25
            | 0x26
            | 0x27
            | 0x28
            | 0x29
            | 0x2A
    )
}

fn check_allowed(ctx: PropertyContext, id: u8) -> Result<(), DecodeError> {
    if ctx.allows(id) {
        Ok(())
    } else {
        Err(DecodeError { kind: ctx.misplaced_kind(), reason: "[MQTT-2.2.2] property not allowed in this packet" })
    }
}
