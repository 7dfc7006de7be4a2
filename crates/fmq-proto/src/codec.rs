//! [`StompCodec`]: incremental STOMP decoder and encoder for `tokio_util`.
//!
//! # Decoding
//!
//! The decoder is a small state machine (command line → header lines → body)
//! that consumes lines from the read buffer as soon as they are complete, and
//! remembers how far it has already searched for the next delimiter. A large
//! body trickling in over many reads is therefore scanned once, not once per
//! read, and no limit check ever waits for more data than the limit itself:
//! an oversized `content-length` is refused when its header line arrives, an
//! overlong header line when `max_header_length` bytes are buffered without an
//! EOL, and a NUL-terminated body when `max_frame_size` bytes are buffered
//! without a NUL. A peer can thus never make the broker buffer more than
//! roughly one frame's worth of limits.
//!
//! EOLs where a command is expected are heart-beats and are reported as
//! [`Item::HeartBeat`] (one per EOL) so the connection can track liveness.
//!
//! # Escaping
//!
//! Header escaping depends on the negotiated [`Version`] and is applied
//! symmetrically by the decoder and the encoder:
//!
//! | version | `\r` | `\n` | `\c` | `\\` |
//! |---------|------|------|------|------|
//! | 1.2     | yes  | yes  | yes  | yes  |
//! | 1.1     | no   | yes  | yes  | yes  |
//! | 1.0     | no   | no   | no   | no   |
//!
//! CONNECT, STOMP and CONNECTED are never escaped, which is why a fresh codec
//! can parse the CONNECT frame before the version is known.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{Error, Result};
use crate::frame::{Command, Frame, Headers};
use crate::version::Version;

/// What the decoder yields: a frame, or a heart-beat EOL between frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete frame.
    Frame(Frame),
    /// An EOL received where a command was expected (a heart-beat). Also
    /// accepted by the encoder, which writes a single LF.
    HeartBeat,
}

impl From<Frame> for Item {
    fn from(frame: Frame) -> Self {
        Item::Frame(frame)
    }
}

/// Resource limits the decoder enforces on the peer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum size of a frame in bytes: command line, header lines, blank
    /// line and body, excluding the NUL terminator.
    pub max_frame_size: usize,
    /// Maximum number of header lines per frame (repeats counted).
    pub max_headers: usize,
    /// Maximum length of one header line in bytes, excluding its EOL.
    pub max_header_length: usize,
}

impl Default for Limits {
    /// 16 MiB frames, 1000 headers, 10 KiB header lines.
    fn default() -> Self {
        Limits {
            max_frame_size: 16 * 1024 * 1024,
            max_headers: 1000,
            max_header_length: 10 * 1024,
        }
    }
}

/// The longest command, `UNSUBSCRIBE`. A command line that has not ended
/// after this many bytes (plus an optional CR) cannot be valid, so garbage
/// without newlines is rejected after a dozen bytes instead of being buffered.
const LONGEST_COMMAND: usize = 11;

/// How much of a peer-supplied value to quote back in an error.
const PREVIEW_LEN: usize = 100;

/// STOMP codec for `tokio_util::codec::Framed`.
///
/// One codec serves one connection. It starts with STOMP 1.2 escaping (which
/// does not matter for the unescaped CONNECT/STOMP/CONNECTED frames of the
/// handshake); after negotiating, call [`set_version`](Self::set_version)
/// through `Framed::codec_mut`. After a decoding error the connection is
/// unusable: send [`Error::to_frame`] and close.
#[derive(Debug)]
pub struct StompCodec {
    limits: Limits,
    version: Version,
    state: State,
    /// Bytes at the start of the buffer already searched, without success,
    /// for the delimiter the current state is waiting for.
    scanned: usize,
}

#[derive(Debug)]
enum State {
    /// Expecting heart-beat EOLs or a command line.
    Command,
    /// Reading header lines of the frame started by a command line.
    Headers(Partial),
    /// Headers complete; reading the body up to the NUL.
    Body(Partial),
}

/// A frame whose command and (some) headers have been consumed.
#[derive(Debug)]
struct Partial {
    command: Command,
    headers: Headers,
    /// Bytes of this frame consumed so far.
    size: usize,
    /// Value of the first `content-length` header, if any.
    content_length: Option<usize>,
}

/// Header escaping rules in effect for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escaping {
    /// STOMP 1.0, or a CONNECT/STOMP/CONNECTED frame.
    Raw,
    /// STOMP 1.1: `\n`, `\c`, `\\`.
    V11,
    /// STOMP 1.2: `\r`, `\n`, `\c`, `\\`.
    V12,
}

impl Escaping {
    fn of(version: Version, command: Command) -> Escaping {
        if !command.escapes_headers() {
            return Escaping::Raw;
        }
        match version {
            Version::V1_0 => Escaping::Raw,
            Version::V1_1 => Escaping::V11,
            Version::V1_2 => Escaping::V12,
        }
    }
}

impl Default for StompCodec {
    fn default() -> Self {
        StompCodec::new(Limits::default())
    }
}

impl StompCodec {
    /// A codec enforcing `limits`, using STOMP 1.2 escaping until told
    /// otherwise.
    pub fn new(limits: Limits) -> Self {
        StompCodec {
            limits,
            version: Version::V1_2,
            state: State::Command,
            scanned: 0,
        }
    }

    /// Switches escaping rules, normally right after the CONNECT/CONNECTED
    /// exchange. Call it between frames.
    pub fn set_version(&mut self, v: Version) {
        self.version = v;
    }

    /// The version whose escaping rules are in effect.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The limits this codec enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Item>> {
        loop {
            match &mut self.state {
                State::Command => match self.read_command(buf)? {
                    CommandStep::Pending => return Ok(None),
                    CommandStep::HeartBeat => return Ok(Some(Item::HeartBeat)),
                    CommandStep::Started => {}
                },
                State::Headers(partial) => {
                    let done =
                        read_headers(partial, &mut self.scanned, &self.limits, self.version, buf)?;
                    if !done {
                        return Ok(None);
                    }
                    if let State::Headers(p) = std::mem::replace(&mut self.state, State::Command) {
                        self.state = State::Body(p);
                    }
                }
                State::Body(partial) => {
                    let Some(body) = read_body(partial, &mut self.scanned, &self.limits, buf)?
                    else {
                        return Ok(None);
                    };
                    let State::Body(p) = std::mem::replace(&mut self.state, State::Command) else {
                        return Ok(None);
                    };
                    return Ok(Some(Item::Frame(Frame {
                        command: p.command,
                        headers: p.headers,
                        body,
                    })));
                }
            }
        }
    }

    /// Heart-beat EOLs, or the command line that starts a frame.
    fn read_command(&mut self, buf: &mut BytesMut) -> Result<CommandStep> {
        match buf.first() {
            None => return Ok(CommandStep::Pending),
            Some(b'\n') => {
                buf.advance(1);
                return Ok(CommandStep::HeartBeat);
            }
            Some(b'\r') => match buf.get(1) {
                None => return Ok(CommandStep::Pending),
                Some(b'\n') => {
                    buf.advance(2);
                    return Ok(CommandStep::HeartBeat);
                }
                Some(_) => {}
            },
            Some(_) => {}
        }
        let window = &buf[..buf.len().min(LONGEST_COMMAND + 2)];
        let Some(pos) = find(b'\n', window) else {
            if window.len() >= LONGEST_COMMAND + 2 {
                return Err(Error::UnknownCommand(preview(window)));
            }
            return Ok(CommandStep::Pending);
        };
        let line = strip_cr(&buf[..pos]);
        let command = Command::from_bytes(line).ok_or_else(|| match std::str::from_utf8(line) {
            Ok(s) => Error::UnknownCommand(s.to_owned()),
            Err(_) => Error::NotUtf8 { context: "command" },
        })?;
        buf.advance(pos + 1);
        self.scanned = 0;
        self.state = State::Headers(Partial {
            command,
            headers: Headers::new(),
            size: pos + 1,
            content_length: None,
        });
        Ok(CommandStep::Started)
    }

    fn encode_frame(&self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        let esc = Escaping::of(self.version, frame.command);
        // Refuse unrepresentable headers before writing anything, so a
        // refused frame leaves the output buffer untouched.
        for (name, value) in frame.headers.iter() {
            check_encodable(name, value, esc).map_err(|()| Error::Unencodable {
                name: name.to_owned(),
                command: frame.command.as_str(),
                version: self.version.as_str(),
            })?;
        }
        let headers_len: usize = frame
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 2)
            .sum();
        dst.reserve(frame.command.as_str().len() + headers_len + frame.body.len() + 40);

        dst.put_slice(frame.command.as_str().as_bytes());
        dst.put_u8(b'\n');
        for (name, value) in frame.headers.iter() {
            // The encoder owns content-length: a stale value copied from
            // another frame would desynchronise the peer's parser.
            if name == "content-length" {
                continue;
            }
            put_escaped(dst, name, esc);
            dst.put_u8(b':');
            put_escaped(dst, value, esc);
            dst.put_u8(b'\n');
        }
        if !frame.body.is_empty() {
            dst.put_slice(b"content-length:");
            dst.put_slice(frame.body.len().to_string().as_bytes());
            dst.put_u8(b'\n');
        }
        dst.put_u8(b'\n');
        dst.put_slice(&frame.body);
        dst.put_u8(0);
        Ok(())
    }
}

enum CommandStep {
    Pending,
    HeartBeat,
    Started,
}

/// Consumes complete header lines. Returns `true` once the blank line that
/// ends the headers has been consumed.
fn read_headers(
    p: &mut Partial,
    scanned: &mut usize,
    limits: &Limits,
    version: Version,
    buf: &mut BytesMut,
) -> Result<bool> {
    let esc = Escaping::of(version, p.command);
    // An EOL may be at most this far into the buffer: the longest allowed
    // line, an optional CR, then the LF.
    let window_len = limits.max_header_length.saturating_add(2);
    loop {
        let window_end = buf.len().min(window_len);
        let start = (*scanned).min(window_end);
        let Some(pos) = find(b'\n', &buf[start..window_end]).map(|i| i + start) else {
            if buf.len() >= window_len {
                return Err(Error::HeaderTooLong {
                    limit: limits.max_header_length,
                });
            }
            if p.size.saturating_add(buf.len()) > limits.max_frame_size {
                return Err(Error::FrameTooLarge {
                    limit: limits.max_frame_size,
                    declared: None,
                });
            }
            *scanned = buf.len();
            return Ok(false);
        };
        *scanned = 0;
        let consumed = pos + 1;
        let size = p.size.saturating_add(consumed);
        if size > limits.max_frame_size {
            return Err(Error::FrameTooLarge {
                limit: limits.max_frame_size,
                declared: None,
            });
        }
        let line = strip_cr(&buf[..pos]);
        if line.len() > limits.max_header_length {
            return Err(Error::HeaderTooLong {
                limit: limits.max_header_length,
            });
        }
        if line.is_empty() {
            buf.advance(consumed);
            p.size = size;
            return Ok(true);
        }
        if p.headers.len() >= limits.max_headers {
            return Err(Error::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        let (name, value) = parse_header(line, esc)?;
        // Only the first content-length counts (repeated-header rule); check
        // it now so an oversized frame is refused before its body arrives.
        if name == "content-length" && p.content_length.is_none() {
            p.content_length = Some(parse_content_length(&value, size, limits)?);
        }
        p.headers.push(name, value);
        buf.advance(consumed);
        p.size = size;
    }
}

/// Returns the body once it and its NUL are buffered.
fn read_body(
    p: &mut Partial,
    scanned: &mut usize,
    limits: &Limits,
    buf: &mut BytesMut,
) -> Result<Option<Bytes>> {
    let remaining = limits.max_frame_size.saturating_sub(p.size);
    match p.content_length {
        Some(len) => {
            if len > remaining {
                return Err(Error::FrameTooLarge {
                    limit: limits.max_frame_size,
                    declared: Some(len as u64),
                });
            }
            let needed = len + 1;
            if buf.len() < needed {
                // Make room for the whole body at once instead of growing
                // the buffer read by read.
                buf.reserve(needed - buf.len());
                return Ok(None);
            }
            if buf[len] != 0 {
                return Err(Error::MissingNul);
            }
            let body = buf.split_to(len).freeze();
            buf.advance(1);
            *scanned = 0;
            Ok(Some(body))
        }
        None => {
            let window_end = buf.len().min(remaining.saturating_add(1));
            let start = (*scanned).min(window_end);
            match find(0, &buf[start..window_end]) {
                Some(i) => {
                    let body = buf.split_to(start + i).freeze();
                    buf.advance(1);
                    *scanned = 0;
                    Ok(Some(body))
                }
                None if buf.len() > remaining => Err(Error::FrameTooLarge {
                    limit: limits.max_frame_size,
                    declared: None,
                }),
                None => {
                    *scanned = buf.len();
                    Ok(None)
                }
            }
        }
    }
}

/// Splits `name:value` on the first colon and unescapes both halves.
fn parse_header(line: &[u8], esc: Escaping) -> Result<(String, String)> {
    let colon = find(b':', line).ok_or_else(|| Error::InvalidHeader(preview(line)))?;
    let text = std::str::from_utf8(line).map_err(|_| Error::NotUtf8 { context: "header" })?;
    let (name, value) = (&text[..colon], &text[colon + 1..]);
    Ok((unescape(name, esc)?, unescape(value, esc)?))
}

fn unescape(s: &str, esc: Escaping) -> Result<String> {
    if esc == Escaping::Raw || !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('c') => ':',
            Some('\\') => '\\',
            Some('r') if esc == Escaping::V12 => '\r',
            Some(other) => return Err(Error::InvalidEscape(format!("\\{other}"))),
            None => return Err(Error::InvalidEscape("\\".to_owned())),
        });
    }
    Ok(out)
}

/// `content-length` must be plain decimal digits (no sign, no spaces).
fn parse_content_length(value: &str, size_so_far: usize, limits: &Limits) -> Result<usize> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidContentLength(preview(value.as_bytes())));
    }
    // All digits: parsing can only fail by overflow, which is "too large".
    let declared: u64 = value.parse().unwrap_or(u64::MAX);
    let remaining = limits.max_frame_size.saturating_sub(size_so_far);
    match usize::try_from(declared) {
        Ok(n) if n <= remaining => Ok(n),
        _ => Err(Error::FrameTooLarge {
            limit: limits.max_frame_size,
            declared: Some(declared),
        }),
    }
}

/// Whether the decoder on the other side would read back exactly this header.
fn check_encodable(name: &str, value: &str, esc: Escaping) -> std::result::Result<(), ()> {
    let ok = match esc {
        Escaping::V12 => true,
        // A raw CR right before the LF would be taken for a CRLF ending.
        Escaping::V11 => !value.ends_with('\r'),
        Escaping::Raw => {
            !name.contains('\n')
                && !name.contains(':')
                && !value.contains('\n')
                && !value.ends_with('\r')
        }
    };
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

fn put_escaped(dst: &mut BytesMut, s: &str, esc: Escaping) {
    if esc == Escaping::Raw || !s.bytes().any(|b| matches!(b, b'\r' | b'\n' | b':' | b'\\')) {
        dst.put_slice(s.as_bytes());
        return;
    }
    for b in s.bytes() {
        match b {
            b'\r' if esc == Escaping::V12 => dst.put_slice(b"\\r"),
            b'\n' => dst.put_slice(b"\\n"),
            b':' => dst.put_slice(b"\\c"),
            b'\\' => dst.put_slice(b"\\\\"),
            other => dst.put_u8(other),
        }
    }
}

fn find(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A short, printable quote of peer input for error messages.
fn preview(bytes: &[u8]) -> String {
    let cut = bytes.len().min(PREVIEW_LEN);
    let mut s = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    if cut < bytes.len() {
        s.push('…');
    }
    s
}

impl Decoder for StompCodec {
    type Item = Item;
    type Error = Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Item>> {
        let result = self.decode_inner(buf);
        if result.is_err() {
            // The stream cannot be resynchronised; start clean so a caller
            // that keeps going at least gets deterministic behaviour.
            self.state = State::Command;
            self.scanned = 0;
        }
        result
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Item>> {
        match self.decode(buf)? {
            Some(item) => Ok(Some(item)),
            None if buf.is_empty() && matches!(self.state, State::Command) => Ok(None),
            None => Err(Error::Truncated),
        }
    }
}

impl Encoder<Frame> for StompCodec {
    type Error = Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<()> {
        self.encode_frame(&frame, dst)
    }
}

impl Encoder<&Frame> for StompCodec {
    type Error = Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        self.encode_frame(frame, dst)
    }
}

impl Encoder<Item> for StompCodec {
    type Error = Error;

    fn encode(&mut self, item: Item, dst: &mut BytesMut) -> Result<()> {
        match item {
            Item::Frame(frame) => self.encode_frame(&frame, dst),
            Item::HeartBeat => {
                dst.put_u8(b'\n');
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
