//! Stored form of the broker's per-producer high-water marks.
//!
//! A SEND that carries a producer id and a sequence number is stored together
//! with its producer's mark (the highest sequence stored for that producer),
//! in the same [`Batch`](crate::Batch) and so in the same replicated unit. A
//! server that recovers from the store, or takes over from its peer, reads the
//! marks back and drops resent duplicates.
//!
//! [`Cf::Dedupe`](crate::Cf::Dedupe) holds one record per producer: the key
//! is the producer id's UTF-8 bytes, the value a version byte, the sequence
//! (8 bytes, big-endian) and the time the producer last stored a message
//! (milliseconds since the Unix epoch, 8 bytes, big-endian), which decides
//! when an idle producer is forgotten.

use crate::error::{Error, Result};

const VERSION: u8 = 1;
const VALUE_LEN: usize = 17;

/// One producer's record in [`Cf::Dedupe`](crate::Cf::Dedupe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Highest sequence number stored for the producer.
    pub sequence: u64,
    /// When the producer last stored a message, ms since the Unix epoch.
    pub last_used_ms: u64,
}

/// The key of a producer's record.
pub fn key(producer: &str) -> Vec<u8> {
    producer.as_bytes().to_vec()
}

/// The producer id a record's key names.
pub fn producer(key: &[u8]) -> Result<&str> {
    std::str::from_utf8(key).map_err(|_| Error::Corrupt(format!("dedupe key {key:?} is not UTF-8")))
}

/// The value of a producer's record.
pub fn encode(mark: Mark) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_LEN);
    out.push(VERSION);
    out.extend_from_slice(&mark.sequence.to_be_bytes());
    out.extend_from_slice(&mark.last_used_ms.to_be_bytes());
    out
}

/// Decodes a value made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Mark> {
    match bytes.first() {
        Some(&VERSION) if bytes.len() == VALUE_LEN => {}
        Some(&VERSION) => {
            return Err(Error::Corrupt(format!(
                "dedupe record of {} bytes, expected {VALUE_LEN}",
                bytes.len()
            )))
        }
        Some(v) => {
            return Err(Error::Corrupt(format!(
                "dedupe record version {v}, expected {VERSION}"
            )))
        }
        None => return Err(Error::Corrupt("empty dedupe record".into())),
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(b)
    };
    Ok(Mark {
        sequence: word(1),
        last_used_ms: word(9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn value_round_trip(sequence: u64, last_used_ms: u64) {
            let mark = Mark { sequence, last_used_ms };
            prop_assert_eq!(decode(&encode(mark)).expect("decodes"), mark);
        }

        #[test]
        fn key_round_trip(id in "\\PC{1,64}") {
            let k = key(&id);
            prop_assert_eq!(producer(&k).expect("UTF-8"), id.as_str());
        }

        #[test]
        fn wrong_lengths_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() {
                *b = VERSION;
            }
            prop_assert_eq!(decode(&bytes).is_ok(), bytes.len() == VALUE_LEN);
        }
    }

    #[test]
    fn layout_is_version_sequence_time() {
        let bytes = encode(Mark {
            sequence: 0x0102,
            last_used_ms: 0x0304,
        });
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 3, 4].to_vec()
        );
    }

    #[test]
    fn unknown_version_and_bad_keys_are_rejected() {
        let mut bytes = encode(Mark {
            sequence: 1,
            last_used_ms: 2,
        });
        bytes[0] = 2;
        let err = decode(&bytes).expect_err("must reject");
        assert!(err.to_string().contains("version 2"), "{err}");
        assert!(decode(&[]).is_err());
        assert!(producer(&[0xff, 0xfe]).is_err());
    }
}
