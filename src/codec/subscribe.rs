//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK [MQTT-3.8 .. 3.11].

use bytes::{BufMut, BytesMut};

use super::properties::{Properties, PropertyContext};
use super::wire::{put_str, str_len, Reader};
use super::{put_fixed_header, DecodeError, QoS, ReasonCode};

/// The subscription options byte [MQTT-3.8.3.1].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

impl SubscriptionOptions {
    fn decode(byte: u8, v5: bool) -> Result<Self, DecodeError> {
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if byte & reserved != 0 {
            return Err(DecodeError::malformed("[MQTT-3.8.3-5] reserved subscription option bits set"));
        }
        let qos = QoS::from_u8(byte & 0x03).ok_or(DecodeError::malformed("[MQTT-3.8.3-4] subscription QoS 3"))?;
        let retain_handling = (byte >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(DecodeError::malformed("[MQTT-3.8.3-4] retain handling 3"));
        }
        Ok(Self { qos, no_local: byte & 0x04 != 0, retain_as_published: byte & 0x08 != 0, retain_handling })
    }

    fn encode(&self) -> u8 {
        self.qos as u8
            | (self.no_local as u8) << 2
            | (self.retain_as_published as u8) << 3
            | (self.retain_handling & 0x03) << 4
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubscriptionOptions)>,
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    let id = r.u16()?;
    if id == 0 {
        return Err(DecodeError::protocol("[MQTT-2.2.1-3] packet identifier 0"));
    }
    Ok(id)
}

impl Subscribe {
    pub fn decode(flags: u8, r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
        if flags != 0x02 {
            return Err(DecodeError::malformed("[MQTT-3.8.1-1] SUBSCRIBE reserved flags are not 0010"));
        }
        let packet_id = packet_id(r)?;
        let properties =
            if v5 { Properties::decode(r, PropertyContext::Subscribe, false)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.utf8()?;
            if filter.is_empty() {
                return Err(DecodeError::malformed("[MQTT-4.7.3-1] empty topic filter"));
            }
            let options = SubscriptionOptions::decode(r.u8()?, v5)?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::malformed("[MQTT-3.8.3-3] SUBSCRIBE without a topic filter"));
        }
        Ok(Subscribe { packet_id, properties, filters })
    }

    pub fn encode(&self, out: &mut BytesMut, v5: bool) {
        let len = 2
            + if v5 { self.properties.wire_len() } else { 0 }
            + self.filters.iter().map(|(f, _)| str_len(f.as_bytes()) + 1).sum::<usize>();
        put_fixed_header(out, 0x82, len);
        out.put_u16(self.packet_id);
        if v5 {
            self.properties.encode(out);
        }
        for (f, o) in &self.filters {
            put_str(out, f);
            out.put_u8(o.encode());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: Properties,
    /// 3.1.1 return codes (0, 1, 2, 0x80) or 5.0 reason codes, one per filter.
    pub reasons: Vec<ReasonCode>,
}

impl SubAck {
    pub fn decode(flags: u8, r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
        if flags != 0 {
            return Err(DecodeError::malformed("[MQTT-2.1.3-1] SUBACK with reserved flags set"));
        }
        let packet_id = packet_id(r)?;
        let properties =
            if v5 { Properties::decode(r, PropertyContext::SubAck, false)? } else { Properties::default() };
        let reasons: Vec<ReasonCode> = r.rest().iter().map(|&b| ReasonCode(b)).collect();
        if reasons.is_empty() {
            return Err(DecodeError::protocol("[MQTT-3.9.3] SUBACK without a reason code"));
        }
        Ok(SubAck { packet_id, properties, reasons })
    }

    pub fn encode(&self, out: &mut BytesMut, v5: bool) {
        let len = 2 + if v5 { self.properties.wire_len() } else { 0 } + self.reasons.len();
        put_fixed_header(out, 0x90, len);
        out.put_u16(self.packet_id);
        if v5 {
            self.properties.encode(out);
        }
        for r in &self.reasons {
            out.put_u8(r.0);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

impl Unsubscribe {
    pub fn decode(flags: u8, r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
        if flags != 0x02 {
            return Err(DecodeError::malformed("[MQTT-3.10.1-1] UNSUBSCRIBE reserved flags are not 0010"));
        }
        let packet_id = packet_id(r)?;
        let properties =
            if v5 { Properties::decode(r, PropertyContext::Unsubscribe, false)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.utf8()?;
            if filter.is_empty() {
                return Err(DecodeError::malformed("[MQTT-4.7.3-1] empty topic filter"));
            }
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(DecodeError::malformed("[MQTT-3.10.3-2] UNSUBSCRIBE without a topic filter"));
        }
        Ok(Unsubscribe { packet_id, properties, filters })
    }

    pub fn encode(&self, out: &mut BytesMut, v5: bool) {
        let len = 2
            + if v5 { self.properties.wire_len() } else { 0 }
            + self.filters.iter().map(|f| str_len(f.as_bytes())).sum::<usize>();
        put_fixed_header(out, 0xA2, len);
        out.put_u16(self.packet_id);
        if v5 {
            self.properties.encode(out);
        }
        for f in &self.filters {
            put_str(out, f);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: Properties,
    /// Empty for 3.1.1, whose UNSUBACK carries no reason codes.
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub fn decode(flags: u8, r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
        if flags != 0 {
            return Err(DecodeError::malformed("[MQTT-2.1.3-1] UNSUBACK with reserved flags set"));
        }
        let packet_id = packet_id(r)?;
        if !v5 {
            if !r.is_empty() {
                return Err(DecodeError::malformed("3.1.1 UNSUBACK longer than two bytes"));
            }
            return Ok(UnsubAck { packet_id, properties: Properties::default(), reasons: Vec::new() });
        }
        let properties = Properties::decode(r, PropertyContext::UnsubAck, false)?;
        let reasons: Vec<ReasonCode> = r.rest().iter().map(|&b| ReasonCode(b)).collect();
        Ok(UnsubAck { packet_id, properties, reasons })
    }

    pub fn encode(&self, out: &mut BytesMut, v5: bool) {
        if !v5 {
            out.put_slice(&[0xB0, 0x02]);
            out.put_u16(self.packet_id);
            return;
        }
        let len = 2 + self.properties.wire_len() + self.reasons.len();
        put_fixed_header(out, 0xB0, len);
        out.put_u16(self.packet_id);
        self.properties.encode(out);
        for r in &self.reasons {
            out.put_u8(r.0);
        }
    }
}
