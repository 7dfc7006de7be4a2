//! Atomic write batches and their wire encoding.
//!
//! A [`Batch`] is the unit of every state change in FerroMQ: a SEND of a
//! persistent message, an ACK, a COMMIT, a new user. The store applies a batch
//! all-or-nothing and gives it the next sequence number. The same encoded
//! bytes are what replication ships to a passive server, so the encoding is
//! explicit, versioned and independent of the storage engine.

use crate::error::{Error, Result};

/// Column families: one per kind of object the broker keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Cf {
    /// Message bodies and headers, keyed by message id.
    Messages = 0,
    /// Queue and durable-subscription entries that reference messages.
    QueueEntries = 1,
    /// Durable topic subscriptions.
    Subscriptions = 2,
    /// Users and their password hashes.
    Principals = 3,
    /// Access-control entries.
    Acls = 4,
    /// Destinations and other administered objects.
    Destinations = 5,
    /// Store metadata: sequence number, epoch, id counters.
    Meta = 6,
    /// Per-producer high-water marks for duplicate detection.
    Dedupe = 7,
    /// The batch log: recent batches by sequence number (8 bytes,
    /// big-endian), each as its [`Batch::encode`] bytes. Written by the store
    /// itself alongside every batch it applies, when it keeps a log; callers
    /// never write it. A passive server catches up from it (see
    /// [`Store::read_log`](crate::Store::read_log)).
    Log = 8,
}

impl Cf {
    /// Every column family, in tag order.
    pub const ALL: [Cf; 9] = [
        Cf::Messages,
        Cf::QueueEntries,
        Cf::Subscriptions,
        Cf::Principals,
        Cf::Acls,
        Cf::Destinations,
        Cf::Meta,
        Cf::Dedupe,
        Cf::Log,
    ];

    /// The column family's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Messages => "messages",
            Cf::QueueEntries => "queue_entries",
            Cf::Subscriptions => "subscriptions",
            Cf::Principals => "principals",
            Cf::Acls => "acls",
            Cf::Destinations => "destinations",
            Cf::Meta => "meta",
            Cf::Dedupe => "dedupe",
            Cf::Log => "replication_log",
        }
    }

    /// The column family with this tag.
    pub fn from_tag(tag: u8) -> Option<Cf> {
        Cf::ALL.get(usize::from(tag)).copied()
    }
}

/// One operation in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or overwrite `key` in `cf`.
    Put {
        /// Column family.
        cf: Cf,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove `key` from `cf` (no error if absent).
    Delete {
        /// Column family.
        cf: Cf,
        /// Key bytes.
        key: Vec<u8>,
    },
}

/// An ordered set of operations applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
    sync: bool,
}

const ENCODING_VERSION: u8 = 1;

impl Batch {
    /// An empty batch that does not ask for a sync.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
    }

    /// Adds a delete.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete {
            cf,
            key: key.into(),
        });
    }

    /// Asks that the batch be on stable storage before its commit resolves.
    /// Batches without it are still applied in order, and become durable with
    /// the next synced batch (or within the store's background sync period).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Whether this batch asks for a sync.
    pub fn sync(&self) -> bool {
        self.sync
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends all operations of `other`; the result syncs if either did.
    pub fn extend(&mut self, other: Batch) {
        self.sync |= other.sync;
        self.ops.extend(other.ops);
    }

    /// Encodes the batch: version byte, sync flag, op count, then for each op
    /// a kind byte, the column family tag and length-prefixed key and value.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => 10 + key.len() + value.len(),
                Op::Delete { key, .. } => 6 + key.len(),
            })
            .sum();
        let mut out = Vec::with_capacity(6 + size);
        out.push(ENCODING_VERSION);
        out.push(u8::from(self.sync));
        out.extend_from_slice(&(self.ops.len() as u32).to_be_bytes());
        for op in &self.ops {
            match op {
                Op::Put { cf, key, value } => {
                    out.push(1);
                    out.push(*cf as u8);
                    put_bytes(&mut out, key);
                    put_bytes(&mut out, value);
                }
                Op::Delete { cf, key } => {
                    out.push(2);
                    out.push(*cf as u8);
                    put_bytes(&mut out, key);
                }
            }
        }
        out
    }

    /// Decodes bytes made by [`Batch::encode`].
    pub fn decode(mut input: &[u8]) -> Result<Batch> {
        let version = take_u8(&mut input)?;
        if version != ENCODING_VERSION {
            return Err(Error::Corrupt(format!(
                "batch encoding version {version}, expected {ENCODING_VERSION}"
            )));
        }
        let sync = take_u8(&mut input)? != 0;
        let count = take_u32(&mut input)? as usize;
        let mut ops = Vec::with_capacity(count.min(input.len() / 6));
        for _ in 0..count {
            let kind = take_u8(&mut input)?;
            let tag = take_u8(&mut input)?;
            let cf = Cf::from_tag(tag)
                .ok_or_else(|| Error::Corrupt(format!("unknown column family tag {tag}")))?;
            let key = take_bytes(&mut input)?;
            match kind {
                1 => {
                    let value = take_bytes(&mut input)?;
                    ops.push(Op::Put { cf, key, value });
                }
                2 => ops.push(Op::Delete { cf, key }),
                other => return Err(Error::Corrupt(format!("unknown batch op kind {other}"))),
            }
        }
        if !input.is_empty() {
            return Err(Error::Corrupt(format!(
                "{} trailing bytes after batch",
                input.len()
            )));
        }
        Ok(Batch { ops, sync })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take_u8(input: &mut &[u8]) -> Result<u8> {
    let (&b, rest) = input
        .split_first()
        .ok_or_else(|| Error::Corrupt("batch truncated".into()))?;
    *input = rest;
    Ok(b)
}

fn take_u32(input: &mut &[u8]) -> Result<u32> {
    if input.len() < 4 {
        return Err(Error::Corrupt("batch truncated".into()));
    }
    let (head, rest) = input.split_at(4);
    *input = rest;
    Ok(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
}

fn take_bytes(input: &mut &[u8]) -> Result<Vec<u8>> {
    let len = take_u32(input)? as usize;
    if input.len() < len {
        return Err(Error::Corrupt(format!(
            "batch field of {len} bytes truncated at {}",
            input.len()
        )));
    }
    let (head, rest) = input.split_at(len);
    *input = rest;
    Ok(head.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_op() -> impl Strategy<Value = Op> {
        let cf = (0u8..9).prop_map(|t| Cf::from_tag(t).expect("tag in range"));
        let bytes = proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (cf.clone(), bytes.clone(), bytes.clone()).prop_map(|(cf, key, value)| Op::Put {
                cf,
                key,
                value
            }),
            (cf, bytes).prop_map(|(cf, key)| Op::Delete { cf, key }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(ops in proptest::collection::vec(arb_op(), 0..20), sync: bool) {
            let batch = Batch { ops, sync };
            let decoded = Batch::decode(&batch.encode()).expect("decodes");
            prop_assert_eq!(decoded, batch);
        }

        #[test]
        fn truncated_input_is_an_error_not_a_panic(ops in proptest::collection::vec(arb_op(), 1..8), cut in 0usize..200) {
            let bytes = Batch { ops, sync: true }.encode();
            let cut = cut % bytes.len();
            prop_assert!(Batch::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn tags_and_names_match_all() {
        for (tag, cf) in (0u8..).zip(Cf::ALL) {
            assert_eq!(cf as u8, tag);
            assert_eq!(Cf::from_tag(tag), Some(cf));
        }
        assert_eq!(Cf::from_tag(9), None);
        assert_eq!(Cf::Log.name(), "replication_log");
        let mut names: Vec<_> = Cf::ALL.iter().map(|cf| cf.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Cf::ALL.len());
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut bytes = Batch::new().encode();
        bytes[0] = 9;
        let err = Batch::decode(&bytes).expect_err("must reject");
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
