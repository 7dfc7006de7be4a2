//! Command-line arguments shared by the examples (plain `std::env` parsing).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use fmq_client::durable::{Connection, ConnectionBuilder};

/// Command-line arguments shared by the examples.
#[derive(Debug)]
pub struct Args {
    /// Servers, in the order they are tried (`--addr A,B`).
    pub servers: Vec<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    pub client_id: Option<String>,
    pub buffer_dir: Option<PathBuf>,
    pub destination: String,
    pub name: String,
    pub count: usize,
    pub interval: Duration,
    /// `--delete`: the durable subscriber deletes its subscription at the end.
    pub delete: bool,
    /// `--offline-start`: start even if no server accepts the connection
    /// (persistent sends wait in the local buffer until one does).
    pub offline_start: bool,
    /// `--initial-timeout-ms`: how long to wait for the first connection.
    pub initial_timeout: Option<Duration>,
}

/// Parses `std::env::args()`. `--help` prints the usage and exits; a bad
/// argument prints what is wrong and exits with status 2.
pub fn parse_args(program: &str, about: &str, defaults: Args) -> Args {
    match parse(program, about, defaults) {
        Ok(args) => args,
        Err(Usage::Help(text)) => {
            println!("{text}");
            std::process::exit(0)
        }
        Err(Usage::Bad(text)) => {
            eprintln!("{program}: {text}");
            std::process::exit(2)
        }
    }
}

enum Usage {
    Help(String),
    Bad(String),
}

impl From<String> for Usage {
    fn from(s: String) -> Usage {
        Usage::Bad(s)
    }
}

fn parse(program: &str, about: &str, defaults: Args) -> Result<Args, Usage> {
    let mut args = defaults;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => {
                args.servers = value()?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "--login" => args.login = Some(value()?),
            "--passcode" => args.passcode = Some(value()?),
            "--client-id" => args.client_id = Some(value()?),
            "--buffer-dir" => args.buffer_dir = Some(value()?.into()),
            "--destination" => args.destination = value()?,
            "--name" => args.name = value()?,
            "--count" => {
                let v = value()?;
                args.count = v
                    .parse()
                    .map_err(|_| format!("--count {v}: not a number"))?;
            }
            "--delete" => args.delete = true,
            "--offline-start" => args.offline_start = true,
            "--initial-timeout-ms" => {
                let v = value()?;
                args.initial_timeout = Some(Duration::from_millis(
                    v.parse()
                        .map_err(|_| format!("--initial-timeout-ms {v}: not a number"))?,
                ));
            }
            "--interval-ms" => {
                let v = value()?;
                args.interval = Duration::from_millis(
                    v.parse()
                        .map_err(|_| format!("--interval-ms {v}: not a number"))?,
                );
            }
            "-h" | "--help" => {
                return Err(Usage::Help(format!(
                    "{about}\n\nusage: {program} [--addr HOST:PORT[,HOST:PORT...]] [--login USER] \
                     [--passcode PASS] [--client-id ID] [--buffer-dir DIR] \
                     [--destination /queue/NAME|/topic/NAME] [--name NAME] [--count N] \
                     [--interval-ms MS] [--delete] [--offline-start] [--initial-timeout-ms MS]\n\ndefaults: --addr {} --destination {} --name {} --count {}",
                    args.servers.join(","),
                    args.destination,
                    args.name,
                    args.count
                )))
            }
            other => return Err(format!("unknown argument {other} (try --help)").into()),
        }
    }
    if args.servers.is_empty() {
        return Err(Usage::Bad("--addr needs at least one server".into()));
    }
    Ok(args)
}

impl Args {
    /// Defaults: the HA pair on this machine, `/queue/demo`, 10 messages.
    pub fn defaults() -> Args {
        Args {
            servers: vec!["127.0.0.1:1856".into(), "127.0.0.1:1956".into()],
            login: None,
            passcode: None,
            client_id: None,
            buffer_dir: None,
            destination: "/queue/demo".into(),
            name: "demo".into(),
            count: 10,
            interval: Duration::ZERO,
            delete: false,
            offline_start: false,
            initial_timeout: None,
        }
    }

    /// A connection builder from these arguments.
    pub fn builder(&self) -> ConnectionBuilder {
        let mut b = Connection::builder(self.servers.iter().cloned());
        if let (Some(l), Some(p)) = (&self.login, &self.passcode) {
            b = b.credentials(l.clone(), p.clone());
        } else if let Some(l) = &self.login {
            b = b.credentials(l.clone(), "");
        }
        if let Some(id) = &self.client_id {
            b = b.client_id(id.clone());
        }
        if let Some(dir) = &self.buffer_dir {
            b = b.buffer_dir(dir.clone());
        }
        if let Some(timeout) = self.initial_timeout {
            b = b.initial_timeout(timeout);
        }
        b.offline_start(self.offline_start)
    }
}
