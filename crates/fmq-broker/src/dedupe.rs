//! Once-only sends: per-producer high-water marks.
//!
//! A SEND may name its producer (`fmq-producer-id`) and number itself
//! (`fmq-sequence`, increasing per producer). The broker remembers, per
//! producer, the highest sequence it accepted (the mark). A SEND whose
//! sequence is not above the mark is a duplicate, typically a resend after a
//! lost RECEIPT or a failover: it is acknowledged but not enqueued again.
//!
//! A COMMIT may carry the same two headers: the transaction's key. A COMMIT
//! whose key is at or below its producer's mark is a duplicate and applies
//! nothing (neither its sends nor its acks); a fresh one moves the mark in
//! the batch that holds the transaction's effects. A client that lost a
//! COMMIT's RECEIPT learns the outcome by committing an empty transaction
//! under the same key (see `docs/dedupe.md`).
//!
//! [`Marks`] is the sans-IO core: the engine calls [`Marks::check`] for each
//! SEND (or each send of a COMMIT, and each keyed COMMIT) and passes its
//! store batch, so a persistent message and its producer's mark are written
//! in one atomic, replicated batch. The record format is
//! [`fmq_store::dedupe`].
//!
//! Memory is bounded: a producer idle for longer than the retention is
//! forgotten by [`Marks::prune`], and when the table is full the producer
//! idle the longest makes room for a new one. A resend from a forgotten
//! producer is accepted again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fmq_store::dedupe::{self, Mark};
use fmq_store::{Batch, Cf};

/// SEND (and COMMIT) header naming the producer.
pub const PRODUCER_ID_HEADER: &str = "fmq-producer-id";
/// SEND (and COMMIT) header carrying the producer's sequence number.
pub const SEQUENCE_HEADER: &str = "fmq-sequence";
/// RECEIPT header set (to `true`) when the SEND, or the keyed COMMIT, was a
/// duplicate.
pub const DUPLICATE_HEADER: &str = "fmq-duplicate";
/// COMMIT RECEIPT header: how many of the transaction's sends were dropped
/// as duplicates (present only when some were).
pub const DUPLICATES_HEADER: &str = "fmq-duplicates";
/// Longest producer id, in bytes.
pub const MAX_PRODUCER_ID_LEN: usize = 128;

/// A SEND's (or a COMMIT's) producer id and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerSeq {
    /// The producer id.
    pub producer: Arc<str>,
    /// Its sequence number, at least 1.
    pub sequence: u64,
}

/// Reads a SEND's or a COMMIT's `fmq-producer-id` and `fmq-sequence`
/// headers. Both or neither must be present; the error text names the
/// header and value.
pub fn parse(
    producer: Option<&str>,
    sequence: Option<&str>,
) -> Result<Option<ProducerSeq>, String> {
    let (producer, sequence) = match (producer, sequence) {
        (None, None) => return Ok(None),
        (Some(p), None) => {
            return Err(format!(
                "{PRODUCER_ID_HEADER} header '{p}' needs an {SEQUENCE_HEADER} header"
            ))
        }
        (None, Some(s)) => {
            return Err(format!(
                "{SEQUENCE_HEADER} header '{s}' needs an {PRODUCER_ID_HEADER} header"
            ))
        }
        (Some(p), Some(s)) => (p, s),
    };
    if producer.is_empty()
        || producer.len() > MAX_PRODUCER_ID_LEN
        || producer.chars().any(char::is_control)
    {
        return Err(format!(
            "{PRODUCER_ID_HEADER} header '{producer}' is not 1 to {MAX_PRODUCER_ID_LEN} bytes of printable characters"
        ));
    }
    let sequence = Some(sequence)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            format!(
                "{SEQUENCE_HEADER} header '{sequence}' is not a whole number from 1 to {}",
                u64::MAX
            )
        })?;
    Ok(Some(ProducerSeq {
        producer: producer.into(),
        sequence,
    }))
}

/// The outcome of [`Marks::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Above the mark: accept the message (the mark has moved).
    Fresh,
    /// At or below the mark: drop the message, still answer its RECEIPT.
    Duplicate,
}

/// Running totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sends (and keyed COMMITs) dropped as duplicates.
    pub duplicates: u64,
    /// Producers forgotten after being idle longer than the retention.
    pub pruned: u64,
    /// Producers forgotten to make room for a new one.
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    sequence: u64,
    last_used_ms: u64,
    /// Whether the store may hold a record for this producer.
    stored: bool,
}

/// Every tracked producer's mark, with an index by idle time.
#[derive(Debug)]
pub struct Marks {
    entries: HashMap<Arc<str>, Entry>,
    /// (last used, producer), oldest first: what pruning and eviction take.
    idle: BTreeSet<(u64, Arc<str>)>,
    retention_ms: u64,
    max_producers: usize,
    counters: Counters,
}

impl Marks {
    /// An empty table that forgets producers idle for longer than
    /// `retention` and tracks at most `max_producers` (at least 1).
    pub fn new(retention: Duration, max_producers: usize) -> Marks {
        Marks {
            entries: HashMap::new(),
            idle: BTreeSet::new(),
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            max_producers: max_producers.max(1),
            counters: Counters::default(),
        }
    }

    /// Adds a record read from the store (recovery). Call [`Marks::prune`]
    /// afterwards to apply the retention and the size bound.
    pub fn load(&mut self, producer: &str, mark: Mark) {
        let producer: Arc<str> = producer.into();
        let entry = Entry {
            sequence: mark.sequence,
            last_used_ms: mark.last_used_ms,
            stored: true,
        };
        if let Some(old) = self.entries.insert(producer.clone(), entry) {
            self.idle.remove(&(old.last_used_ms, producer.clone()));
        }
        self.idle.insert((mark.last_used_ms, producer));
    }

    /// Whether `send` is at or below its producer's mark, i.e. what
    /// [`Marks::check`] would answer, without changing anything.
    pub fn is_duplicate(&self, send: &ProducerSeq) -> bool {
        self.entries
            .get(&send.producer)
            .is_some_and(|e| send.sequence <= e.sequence)
    }

    /// Checks one send at `now_ms`. A fresh send moves the producer's mark
    /// and, when `persist` is set (the message is persistent), puts the
    /// producer's record into `batch`, the batch that stores the message.
    /// A duplicate changes nothing but the producer's idle time in memory.
    pub fn check(
        &mut self,
        send: &ProducerSeq,
        persist: bool,
        now_ms: u64,
        batch: &mut Batch,
    ) -> Verdict {
        let key = &send.producer;
        let (verdict, entry) = match self.entries.get(key).copied() {
            Some(mut entry) => {
                self.idle.remove(&(entry.last_used_ms, key.clone()));
                // Never move backwards, so the idle index stays ordered even
                // if the clock does.
                entry.last_used_ms = entry.last_used_ms.max(now_ms);
                if send.sequence <= entry.sequence {
                    self.counters.duplicates += 1;
                    (Verdict::Duplicate, entry)
                } else {
                    entry.sequence = send.sequence;
                    (Verdict::Fresh, entry)
                }
            }
            None => {
                while self.entries.len() >= self.max_producers {
                    if !self.forget_oldest(batch) {
                        break;
                    }
                    self.counters.evicted += 1;
                }
                let entry = Entry {
                    sequence: send.sequence,
                    last_used_ms: now_ms,
                    stored: false,
                };
                (Verdict::Fresh, entry)
            }
        };
        let mut entry = entry;
        if verdict == Verdict::Fresh && persist {
            batch.put(
                Cf::Dedupe,
                dedupe::key(key),
                dedupe::encode(Mark {
                    sequence: entry.sequence,
                    last_used_ms: entry.last_used_ms,
                }),
            );
            entry.stored = true;
        }
        self.idle.insert((entry.last_used_ms, key.clone()));
        self.entries.insert(key.clone(), entry);
        verdict
    }

    /// Forgets producers idle since before `now_ms - retention`, and the
    /// longest idle ones beyond the size bound, deleting their stored
    /// records in `batch`. Returns how many were forgotten.
    pub fn prune(&mut self, now_ms: u64, batch: &mut Batch) -> usize {
        let cutoff = now_ms.saturating_sub(self.retention_ms);
        let mut forgotten = 0;
        while let Some((last_used, _)) = self.idle.first() {
            if *last_used < cutoff {
                self.counters.pruned += 1;
            } else if self.entries.len() > self.max_producers {
                self.counters.evicted += 1;
            } else {
                break;
            }
            self.forget_oldest(batch);
            forgotten += 1;
        }
        forgotten
    }

    fn forget_oldest(&mut self, batch: &mut Batch) -> bool {
        let Some((_, producer)) = self.idle.pop_first() else {
            return false;
        };
        if let Some(entry) = self.entries.remove(&producer) {
            tracing::debug!(%producer, sequence = entry.sequence, "forgetting a producer's dedupe mark");
            if entry.stored {
                batch.delete(Cf::Dedupe, dedupe::key(&producer));
            }
        }
        true
    }

    /// The producer's mark, if it is tracked.
    pub fn sequence(&self, producer: &str) -> Option<u64> {
        self.entries.get(producer).map(|e| e.sequence)
    }

    /// Number of producers tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no producer is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Totals since start.
    pub fn counters(&self) -> Counters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmq_store::Op;

    fn send(producer: &str, sequence: u64) -> ProducerSeq {
        ProducerSeq {
            producer: producer.into(),
            sequence,
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn parse_takes_both_headers_or_neither() {
        assert_eq!(parse(None, None), Ok(None));
        assert_eq!(parse(Some("p:1"), Some("42")), Ok(Some(send("p:1", 42))));
        let max = u64::MAX.to_string();
        assert_eq!(parse(Some("p"), Some(&max)), Ok(Some(send("p", u64::MAX))));
        let e = parse(Some("p"), None).expect_err("needs a sequence");
        assert!(e.contains("fmq-producer-id header 'p'"), "{e}");
        let e = parse(None, Some("3")).expect_err("needs a producer");
        assert!(e.contains("fmq-sequence header '3'"), "{e}");
    }

    #[test]
    fn parse_rejects_bad_values_naming_header_and_value() {
        for bad in [
            "0",
            "",
            "-1",
            "+1",
            " 1",
            "1.0",
            "x",
            "18446744073709551616",
        ] {
            let e = parse(Some("p"), Some(bad)).expect_err(bad);
            assert!(
                e.starts_with(&format!("fmq-sequence header '{bad}'")),
                "{e}"
            );
        }
        let long = "p".repeat(MAX_PRODUCER_ID_LEN + 1);
        for bad in ["", "a\u{7}b", "tab\there", long.as_str()] {
            let e = parse(Some(bad), Some("1")).expect_err(bad);
            assert!(
                e.starts_with(&format!("fmq-producer-id header '{bad}'")),
                "{e}"
            );
        }
        let longest = "é".repeat(MAX_PRODUCER_ID_LEN / 2);
        assert!(parse(Some(&longest), Some("1")).is_ok());
    }

    #[test]
    fn duplicates_are_at_or_below_the_mark_and_gaps_move_it() {
        let mut marks = Marks::new(DAY, 10);
        let mut batch = Batch::new();
        assert_eq!(
            marks.check(&send("a", 1), true, 5, &mut batch),
            Verdict::Fresh
        );
        assert_eq!(
            marks.check(&send("a", 1), true, 6, &mut batch),
            Verdict::Duplicate
        );
        assert_eq!(
            marks.check(&send("a", 5), true, 7, &mut batch),
            Verdict::Fresh
        );
        for seq in [2, 4, 5] {
            assert_eq!(
                marks.check(&send("a", seq), true, 8, &mut batch),
                Verdict::Duplicate
            );
        }
        assert_eq!(
            marks.check(&send("b", 1), true, 9, &mut batch),
            Verdict::Fresh
        );
        assert_eq!(marks.sequence("a"), Some(5));
        assert_eq!(marks.sequence("b"), Some(1));
        assert_eq!(marks.counters().duplicates, 4);
        // Only fresh sends write a record.
        let puts: Vec<_> = batch
            .ops()
            .iter()
            .map(|op| match op {
                Op::Put { cf, key, value } => {
                    assert_eq!(*cf, Cf::Dedupe);
                    let mark = dedupe::decode(value).expect("decodes");
                    (
                        String::from_utf8(key.clone()).expect("utf-8"),
                        mark.sequence,
                        mark.last_used_ms,
                    )
                }
                Op::Delete { .. } => panic!("unexpected delete"),
            })
            .collect();
        assert_eq!(
            puts,
            [("a".into(), 1, 5), ("a".into(), 5, 7), ("b".into(), 1, 9)]
        );
    }

    #[test]
    fn is_duplicate_tells_what_check_would_without_changing_anything() {
        let mut marks = Marks::new(DAY, 10);
        let mut batch = Batch::new();
        assert!(!marks.is_duplicate(&send("a", 1)), "unknown producer");
        assert!(marks.is_empty(), "asking tracks nothing");
        marks.check(&send("a", 3), true, 1, &mut batch);
        for (seq, dup) in [(1, true), (3, true), (4, false)] {
            assert_eq!(marks.is_duplicate(&send("a", seq)), dup, "{seq}");
        }
        assert_eq!(marks.sequence("a"), Some(3));
        assert_eq!(marks.counters().duplicates, 0);
        assert_eq!(batch.len(), 1);
        assert_eq!(
            marks.check(&send("a", 3), true, 2, &mut batch),
            Verdict::Duplicate
        );
        assert_eq!(
            marks.check(&send("a", 4), true, 3, &mut batch),
            Verdict::Fresh
        );
    }

    #[test]
    fn non_persistent_sends_move_the_mark_in_memory_only() {
        let mut marks = Marks::new(DAY, 10);
        let mut batch = Batch::new();
        assert_eq!(
            marks.check(&send("a", 1), false, 1, &mut batch),
            Verdict::Fresh
        );
        assert_eq!(
            marks.check(&send("a", 1), true, 2, &mut batch),
            Verdict::Duplicate
        );
        assert!(batch.is_empty());
        assert_eq!(
            marks.check(&send("a", 2), true, 3, &mut batch),
            Verdict::Fresh
        );
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn idle_producers_are_pruned_and_their_records_deleted() {
        let mut marks = Marks::new(Duration::from_millis(100), 10);
        let mut batch = Batch::new();
        marks.check(&send("stored", 1), true, 1_000, &mut batch);
        marks.check(&send("volatile", 1), false, 1_000, &mut batch);
        marks.check(&send("busy", 1), true, 1_000, &mut batch);
        marks.check(&send("busy", 1), true, 1_090, &mut batch); // a duplicate still counts as use
        let mut prune = Batch::new();
        assert_eq!(
            marks.prune(1_100, &mut prune),
            0,
            "idle exactly the retention is kept"
        );
        assert_eq!(marks.prune(1_101, &mut prune), 2);
        assert_eq!(
            prune.ops(),
            [Op::Delete {
                cf: Cf::Dedupe,
                key: b"stored".to_vec()
            }]
        );
        assert_eq!(marks.sequence("busy"), Some(1));
        assert_eq!(marks.sequence("stored"), None);
        assert_eq!(marks.counters().pruned, 2);
        // A forgotten producer starts again.
        assert_eq!(
            marks.check(&send("stored", 1), true, 1_102, &mut batch),
            Verdict::Fresh
        );
    }

    #[test]
    fn a_full_table_forgets_the_longest_idle_producer() {
        let mut marks = Marks::new(DAY, 2);
        let mut batch = Batch::new();
        marks.check(&send("a", 1), true, 10, &mut batch);
        marks.check(&send("b", 1), true, 20, &mut batch);
        marks.check(&send("a", 2), true, 30, &mut batch); // b is now the longest idle
        let mut evict = Batch::new();
        assert_eq!(
            marks.check(&send("c", 1), true, 40, &mut evict),
            Verdict::Fresh
        );
        assert_eq!(marks.len(), 2);
        assert_eq!(marks.sequence("b"), None);
        assert_eq!(marks.sequence("a"), Some(2));
        assert_eq!(marks.counters().evicted, 1);
        assert_eq!(
            evict.ops()[0],
            Op::Delete {
                cf: Cf::Dedupe,
                key: b"b".to_vec()
            }
        );
        // The newest producer is never the one evicted, even on a clock tie.
        let mut marks = Marks::new(DAY, 1);
        marks.check(&send("z", 1), true, 5, &mut batch);
        marks.check(&send("a", 1), true, 5, &mut batch);
        assert_eq!(marks.sequence("a"), Some(1));
    }

    #[test]
    fn loaded_records_beyond_the_bound_are_evicted_oldest_first() {
        let mut marks = Marks::new(DAY, 2);
        for (i, p) in ["old", "mid", "new"].into_iter().enumerate() {
            marks.load(
                p,
                Mark {
                    sequence: 7,
                    last_used_ms: 1_000 + i as u64,
                },
            );
        }
        let mut batch = Batch::new();
        assert_eq!(marks.prune(2_000, &mut batch), 1);
        assert_eq!(marks.sequence("old"), None);
        assert_eq!(marks.sequence("new"), Some(7));
        assert_eq!(batch.len(), 1);
        assert_eq!(marks.counters().evicted, 1);
        assert_eq!(
            marks.check(&send("mid", 7), true, 2_001, &mut batch),
            Verdict::Duplicate
        );
    }

    #[test]
    fn a_clock_going_back_keeps_the_index_consistent() {
        let mut marks = Marks::new(Duration::from_millis(10), 10);
        let mut batch = Batch::new();
        marks.check(&send("a", 1), true, 1_000, &mut batch);
        marks.check(&send("a", 2), true, 500, &mut batch);
        assert_eq!(marks.prune(1_005, &mut batch), 0);
        assert_eq!(marks.prune(1_011, &mut batch), 1);
        assert!(marks.is_empty());
    }
}
