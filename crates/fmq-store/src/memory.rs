//! An in-memory [`Store`] for tests and for non-persistent deployments.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::{encode_sequence, Batch, Cf, Commit, Op, Result, Store, META_SEQUENCE};

/// A [`Store`] that keeps everything in memory. Batches apply at once, so a
/// commit is ready as soon as it is made; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sequence: u64,
    families: BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn commit(&self, batch: Batch) -> Commit {
        let mut inner = self.inner.lock();
        inner.sequence += 1;
        let seq = inner.sequence;
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => {
                    inner
                        .families
                        .entry(*cf)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { cf, key } => {
                    if let Some(family) = inner.families.get_mut(cf) {
                        family.remove(key);
                    }
                }
            }
        }
        inner
            .families
            .entry(Cf::Meta)
            .or_default()
            .insert(META_SEQUENCE.to_vec(), encode_sequence(seq).to_vec());
        Commit::ready(Ok(seq))
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
}
