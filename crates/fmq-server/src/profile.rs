//! Profiles: a directory holding `fmq.toml`, found by name under a
//! `profiles/` directory or given as a path (like the seed's
//! `fmq.sh -profile NAME`). Every key is checked; errors name the file, the
//! key and the problem.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The file inside a profile directory.
pub const PROFILE_FILE: &str = "fmq.toml";

/// A loaded, validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The profile directory.
    pub dir: PathBuf,
    /// Parsed settings.
    pub file: ProfileFile,
}

/// `fmq.toml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileFile {
    /// `[server]`
    pub server: ServerSection,
    /// `[network]`
    pub network: NetworkSection,
    /// `[store]`
    pub store: StoreSection,
    /// `[security]`
    pub security: SecuritySection,
    /// `[broker]`
    pub broker: BrokerSection,
    /// `[log]`
    pub log: LogSection,
    /// `[ha]`: present when this server is one half of an HA pair.
    pub ha: Option<fmq_ha::HaConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Server name, shown in CONNECTED and `fmq status`.
    pub name: String,
    /// Threads that run client connections, the broker and the HA links;
    /// 0 (the default) is one per core (see [`ServerSection::workers`]).
    pub worker_threads: usize,
}

/// Most `server.worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            name: "FerroMQ".into(),
            worker_threads: 0,
        }
    }
}

impl ServerSection {
    /// The number of worker threads to run, given the cores this process
    /// may use: `worker_threads`, or when it is 0 one per core. The
    /// trade-off, measured, is in `docs/configuration.md`.
    pub fn workers(&self, cores: usize) -> usize {
        match self.worker_threads {
            0 => cores.max(1),
            n => n,
        }
    }
}

/// `[network]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Address the client port binds.
    pub bind_address: String,
    /// STOMP client port.
    pub port: u16,
    /// Address the admin port binds.
    pub admin_bind_address: String,
    /// Admin port (the seed's RMI port).
    pub admin_port: u16,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Time a new connection has to send CONNECT, ms.
    pub connect_timeout_ms: u64,
    /// Heart-beat offered: [send every ms, want to receive every ms].
    pub heart_beat_ms: [u32; 2],
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            bind_address: "127.0.0.1".into(),
            port: 1856,
            admin_bind_address: "127.0.0.1".into(),
            admin_port: 1858,
            max_connections: 10_000,
            connect_timeout_ms: 10_000,
            heart_beat_ms: [10_000, 10_000],
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// RocksDB directory; relative paths are under the profile directory.
    pub db_path: String,
    /// fsync before a RECEIPT for a persistent SEND.
    pub sync: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            db_path: "run/db".into(),
            sync: true,
        }
    }
}

/// `[security]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// Require login and enforce ACLs.
    pub authentication: bool,
    /// Created with admin rights when the store has no users yet.
    pub initial_admin_user: String,
    /// Its first password: change it with `fmq user passwd`.
    pub initial_admin_password: String,
}

impl Default for SecuritySection {
    fn default() -> Self {
        SecuritySection {
            authentication: true,
            initial_admin_user: "admin".into(),
            initial_admin_password: "passwd".into(),
        }
    }
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// Prefetch for subscriptions that do not set one.
    pub default_prefetch: usize,
    /// Deliveries before a message is dead-lettered.
    pub max_redeliveries: u32,
    /// Dead-letter queue name (without /queue/).
    pub dead_letter_queue: String,
    /// Period of the expiry sweep, ms.
    pub expiry_sweep_ms: u64,
    /// Largest frame, bytes.
    pub max_frame_size: usize,
    /// Most headers in a frame.
    pub max_headers: usize,
    /// Longest header line, bytes.
    pub max_header_length: usize,
    /// Most frames in one transaction.
    pub max_transaction_frames: usize,
    /// A producer id unused this long loses its dedupe mark, ms.
    pub dedupe_retention_ms: u64,
    /// Most producer ids with a dedupe mark.
    pub dedupe_max_producers: usize,
}

impl Default for BrokerSection {
    fn default() -> Self {
        let c = fmq_broker::Config::default();
        BrokerSection {
            default_prefetch: c.default_prefetch,
            max_redeliveries: c.max_redeliveries,
            dead_letter_queue: c.dead_letter_queue,
            expiry_sweep_ms: c.expiry_sweep.as_millis() as u64,
            max_frame_size: c.limits.max_frame_size,
            max_headers: c.limits.max_headers,
            max_header_length: c.limits.max_header_length,
            max_transaction_frames: c.max_transaction_frames,
            dedupe_retention_ms: c.dedupe_retention.as_millis() as u64,
            dedupe_max_producers: c.dedupe_max_producers,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Directory of the rolling log files; relative to the profile directory.
    pub dir: String,
    /// Default level filter (`RUST_LOG` overrides).
    pub level: String,
    /// Write daily rolling files as well as the console.
    pub file: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            dir: "run/logs".into(),
            level: "info".into(),
            file: true,
        }
    }
}

/// Finds a profile directory by name or path.
pub fn locate(name: &str) -> Result<PathBuf> {
    let direct = PathBuf::from(name);
    if name.contains('/') || name.contains('\\') || direct.is_dir() {
        if direct.join(PROFILE_FILE).is_file() {
            return Ok(direct);
        }
        if direct.is_file() && direct.file_name().is_some_and(|f| f == PROFILE_FILE) {
            if let Some(parent) = direct.parent() {
                return Ok(parent.to_path_buf());
            }
        }
    }
    let mut tried = Vec::new();
    for base in search_dirs() {
        let candidate = base.join(name);
        if candidate.join(PROFILE_FILE).is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    if direct.exists() {
        bail!(
            "profile '{name}': {} has no {PROFILE_FILE}",
            direct.display()
        );
    }
    bail!(
        "profile '{name}' not found; looked for {PROFILE_FILE} in: {}",
        tried.join(", ")
    )
}

/// Where named profiles are looked up: `$FMQ_PROFILES`, `./profiles`, and
/// `profiles/` beside or above the binary (installed and build layouts).
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("FMQ_PROFILES") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("profiles"));
    if let Ok(exe) = std::env::current_exe() {
        let mut p = exe.parent().map(Path::to_path_buf);
        for _ in 0..4 {
            let Some(dir) = p else { break };
            dirs.push(dir.join("profiles"));
            p = dir.parent().map(Path::to_path_buf);
        }
    }
    dirs
}

impl Profile {
    /// Loads and validates a profile directory.
    pub fn load(dir: &Path) -> Result<Profile> {
        let path = dir.join(PROFILE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read profile file {}", path.display()))?;
        let file = parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Profile {
            dir: dir.to_path_buf(),
            file,
        })
    }

    /// Resolves a path from the profile against the profile directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        if p.is_absolute() {
            p
        } else {
            self.dir.join(p)
        }
    }

    /// The `[ha]` section with its lock file resolved against the profile
    /// directory and canonicalized: the two servers compare the lock file
    /// path in their handshake, and `HAPrimary/../lock/lock.dat` and
    /// `HASecondary/../lock/lock.dat` are the same file.
    pub fn ha(&self) -> Option<fmq_ha::HaConfig> {
        self.file.ha.clone().map(|mut ha| {
            if let Some(lock) = &ha.lock_file {
                if lock.as_os_str() != "null" && !lock.as_os_str().is_empty() {
                    let path = self.resolve(&lock.to_string_lossy());
                    ha.lock_file = Some(path.canonicalize().unwrap_or(path));
                }
            }
            ha
        })
    }

    /// Broker settings from the profile.
    pub fn broker_config(&self) -> fmq_broker::Config {
        let f = &self.file;
        let mut c = fmq_broker::Config {
            name: f.server.name.clone(),
            max_connections: f.network.max_connections,
            connect_timeout: Duration::from_millis(f.network.connect_timeout_ms),
            heart_beat: (f.network.heart_beat_ms[0], f.network.heart_beat_ms[1]),
            default_prefetch: f.broker.default_prefetch,
            max_redeliveries: f.broker.max_redeliveries,
            dead_letter_queue: f.broker.dead_letter_queue.clone(),
            expiry_sweep: Duration::from_millis(f.broker.expiry_sweep_ms),
            authentication: f.security.authentication,
            max_transaction_frames: f.broker.max_transaction_frames,
            dedupe_retention: Duration::from_millis(f.broker.dedupe_retention_ms),
            dedupe_max_producers: f.broker.dedupe_max_producers,
            ..fmq_broker::Config::default()
        };
        c.limits.max_frame_size = f.broker.max_frame_size;
        c.limits.max_headers = f.broker.max_headers;
        c.limits.max_header_length = f.broker.max_header_length;
        c
    }
}

/// Parses and validates the text of `fmq.toml`; errors name the key.
pub fn parse(text: &str) -> Result<ProfileFile> {
    let file: ProfileFile =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    let key = |k: &str, problem: String| anyhow::anyhow!("key `{k}`: {problem}");
    if file.server.worker_threads > MAX_WORKER_THREADS {
        return Err(key(
            "server.worker_threads",
            format!("must be 0 (automatic) to {MAX_WORKER_THREADS}"),
        ));
    }
    let n = &file.network;
    for (k, v) in [
        ("network.bind_address", &n.bind_address),
        ("network.admin_bind_address", &n.admin_bind_address),
    ] {
        if v.parse::<IpAddr>().is_err() {
            return Err(key(k, format!("'{v}' is not an IP address")));
        }
    }
    if n.port == 0 {
        return Err(key("network.port", "must be 1 to 65535".into()));
    }
    if n.admin_port == 0 {
        return Err(key("network.admin_port", "must be 1 to 65535".into()));
    }
    if n.port == n.admin_port {
        return Err(key(
            "network.admin_port",
            format!("must differ from network.port ({})", n.port),
        ));
    }
    if n.max_connections == 0 {
        return Err(key("network.max_connections", "must be at least 1".into()));
    }
    if n.connect_timeout_ms == 0 {
        return Err(key(
            "network.connect_timeout_ms",
            "must be at least 1".into(),
        ));
    }
    if file.store.db_path.trim().is_empty() {
        return Err(key("store.db_path", "must not be empty".into()));
    }
    let s = &file.security;
    if s.authentication && (s.initial_admin_user.is_empty() || s.initial_admin_password.is_empty())
    {
        return Err(key(
            "security.initial_admin_user",
            "initial admin user and password must be set when authentication is on".into(),
        ));
    }
    let b = &file.broker;
    if b.default_prefetch == 0 {
        return Err(key("broker.default_prefetch", "must be at least 1".into()));
    }
    if fmq_broker::Destination::parse(&format!("/queue/{}", b.dead_letter_queue)).is_err() {
        return Err(key(
            "broker.dead_letter_queue",
            format!("'{}' is not a valid queue name", b.dead_letter_queue),
        ));
    }
    if b.expiry_sweep_ms < 10 {
        return Err(key("broker.expiry_sweep_ms", "must be at least 10".into()));
    }
    if b.dedupe_retention_ms < 1000 {
        return Err(key(
            "broker.dedupe_retention_ms",
            "must be at least 1000".into(),
        ));
    }
    if b.dedupe_max_producers == 0 {
        return Err(key(
            "broker.dedupe_max_producers",
            "must be at least 1".into(),
        ));
    }
    if b.max_frame_size < 1024 {
        return Err(key("broker.max_frame_size", "must be at least 1024".into()));
    }
    if b.max_headers == 0 || b.max_header_length < 64 {
        return Err(key(
            "broker.max_headers",
            "max_headers must be >= 1 and max_header_length >= 64".into(),
        ));
    }
    if b.max_header_length > b.max_frame_size {
        return Err(key(
            "broker.max_header_length",
            "must not exceed broker.max_frame_size".into(),
        ));
    }
    if !matches!(
        file.log.level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace"
    ) {
        return Err(key(
            "log.level",
            format!(
                "'{}' is not one of error, warn, info, debug, trace",
                file.log.level
            ),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let f = parse("").expect("defaults");
        assert_eq!(f.network.port, 1856);
        assert_eq!(f.network.admin_port, 1858);
        assert!(f.security.authentication);
        assert_eq!(f.server.worker_threads, 0);
    }

    #[test]
    fn worker_threads_are_one_per_core_unless_set() {
        let auto = ServerSection::default();
        assert_eq!(auto.workers(0), 1);
        assert_eq!(auto.workers(2), 2);
        assert_eq!(auto.workers(8), 8);
        let set = parse("[server]\nworker_threads = 3\n").expect("valid");
        assert_eq!(set.server.workers(2), 3);
        assert_eq!(set.server.workers(64), 3);
    }

    #[test]
    fn errors_name_the_key_and_problem() {
        for (text, needle) in [
            ("[network]\nport = 0\n", "network.port"),
            ("[network]\nport = \"x\"\n", "port"),
            ("[network]\nprot = 1\n", "unknown field `prot`"),
            (
                "[network]\nbind_address = \"nowhere\"\n",
                "not an IP address",
            ),
            ("[network]\nport = 5\nadmin_port = 5\n", "must differ"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[server]\nworker_threads = 5000\n", "server.worker_threads"),
            ("[server]\nworker_threads = -1\n", "worker_threads"),
            ("[broker]\ndead_letter_queue = \"\"\n", "dead_letter_queue"),
            ("[store]\nsync = 3\n", "sync"),
            (
                "[broker]\ndedupe_retention_ms = 10\n",
                "broker.dedupe_retention_ms",
            ),
            (
                "[broker]\ndedupe_max_producers = 0\n",
                "broker.dedupe_max_producers",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?} -> {err}");
        }
    }

    #[test]
    fn shipped_profile_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/FerroMQ");
        let p = Profile::load(&dir).expect("shipped profile loads");
        assert_eq!(p.file.network.port, 1856);
        assert_eq!(p.file.network.admin_port, 1858);
    }
}
