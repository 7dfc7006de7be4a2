//! The admin port (the seed's RMI port): one JSON request per line, one JSON
//! response per line. Status is open to anyone who can reach the port (it
//! binds loopback by default); every command that changes something needs
//! the credentials of a user with the admin permission on `>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fmq_broker::Broker;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request on the admin port.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Request {
    /// status, shutdown, user_add, user_passwd, user_remove, user_list,
    /// acl_grant, acl_revoke, acl_list
    pub cmd: String,
    /// Admin user for commands that change something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Command arguments.
    #[serde(default)]
    pub args: Value,
}

/// Facts the status command reports beside the broker's figures.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Server name.
    pub name: String,
    /// Client port address.
    pub client_addr: String,
    /// Store directory.
    pub db_path: String,
    /// Start time.
    pub started: Instant,
}

/// What the admin port serves from: the broker while there is one (an HA
/// server that is not active has none), the HA status if the server is one
/// half of a pair, and the shutdown switch.
#[derive(Debug)]
pub struct AdminCtx {
    /// The running broker, if any.
    pub broker: watch::Receiver<Option<Arc<Broker>>>,
    /// HA status as JSON, for HA servers.
    pub ha: Option<watch::Receiver<Value>>,
    /// Static facts.
    pub info: ServerInfo,
    /// Set to true to stop the server.
    pub shutdown: watch::Sender<bool>,
}

/// Serves the admin port until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminCtx>) {
    let mut stop = ctx.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &ctx).await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn connection(stream: TcpStream, ctx: &AdminCtx) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(rd).take(MAX_REQUEST).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow!("admin request timed out"))??;
    if read == 0 {
        return Ok(());
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match handle(req, ctx).await {
            Ok(data) => json!({ "ok": true, "data": data }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        Err(e) => json!({ "ok": false, "error": format!("bad admin request: {e}") }),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await?;
    Ok(())
}

fn arg<'a>(req: &'a Request, name: &str) -> Result<&'a str> {
    req.args
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{} needs argument '{name}'", req.cmd))
}

async fn handle(req: Request, ctx: &AdminCtx) -> Result<Value> {
    let broker = ctx.broker.borrow().clone();
    if req.cmd == "status" {
        return status(broker.as_deref(), ctx).await;
    }
    let shutdown = &ctx.shutdown;
    let Some(broker) = broker else {
        // An HA server that is not active has no store open, so it cannot
        // check credentials. Shutdown stays possible (the admin port binds
        // loopback by default); everything else belongs to the active.
        if req.cmd == "shutdown" {
            tracing::info!("shutdown requested through the admin port");
            let _ = shutdown.send(true);
            return Ok(json!("shutting down"));
        }
        bail!(
            "this server is not active: run '{}' against the active server's admin port",
            req.cmd
        );
    };
    let security = broker.security().clone();
    if security.enabled() {
        let user = req.user.clone();
        let password = req.password.clone();
        let sec = security.clone();
        let principal = tokio::task::spawn_blocking(move || {
            sec.authenticate(user.as_deref(), password.as_deref())
        })
        .await?
        .map_err(|e| anyhow!("{e}"))?;
        if !security.is_admin(&principal) {
            bail!("user '{principal}' does not have the admin permission on '>'");
        }
    }
    match req.cmd.as_str() {
        "shutdown" => {
            tracing::info!("shutdown requested through the admin port");
            let _ = shutdown.send(true);
            Ok(json!("shutting down"))
        }
        "user_add" => {
            security.add_user(arg(&req, "name")?, arg(&req, "password")?).await?;
            Ok(json!(format!("user '{}' added", arg(&req, "name")?)))
        }
        "user_passwd" => {
            security.set_password(arg(&req, "name")?, arg(&req, "password")?).await?;
            Ok(json!(format!("password of '{}' changed", arg(&req, "name")?)))
        }
        "user_remove" => {
            security.remove_user(arg(&req, "name")?).await?;
            Ok(json!(format!("user '{}' removed", arg(&req, "name")?)))
        }
        "user_list" => Ok(json!(security.users())),
        "acl_grant" | "acl_revoke" => {
            let (principal, pattern, perms) = (arg(&req, "principal")?, arg(&req, "pattern")?, arg(&req, "permissions")?);
            if req.cmd == "acl_grant" {
                security.grant(principal, pattern, perms).await?;
            } else {
                security.revoke(principal, pattern, perms).await?;
            }
            Ok(json!(format!("{} {perms} on {pattern} for {principal}", if req.cmd == "acl_grant" { "granted" } else { "revoked" })))
        }
        "acl_list" => Ok(json!(security
            .acls()
            .into_iter()
            .map(|a| json!({ "principal": a.principal, "pattern": a.pattern, "permissions": a.permissions }))
            .collect::<Vec<_>>())),
        other => bail!("unknown admin command '{other}'"),
    }
}

async fn status(broker: Option<&Broker>, ctx: &AdminCtx) -> Result<Value> {
    let info = &ctx.info;
    let mut v = json!({
        "name": info.name,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "state": "RUNNING",
        "uptime_s": info.started.elapsed().as_secs(),
        "client_addr": info.client_addr,
        "db_path": info.db_path,
    });
    if let Some(broker) = broker {
        let stats = broker.stats().await?;
        let extra = json!({
            "store_sequence": stats.store_sequence,
            "sessions": stats.sessions,
            "messages_in": stats.messages_in,
            "messages_out": stats.messages_out,
            "dead_lettered": stats.dead_lettered,
            "expired": stats.expired,
            "duplicates": stats.duplicates,
            "producers": stats.producers,
            "queues": stats.queues.iter().map(|q| json!({
                "name": q.name, "pending": q.pending, "inflight": q.inflight,
                "consumers": q.consumers, "enqueued": q.enqueued, "dequeued": q.dequeued,
            })).collect::<Vec<_>>(),
        });
        if let (Some(obj), Some(add)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(add.clone());
        }
    }
    if let Some(ha) = &ctx.ha {
        let mut ha = ha.borrow().clone();
        if let Some(since) = ha.get("since_ms").and_then(Value::as_u64) {
            let in_state = fmq_broker::message::now_ms().saturating_sub(since);
            if let Some(obj) = ha.as_object_mut() {
                obj.insert("in_state_ms".into(), json!(in_state));
            }
        }
        if let Some(obj) = v.as_object_mut() {
            if let Some(state) = ha.get("state").and_then(Value::as_str) {
                obj.insert("state".into(), json!(state));
            }
            obj.insert("ha".into(), ha);
        }
    }
    Ok(v)
}

/// Sends one request to a server's admin port and returns its `data`.
pub async fn call(host: &str, port: u16, req: &Request) -> Result<Value> {
    let mut stream = TcpStream::connect((host, port)).await.with_context(|| {
        format!("no FerroMQ server answers on admin port {host}:{port} (is it running?)")
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stream).read_line(&mut response),
    )
    .await
    .map_err(|_| anyhow!("admin port {host}:{port} did not answer within 30 s"))??;
    let value: Value = serde_json::from_str(&response).with_context(|| {
        format!("admin port {host}:{port} sent something that is not a FerroMQ answer")
    })?;
    if value.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(value.get("data").cloned().unwrap_or(Value::Null))
    } else {
        bail!(
            "{}",
            value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the server refused the request")
        )
    }
}

/// Human-readable `fmq status`.
pub fn format_status(v: &Value) -> String {
    let s = |k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    let mut out = format!(
        "Server:       {} {} (pid {})\nState:        {} (up {} s)\nClient port:  {}\n",
        s("name"),
        s("version"),
        s("pid"),
        s("state"),
        s("uptime_s"),
        s("client_addr"),
    );
    if v.get("store_sequence").is_some() {
        out.push_str(&format!(
            "Store:        {} (sequence {})\nSessions:     {}\nMessages:     in {}, out {}, dead-lettered {}, expired {}, duplicates dropped {}\nProducers:    {} with a dedupe mark\n",
            s("db_path"), s("store_sequence"), s("sessions"), s("messages_in"), s("messages_out"),
            s("dead_lettered"), s("expired"), s("duplicates"), s("producers"),
        ));
    } else if v.pointer("/ha/mode").and_then(Value::as_str) == Some("replicated") {
        out.push_str(&format!(
            "Store:        {} (replica, sequence {})\n",
            s("db_path"),
            v.pointer("/ha/position/sequence")
                .map(ToString::to_string)
                .unwrap_or_default()
        ));
    } else {
        out.push_str(&format!(
            "Store:        {} (not open on this server)\n",
            s("db_path")
        ));
    }
    if let Some(ha) = v.get("ha") {
        let h = |k: &str| {
            ha.get(k)
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| x.to_string())
                })
                .unwrap_or_default()
        };
        out.push_str(&format!(
            "HA:           {} {} (previous {}, {} ms in state), peer {}\nLock:         holder {}, epoch {}\nGateway:      {}\n",
            h("role"), h("state"), h("previous"), h("in_state_ms"), h("peer"), h("lock_holder"), h("lock_epoch"),
            if ha.get("gateway_reachable").and_then(Value::as_bool) == Some(true) { "reachable" } else { "NOT reachable" },
        ));
        if let Some(p) = ha.get("position").filter(|p| !p.is_null()) {
            let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            out.push_str(&format!(
                "Replication:  {}, repository epoch {} sequence {}",
                h("replication"),
                n(p, "epoch"),
                n(p, "sequence")
            ));
            if let Some(t) = ha.get("to_passive").filter(|t| !t.is_null()) {
                out.push_str(&format!(
                    "; passive confirmed {}, lag {} batches / {} bytes / {:.3} s{}",
                    n(t, "acked_sequence"),
                    n(t, "lag_batches"),
                    n(t, "lag_bytes"),
                    t.get("lag_seconds").and_then(Value::as_f64).unwrap_or(0.0),
                    if t.get("waiting_for_passive").and_then(Value::as_bool) == Some(true) {
                        " (receipts wait for the passive)"
                    } else {
                        ""
                    }
                ));
            }
            if let Some(c) = ha.get("catch_up").filter(|c| !c.is_null()) {
                out.push_str(&format!(
                    "; catching up: applied {} at {:.0} batches/s",
                    n(c, "applied"),
                    c.get("batches_per_s")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0)
                ));
            }
            out.push('\n');
            if let Some(d) = ha.get("diverged").and_then(Value::as_array) {
                for f in d {
                    out.push_str(&format!(
                        "Diverged:     batches {}..={} saved to {} (fmq diverged show FILE)\n",
                        n(f, "from"),
                        n(f, "to"),
                        f.get("file").and_then(Value::as_str).unwrap_or("?")
                    ));
                }
            }
        }
    }
    if let Some(queues) = v.get("queues").and_then(Value::as_array) {
        if !queues.is_empty() {
            out.push_str(&format!(
                "{:<40} {:>9} {:>9} {:>9} {:>10} {:>10}\n",
                "QUEUE", "PENDING", "INFLIGHT", "CONSUMERS", "ENQUEUED", "DEQUEUED"
            ));
            for q in queues {
                let n = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
                out.push_str(&format!(
                    "{:<40} {:>9} {:>9} {:>9} {:>10} {:>10}\n",
                    q.get("name").and_then(Value::as_str).unwrap_or("?"),
                    n("pending"),
                    n("inflight"),
                    n("consumers"),
                    n("enqueued"),
                    n("dequeued")
                ));
            }
        }
    }
    out
}
