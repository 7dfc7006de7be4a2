//! Protocol errors.
//!
//! Every variant is a reason to end a STOMP session: the spec leaves a server
//! no way to resynchronise a byte stream after a malformed frame, so the
//! broker answers with [`Error::to_frame`] and closes the connection. The
//! `Display` text is short because it becomes the ERROR frame's `message`
//! header; [`Error::detail`] carries the longer explanation for the body.
//!
//! Values that came from the peer are printed with `{:?}` so that control
//! characters are escaped and can never break the header line they end up in.

use crate::frame::Frame;
use crate::version::SUPPORTED_VERSIONS;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Anything that can go wrong while decoding, encoding or negotiating.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frame (command line, headers and body, without the NUL) is larger
    /// than [`Limits::max_frame_size`](crate::Limits::max_frame_size).
    #[error("frame exceeds {limit} bytes")]
    FrameTooLarge {
        /// The configured limit.
        limit: usize,
        /// The size the peer announced with `content-length`, when that is
        /// how we found out (the body was never buffered).
        declared: Option<u64>,
    },
    /// More header lines than [`Limits::max_headers`](crate::Limits::max_headers).
    #[error("frame has more than {limit} headers")]
    TooManyHeaders {
        /// The configured limit.
        limit: usize,
    },
    /// A header line (or the command line) longer than
    /// [`Limits::max_header_length`](crate::Limits::max_header_length).
    #[error("header line exceeds {limit} bytes")]
    HeaderTooLong {
        /// The configured limit.
        limit: usize,
    },
    /// The command line is not one of the STOMP commands.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// A header line without a colon; carries the (truncated) line.
    #[error("malformed header line {0:?}")]
    InvalidHeader(String),
    /// A backslash sequence the negotiated version does not define.
    #[error("invalid escape sequence {0:?} in header")]
    InvalidEscape(String),
    /// `content-length` is not a non-negative decimal number.
    #[error("invalid content-length {0:?}")]
    InvalidContentLength(String),
    /// The `content-length` bytes of body are not followed by a NUL.
    #[error("frame body not terminated by NUL")]
    MissingNul,
    /// The command line or a header is not valid UTF-8.
    #[error("{context} is not valid UTF-8")]
    NotUtf8 {
        /// Which part of the frame: `"command"` or `"header"`.
        context: &'static str,
    },
    /// `accept-version` lists no version this crate speaks.
    #[error("unsupported protocol version {0:?}")]
    UnsupportedVersion(String),
    /// A `heart-beat` header that is not `<u32>,<u32>`.
    #[error("invalid heart-beat {0:?}")]
    InvalidHeartBeat(String),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The encoder was asked to write a header the negotiated version cannot
    /// represent (for example a newline under STOMP 1.0, which has no
    /// escaping). Writing it anyway would let one header forge others, so the
    /// frame is refused instead.
    #[error("header {name:?} cannot be encoded in a STOMP {version} {command} frame")]
    Unencodable {
        /// The offending header's name.
        name: String,
        /// The frame's command (CONNECT/CONNECTED are never escaped).
        command: &'static str,
        /// The version whose escaping rules lack a way to write it.
        version: &'static str,
    },
    /// The underlying transport failed (only produced through the
    /// `tokio_util` codec traits, which require `From<io::Error>`).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A longer, human readable explanation suitable for an ERROR frame body.
    pub fn detail(&self) -> String {
        match self {
            Error::FrameTooLarge {
                limit,
                declared: Some(n),
            } => format!(
                "The frame declared content-length {n}, but this server accepts frames of at most {limit} bytes (headers and body)."
            ),
            Error::FrameTooLarge { limit, declared: None } => format!(
                "The frame grew beyond {limit} bytes (headers and body) without being terminated by a NUL octet."
            ),
            Error::TooManyHeaders { limit } => {
                format!("This server accepts at most {limit} headers per frame.")
            }
            Error::HeaderTooLong { limit } => {
                format!("This server accepts header lines of at most {limit} bytes.")
            }
            Error::UnknownCommand(c) => format!(
                "The command line {c:?} is not a STOMP command. Commands are upper case, e.g. SEND, SUBSCRIBE."
            ),
            Error::InvalidHeader(l) => {
                format!("The header line {l:?} has no colon; headers are written as name:value.")
            }
            Error::InvalidEscape(e) => format!(
                "The escape sequence {e:?} is not defined. STOMP 1.2 defines \\r, \\n, \\c and \\\\; STOMP 1.1 defines \\n, \\c and \\\\."
            ),
            Error::InvalidContentLength(v) => format!(
                "The content-length header {v:?} is not a non-negative decimal number of octets."
            ),
            Error::MissingNul => {
                "The body was not followed by a NUL octet where content-length said it would end.".to_owned()
            }
            Error::NotUtf8 { context } => format!(
                "The {context} contains octets that are not UTF-8; STOMP commands and headers are UTF-8 text."
            ),
            Error::UnsupportedVersion(v) => format!(
                "The client accepts versions {v:?}; supported protocol versions are {}.",
                SUPPORTED_VERSIONS.replace(',', " ")
            ),
            Error::InvalidHeartBeat(v) => format!(
                "The heart-beat header {v:?} must be two non-negative integers of milliseconds, e.g. 10000,10000."
            ),
            Error::Truncated => "The connection closed before the frame's NUL terminator.".to_owned(),
            Error::Unencodable {
                name,
                command,
                version,
            } => format!(
                "The header {name:?} contains a line break (or a colon in its name, or a trailing carriage return) that a STOMP {version} {command} frame cannot escape."
            ),
            Error::Io(e) => format!("I/O error: {e}"),
        }
    }

    /// The ERROR frame a server sends for this error before closing.
    ///
    /// The `message` header is the short `Display` text, the body is
    /// [`detail`](Self::detail). For [`Error::UnsupportedVersion`] the frame
    /// also carries the `version` header listing what we support, as the spec
    /// requires for a failed version negotiation.
    pub fn to_frame(&self) -> Frame {
        let frame = Frame::error(&self.to_string(), &self.detail());
        match self {
            Error::UnsupportedVersion(_) => frame.header("version", SUPPORTED_VERSIONS),
            _ => frame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;

    #[test]
    fn frame_too_large_message_names_limit() {
        let e = Error::FrameTooLarge {
            limit: 16 * 1024 * 1024,
            declared: Some(1 << 40),
        };
        let f = e.to_frame();
        assert_eq!(f.command, Command::Error);
        assert_eq!(f.get("message"), Some("frame exceeds 16777216 bytes"));
        assert_eq!(f.get("content-type"), Some("text/plain"));
        let body = String::from_utf8(f.body.to_vec()).unwrap();
        assert!(body.contains("1099511627776"), "{body}");
    }

    #[test]
    fn unsupported_version_frame_lists_versions() {
        let f = Error::UnsupportedVersion("2.0".into()).to_frame();
        assert_eq!(f.get("version"), Some("1.0,1.1,1.2"));
        assert_eq!(
            f.get("message"),
            Some("unsupported protocol version \"2.0\"")
        );
        let body = String::from_utf8(f.body.to_vec()).unwrap();
        assert!(body.contains("1.0 1.1 1.2"), "{body}");
    }

    #[test]
    fn peer_values_cannot_break_the_message_line() {
        let f = Error::UnknownCommand("EVIL\r\nx:y".into()).to_frame();
        let m = f.get("message").unwrap();
        assert!(!m.contains('\n') && !m.contains('\r'), "{m}");
    }

    #[test]
    fn every_variant_has_readable_message_and_detail() {
        let all = [
            Error::FrameTooLarge {
                limit: 10,
                declared: None,
            },
            Error::TooManyHeaders { limit: 3 },
            Error::HeaderTooLong { limit: 4 },
            Error::UnknownCommand("FOO".into()),
            Error::InvalidHeader("nocolon".into()),
            Error::InvalidEscape("\\t".into()),
            Error::InvalidContentLength("-1".into()),
            Error::MissingNul,
            Error::NotUtf8 { context: "header" },
            Error::UnsupportedVersion("9".into()),
            Error::InvalidHeartBeat("x".into()),
            Error::Truncated,
            Error::Unencodable {
                name: "a".into(),
                command: "MESSAGE",
                version: "1.0",
            },
            Error::Io(std::io::Error::other("boom")),
        ];
        for e in all {
            let f = e.to_frame();
            assert!(!f.get("message").unwrap().is_empty());
            assert!(!f.body.is_empty());
        }
    }
}
