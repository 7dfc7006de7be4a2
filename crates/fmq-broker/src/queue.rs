//! The in-memory side of a queue: pending entries by priority, the entries
//! delivered and not yet acknowledged, and the consumers attached.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use fmq_selector::Selector;

use crate::message::Entry;

/// Identifies a queue in memory and in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKey {
    /// `/queue/NAME`.
    Named(Arc<str>),
    /// A durable topic subscription: client-id and subscription name.
    Durable(Arc<str>, Arc<str>),
    /// A non-durable topic subscription: session and subscription id.
    /// Never stored.
    Temp(u64, Arc<str>),
}

impl QueueKey {
    /// Whether its entries are kept in the store.
    pub fn persistent(&self) -> bool {
        !matches!(self, QueueKey::Temp(..))
    }

    /// Stored form: `q:NAME` or `d:CLIENT\0NAME`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            QueueKey::Named(n) => [b"q:", n.as_bytes()].concat(),
            QueueKey::Durable(c, n) => [b"d:", c.as_bytes(), b"\0", n.as_bytes()].concat(),
            QueueKey::Temp(s, n) => format!("t:{s}\0{n}").into_bytes(),
        }
    }

    /// Parses [`QueueKey::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<QueueKey> {
        let text = std::str::from_utf8(bytes).ok()?;
        if let Some(name) = text.strip_prefix("q:") {
            return Some(QueueKey::Named(name.into()));
        }
        let rest = text.strip_prefix("d:")?;
        let (client, name) = rest.split_once('\0')?;
        Some(QueueKey::Durable(client.into(), name.into()))
    }

    /// Key prefix of this queue's entries in the QueueEntries family.
    pub fn entry_prefix(&self) -> Vec<u8> {
        let k = self.encode();
        let mut out = Vec::with_capacity(2 + k.len() + 8);
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(&k);
        out
    }

    /// Key of one entry.
    pub fn entry_key(&self, message_id: u64) -> Vec<u8> {
        let mut out = self.entry_prefix();
        out.extend_from_slice(&message_id.to_be_bytes());
        out
    }

    /// Splits an entry key into queue and message id.
    pub fn split_entry_key(key: &[u8]) -> Option<(QueueKey, u64)> {
        let len = usize::from(u16::from_be_bytes([*key.first()?, *key.get(1)?]));
        let qk = key.get(2..2 + len)?;
        let id: [u8; 8] = key.get(2 + len..)?.try_into().ok()?;
        Some((QueueKey::decode(qk)?, u64::from_be_bytes(id)))
    }

    /// How operators see it.
    pub fn display(&self) -> String {
        match self {
            QueueKey::Named(n) => format!("/queue/{n}"),
            QueueKey::Durable(c, n) => format!("durable {c}:{n}"),
            QueueKey::Temp(s, n) => format!("subscription {n} of session {s}"),
        }
    }
}

/// A consumer attached to a queue: a session and its subscription id.
pub type ConsumerKey = (u64, Arc<str>);

/// Priority levels (JMS 0..=9).
pub const PRIORITIES: usize = 10;

/// A queue's in-memory state.
#[derive(Debug)]
pub struct Queue {
    /// Its key.
    pub key: QueueKey,
    /// For subscriptions: the topic fed into it.
    pub topic: Option<Arc<str>>,
    /// For subscriptions: only matching messages are fed into it.
    pub selector: Option<Selector>,
    pending: [VecDeque<Entry>; PRIORITIES],
    pending_len: usize,
    /// Consumers, served round-robin.
    pub consumers: Vec<ConsumerKey>,
    /// Next consumer to try.
    pub rr: usize,
    /// Entries delivered and not yet acknowledged, by message id.
    pub inflight: HashMap<u64, Entry>,
    /// Messages ever added.
    pub enqueued: u64,
    /// Messages acknowledged, expired or dead-lettered.
    pub dequeued: u64,
}

impl Queue {
    /// An empty queue.
    pub fn new(key: QueueKey) -> Queue {
        Queue {
            key,
            topic: None,
            selector: None,
            pending: Default::default(),
            pending_len: 0,
            consumers: Vec::new(),
            rr: 0,
            inflight: HashMap::new(),
            enqueued: 0,
            dequeued: 0,
        }
    }

    /// Messages waiting for a consumer.
    pub fn pending_len(&self) -> usize {
        self.pending_len
    }

    /// Appends in FIFO order within the message's priority.
    pub fn push_back(&mut self, entry: Entry) {
        let p = usize::from(entry.message.priority.min(9));
        self.pending[p].push_back(entry);
        self.pending_len += 1;
        self.enqueued += 1;
    }

    /// Puts a redelivered entry back at the head of its priority.
    pub fn push_front(&mut self, entry: Entry) {
        let p = usize::from(entry.message.priority.min(9));
        self.pending[p].push_front(entry);
        self.pending_len += 1;
    }

    /// Takes the next entry: highest priority first, FIFO within one.
    pub fn pop_front(&mut self) -> Option<Entry> {
        for bucket in self.pending.iter_mut().rev() {
            if let Some(e) = bucket.pop_front() {
                self.pending_len -= 1;
                return Some(e);
            }
        }
        None
    }

    /// Removes and returns every pending entry, highest priority first.
    pub fn take_pending(&mut self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.pending_len);
        for bucket in self.pending.iter_mut().rev() {
            out.extend(bucket.drain(..));
        }
        self.pending_len = 0;
        out
    }

    /// Puts back entries taken with [`Queue::take_pending`], keeping order.
    pub fn restore_pending(&mut self, entries: Vec<Entry>) {
        for e in entries {
            let p = usize::from(e.message.priority.min(9));
            self.pending[p].push_back(e);
            self.pending_len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Destination;
    use crate::message::Message;
    use bytes::Bytes;
    use fmq_proto::Headers;

    fn entry(id: u64, priority: u8) -> Entry {
        Entry {
            message: Arc::new(Message {
                id,
                destination: Destination::Queue("q".into()),
                headers: Headers::new(),
                body: Bytes::new(),
                persistent: false,
                priority,
                expires: 0,
                timestamp: 0,
            }),
            deliveries: 0,
            batch: 0,
        }
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = Queue::new(QueueKey::Named("q".into()));
        q.push_back(entry(1, 4));
        q.push_back(entry(2, 9));
        q.push_back(entry(3, 4));
        q.push_front(entry(4, 4));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop_front().map(|e| e.message.id)).collect();
        assert_eq!(order, [2, 4, 1, 3]);
        assert_eq!(q.pending_len(), 0);
    }

    #[test]
    fn entry_keys_round_trip() {
        for key in [
            QueueKey::Named("orders.eu".into()),
            QueueKey::Durable("client-1".into(), "sub".into()),
        ] {
            let k = key.entry_key(77);
            assert!(k.starts_with(&key.entry_prefix()));
            assert_eq!(QueueKey::split_entry_key(&k), Some((key, 77)));
        }
        assert_eq!(QueueKey::split_entry_key(b"\0"), None);
    }
}
