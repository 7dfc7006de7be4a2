//! Message bodies: a fixed-width text prefix carrying producer id, sequence
//! number and send time, padded to the requested size.
//!
//! Layout (48 bytes, ASCII): `FMQB <producer:8 hex> <seq:16 hex> <ns:16 hex>\n`.

use bytes::{Bytes, BytesMut};

pub const PREFIX_LEN: usize = 48;
const MAGIC: &[u8; 5] = b"FMQB ";

/// Builds bodies of one size from a padded template.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    template: Bytes,
}

/// What a received body says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub producer: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

impl BodyTemplate {
    pub fn new(size: usize) -> Self {
        assert!(size >= PREFIX_LEN, "body size below prefix length");
        // Printable padding, so bodies are valid text for any broker.
        let template: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        BodyTemplate {
            template: Bytes::from(template),
        }
    }

    pub fn body(&self, stamp: Stamp) -> Bytes {
        let mut b = BytesMut::from(&self.template[..]);
        let prefix = format!(
            "FMQB {:08x} {:016x} {:016x}\n",
            stamp.producer, stamp.seq, stamp.sent_ns
        );
        debug_assert_eq!(prefix.len(), PREFIX_LEN);
        b[..PREFIX_LEN].copy_from_slice(prefix.as_bytes());
        b.freeze()
    }
}

fn hex(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    u64::from_str_radix(s, 16).ok()
}

/// Parse the prefix of a received body; `None` if it is not one of ours.
pub fn parse(body: &[u8]) -> Option<Stamp> {
    let p = body.get(..PREFIX_LEN)?;
    if &p[..5] != MAGIC || p[13] != b' ' || p[30] != b' ' || p[47] != b'\n' {
        return None;
    }
    Some(Stamp {
        producer: u32::try_from(hex(&p[5..13])?).ok()?,
        seq: hex(&p[14..30])?,
        sent_ns: hex(&p[31..47])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let t = BodyTemplate::new(1024);
        let s = Stamp {
            producer: 15,
            seq: 123_456,
            sent_ns: 987_654_321_000,
        };
        let b = t.body(s);
        assert_eq!(b.len(), 1024);
        assert_eq!(parse(&b), Some(s));
        assert_eq!(parse(b"hello"), None);
        assert_eq!(parse(&[b'x'; 100]), None);
    }
}
