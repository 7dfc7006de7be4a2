//! A small STOMP 1.2 client layer for the load generator.
//!
//! Kept in one module so it can later be swapped for `fmq-proto`. It covers
//! what the benchmark needs: CONNECT/CONNECTED, SEND, SUBSCRIBE, ACK,
//! RECEIPT, MESSAGE, ERROR and DISCONNECT, `content-length` bodies, header
//! escaping, heart-beat EOLs between frames and repeated headers (the first
//! occurrence wins, as the spec says).

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

/// Largest header section accepted from a server.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest body accepted from a server.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// One STOMP frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("command", &self.command)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Frame {
    pub fn new(command: &str) -> Self {
        Frame {
            command: command.to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// First value of a header (STOMP 1.2: the first occurrence wins).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A readable description of an ERROR frame.
    pub fn error_text(&self) -> String {
        let msg = self.get("message").unwrap_or("");
        let body = String::from_utf8_lossy(&self.body);
        let body = body.trim();
        if body.is_empty() {
            format!("ERROR frame: {msg}")
        } else {
            format!("ERROR frame: {msg}: {body}")
        }
    }
}

/// STOMP 1.2 frame codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct StompCodec;

fn escaped_commands(command: &str) -> bool {
    // CONNECT and CONNECTED frames do not escape header values.
    command != "CONNECT" && command != "CONNECTED" && command != "STOMP"
}

fn unescape(raw: &[u8], escape: bool) -> Result<String> {
    let s = std::str::from_utf8(raw).context("header is not UTF-8")?;
    if !escape || !s.contains('\\') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('c') => out.push(':'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => bail!("invalid header escape \\{other:?}"),
        }
    }
    Ok(out)
}

fn put_escaped(dst: &mut BytesMut, s: &str, escape: bool) {
    if !escape {
        dst.put_slice(s.as_bytes());
        return;
    }
    for b in s.bytes() {
        match b {
            b'\\' => dst.put_slice(b"\\\\"),
            b':' => dst.put_slice(b"\\c"),
            b'\n' => dst.put_slice(b"\\n"),
            b'\r' => dst.put_slice(b"\\r"),
            _ => dst.put_u8(b),
        }
    }
}

/// Strip one trailing `\r` of a line (STOMP allows CRLF line ends).
fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl Decoder for StompCodec {
    type Item = Frame;
    type Error = anyhow::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        // Heart-beats / optional EOLs between frames.
        let skip = src
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
        src.advance(skip);
        if src.is_empty() {
            return Ok(None);
        }

        // Header section: lines up to an empty line.
        let mut pos = 0usize;
        let mut lines: Vec<(usize, usize)> = Vec::new();
        let body_start = loop {
            let Some(nl) = src[pos..].iter().position(|&b| b == b'\n') else {
                if src.len() > MAX_HEADER_BYTES {
                    bail!("frame header section larger than {MAX_HEADER_BYTES} bytes");
                }
                return Ok(None);
            };
            let line_end = pos + nl;
            let line = trim_cr(&src[pos..line_end]);
            if line.is_empty() {
                break line_end + 1;
            }
            lines.push((pos, pos + line.len()));
            pos = line_end + 1;
            if pos > MAX_HEADER_BYTES {
                bail!("frame header section larger than {MAX_HEADER_BYTES} bytes");
            }
        };

        let Some(&(cs, ce)) = lines.first() else {
            bail!("frame without a command line");
        };
        let command = std::str::from_utf8(&src[cs..ce])
            .context("command is not UTF-8")?
            .to_string();
        let escape = escaped_commands(&command);
        let mut headers = Vec::with_capacity(lines.len().saturating_sub(1));
        for &(ls, le) in &lines[1..] {
            let line = &src[ls..le];
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                bail!("header line without ':' in {command} frame");
            };
            let name = unescape(&line[..colon], escape)?;
            let value = unescape(&line[colon + 1..], escape)?;
            headers.push((name, value));
        }

        let content_length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad content-length {v:?}"))
            })
            .transpose()?;

        let body_len = match content_length {
            Some(len) => {
                if len > MAX_BODY_BYTES {
                    bail!("content-length {len} too large");
                }
                if src.len() < body_start + len + 1 {
                    src.reserve(body_start + len + 1 - src.len());
                    return Ok(None);
                }
                if src[body_start + len] != 0 {
                    bail!("frame body of content-length {len} not followed by NUL");
                }
                len
            }
            None => match src[body_start..].iter().position(|&b| b == 0) {
                Some(n) => n,
                None => {
                    if src.len() - body_start > MAX_BODY_BYTES {
                        bail!("frame body too large");
                    }
                    return Ok(None);
                }
            },
        };

        let mut frame_bytes = src.split_to(body_start + body_len + 1);
        frame_bytes.advance(body_start);
        frame_bytes.truncate(body_len);
        Ok(Some(Frame {
            command,
            headers,
            body: frame_bytes.freeze(),
        }))
    }
}

impl Encoder<&Frame> for StompCodec {
    type Error = anyhow::Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        let escape = escaped_commands(&frame.command);
        dst.reserve(frame.command.len() + 64 * frame.headers.len() + frame.body.len() + 4);
        dst.put_slice(frame.command.as_bytes());
        dst.put_u8(b'\n');
        for (k, v) in &frame.headers {
            put_escaped(dst, k, escape);
            dst.put_u8(b':');
            put_escaped(dst, v, escape);
            dst.put_u8(b'\n');
        }
        dst.put_u8(b'\n');
        dst.put_slice(&frame.body);
        dst.put_u8(0);
        Ok(())
    }
}

/// Credentials and addressing of a STOMP server.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// Value of the CONNECT `host` header (RabbitMQ: `/`).
    pub vhost: String,
}

/// One STOMP connection with explicit read and write buffers, so callers can
/// process every frame already received, then flush their replies in one
/// write, then wait for more.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: StompCodec,
    pub server: Option<String>,
}

impl Connection {
    /// TCP connect, CONNECT, and wait for CONNECTED (or fail on ERROR).
    pub async fn connect(opts: &ConnectOptions, deadline: Instant) -> Result<Self> {
        let addr = format!("{}:{}", opts.host, opts.port);
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to {addr}"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Connection {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            codec: StompCodec,
            server: None,
        };
        let mut f = Frame::new("CONNECT")
            .header("accept-version", "1.2")
            .header("host", opts.vhost.clone())
            .header("heart-beat", "0,0");
        if let Some(l) = &opts.login {
            f = f.header("login", l.clone());
        }
        if let Some(p) = &opts.passcode {
            f = f.header("passcode", p.clone());
        }
        conn.send(&f).await?;
        let reply = conn.read_frame(deadline).await?;
        match reply.command.as_str() {
            "CONNECTED" => {
                if let Some(v) = reply.get("version") {
                    if v != "1.2" {
                        bail!("server negotiated STOMP {v}, need 1.2");
                    }
                }
                conn.server = reply.get("server").map(str::to_string);
                Ok(conn)
            }
            "ERROR" => bail!("CONNECT refused: {}", reply.error_text()),
            other => bail!("expected CONNECTED, got {other}"),
        }
    }

    /// Queue a frame in the write buffer (no I/O).
    pub fn queue(&mut self, frame: &Frame) -> Result<()> {
        self.codec.encode(frame, &mut self.wbuf)
    }

    /// Write everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queue and flush one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        self.queue(frame)?;
        self.flush().await
    }

    /// A frame already in the read buffer, without I/O.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>> {
        self.codec.decode(&mut self.rbuf)
    }

    /// Read more bytes from the socket (fails on EOF or at the deadline).
    pub async fn fill(&mut self, deadline: Instant) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
        let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf))
            .await
            .map_err(|_| anyhow!("timed out waiting for the server"))??;
        if n == 0 {
            bail!("server closed the connection");
        }
        Ok(())
    }

    /// Next frame, reading from the socket as needed.
    pub async fn read_frame(&mut self, deadline: Instant) -> Result<Frame> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill(deadline).await?;
        }
    }

    /// Wait for the RECEIPT with this id. MESSAGE frames arriving meanwhile
    /// are handed to `on_other`; an ERROR fails.
    pub async fn wait_receipt(
        &mut self,
        receipt_id: &str,
        deadline: Instant,
        mut on_other: impl FnMut(Frame) -> Result<()>,
    ) -> Result<()> {
        loop {
            let f = self.read_frame(deadline).await?;
            match f.command.as_str() {
                "RECEIPT" if f.get("receipt-id") == Some(receipt_id) => return Ok(()),
                "RECEIPT" => {
                    bail!(
                        "unexpected RECEIPT {:?} while waiting for {receipt_id}",
                        f.get("receipt-id")
                    )
                }
                "ERROR" => bail!("{}", f.error_text()),
                _ => on_other(f)?,
            }
        }
    }

    /// DISCONNECT with a receipt, waiting for it at most `grace`.
    pub async fn disconnect(mut self, grace: Duration) -> Result<()> {
        let deadline = Instant::now() + grace;
        self.send(&Frame::new("DISCONNECT").header("receipt", "bye"))
            .await?;
        // Anything else (late MESSAGE frames) is ignored.
        let r = self.wait_receipt("bye", deadline, |_| Ok(())).await;
        let _ = self.stream.shutdown().await;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        let mut codec = StompCodec;
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            out.push(f);
        }
        out
    }

    #[test]
    fn roundtrip_with_escapes_and_binary_body() {
        let f = Frame::new("SEND")
            .header("destination", "/queue/a:b\\c\nd")
            .header("content-length", "3")
            .body(Bytes::from_static(b"a\0b"));
        let mut buf = BytesMut::new();
        StompCodec.encode(&f, &mut buf).expect("encode");
        let frames = decode_all(&buf);
        assert_eq!(frames, vec![f]);
    }

    #[test]
    fn message_with_crlf_heartbeats_and_repeated_headers() {
        let raw = b"\n\r\nMESSAGE\r\nsubscription:0\r\nmessage-id:7\r\nack:x\r\nfoo:1\r\nfoo:2\r\n\r\nhello\0\n\nRECEIPT\nreceipt-id:9\n\n\0";
        let frames = decode_all(raw);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].command, "MESSAGE");
        assert_eq!(frames[0].get("foo"), Some("1"));
        assert_eq!(frames[0].get("ack"), Some("x"));
        assert_eq!(&frames[0].body[..], b"hello");
        assert_eq!(frames[1].get("receipt-id"), Some("9"));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let raw: &[u8] = b"MESSAGE\ncontent-length:4\nmessage-id:1\n\nab\0d\0";
        let mut codec = StompCodec;
        for cut in 0..raw.len() {
            let mut buf = BytesMut::from(&raw[..cut]);
            assert!(
                codec.decode(&mut buf).expect("decode").is_none(),
                "cut {cut}"
            );
        }
        let mut buf = BytesMut::from(raw);
        let f = codec.decode(&mut buf).expect("decode").expect("frame");
        assert_eq!(&f.body[..], b"ab\0d");
        assert!(buf.is_empty());
    }

    #[test]
    fn content_length_without_nul_is_an_error() {
        let mut buf = BytesMut::from(&b"MESSAGE\ncontent-length:2\n\nabc\0"[..]);
        assert!(StompCodec.decode(&mut buf).is_err());
    }

    #[test]
    fn connected_headers_are_not_unescaped() {
        let frames = decode_all(b"CONNECTED\nversion:1.2\nserver:x\\cy\n\n\0");
        assert_eq!(frames[0].get("server"), Some("x\\cy"));
    }
}
