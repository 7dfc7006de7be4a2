//! `fmq diverged show|replay FILE`: the operator's tools for the batches a
//! replicated server saved aside when its history diverged from the
//! active's (see `fmq_ha::replication::save_divergent`).
//!
//! `show` lists every batch and, for messages, their destination, headers
//! and body. `replay` re-sends to a running server the messages the
//! divergent history accepted and had not delivered by its end (messages
//! it accepted and also consumed are skipped unless asked for), each with
//! a receipt, so an operator can merge the lost side back in one command.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fmq_broker::message::Message;
use fmq_proto::{Command, Frame, Item, StompCodec};
use fmq_store::{Cf, Op};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// What a divergent history did to one message.
#[derive(Debug)]
struct Fate {
    message: Message,
    /// Sequence of the batch that stored it.
    stored_in: u64,
    /// Sequence of the batch that removed it (consumed, expired or moved),
    /// if the divergent history did.
    removed_in: Option<u64>,
}

fn message_id(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// A divergent-batches file, read: its header, its batches, and what they
/// did to each message.
struct Divergent {
    header: serde_json::Value,
    batches: Vec<(u64, fmq_store::Batch)>,
    fates: BTreeMap<u64, Fate>,
}

fn fates(path: &Path) -> Result<Divergent> {
    let (header, batches) = fmq_ha::replication::read_divergent(path).map_err(|e| anyhow!(e))?;
    let mut fates: BTreeMap<u64, Fate> = BTreeMap::new();
    for (seq, batch) in &batches {
        for op in batch.ops() {
            match op {
                Op::Put {
                    cf: Cf::Messages,
                    key,
                    value,
                } => {
                    let id = message_id(key).ok_or_else(|| {
                        anyhow!("batch {seq}: message key of {} bytes", key.len())
                    })?;
                    let message = Message::decode(id, value)
                        .map_err(|e| anyhow!("batch {seq}: message {id}: {e}"))?;
                    fates.insert(
                        id,
                        Fate {
                            message,
                            stored_in: *seq,
                            removed_in: None,
                        },
                    );
                }
                Op::Delete {
                    cf: Cf::Messages,
                    key,
                } => {
                    if let Some(f) = message_id(key).and_then(|id| fates.get_mut(&id)) {
                        f.removed_in = Some(*seq);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Divergent {
        header,
        batches,
        fates,
    })
}

fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if bytes.len() > max {
        out.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    out
}

/// `fmq diverged show FILE`.
pub fn show(path: &Path, json: bool) -> Result<()> {
    let Divergent {
        header,
        batches,
        fates,
    } = fates(path)?;
    let mut out = String::new();
    if json {
        let messages: Vec<serde_json::Value> = fates
            .values()
            .map(|f| {
                serde_json::json!({
                    "id": f.message.id,
                    "destination": f.message.destination.to_string(),
                    "stored_in": f.stored_in,
                    "removed_in": f.removed_in,
                    "persistent": f.message.persistent,
                    "priority": f.message.priority,
                    "headers": f.message.headers.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<BTreeMap<_, _>>(),
                    "body": String::from_utf8_lossy(&f.message.body),
                })
            })
            .collect();
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({"header": header, "batches": batches.len(), "messages": messages})
        );
        return emit(&out);
    }
    let _ = writeln!(out, "divergent batches in {}", path.display());
    let _ = writeln!(out, "  {header}");
    for (seq, batch) in &batches {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for op in batch.ops() {
            let (what, cf) = match op {
                Op::Put { cf, .. } => ("put", cf),
                Op::Delete { cf, .. } => ("delete", cf),
            };
            *kinds.entry(format!("{what} {}", cf.name())).or_default() += 1;
        }
        let summary: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = writeln!(out, "batch {seq}: {}", summary.join(", "));
    }
    let pending = fates.values().filter(|f| f.removed_in.is_none()).count();
    let _ = writeln!(out,
        "{} messages accepted by the divergent history; {pending} still undelivered at its end (what `fmq diverged replay` re-sends):",
        fates.len()
    );
    for f in fates.values() {
        let state = match f.removed_in {
            None => "undelivered".to_owned(),
            Some(s) => format!("removed in batch {s}"),
        };
        let _ = writeln!(
            out,
            "  message {} -> {} (batch {}, {state}) headers [{}] body {}",
            f.message.id,
            f.message.destination,
            f.stored_in,
            f.message
                .headers
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            printable(&f.message.body, 80)
        );
    }
    emit(&out)
}

/// Prints `text`; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Options of `fmq diverged replay`.
#[derive(Debug)]
pub struct Replay<'a> {
    pub path: &'a Path,
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub include_removed: bool,
    /// Strip the producer id and sequence, so dedupe does not drop them.
    pub ignore_dedupe: bool,
    pub dry_run: bool,
}

/// `fmq diverged replay FILE`: re-sends the messages, each with a receipt.
pub async fn replay(opts: Replay<'_>) -> Result<()> {
    let Divergent { fates, .. } = fates(opts.path)?;
    let chosen: Vec<&Fate> = fates
        .values()
        .filter(|f| opts.include_removed || f.removed_in.is_none())
        .collect();
    if opts.dry_run {
        for f in &chosen {
            println!(
                "would send message {} to {}",
                f.message.id, f.message.destination
            );
        }
        println!("{} messages would be re-sent", chosen.len());
        return Ok(());
    }
    let addr = format!("{}:{}", opts.host, opts.port);
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let mut wire = Framed::new(stream, StompCodec::default());
    let connect = Frame::new(Command::Connect)
        .header("accept-version", "1.2")
        .header("host", opts.host)
        .header("login", opts.user)
        .header("passcode", opts.password);
    wire.send(Item::Frame(connect)).await?;
    match next_frame(&mut wire).await? {
        f if f.command == Command::Connected => {}
        f => bail!(
            "{addr} refused the connection: {}",
            f.get("message").unwrap_or("no message")
        ),
    }
    let file = opts.path.display().to_string();
    let mut duplicates = 0usize;
    for f in &chosen {
        let m = &f.message;
        let mut frame = Frame::new(Command::Send)
            .header("destination", m.destination.to_string())
            .header("persistent", if m.persistent { "true" } else { "false" })
            .header("priority", m.priority.to_string())
            .header("receipt", format!("replay-{}", m.id))
            .header("fmq-replayed-from", format!("{file}#{}", m.id));
        if m.expires != 0 {
            frame = frame.header("expires", m.expires.to_string());
        }
        for (k, v) in m.headers.iter() {
            if opts.ignore_dedupe && (k == "fmq-producer-id" || k == "fmq-sequence") {
                // Kept for the record, under names dedupe does not read.
                frame = frame.header(format!("fmq-replayed-{}", &k[4..]), v);
                continue;
            }
            frame = frame.header(k, v);
        }
        frame = frame
            .header("content-length", m.body.len().to_string())
            .with_body(m.body.clone());
        wire.send(Item::Frame(frame)).await?;
        let answer = next_frame(&mut wire).await?;
        match answer.command {
            Command::Receipt if answer.get("fmq-duplicate") == Some("true") => {
                duplicates += 1;
                println!(
                    "message {} to {}: dropped as a duplicate (its producer already sent it; --ignore-dedupe re-sends it anyway)",
                    m.id, m.destination
                );
            }
            Command::Receipt => {}
            _ => bail!(
                "message {} to {} was refused: {}",
                m.id,
                m.destination,
                answer.get("message").unwrap_or("no message")
            ),
        }
    }
    let _ = wire
        .send(Item::Frame(Frame::new(Command::Disconnect)))
        .await;
    println!(
        "{} messages re-sent to {addr}, {duplicates} of them dropped as duplicates",
        chosen.len()
    );
    Ok(())
}

async fn next_frame(wire: &mut Framed<TcpStream, StompCodec>) -> Result<Frame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), wire.next()).await {
            Err(_) => bail!("no answer from the server within 30 s"),
            Ok(None) => bail!("the server closed the connection"),
            Ok(Some(Err(e))) => bail!("reading from the server: {e}"),
            Ok(Some(Ok(Item::HeartBeat))) => {}
            Ok(Some(Ok(Item::Frame(f)))) => return Ok(f),
        }
    }
}
