//! Feeds arbitrary bytes to the server-side and client-side decoders, before and after CONNECT,
//! at both protocol levels, and re-encodes whatever decodes: nothing may panic, and a decoded
//! packet must survive its own encoding.
#![no_main]

use bytes::BytesMut;
use herald::codec::{Decoder, Packet, ProtocolVersion, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let role = if selector & 1 == 0 { Role::Server } else { Role::Client };
    let version = match selector >> 1 & 3 {
        0 => None,
        1 => Some(ProtocolVersion::V3_1_1),
        _ => Some(ProtocolVersion::V5),
    };
    let mut decoder = Decoder::new(role, 1 << 20);
    decoder.version = version;
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decoder.decode(&mut buf) {
        let v = decoder.version.unwrap_or(ProtocolVersion::V5);
        let mut out = BytesMut::new();
        packet.encode(v, &mut out);
        if !matches!(packet, Packet::Connect(_)) {
            let mut again = Decoder::new(role, u32::MAX);
            again.version = Some(v);
            let back = again.decode(&mut out).expect("our own encoding decodes").expect("complete");
            assert_eq!(back, packet);
        }
    }
});
