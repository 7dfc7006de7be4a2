//! `fmq`: runs a FerroMQ server on a profile, and administers running ones.
//!
//! ```text
//! fmq -profile FerroMQ [-dbPath DIR]       run a server (foreground)
//! fmq status   --admin-port 1858           show a running server's state
//! fmq shutdown --admin-port 1858           stop it gracefully
//! fmq user add|passwd|remove|list ...      manage users on a running server
//! fmq acl grant|revoke|list ...            manage ACLs on a running server
//! ```

mod admin;
mod diverged;
mod ha;
mod ha_rpl;
mod profile;
mod run;

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::admin::Request;

/// The process allocator: jemalloc. Each message is a frame, a store batch
/// and (replicated) a replication frame, allocated on one thread and freed
/// on another; under that load glibc's malloc (arena locking, consolidation
/// of freed chunks) took about a tenth of the server's CPU, jemalloc's
/// thread caches a good part less (CPU per message: docs/ha-replicated.md,
/// Known limits).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "fmq",
    version,
    about = "FerroMQ: a highly available STOMP message broker"
)]
struct Cli {
    /// Profile to run: a name under profiles/ (e.g. FerroMQ) or a directory
    /// holding fmq.toml. `-profile` is accepted too.
    #[arg(long, global = false)]
    profile: Option<String>,
    /// Store directory, overriding the profile's store.db_path (`-dbPath`).
    #[arg(long = "db-path")]
    db_path: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs a server in the foreground (the default with --profile).
    Run,
    /// Shows a running server's state.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Stops a running server gracefully.
    Shutdown {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        auth: Auth,
    },
    /// Manages users on a running server.
    User {
        #[command(subcommand)]
        action: UserCmd,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        auth: Auth,
    },
    /// Runs the gateway responder on the third machine: HA servers ping it
    /// to tell a dead peer from their own isolation. Stops on SIGTERM/SIGINT.
    Gateway {
        /// Address to listen on (e.g. 0.0.0.0:7007).
        #[arg(long)]
        listen: String,
    },
    /// Checks that a directory (an NFSv4/SMB mount for the lock file or a
    /// shared store) gives exclusive locks between processes, releases them
    /// when the holder dies, and honours fsync; prints a verdict.
    Fscheck {
        /// The directory to check.
        path: PathBuf,
    },
    /// Inspects or re-sends the batches a replicated server saved aside
    /// when its history diverged from the active's (run/diverged/*.fmqlog).
    Diverged {
        #[command(subcommand)]
        action: DivergedCmd,
    },
    /// Manages access-control lists on a running server.
    Acl {
        #[command(subcommand)]
        action: AclCmd,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        auth: Auth,
    },
}

#[derive(Debug, Args)]
struct Target {
    /// The server's admin port (the seed's RMI port).
    #[arg(long, default_value_t = 1858)]
    admin_port: u16,
    /// The server's admin address.
    #[arg(long, default_value = "127.0.0.1")]
    admin_host: String,
}

#[derive(Debug, Args)]
struct Auth {
    /// Admin user name.
    #[arg(long, env = "FMQ_ADMIN_USER", default_value = "admin")]
    admin_user: String,
    /// Admin password (the shipped profiles start with 'passwd').
    #[arg(
        long,
        env = "FMQ_ADMIN_PASSWORD",
        default_value = "passwd",
        hide_default_value = true
    )]
    admin_password: String,
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Adds a user (password from --password or one line on stdin).
    Add {
        name: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Changes a user's password.
    Passwd {
        name: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Removes a user and its ACL entries.
    Remove { name: String },
    /// Lists users.
    List,
}

#[derive(Debug, Subcommand)]
enum DivergedCmd {
    /// Lists the batches and the messages in a divergent-batches file.
    Show {
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-sends to a running (active) server the messages the divergent
    /// history accepted and had not delivered, each with a receipt.
    Replay {
        file: PathBuf,
        /// The active server's STOMP address.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The active server's STOMP port.
        #[arg(long, default_value_t = 1856)]
        port: u16,
        /// STOMP login.
        #[arg(long, env = "FMQ_USER", default_value = "admin")]
        user: String,
        /// STOMP passcode.
        #[arg(
            long,
            env = "FMQ_PASSWORD",
            default_value = "passwd",
            hide_default_value = true
        )]
        password: String,
        /// Also re-send messages the divergent history consumed.
        #[arg(long)]
        include_consumed: bool,
        /// Re-send without the messages' producer id and sequence
        /// (`fmq-producer-id`, `fmq-sequence`), so the broker's dedupe does
        /// not drop them: for messages whose producer never resent them
        /// (a RECEIPT was given under `replication = "async"`).
        #[arg(long)]
        ignore_dedupe: bool,
        /// Only list what would be sent.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AclCmd {
    /// Grants permissions (letters of rwa) on a destination pattern.
    Grant {
        principal: String,
        pattern: String,
        permissions: String,
    },
    /// Revokes permissions.
    Revoke {
        principal: String,
        pattern: String,
        permissions: String,
    },
    /// Lists ACL entries.
    List,
}

/// clap has no single-dash long options; accept the seed's spellings.
fn rewrite_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.map(|a| match a.as_str() {
        "-profile" => "--profile".into(),
        "-dbPath" => "--db-path".into(),
        _ => a,
    })
    .collect()
}

fn password(given: Option<String>) -> Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    eprintln!("password (one line on stdin):");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        bail!("no password given");
    }
    Ok(p)
}

fn main() {
    // `fmq fscheck` re-runs this binary as its lock-holder process.
    fmq_ha::fscheck::dispatch_holder();
    let cli = Cli::parse_from(rewrite_args(std::env::args()));
    let code = match serve_or_run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fmq: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Runs the command on a runtime sized for it. A server's profile is read
/// first, since it sets how many worker threads the server gets; every
/// other command is a short client or the gateway, for which the runtime's
/// default does.
fn serve_or_run(cli: Cli) -> Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let serve = match (&cli.command, &cli.profile) {
        (None | Some(Cmd::Run), Some(name)) => {
            let profile = profile::Profile::load(&profile::locate(name)?)?;
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            builder.worker_threads(profile.file.server.workers(cores));
            Some(profile)
        }
        _ => None,
    };
    let rt = builder
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    match serve {
        Some(profile) => rt.block_on(run::run(profile, cli.db_path)),
        None => rt.block_on(dispatch(cli)),
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    let authed = |cmd: &str, auth: &Auth, args: serde_json::Value| Request {
        cmd: cmd.into(),
        user: Some(auth.admin_user.clone()),
        password: Some(auth.admin_password.clone()),
        args,
    };
    match cli.command {
        // With a profile, `serve_or_run` has started the server instead.
        None | Some(Cmd::Run) => {
            bail!("no profile given: run `fmq -profile FerroMQ` (see `fmq --help`)")
        }
        Some(Cmd::Status { target, json }) => {
            let req = Request {
                cmd: "status".into(),
                ..Request::default()
            };
            let v = admin::call(&target.admin_host, target.admin_port, &req).await?;
            if json {
                println!("{v}");
            } else {
                print!("{}", admin::format_status(&v));
            }
            Ok(())
        }
        Some(Cmd::Gateway { listen }) => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for gateway pings: {e}"))?;
            // Before the banner: a SIGTERM sent as soon as the gateway says
            // it is up stops it cleanly.
            let stop = run::termination()?;
            println!(
                "FerroMQ gateway answering HA pings on {}",
                listener.local_addr()?
            );
            fmq_ha::gateway::serve(listener, stop).await;
            println!("FerroMQ gateway stopped");
            Ok(())
        }
        Some(Cmd::Diverged { action }) => match action {
            DivergedCmd::Show { file, json } => diverged::show(&file, json),
            DivergedCmd::Replay {
                file,
                host,
                port,
                user,
                password,
                include_consumed,
                ignore_dedupe,
                dry_run,
            } => {
                diverged::replay(diverged::Replay {
                    path: &file,
                    host: &host,
                    port,
                    user: &user,
                    password: &password,
                    include_removed: include_consumed,
                    ignore_dedupe,
                    dry_run,
                })
                .await
            }
        },
        Some(Cmd::Fscheck { path }) => {
            let report = tokio::task::spawn_blocking(move || fmq_ha::fscheck::run(&path)).await??;
            println!("{report}");
            if report.suitable() {
                Ok(())
            } else {
                bail!("{}", report.verdict())
            }
        }
        Some(Cmd::Shutdown { target, auth }) => {
            let v = admin::call(
                &target.admin_host,
                target.admin_port,
                &authed("shutdown", &auth, json!({})),
            )
            .await?;
            println!("{}", v.as_str().unwrap_or("ok"));
            Ok(())
        }
        Some(Cmd::User {
            action,
            target,
            auth,
        }) => {
            let req = match action {
                UserCmd::Add { name, password: p } => authed(
                    "user_add",
                    &auth,
                    json!({ "name": name, "password": password(p)? }),
                ),
                UserCmd::Passwd { name, password: p } => authed(
                    "user_passwd",
                    &auth,
                    json!({ "name": name, "password": password(p)? }),
                ),
                UserCmd::Remove { name } => authed("user_remove", &auth, json!({ "name": name })),
                UserCmd::List => authed("user_list", &auth, json!({})),
            };
            print_answer(admin::call(&target.admin_host, target.admin_port, &req).await?);
            Ok(())
        }
        Some(Cmd::Acl {
            action,
            target,
            auth,
        }) => {
            let req = match action {
                AclCmd::Grant {
                    principal,
                    pattern,
                    permissions,
                } => authed(
                    "acl_grant",
                    &auth,
                    json!({ "principal": principal, "pattern": pattern, "permissions": permissions }),
                ),
                AclCmd::Revoke {
                    principal,
                    pattern,
                    permissions,
                } => authed(
                    "acl_revoke",
                    &auth,
                    json!({ "principal": principal, "pattern": pattern, "permissions": permissions }),
                ),
                AclCmd::List => authed("acl_list", &auth, json!({})),
            };
            print_answer(admin::call(&target.admin_host, target.admin_port, &req).await?);
            Ok(())
        }
    }
}

fn print_answer(v: serde_json::Value) {
    match v {
        serde_json::Value::String(s) => println!("{s}"),
        serde_json::Value::Array(items) => {
            for item in items {
                match item {
                    serde_json::Value::String(s) => println!("{s}"),
                    serde_json::Value::Object(o) => println!(
                        "{:<20} {:<40} {}",
                        o.get("principal").and_then(|v| v.as_str()).unwrap_or(""),
                        o.get("pattern").and_then(|v| v.as_str()).unwrap_or(""),
                        o.get("permissions").and_then(|v| v.as_str()).unwrap_or("")
                    ),
                    other => println!("{other}"),
                }
            }
        }
        other => println!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_style_flags_are_accepted() {
        let args = rewrite_args(
            ["fmq", "-profile", "FerroMQ", "-dbPath", "/tmp/x"]
                .map(String::from)
                .into_iter(),
        );
        let cli = Cli::parse_from(args);
        assert_eq!(cli.profile.as_deref(), Some("FerroMQ"));
        assert_eq!(cli.db_path, Some(PathBuf::from("/tmp/x")));
    }
}
