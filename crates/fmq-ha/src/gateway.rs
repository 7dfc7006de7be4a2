//! The gateway: the third machine of an HA pair. Each server pings it to
//! tell "my peer is gone" apart from "I am cut off from the network": a
//! server that cannot reach the gateway must not take over.
//!
//! The wire exchange is one line each way over a fresh TCP connection:
//!
//! ```text
//! server  -> gateway: FMQPING <cluster> <server>\n
//! gateway -> server : FMQPONG\n            (then the gateway closes)
//! ```
//!
//! [`serve`] is the responder `fmq gateway --listen ADDR` runs; [`ping`]
//! is one probe; [`GatewayMonitor`] probes periodically and publishes
//! reachability through a [`watch`] channel.
//!
//! The default gateway port is 7, the standard echo service, so that a
//! pair can use any machine running an echo service as its gateway without
//! installing FerroMQ there. A probe therefore also counts an exact echo of
//! its own line as an answer: either way the gateway machine answered
//! over TCP, which is all the isolation check needs.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::config::HaConfig;
use crate::error::{Error, Result};

/// First word of a ping line.
pub const PING_WORD: &str = "FMQPING";
/// The answer line, without its newline.
pub const PONG_WORD: &str = "FMQPONG";
/// Longest line either side reads, newline included; longer input is
/// garbage and the connection is closed.
pub const MAX_LINE: usize = 512;
/// Longest one pinger may keep a responder connection open.
pub const SERVE_DEADLINE: Duration = Duration::from_secs(5);
/// Most connections the responder handles at once; further ones wait in
/// the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 1024;
/// Each name in a ping line is cut to this many bytes.
const MAX_NAME: usize = 128;

/// Runs the gateway responder on `listener` until `shutdown` completes.
///
/// Each connection may send one line `FMQPING <cluster> <server>\n`, gets
/// `FMQPONG\n` and is closed. Anything else (a line not starting with
/// `FMQPING`, a line longer than [`MAX_LINE`], no line within
/// [`SERVE_DEADLINE`]) is closed without an answer. Connection tasks live in
/// a [`JoinSet`]: finished ones are reaped as they end, at most
/// [`MAX_CONNECTIONS`] run at once, and all are aborted on shutdown.
pub async fn serve(listener: TcpListener, shutdown: impl Future) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    info!(%local, "gateway responder listening");
    let mut tasks: JoinSet<()> = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept(), if tasks.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(async move {
                        match tokio::time::timeout(SERVE_DEADLINE, answer(stream)).await {
                            Ok(Ok(Some(line))) => debug!(%peer, %line, "gateway ping answered"),
                            Ok(Ok(None)) => debug!(%peer, "gateway: not a ping, connection closed"),
                            Ok(Err(e)) => debug!(%peer, error = %e, "gateway connection failed"),
                            Err(_) => debug!(%peer, "gateway: no ping within the deadline, connection closed"),
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "gateway responder: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tasks.shutdown().await;
    info!(%local, "gateway responder stopped");
}

/// Reads one ping line and answers it. `Ok(None)`: not a ping.
async fn answer(mut stream: TcpStream) -> io::Result<Option<String>> {
    let _ = stream.set_nodelay(true);
    let Some(line) = read_line(&mut stream).await? else {
        return Ok(None);
    };
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(PING_WORD) {
        return Ok(None);
    }
    stream
        .write_all(format!("{PONG_WORD}\n").as_bytes())
        .await?;
    stream.shutdown().await?;
    Ok(Some(line))
}

/// Reads up to [`MAX_LINE`] bytes up to and including a newline. `None` when
/// the stream ends first, the line is too long or not UTF-8.
async fn read_line(stream: impl AsyncRead + Unpin) -> io::Result<Option<String>> {
    let mut reader = BufReader::new(stream.take(MAX_LINE as u64));
    let mut buf = Vec::with_capacity(64);
    reader.read_until(b'\n', &mut buf).await?;
    if buf.last() != Some(&b'\n') {
        return Ok(None);
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8(buf).ok())
}

/// A name as one word of a ping line: whitespace and control characters
/// become `_`, empty becomes `-`, long names are cut.
fn word(name: &str) -> String {
    let mut w: String = name
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if w.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !w.is_char_boundary(end) {
            end -= 1;
        }
        w.truncate(end);
    }
    if w.is_empty() {
        w.push('-');
    }
    w
}

/// The ping line (with its newline) a server sends.
pub fn ping_line(cluster: &str, server: &str) -> String {
    format!("{PING_WORD} {} {}\n", word(cluster), word(server))
}

/// One probe as an anonymous pinger (`FMQPING - -`); see [`ping_as`].
pub async fn ping(addr: &str, port: u16, timeout: Duration) -> Result<Duration> {
    ping_as(addr, port, timeout, "-", "-").await
}

/// One probe: connects to `addr:port`, sends the ping line naming `cluster`
/// and `server`, waits for the answer, all within `timeout`, and returns
/// the round trip.
///
/// The answer is either `FMQPONG` (a FerroMQ gateway) or the ping line
/// itself (an echo service such as the default port 7); both mean the
/// gateway machine is reachable. A refused connection fails as soon as the
/// kernel reports it; any other answer is [`Error::Protocol`]; running out
/// of time is an [`Error::Io`] of kind `TimedOut`.
pub async fn ping_as(
    addr: &str,
    port: u16,
    timeout: Duration,
    cluster: &str,
    server: &str,
) -> Result<Duration> {
    let started = Instant::now();
    let line = ping_line(cluster, server);
    match tokio::time::timeout(timeout, exchange(addr, port, &line)).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "gateway {addr}:{port} did not answer within {} ms",
                timeout.as_millis()
            ),
        ))),
    }
}

async fn exchange(addr: &str, port: u16, line: &str) -> Result<()> {
    let mut stream = TcpStream::connect((addr, port)).await?;
    let _ = stream.set_nodelay(true);
    stream.write_all(line.as_bytes()).await?;
    let answer = read_line(&mut stream).await?;
    match answer.as_deref() {
        Some(PONG_WORD) => Ok(()),
        // An echo service: the gateway machine answered all the same.
        Some(echo) if Some(echo) == line.strip_suffix('\n') => Ok(()),
        Some(other) => Err(Error::Protocol(format!(
            "gateway {addr}:{port} answered {:?}, expected {PONG_WORD}",
            other.chars().take(64).collect::<String>()
        ))),
        None => Err(Error::Protocol(format!(
            "gateway {addr}:{port} closed the connection without answering"
        ))),
    }
}

/// Settings of a [`GatewayMonitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Gateway host name or address.
    pub host: String,
    /// Gateway port.
    pub port: u16,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// Time one probe may take (capped at `interval`).
    pub timeout: Duration,
    /// Consecutive failed probes after which the gateway is unreachable
    /// (at least 1).
    pub failures_to_unreachable: u32,
    /// Cluster name sent in the ping line.
    pub cluster: String,
    /// Server name sent in the ping line.
    pub server: String,
}

/// Default for [`MonitorConfig::failures_to_unreachable`]: one lost probe
/// is tolerated, two in a row are not.
pub const DEFAULT_FAILURES_TO_UNREACHABLE: u32 = 2;

impl MonitorConfig {
    /// The monitor of a profile: probes `gateway_server_ip_address:
    /// gateway_server_port` every `ping_interval`, each probe limited to
    /// `socket_creation_timeout` (and to the interval).
    pub fn from_ha(config: &HaConfig, server: &str) -> Self {
        MonitorConfig {
            host: config.gateway_server_ip_address.clone(),
            port: config.gateway_server_port,
            interval: config.ping(),
            timeout: Duration::from_millis(config.socket_creation_timeout),
            failures_to_unreachable: DEFAULT_FAILURES_TO_UNREACHABLE,
            cluster: config.cluster_name.clone(),
            server: server.to_owned(),
        }
    }
}

/// A task that probes the gateway every [`MonitorConfig::interval`] and
/// publishes whether it is reachable.
///
/// The value starts `false` (not yet known to be reachable: a server that
/// has not heard from the gateway must not assume it is connected), turns
/// `true` after one successful probe and `false` again after
/// [`MonitorConfig::failures_to_unreachable`] consecutive failures. The
/// first probe runs at once. Transitions are logged. Dropping the monitor
/// stops the task.
#[derive(Debug)]
pub struct GatewayMonitor {
    reachable: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl GatewayMonitor {
    /// Starts the probing task on the current Tokio runtime.
    pub fn start(config: MonitorConfig) -> Self {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(monitor(config, tx));
        GatewayMonitor {
            reachable: rx,
            task,
        }
    }

    /// A receiver of the reachability; `changed()` fires on transitions.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.reachable.clone()
    }

    /// The reachability now.
    pub fn is_reachable(&self) -> bool {
        *self.reachable.borrow()
    }

    /// Stops the task and waits for it to end.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for GatewayMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn monitor(config: MonitorConfig, tx: watch::Sender<bool>) {
    let interval = config.interval.max(Duration::from_millis(1));
    let timeout = config.timeout.min(interval).max(Duration::from_millis(1));
    let threshold = config.failures_to_unreachable.max(1);
    let target = format!("{}:{}", config.host, config.port);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    let mut ever_answered = false;
    loop {
        ticker.tick().await;
        let probe = ping_as(
            &config.host,
            config.port,
            timeout,
            &config.cluster,
            &config.server,
        )
        .await;
        let reachable = *tx.borrow();
        match probe {
            Ok(rtt) => {
                failures = 0;
                if !reachable {
                    info!(gateway = %target, rtt_ms = rtt.as_millis() as u64, "gateway server is reachable");
                    tx.send_replace(true);
                }
                ever_answered = true;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                debug!(gateway = %target, failures, error = %e, "gateway ping failed");
                if reachable && failures >= threshold {
                    warn!(gateway = %target, failures, error = %e, "gateway server is unreachable");
                    tx.send_replace(false);
                } else if !reachable && !ever_answered && failures == threshold {
                    warn!(gateway = %target, failures, error = %e, "gateway server is unreachable");
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_single_words() {
        assert_eq!(ping_line("Ferro MQ", "a\tb"), "FMQPING Ferro_MQ a_b\n");
        assert_eq!(ping_line("", "x"), "FMQPING - x\n");
        let long = "é".repeat(200);
        let l = ping_line(&long, "s");
        assert!(l.len() <= PING_WORD.len() + MAX_NAME + 5, "{l}");
    }

    #[tokio::test]
    async fn lines_longer_than_the_limit_are_refused() {
        let data = vec![b'x'; MAX_LINE + 10];
        assert_eq!(read_line(&data[..]).await.ok().flatten(), None);
        assert_eq!(
            read_line(&b"FMQPING a b\r\n"[..])
                .await
                .ok()
                .flatten()
                .as_deref(),
            Some("FMQPING a b")
        );
        assert_eq!(read_line(&b"no newline"[..]).await.ok().flatten(), None);
    }
}
