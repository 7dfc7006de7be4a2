//! Broker settings (the `[broker]` part of a profile).

use std::time::Duration;

use fmq_proto::Limits;

/// Broker settings. `Default` gives the values the shipped profiles use.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name reported in CONNECTED's `server` header and in message ids.
    pub name: String,
    /// Frame size and header limits.
    pub limits: Limits,
    /// Most client connections served at once; more wait in the backlog.
    pub max_connections: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Heart-beat the server offers: (can send every ms, wants to receive every ms).
    pub heart_beat: (u32, u32),
    /// Prefetch for subscriptions that do not ask for one.
    pub default_prefetch: usize,
    /// Deliveries of one message after which it goes to the dead-letter queue.
    pub max_redeliveries: u32,
    /// Queue name (without `/queue/`) of the dead-letter queue.
    pub dead_letter_queue: String,
    /// How often expired messages are purged from queues nobody consumes.
    pub expiry_sweep: Duration,
    /// Require login and check ACLs.
    pub authentication: bool,
    /// Most frames of one transaction.
    pub max_transaction_frames: usize,
    /// A producer id not used for this long is forgotten by duplicate
    /// detection: a resend from it after that is accepted again.
    pub dedupe_retention: Duration,
    /// Most producer ids duplicate detection tracks; when full, the one idle
    /// the longest is forgotten to make room.
    pub dedupe_max_producers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "FerroMQ".into(),
            limits: Limits::default(),
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(10),
            heart_beat: (10_000, 10_000),
            default_prefetch: 100,
            max_redeliveries: 6,
            dead_letter_queue: "DLQ".into(),
            expiry_sweep: Duration::from_secs(5),
            authentication: true,
            max_transaction_frames: 100_000,
            dedupe_retention: Duration::from_secs(7 * 24 * 3600),
            dedupe_max_producers: 100_000,
        }
    }
}
