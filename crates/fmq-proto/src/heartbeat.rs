//! Heart-beat header parsing and negotiation.
//!
//! Both sides announce `heart-beat:cx,cy` where `cx` is the smallest interval
//! (ms) at which they can *send* beats and `cy` the interval at which they
//! would like to *receive* them; `0` means "cannot" / "do not want". The
//! negotiated interval in each direction is the larger of the sender's
//! offer and the receiver's wish, or none if either is zero.

use crate::error::{Error, Result};

/// Parses a `heart-beat` header value `"cx,cy"` into `(cx, cy)`.
///
/// Surrounding whitespace around each number is tolerated; anything else
/// (missing comma, signs, non-digits, values beyond `u32`) is
/// [`Error::InvalidHeartBeat`] carrying the whole value.
pub fn parse_heart_beat(value: &str) -> Result<(u32, u32)> {
    let bad = || Error::InvalidHeartBeat(value.to_owned());
    let (x, y) = value.split_once(',').ok_or_else(bad)?;
    let num = |s: &str| -> Result<u32> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    Ok((num(x)?, num(y)?))
}

/// Negotiates heart-beating from this side's offer and the peer's.
///
/// `ours` and `theirs` are `(can send every, want to receive every)` in ms.
/// Returns `(send, receive)`: this side must send something at least every
/// `send` ms, and may consider the peer dead when nothing arrived within
/// `receive` ms (callers usually add some grace). `0` means disabled.
///
/// For the server, `ours` is what it puts in CONNECTED and `theirs` the
/// client's CONNECT header; the client calls it the other way round and both
/// arrive at mirrored results.
pub fn negotiate_heart_beat(ours: (u32, u32), theirs: (u32, u32)) -> (u32, u32) {
    let combine = |a: u32, b: u32| if a == 0 || b == 0 { 0 } else { a.max(b) };
    (combine(ours.0, theirs.1), combine(ours.1, theirs.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs() {
        assert_eq!(parse_heart_beat("0,0").unwrap(), (0, 0));
        assert_eq!(parse_heart_beat("10000,5000").unwrap(), (10000, 5000));
        assert_eq!(parse_heart_beat(" 1 , 2 ").unwrap(), (1, 2));
        assert_eq!(parse_heart_beat("4294967295,0").unwrap(), (u32::MAX, 0));
    }

    #[test]
    fn rejects_garbage_and_names_it() {
        for v in [
            "",
            "1",
            "1,",
            ",1",
            "a,b",
            "-1,0",
            "+1,0",
            "1,2,3",
            "4294967296,0",
            "1;2",
        ] {
            let e = parse_heart_beat(v).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidHeartBeat(s) if s == v),
                "{v}: {e:?}"
            );
            assert!(e.to_string().contains(&format!("{v:?}")), "{e}");
        }
    }

    #[test]
    fn negotiation_follows_the_spec() {
        // Client: can send every 1000, wants every 2000.
        // Server: can send every 500, wants every 3000.
        let client = (1000, 2000);
        let server = (500, 3000);
        // Server sends max(500, 2000); expects from client max(3000, 1000).
        assert_eq!(negotiate_heart_beat(server, client), (2000, 3000));
        // The client's view mirrors it.
        assert_eq!(negotiate_heart_beat(client, server), (3000, 2000));
    }

    #[test]
    fn zero_disables_a_direction() {
        assert_eq!(negotiate_heart_beat((0, 0), (1000, 1000)), (0, 0));
        assert_eq!(negotiate_heart_beat((1000, 0), (1000, 1000)), (1000, 0));
        assert_eq!(negotiate_heart_beat((1000, 1000), (0, 1000)), (1000, 0));
        assert_eq!(negotiate_heart_beat((1000, 1000), (1000, 0)), (0, 1000));
    }
}
