//! The frame model: [`Command`], [`Headers`] and [`Frame`].
//!
//! Frames are plain data. Escaping, `content-length` and limits are the
//! codec's business, so code that builds or inspects frames never sees wire
//! encoding details.

use std::fmt;

use bytes::Bytes;

/// A STOMP command: the first line of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Client opens a session (STOMP 1.0 spelling).
    Connect,
    /// Client opens a session (1.1+ spelling, identical to CONNECT).
    Stomp,
    /// Server accepts a session.
    Connected,
    /// Client publishes a message.
    Send,
    /// Client subscribes to a destination.
    Subscribe,
    /// Client cancels a subscription.
    Unsubscribe,
    /// Client starts a transaction.
    Begin,
    /// Client commits a transaction.
    Commit,
    /// Client rolls back a transaction.
    Abort,
    /// Client acknowledges a message.
    Ack,
    /// Client rejects a message.
    Nack,
    /// Client ends the session gracefully.
    Disconnect,
    /// Server delivers a message to a subscription.
    Message,
    /// Server confirms a frame carrying a `receipt` header.
    Receipt,
    /// Server reports a problem (and then usually closes).
    Error,
}

impl Command {
    /// Every command, for exhaustive tests and generators.
    pub const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Connected,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Ack,
        Command::Nack,
        Command::Disconnect,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    /// The command as written on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Connected => "CONNECTED",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Disconnect => "DISCONNECT",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// Parses a command line (without its EOL). Commands are case-sensitive.
    pub fn from_bytes(b: &[u8]) -> Option<Command> {
        Some(match b {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"CONNECTED" => Command::Connected,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"DISCONNECT" => Command::Disconnect,
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"ERROR" => Command::Error,
            _ => return None,
        })
    }

    /// Whether header values of this command are escaped on the wire.
    ///
    /// CONNECT, STOMP and CONNECTED are never escaped so that a 1.0 peer can
    /// still read them before a version has been negotiated.
    pub fn escapes_headers(&self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }

    /// Whether the spec allows this command to carry a body (SEND, MESSAGE
    /// and ERROR). The codec does not enforce this; the broker decides.
    pub fn allows_body(&self) -> bool {
        matches!(self, Command::Send | Command::Message | Command::Error)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Frame headers in wire order, repeats included.
///
/// STOMP 1.2: "If a client or a server receives repeated frame header entries,
/// only the first header entry SHOULD be used as the value of header entry."
/// [`get`](Self::get) implements that rule; the later entries are kept so a
/// relayed frame is forwarded unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in wire order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Appends a header, keeping any earlier entries with the same name
    /// (which therefore still win on [`get`](Self::get)).
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// Replaces every entry named `name` by one entry, at the position of the
    /// first one (or at the end if there was none).
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                self.0[i].1 = value;
                let mut idx = 0;
                self.0.retain(|(n, _)| {
                    let keep = idx <= i || *n != name;
                    idx += 1;
                    keep
                });
            }
            None => self.0.push((name, value)),
        }
    }

    /// Removes every entry named `name` and returns the first value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        let (_, first) = self.0.remove(i);
        self.0.retain(|(n, _)| n != name);
        Some(first)
    }

    /// Whether at least one entry is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// All entries in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of entries (repeats counted).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers(
            iter.into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        )
    }
}

impl IntoIterator for Headers {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// One STOMP frame.
///
/// The body is [`Bytes`] so the decoder can hand it out without copying and
/// the broker can fan a message out to many subscribers by reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command line.
    pub command: Command,
    /// Headers, unescaped, in wire order.
    pub headers: Headers,
    /// Raw body octets (may contain NULs when sent with `content-length`).
    pub body: Bytes,
}

impl Frame {
    /// A frame with no headers and no body.
    pub fn new(command: Command) -> Self {
        Frame {
            command,
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }

    /// Builder: appends a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(name, value);
        self
    }

    /// Builder: sets the body.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// An ERROR frame with a short `message` header and a plain-text body.
    ///
    /// Line breaks in `message` are replaced by spaces: the spec asks for a
    /// short description, and a 1.0 peer could not receive them escaped.
    pub fn error(message: &str, detail: &str) -> Frame {
        let message: String = message
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        Frame::new(Command::Error)
            .header("message", message)
            .header("content-type", "text/plain")
            .with_body(detail.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trips_through_text() {
        for c in Command::ALL {
            assert_eq!(Command::from_bytes(c.as_str().as_bytes()), Some(c));
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(Command::from_bytes(b"send"), None);
        assert_eq!(Command::from_bytes(b"SEND "), None);
        assert_eq!(Command::from_bytes(b""), None);
    }

    #[test]
    fn first_repeated_header_wins() {
        let mut h = Headers::new();
        h.push("foo", "World");
        h.push("foo", "Hello");
        assert_eq!(h.get("foo"), Some("World"));
        assert_eq!(h.get_all("foo").collect::<Vec<_>>(), ["World", "Hello"]);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn set_replaces_all_at_first_position() {
        let mut h: Headers = [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")]
            .into_iter()
            .collect();
        h.set("a", "x");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("a", "x"), ("b", "2"), ("c", "4")]
        );
        h.set("d", "5");
        assert_eq!(h.get("d"), Some("5"));
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn remove_returns_first_and_drops_all() {
        let mut h: Headers = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(h.remove("a"), Some("1".to_owned()));
        assert!(!h.contains("a"));
        assert_eq!(h.remove("a"), None);
        assert_eq!(h.len(), 1);
        assert!(!h.is_empty());
    }

    #[test]
    fn error_frame_shape() {
        let f = Frame::error("bad\nthing", "details here");
        assert_eq!(f.command, Command::Error);
        assert_eq!(f.get("message"), Some("bad thing"));
        assert_eq!(f.get("content-type"), Some("text/plain"));
        assert_eq!(&f.body[..], b"details here");
    }

    #[test]
    fn builder() {
        let f = Frame::new(Command::Send)
            .header("destination", "/queue/a")
            .with_body(&b"hi"[..]);
        assert_eq!(f.get("destination"), Some("/queue/a"));
        assert_eq!(&f.body[..], b"hi");
        assert!(f.command.allows_body());
        assert!(!Command::Subscribe.allows_body());
        assert!(!Command::Connect.escapes_headers());
        assert!(Command::Send.escapes_headers());
    }
}
