//! A scripted STOMP server for the durable-connection tests: it can play
//! an active server (answers CONNECTED and receipts), a standby one
//! (refuses CONNECT with the HA front's ERROR), or a dead one (drops every
//! connection), switch between them at run time, drop its connections,
//! record every frame it receives and deliver MESSAGE frames. It keeps the
//! broker's marks for COMMIT keys (`fmq-producer-id`/`fmq-sequence`): a
//! COMMIT whose key is not above its mark is receipted with
//! `fmq-duplicate:true`. A replica shares its marks, as the servers of a
//! replicated pair do.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fmq_proto::{Command, Frame, Item, StompCodec};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves: CONNECTED, then RECEIPTs.
    Active,
    /// Refuses CONNECT the way a standby FerroMQ server does.
    Passive,
    /// Accepts TCP and hangs up at once (a server that is down).
    Down,
}

/// Failures to inject while active.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Hang up on every SEND (after recording it), without a receipt.
    pub drop_on_send: bool,
    /// Hang up on every COMMIT (after recording it), without applying it
    /// or answering it: a server that dies as the COMMIT arrives.
    pub drop_on_commit: bool,
    /// Apply every COMMIT (its key's mark moves), then hang up without the
    /// receipt: a server that dies once the COMMIT is stored.
    pub lose_commit_receipt: bool,
}

/// The ERROR a standby FerroMQ server answers CONNECT with.
pub fn passive_message(state: &str) -> String {
    format!("server is {state}: it does not accept clients now; connect to the active server")
}

struct State {
    mode: Mutex<Mode>,
    faults: Mutex<Faults>,
    frames: Mutex<Vec<Frame>>,
    arrived: Notify,
    conns: Mutex<Vec<Option<mpsc::UnboundedSender<Control>>>>,
    /// (connection index, subscription id, destination) of each SUBSCRIBE.
    subs: Mutex<Vec<(usize, String, String)>>,
    connects: Mutex<usize>,
    /// COMMIT key marks: producer id -> highest sequence applied.
    marks: Arc<Mutex<HashMap<String, u64>>>,
}

enum Control {
    Deliver(Frame),
    Drop,
}

/// A running fake server.
#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Fake {
    pub async fn start(mode: Mode) -> Fake {
        Self::start_with(mode, Arc::default()).await
    }

    /// A server sharing `of`'s COMMIT key marks (its replicated peer).
    pub async fn start_replica(mode: Mode, of: &Fake) -> Fake {
        Self::start_with(mode, of.state.marks.clone()).await
    }

    async fn start_with(mode: Mode, marks: Arc<Mutex<HashMap<String, u64>>>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode: Mutex::new(mode),
            faults: Mutex::new(Faults::default()),
            frames: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            conns: Mutex::new(Vec::new()),
            subs: Mutex::new(Vec::new()),
            connects: Mutex::new(0),
            marks,
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, s.clone()));
            }
        });
        Fake { addr, state }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap() = faults;
    }

    /// Hangs up every open connection (as a crashing server would).
    pub fn drop_connections(&self) {
        for c in self.state.conns.lock().unwrap().iter_mut() {
            if let Some(c) = c.take() {
                let _ = c.send(Control::Drop);
            }
        }
    }

    /// Number of CONNECT frames answered with CONNECTED.
    pub fn connects(&self) -> usize {
        *self.state.connects.lock().unwrap()
    }

    /// Every frame received so far (CONNECT excluded).
    pub fn frames(&self) -> Vec<Frame> {
        self.state.frames.lock().unwrap().clone()
    }

    /// The frames with this command.
    pub fn frames_of(&self, command: Command) -> Vec<Frame> {
        self.frames()
            .into_iter()
            .filter(|f| f.command == command)
            .collect()
    }

    /// Waits until `n` frames with `command` arrived; returns them.
    pub async fn wait_for(&self, command: Command, n: usize) -> Vec<Frame> {
        let wait = async {
            loop {
                let notified = self.state.arrived.notified();
                let got = self.frames_of(command);
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(f) => f,
            Err(_) => panic!(
                "{command} x{n} never arrived at {}; got {:?}",
                self.addr,
                self.frames()
            ),
        }
    }

    /// Delivers a MESSAGE to the last subscription made to `destination`.
    pub fn deliver(
        &self,
        destination: &str,
        message_id: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) {
        let (conn, sub) = {
            let subs = self.state.subs.lock().unwrap();
            let (conn, sub, _) = subs
                .iter()
                .rev()
                .find(|(_, _, d)| d == destination)
                .unwrap_or_else(|| panic!("nobody subscribed to {destination}"))
                .clone();
            (conn, sub)
        };
        let mut frame = Frame::new(Command::Message)
            .header("subscription", sub)
            .header("message-id", message_id)
            .header("ack", format!("ack-{message_id}"))
            .header("destination", destination);
        for (k, v) in headers {
            frame.headers.push(*k, *v);
        }
        let frame = frame.with_body(body.to_owned());
        let conns = self.state.conns.lock().unwrap();
        if let Some(c) = &conns[conn] {
            let _ = c.send(Control::Deliver(frame));
        }
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, StompCodec::default());
    let mut writer = FramedWrite::new(wr, StompCodec::default());
    let mode = *state.mode.lock().unwrap();
    if mode == Mode::Down {
        return;
    }
    let connect = loop {
        match reader.next().await {
            Some(Ok(Item::Frame(f))) => break f,
            Some(Ok(Item::HeartBeat)) => continue,
            _ => return,
        }
    };
    assert!(matches!(connect.command, Command::Connect | Command::Stomp));
    if mode == Mode::Passive {
        let frame = Frame::error(
            &passive_message("PASSIVE"),
            "this server is the standby of an HA pair",
        );
        let _ = writer.send(Item::Frame(frame)).await;
        return;
    }
    let connected = Frame::new(Command::Connected)
        .header("version", "1.2")
        .header("heart-beat", "0,0")
        .header("server", "fake/1");
    if writer.send(Item::Frame(connected)).await.is_err() {
        return;
    }
    *state.connects.lock().unwrap() += 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let index = {
        let mut conns = state.conns.lock().unwrap();
        conns.push(Some(tx));
        conns.len() - 1
    };
    loop {
        tokio::select! {
            control = rx.recv() => match control {
                Some(Control::Deliver(frame)) => {
                    if writer.send(Item::Frame(frame)).await.is_err() {
                        return;
                    }
                }
                Some(Control::Drop) | None => return,
            },
            item = reader.next() => {
                let frame = match item {
                    Some(Ok(Item::Frame(f))) => f,
                    Some(Ok(Item::HeartBeat)) => continue,
                    _ => return,
                };
                let faults = *state.faults.lock().unwrap();
                if frame.command == Command::Subscribe {
                    state.subs.lock().unwrap().push((
                        index,
                        frame.get("id").unwrap_or("").to_owned(),
                        frame.get("destination").unwrap_or("").to_owned(),
                    ));
                }
                let command = frame.command;
                let receipt = frame.get("receipt").map(str::to_owned);
                let key = frame
                    .get("fmq-producer-id")
                    .zip(frame.get("fmq-sequence"))
                    .map(|(p, s)| (p.to_owned(), s.parse::<u64>().unwrap()));
                state.frames.lock().unwrap().push(frame);
                state.arrived.notify_waiters();
                if (command == Command::Send && faults.drop_on_send)
                    || (command == Command::Commit && faults.drop_on_commit)
                {
                    return;
                }
                let duplicate = command == Command::Commit && apply_commit_key(&state, &key);
                if command == Command::Commit && faults.lose_commit_receipt {
                    return;
                }
                if let Some(r) = receipt {
                    let mut reply = Frame::new(Command::Receipt).header("receipt-id", r);
                    if duplicate {
                        reply.headers.push("fmq-duplicate", "true");
                    }
                    if writer.send(Item::Frame(reply)).await.is_err() {
                        return;
                    }
                }
                if command == Command::Disconnect {
                    return;
                }
            }
        }
    }
}

/// Checks a COMMIT's key against the marks, moving the mark when fresh.
/// Returns whether the COMMIT is a duplicate.
fn apply_commit_key(state: &State, key: &Option<(String, u64)>) -> bool {
    let Some((producer, sequence)) = key else {
        return false;
    };
    let mut marks = state.marks.lock().unwrap();
    let mark = marks.entry(producer.clone()).or_insert(0);
    if *sequence <= *mark {
        return true;
    }
    *mark = *sequence;
    false
}
