//! An in-memory [`Store`] for tests and for non-persistent deployments.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::{
    check_group, encode_sequence, Batch, Cf, Commit, Error, LoggedBatch, Op, Result, Store,
    META_SEQUENCE,
};

/// A [`Store`] that keeps everything in memory. Batches apply at once, so a
/// commit is ready as soon as it is made; nothing survives the process.
///
/// [`MemoryStore::with_log`] makes a store that also keeps a batch log in
/// [`Cf::Log`], pruned like the RocksDB store's, so HA tests can exercise
/// catch-up without a disk.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    sequence: u64,
    /// Batches kept in the log: at least this many of the most recent ones.
    /// 0 keeps no log.
    retention: u64,
    /// Smallest sequence in [`Cf::Log`]; `sequence + 1` when it is empty.
    first_logged: u64,
    families: BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store without a batch log.
    pub fn new() -> Self {
        Self::with_log(0)
    }

    /// An empty store that keeps at least the `retention` most recent
    /// batches in its batch log (none if 0). Like the RocksDB store, it lets
    /// the log grow by `max(retention / 8, 64)` batches before pruning it
    /// back to `retention`.
    pub fn with_log(retention: u64) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                sequence: 0,
                retention,
                first_logged: 1,
                families: BTreeMap::new(),
            }),
        }
    }

    /// Applies `batch` under the next sequence, which must be `wanted` if
    /// given (else nothing is written).
    fn apply(&self, batch: Batch, wanted: Option<u64>) -> Commit {
        let mut inner = self.inner.lock();
        let seq = inner.sequence + 1;
        if let Some(wanted) = wanted.filter(|w| *w != seq) {
            return Commit::ready(Err(Error::OutOfOrder { wanted, next: seq }));
        }
        inner.apply(&batch, seq);
        Commit::ready(Ok(seq))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Applies `batch` as sequence `seq`, the next one.
    fn apply(&mut self, batch: &Batch, seq: u64) {
        self.sequence = seq;
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => {
                    self.families
                        .entry(*cf)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { cf, key } => {
                    if let Some(family) = self.families.get_mut(cf) {
                        family.remove(key);
                    }
                }
            }
        }
        self.families
            .entry(Cf::Meta)
            .or_default()
            .insert(META_SEQUENCE.to_vec(), encode_sequence(seq).to_vec());
        self.log_batch(seq, batch);
    }

    fn log_batch(&mut self, seq: u64, batch: &Batch) {
        if self.retention == 0 {
            self.first_logged = seq + 1;
            return;
        }
        let log = self.families.entry(Cf::Log).or_default();
        log.insert(encode_sequence(seq).to_vec(), batch.encode());
        let slack = (self.retention / 8).max(64);
        if seq - self.first_logged + 1 > self.retention + slack {
            let new_first = seq - self.retention + 1;
            // Keys are big-endian sequences, so the map splits at new_first.
            let kept = log.split_off(encode_sequence(new_first).as_slice());
            *log = kept;
            self.first_logged = new_first;
        }
    }
}

impl Store for MemoryStore {
    fn commit(&self, batch: Batch) -> Commit {
        self.apply(batch, None)
    }

    fn commit_as(&self, batch: Batch, sequence: u64) -> Commit {
        self.apply(batch, Some(sequence))
    }

    fn commit_group_now(&self, batches: &[(u64, Batch)]) -> Result<u64> {
        let mut inner = self.inner.lock();
        let last = check_group(inner.sequence, batches)?;
        for (seq, batch) in batches {
            inner.apply(batch, *seq);
        }
        Ok(last)
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .lock()
            .families
            .get(&cf)
            .and_then(|f| f.get(key).cloned()))
    }

    fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        // Copy out first so `f` may call back into the store.
        let rows: Vec<(Vec<u8>, Vec<u8>)> = {
            let inner = self.inner.lock();
            match inner.families.get(&cf) {
                Some(family) => family
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                None => Vec::new(),
            }
        };
        for (k, v) in rows {
            f(&k, &v)?;
        }
        Ok(())
    }

    fn last_sequence(&self) -> u64 {
        self.inner.lock().sequence
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn first_logged(&self) -> u64 {
        self.inner.lock().first_logged
    }

    fn read_log(
        &self,
        from: u64,
        max_batches: usize,
        max_bytes: usize,
    ) -> Result<Vec<LoggedBatch>> {
        let inner = self.inner.lock();
        if from > inner.sequence {
            return Ok(Vec::new());
        }
        if from < inner.first_logged {
            return Err(Error::Truncated {
                from,
                first: inner.first_logged,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let Some(log) = inner.families.get(&Cf::Log) else {
            return Ok(out);
        };
        for (expected, (key, value)) in
            (from..=inner.sequence).zip(log.range(encode_sequence(from).to_vec()..))
        {
            if out.len() >= max_batches
                || (!out.is_empty() && bytes.saturating_add(value.len()) > max_bytes)
            {
                break;
            }
            let sequence = crate::decode_sequence(key)?;
            if sequence != expected {
                return Err(Error::Corrupt(format!(
                    "batch log has batch {sequence} where {expected} belongs"
                )));
            }
            bytes += value.len();
            out.push(LoggedBatch {
                sequence,
                bytes: value.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_apply_in_order_with_sequence_numbers() {
        let store = MemoryStore::new();
        let mut b1 = Batch::new();
        b1.put(Cf::Messages, b"a".to_vec(), b"1".to_vec());
        let mut b2 = Batch::new();
        b2.delete(Cf::Messages, b"a".to_vec());
        b2.put(Cf::Messages, b"b".to_vec(), b"2".to_vec());
        assert_eq!(store.commit(b1).await.expect("commit"), 1);
        assert_eq!(store.commit(b2).await.expect("commit"), 2);
        assert_eq!(store.get(Cf::Messages, b"a").expect("get"), None);
        assert_eq!(
            store.get(Cf::Messages, b"b").expect("get"),
            Some(b"2".to_vec())
        );
        assert_eq!(store.last_sequence(), 2);
        assert_eq!(
            store.get(Cf::Meta, META_SEQUENCE).expect("get"),
            Some(encode_sequence(2).to_vec())
        );
    }

    #[tokio::test]
    async fn commit_as_refuses_a_batch_out_of_place_before_writing_it() {
        let store = MemoryStore::with_log(10);
        let mut first = Batch::new();
        first.put(Cf::Messages, b"a".to_vec(), b"1".to_vec());
        assert_eq!(store.commit_as(first, 1).await.expect("commit_as"), 1);
        for wanted in [1, 3] {
            let mut stray = Batch::new();
            stray.put(Cf::Messages, b"stray".to_vec(), b"x".to_vec());
            match store.commit_as(stray, wanted).await {
                Err(Error::OutOfOrder { wanted: w, next }) => assert_eq!((w, next), (wanted, 2)),
                other => panic!("commit_as(_, {wanted}) gave {other:?}"),
            }
        }
        assert_eq!(store.get(Cf::Messages, b"stray").expect("get"), None);
        assert_eq!(store.last_sequence(), 1);
        assert_eq!(store.first_logged(), 1);
        assert_eq!(store.read_log(2, 10, usize::MAX).expect("read").len(), 0);
        assert_eq!(store.commit(Batch::new()).await.expect("commit"), 2);
    }

    #[test]
    fn scan_prefix_stops_at_prefix_end() {
        let store = MemoryStore::new();
        let mut b = Batch::new();
        for k in ["q1/1", "q1/2", "q2/1"] {
            b.put(Cf::QueueEntries, k.as_bytes().to_vec(), Vec::new());
        }
        drop(store.commit(b));
        let mut seen = Vec::new();
        store
            .scan_prefix(Cf::QueueEntries, b"q1/", &mut |k, _| {
                seen.push(String::from_utf8_lossy(k).into_owned());
                Ok(())
            })
            .expect("scan");
        assert_eq!(seen, ["q1/1", "q1/2"]);
    }

    fn numbered(n: u64) -> Batch {
        let mut batch = Batch::new();
        // Sizes vary with n, so byte limits fall between batches.
        batch.put(
            Cf::Messages,
            format!("m{n}"),
            vec![b'x'; (n % 7) as usize * 10],
        );
        batch.set_sync(n.is_multiple_of(2));
        batch
    }

    #[test]
    fn without_a_log_nothing_is_logged() {
        let store = MemoryStore::new();
        assert_eq!(store.first_logged(), 1);
        assert_eq!(store.read_log(1, 10, 1000).expect("read"), []);
        for n in 1..=5 {
            drop(store.commit(numbered(n)));
        }
        assert_eq!(store.first_logged(), 6);
        assert_eq!(store.read_log(6, 10, 1000).expect("read"), []);
        let err = store.read_log(5, 10, 1000).expect_err("truncated");
        assert!(
            matches!(err, Error::Truncated { from: 5, first: 6 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("batch 5"), "{err}");
        assert!(err.to_string().contains("batch 6"), "{err}");
        assert_eq!(store.get(Cf::Log, &encode_sequence(1)).expect("get"), None);
    }

    #[test]
    fn the_log_keeps_the_retention_and_prunes_in_steps() {
        let store = MemoryStore::with_log(4);
        assert_eq!(store.first_logged(), 1);
        for n in 1..=68 {
            drop(store.commit(numbered(n)));
        }
        // Up to retention + 64 batches are kept before pruning.
        assert_eq!(store.first_logged(), 1);
        drop(store.commit(numbered(69)));
        assert_eq!(store.first_logged(), 66);
        for n in 70..=100 {
            drop(store.commit(numbered(n)));
        }
        assert_eq!(store.first_logged(), 66);
        assert_eq!(store.last_sequence(), 100);

        let err = store.read_log(65, 10, usize::MAX).expect_err("pruned");
        assert!(
            matches!(
                err,
                Error::Truncated {
                    from: 65,
                    first: 66
                }
            ),
            "{err:?}"
        );
        let read = store.read_log(66, 10, usize::MAX).expect("read");
        assert_eq!(
            read.iter().map(|b| b.sequence).collect::<Vec<_>>(),
            (66..76).collect::<Vec<_>>()
        );
        for logged in &read {
            let batch = Batch::decode(&logged.bytes).expect("decode");
            assert_eq!(batch, numbered(logged.sequence));
        }
        let tail = store.read_log(99, 10, usize::MAX).expect("read");
        assert_eq!(
            tail.iter().map(|b| b.sequence).collect::<Vec<_>>(),
            [99, 100]
        );
        assert_eq!(store.read_log(101, 10, usize::MAX).expect("read"), []);
        assert_eq!(store.read_log(1000, 10, usize::MAX).expect("read"), []);
        assert_eq!(store.read_log(66, 0, usize::MAX).expect("read"), []);

        // The log is visible as a column family, keyed by sequence.
        let mut keys = Vec::new();
        store
            .scan_prefix(Cf::Log, b"", &mut |k, _| {
                keys.push(crate::decode_sequence(k)?);
                Ok(())
            })
            .expect("scan");
        assert_eq!(keys, (66..=100).collect::<Vec<_>>());
    }

    #[test]
    fn read_log_respects_the_byte_limit_but_always_makes_progress() {
        let store = MemoryStore::with_log(1000);
        for n in 1..=20 {
            drop(store.commit(numbered(n)));
        }
        let size = |n: u64| numbered(n).encode().len();
        // Nothing fits, yet one batch comes back.
        let one = store.read_log(3, 10, 0).expect("read");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].sequence, 3);
        // Exactly three batches' worth.
        let limit = size(3) + size(4) + size(5);
        let three = store.read_log(3, 10, limit).expect("read");
        assert_eq!(
            three.iter().map(|b| b.sequence).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let three_minus = store.read_log(3, 10, limit - 1).expect("read");
        assert_eq!(three_minus.len(), 2);
        let total: usize = store
            .read_log(1, usize::MAX, 200)
            .expect("read")
            .iter()
            .map(|b| b.bytes.len())
            .sum();
        assert!(total <= 200, "{total}");
    }
}
