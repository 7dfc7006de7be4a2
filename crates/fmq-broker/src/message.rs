//! Messages as the broker keeps them, and their stored encoding.

use std::sync::Arc;

use bytes::Bytes;
use fmq_proto::Headers;
use fmq_selector::{Properties, Value};

use crate::destination::Destination;
use crate::error::{Error, Result};

/// Default JMS priority when a SEND has no `priority` header.
pub const DEFAULT_PRIORITY: u8 = 4;

/// Headers the broker sets itself on MESSAGE frames; a SEND's values for them
/// are not passed through.
pub const BROKER_HEADERS: &[&str] = &[
    "destination",
    "message-id",
    "subscription",
    "ack",
    "content-length",
    "receipt",
    "transaction",
    "redelivered",
    "timestamp",
];

/// A message accepted by the broker. Immutable once accepted and shared
/// (`Arc`) by every queue entry that references it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Broker-assigned id, unique across restarts.
    pub id: u64,
    /// Where it was sent.
    pub destination: Destination,
    /// Application headers to pass through (reply-to, correlation-id,
    /// content-type, custom properties ...).
    pub headers: Headers,
    /// The body, unchanged.
    pub body: Bytes,
    /// Whether it survives a restart.
    pub persistent: bool,
    /// JMS priority 0 (lowest) to 9.
    pub priority: u8,
    /// Expiry in milliseconds since the Unix epoch; 0 never expires.
    pub expires: u64,
    /// Acceptance time in milliseconds since the Unix epoch.
    pub timestamp: u64,
}

impl Message {
    /// True when the message has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires != 0 && self.expires <= now_ms
    }

    /// Stored size, roughly: used for limits and statistics.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
    }

    /// Encodes for the Messages column family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.size());
        out.push(1); // encoding version
        out.push(u8::from(self.persistent));
        out.push(self.priority);
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        put_str(&mut out, &self.destination.to_string());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (k, v) in self.headers.iter() {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes what [`Message::encode`] wrote.
    pub fn decode(id: u64, bytes: &[u8]) -> Result<Message> {
        let mut r = Reader { buf: bytes };
        let version = r.u8()?;
        if version != 1 {
            return Err(corrupt(format!("message encoding version {version}")));
        }
        let persistent = r.u8()? != 0;
        let priority = r.u8()?;
        let expires = r.u64()?;
        let timestamp = r.u64()?;
        let destination = Destination::parse(&r.string()?).map_err(corrupt)?;
        let count = r.u32()?;
        let mut headers = Headers::new();
        for _ in 0..count {
            let k = r.string()?;
            let v = r.string()?;
            headers.push(k, v);
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        Ok(Message {
            id,
            destination,
            headers,
            body,
            persistent,
            priority,
            expires,
            timestamp,
        })
    }
}

fn corrupt(detail: String) -> Error {
    Error::Corrupt {
        what: "message",
        detail,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(corrupt(format!(
                "truncated: wanted {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|e| corrupt(format!("non-UTF-8 string: {e}")))
    }
}

/// The view a selector gets of a message: JMS header fields by their JMS
/// names, and every STOMP header as a string property.
#[derive(Debug)]
pub struct SelectorView<'a>(pub &'a Message);

impl Properties for SelectorView<'_> {
    fn get(&self, name: &str) -> Option<Value> {
        let m = self.0;
        match name {
            "JMSPriority" => Some(Value::Int(i64::from(m.priority))),
            "JMSTimestamp" => Some(Value::Int(m.timestamp as i64)),
            "JMSExpiration" => Some(Value::Int(m.expires as i64)),
            "JMSDeliveryMode" => Some(Value::Str(
                if m.persistent {
                    "PERSISTENT"
                } else {
                    "NON_PERSISTENT"
                }
                .into(),
            )),
            "JMSMessageID" => Some(Value::Str(format!("ID:fmq-{}", m.id))),
            "JMSCorrelationID" => m
                .headers
                .get("correlation-id")
                .map(|v| Value::Str(v.into())),
            "JMSType" => m.headers.get("type").map(|v| Value::Str(v.into())),
            "JMSReplyTo" => m.headers.get("reply-to").map(|v| Value::Str(v.into())),
            "JMSDestination" => Some(Value::Str(m.destination.to_string())),
            _ => m.headers.get(name).map(|v| Value::Str(v.into())),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message reference held by a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The message.
    pub message: Arc<Message>,
    /// How many times it has been delivered and not acknowledged.
    pub deliveries: u32,
    /// The engine's number of the store batch that wrote the message, so a
    /// delivery can wait until that write is durable; 0 when it already
    /// was (recovered from the store) or the message is not stored.
    pub batch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        let mut headers = Headers::new();
        headers.push("reply-to", "/queue/r");
        headers.push("color", "red");
        Message {
            id: 42,
            destination: Destination::Queue("a".into()),
            headers,
            body: Bytes::from_static(b"hello\0world"),
            persistent: true,
            priority: 7,
            expires: 123,
            timestamp: 99,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let m = sample();
        assert_eq!(Message::decode(42, &m.encode()).expect("decode"), m);
    }

    #[test]
    fn truncated_record_is_corrupt_not_panic() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Message::decode(1, &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn selector_view_maps_jms_fields() {
        let m = sample();
        let v = SelectorView(&m);
        assert_eq!(v.get("JMSPriority"), Some(Value::Int(7)));
        assert_eq!(v.get("color"), Some(Value::Str("red".into())));
        assert_eq!(v.get("missing"), None);
    }
}
