//! The load generator's STOMP connection: FerroMQ's own codec (`fmq-proto`)
//! over a TCP stream with explicit read and write buffers, so the consumer
//! can handle every frame already received, then flush its ACKs in one write.
//! It speaks plain STOMP 1.2, so the same code drives ActiveMQ and RabbitMQ.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

pub use fmq_proto::{Command, Frame};
use fmq_proto::{Item, StompCodec};

/// A readable description of an ERROR frame.
pub fn error_text(frame: &Frame) -> String {
    let msg = frame.get("message").unwrap_or("");
    let body = String::from_utf8_lossy(&frame.body);
    let body = body.trim();
    if body.is_empty() {
        format!("ERROR frame: {msg}")
    } else {
        format!("ERROR frame: {msg}: {body}")
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
            codec: StompCodec::new(fmq_proto::Limits::default()),
            server: None,
        };
        let mut f = Frame::new(Command::Connect)
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
            "ERROR" => bail!("CONNECT refused: {}", error_text(&reply)),
            other => bail!("expected CONNECTED, got {other}"),
        }
    }

    /// Queue a frame in the write buffer (no I/O).
    pub fn queue(&mut self, frame: &Frame) -> Result<()> {
        Ok(self.codec.encode(frame, &mut self.wbuf)?)
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
        loop {
            match self.codec.decode(&mut self.rbuf)? {
                Some(Item::HeartBeat) => continue,
                Some(Item::Frame(f)) => return Ok(Some(f)),
                None => return Ok(None),
            }
        }
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
                "ERROR" => bail!("{}", error_text(&f)),
                _ => on_other(f)?,
            }
        }
    }

    /// DISCONNECT with a receipt, waiting for it at most `grace`.
    pub async fn disconnect(mut self, grace: Duration) -> Result<()> {
        let deadline = Instant::now() + grace;
        self.send(&Frame::new(Command::Disconnect).header("receipt", "bye"))
            .await?;
        // Anything else (late MESSAGE frames) is ignored.
        let r = self.wait_receipt("bye", deadline, |_| Ok(())).await;
        let _ = self.stream.shutdown().await;
        r
    }
}
