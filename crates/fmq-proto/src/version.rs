//! Protocol versions and their negotiation.
//!
//! The version decides how header values are escaped (see
//! [`StompCodec`](crate::StompCodec)), so the broker negotiates it from the
//! CONNECT frame and then switches the codec with
//! [`set_version`](crate::StompCodec::set_version).

use std::fmt;

use crate::error::{Error, Result};

/// The `version` header value sent with an ERROR frame after a failed
/// negotiation, and the list used in error details.
pub(crate) const SUPPORTED_VERSIONS: &str = "1.0,1.1,1.2";

/// A STOMP protocol version. Ordered, so `max` picks the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// STOMP 1.0: no escaping, no heart-beats, no NACK.
    V1_0,
    /// STOMP 1.1: escaping of `\n`, `:` and `\\`; heart-beats.
    V1_1,
    /// STOMP 1.2: adds `\r` escaping, CRLF line endings and the `id` ack header.
    V1_2,
}

impl Version {
    /// The version as written in `accept-version` and `version` headers.
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// Parses `"1.0"`, `"1.1"` or `"1.2"`.
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Picks the session version from a CONNECT/STOMP `accept-version` header.
///
/// Per the spec a client that sends no `accept-version` speaks 1.0; otherwise
/// the header is a comma-separated list and both sides use the highest
/// version they have in common. Unknown entries (e.g. a future `1.3`) are
/// ignored; if nothing is left the result is [`Error::UnsupportedVersion`],
/// whose [`to_frame`](Error::to_frame) lists what we support.
pub fn negotiate_version(accept_version: Option<&str>) -> Result<Version> {
    let Some(list) = accept_version else {
        return Ok(Version::V1_0);
    };
    list.split(',')
        .filter_map(|v| Version::parse(v.trim()))
        .max()
        .ok_or_else(|| Error::UnsupportedVersion(list.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_header_means_1_0() {
        assert_eq!(negotiate_version(None).unwrap(), Version::V1_0);
    }

    #[test]
    fn highest_common_version_wins() {
        assert_eq!(
            negotiate_version(Some("1.0,1.1,1.2")).unwrap(),
            Version::V1_2
        );
        assert_eq!(negotiate_version(Some("1.2,1.0")).unwrap(), Version::V1_2);
        assert_eq!(negotiate_version(Some("1.1")).unwrap(), Version::V1_1);
        assert_eq!(negotiate_version(Some("1.0, 1.1")).unwrap(), Version::V1_1);
        assert_eq!(negotiate_version(Some("1.1,1.3")).unwrap(), Version::V1_1);
    }

    #[test]
    fn nothing_in_common_is_an_error_naming_the_offer() {
        for offer in ["2.0", "", "1.3,2.0", " , "] {
            let e = negotiate_version(Some(offer)).unwrap_err();
            assert!(matches!(&e, Error::UnsupportedVersion(v) if v == offer));
            assert!(e.to_string().contains(offer));
        }
    }

    #[test]
    fn versions_are_ordered_and_printable() {
        assert!(Version::V1_0 < Version::V1_1 && Version::V1_1 < Version::V1_2);
        assert_eq!(Version::V1_2.to_string(), "1.2");
        assert_eq!(Version::parse("1.1"), Some(Version::V1_1));
        assert_eq!(Version::parse("1"), None);
    }
}
