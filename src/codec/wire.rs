//! Wire primitives shared by every packet: variable byte integers, length-prefixed UTF-8 strings and
//! binary data, read from a bounds-checked cursor and written into a `BytesMut`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::DecodeError;

/// The largest value a variable byte integer can carry (four bytes of seven bits).
pub const VARINT_MAX: u32 = 268_435_455;

/// A cursor over one packet's body. Every read checks the remaining length first, so a truncated
/// packet surfaces as `Malformed` and never as a panic.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::malformed("packet ends inside a byte field"));
        }
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::malformed("packet ends inside a two byte integer"));
        }
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::malformed("packet ends inside a four byte integer"));
        }
        Ok(self.buf.get_u32())
    }

    /// Not an MQTT type: the store's records (`store::records`) carry sequence numbers and times.
    pub fn u64_be(&mut self) -> Result<u64, DecodeError> {
        if self.buf.len() < 8 {
            return Err(DecodeError::malformed("record ends inside an eight byte integer"));
        }
        Ok(self.buf.get_u64())
    }

    /// [MQTT-1.5.5-1] a variable byte integer uses at most four bytes and the minimum number of them.
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let (value, used) =
            decode_varint(&self.buf)?.ok_or(DecodeError::malformed("packet ends inside a variable byte integer"))?;
        self.buf.advance(used);
        Ok(value)
    }

    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::malformed("length field points past the end of the packet"));
        }
        Ok(self.buf.split_to(n))
    }

    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// A UTF-8 encoded string [MQTT-1.5.4]: well formed, without U+0000, control characters or
    /// non-characters (the Server MAY close the connection on those; we always do, as Mosquitto does).
    pub fn utf8(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        check_utf8(&raw)?;
        // check_utf8 proved the bytes are valid UTF-8.
        Ok(String::from_utf8(raw.to_vec()).expect("validated above"))
    }

    /// A PUBLISH's topic name: a string that obeys `super::check_topic_name`, checked once.
    pub fn topic_name(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        super::check_topic_name_bytes(&raw)?;
        Ok(String::from_utf8(raw.to_vec()).expect("validated above"))
    }
}

/// Decodes a variable byte integer from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::malformed("[MQTT-1.5.5-1] variable byte integer not in its shortest form"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::malformed("[MQTT-1.5.5-1] variable byte integer longer than four bytes"))
}

pub fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_varint(out: &mut BytesMut, mut value: u32) {
    debug_assert!(value <= VARINT_MAX);
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub fn put_binary(out: &mut BytesMut, data: &[u8]) {
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

pub fn put_str(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

/// Length of a string or binary field on the wire, length prefix included.
pub fn str_len(s: &[u8]) -> usize {
    2 + s.len()
}

pub fn check_utf8(raw: &[u8]) -> Result<(), DecodeError> {
    // Plain printable ASCII is by far the common case and needs no decoding.
    if raw.iter().all(|&b| (0x20..0x7F).contains(&b)) {
        return Ok(());
    }
    let s = std::str::from_utf8(raw).map_err(|_| DecodeError::malformed("[MQTT-1.5.4-1] ill-formed UTF-8 string"))?;
    for c in s.chars() {
        let cp = c as u32;
        if cp == 0 {
            return Err(DecodeError::malformed("[MQTT-1.5.4-2] UTF-8 string contains U+0000"));
        }
        if cp < 0x20 || (0x7F..=0x9F).contains(&cp) {
            return Err(DecodeError::malformed("[MQTT-1.5.4-3] UTF-8 string contains a control character"));
        }
        if (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE {
            return Err(DecodeError::malformed("[MQTT-1.5.4-3] UTF-8 string contains a non-character"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_at_every_boundary() {
        for v in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, VARINT_MAX] {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            assert_eq!(decode_varint(&out).unwrap(), Some((v, out.len())));
        }
    }

    #[test]
    fn varint_rejects_five_bytes_and_non_minimal_forms() {
        assert!(decode_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_err());
        assert!(decode_varint(&[0x80, 0x00]).is_err());
        assert_eq!(decode_varint(&[0x80]).unwrap(), None);
    }

    #[test]
    fn utf8_rules_of_section_1_5_4() {
        assert!(check_utf8(b"news/tech").is_ok());
        assert!(check_utf8("A\u{2A6D4}".as_bytes()).is_ok());
        for bad in [&b"to\x00p"[..], b"to\x01p", b"to\x7fp", b"\xc2\x9f", b"\xed\xa0\x80", b"\xef\xbf\xbf"] {
            assert!(check_utf8(bad).is_err(), "{bad:?}");
        }
    }
}
