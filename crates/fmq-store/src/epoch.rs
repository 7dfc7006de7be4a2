//! Epochs: who wrote which stretch of a store's history.
//!
//! Each time a server becomes active in replicated HA it starts a new epoch:
//! its first batch carries [`mark_epoch`], which records the epoch number, the
//! sequence it starts at and the server that owns it. Batches are only ever
//! written by the active server of the current epoch, so two stores with the
//! same epoch entries hold the same batches up to where those epochs end.
//! When a server rejoins, [`common_prefix`] compares its history with the
//! active server's and names the last sequence they certainly share: batches
//! after it on the rejoining side were never replicated and must be undone
//! (by a full copy or a rollback), batches after it on the active side are
//! shipped from the batch log.
//!
//! Everything is kept in [`Cf::Meta`] and written in ordinary batches, so the
//! history is replicated, checkpointed and recovered like any other data.

use crate::{Batch, Cf, Error, Result, Store};

/// Key in [`Cf::Meta`] of the store's current epoch (8 bytes, big-endian).
pub const META_EPOCH: &[u8] = b"epoch";

/// Prefix of the keys in [`Cf::Meta`] that record epoch starts:
/// `"epochs/"` + epoch (8 bytes, big-endian) maps to the epoch's first
/// sequence (8 bytes, big-endian) followed by the owner's id in UTF-8.
pub const META_EPOCHS_PREFIX: &[u8] = b"epochs/";

/// Where a store's history ends: its current epoch and last sequence.
///
/// Ordering compares the epoch first, then the sequence: a store in a newer
/// epoch is ahead of any store in an older one, however long that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The current epoch (0 before any epoch was marked).
    pub epoch: u64,
    /// The sequence of the last applied batch.
    pub sequence: u64,
}

/// The start of one epoch in a store's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochStart {
    /// The epoch number.
    pub epoch: u64,
    /// The first sequence of the epoch: the sequence of the batch that
    /// marked it.
    pub start: u64,
    /// Opaque id of the server that ran the epoch.
    pub owner: String,
}

/// Adds to `batch` the puts that open `epoch` at sequence `start` (the
/// sequence this very batch will get), owned by `owner`: the current epoch
/// under [`META_EPOCH`] and the history entry under [`META_EPOCHS_PREFIX`].
pub fn mark_epoch(batch: &mut Batch, epoch: u64, start: u64, owner: &str) {
    batch.put(Cf::Meta, META_EPOCH, epoch.to_be_bytes());
    batch.put(Cf::Meta, epoch_key(epoch), encode_start(start, owner));
}

/// The store's epoch history, sorted by epoch.
///
/// # Errors
///
/// The store's read errors, and [`Error::Corrupt`] for a history entry that
/// does not decode.
pub fn history(store: &dyn Store) -> Result<Vec<EpochStart>> {
    let mut entries = Vec::new();
    store.scan_prefix(Cf::Meta, META_EPOCHS_PREFIX, &mut |key, value| {
        let suffix = key.get(META_EPOCHS_PREFIX.len()..).unwrap_or_default();
        let epoch = decode_u64(suffix, "epoch history key")?;
        entries.push(decode_start(epoch, value)?);
        Ok(())
    })?;
    // Keys are big-endian, so the scan is already in epoch order; sorting
    // keeps the promise whatever order a store scans in.
    entries.sort_by_key(|e| e.epoch);
    Ok(entries)
}

/// The store's position: its epoch under [`META_EPOCH`] (0 if absent) and
/// its [`Store::last_sequence`]. The two are read one after the other, so
/// read the position while no batch is being committed (a passive server, or
/// an active one that has stopped writing).
///
/// # Errors
///
/// The store's read errors, and [`Error::Corrupt`] if the stored epoch is
/// not 8 bytes.
pub fn position(store: &dyn Store) -> Result<Position> {
    let sequence = store.last_sequence();
    let epoch = match store.get(Cf::Meta, META_EPOCH)? {
        Some(bytes) => decode_u64(&bytes, "epoch")?,
        None => 0,
    };
    Ok(Position { epoch, sequence })
}

/// The last sequence that two histories certainly share.
///
/// Each side gives its history (sorted by epoch, as [`history`] returns it)
/// and its last sequence. Both histories are implicitly preceded by
/// `EpochStart { epoch: 0, start: 1, owner: "" }`, which covers the batches
/// written before any epoch was marked. With `k` the number of leading
/// entries equal on both sides (epoch, start and owner), entry `k - 1` is the
/// last epoch both ran; it ends, on each side, at the next entry's start − 1,
/// or at that side's last sequence if it is the side's final entry. The
/// result is the smaller of the two ends.
#[must_use]
pub fn common_prefix(
    ours: &[EpochStart],
    our_last: u64,
    theirs: &[EpochStart],
    their_last: u64,
) -> u64 {
    let shared = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
    let end = |history: &[EpochStart], last: u64| {
        // The entry after the last shared one, in the history with the
        // implicit epoch 0 in front, is `history[shared]`.
        history
            .get(shared)
            .map_or(last, |next| next.start.saturating_sub(1))
    };
    end(ours, our_last).min(end(theirs, their_last))
}

fn epoch_key(epoch: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(META_EPOCHS_PREFIX.len() + 8);
    key.extend_from_slice(META_EPOCHS_PREFIX);
    key.extend_from_slice(&epoch.to_be_bytes());
    key
}

fn encode_start(start: u64, owner: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + owner.len());
    value.extend_from_slice(&start.to_be_bytes());
    value.extend_from_slice(owner.as_bytes());
    value
}

fn decode_start(epoch: u64, value: &[u8]) -> Result<EpochStart> {
    if value.len() < 8 {
        return Err(Error::Corrupt(format!(
            "start of epoch {epoch} has {} bytes, expected at least 8",
            value.len()
        )));
    }
    let (start, owner) = value.split_at(8);
    let owner = std::str::from_utf8(owner)
        .map_err(|e| Error::Corrupt(format!("owner of epoch {epoch} is not UTF-8: {e}")))?;
    Ok(EpochStart {
        epoch,
        start: decode_u64(start, "epoch start")?,
        owner: owner.to_owned(),
    })
}

fn decode_u64(bytes: &[u8], what: &str) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Corrupt(format!("{what} of {} bytes, expected 8", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn e(epoch: u64, start: u64, owner: &str) -> EpochStart {
        EpochStart {
            epoch,
            start,
            owner: owner.to_owned(),
        }
    }

    /// Name, our history and last sequence, theirs, the expected result.
    type Case = (
        &'static str,
        Vec<EpochStart>,
        u64,
        Vec<EpochStart>,
        u64,
        u64,
    );

    #[test]
    fn common_prefix_table() {
        let a1 = e(1, 1, "a");
        let cases: &[Case] = &[
            (
                "identical histories",
                vec![a1.clone(), e(2, 50, "b")],
                80,
                vec![a1.clone(), e(2, 50, "b")],
                80,
                80,
            ),
            (
                "one side a prefix of the other",
                vec![a1.clone(), e(2, 50, "b")],
                70,
                vec![a1.clone(), e(2, 50, "b")],
                80,
                70,
            ),
            (
                "the other side continued in a newer epoch",
                vec![a1.clone()],
                40,
                vec![a1.clone(), e(2, 41, "b")],
                90,
                40,
            ),
            (
                "our tail in the old epoch was never replicated",
                vec![a1.clone()],
                45,
                vec![a1.clone(), e(2, 41, "b")],
                90,
                40,
            ),
            (
                "both continued in different epochs from one point",
                vec![a1.clone(), e(2, 31, "a")],
                60,
                vec![a1.clone(), e(3, 31, "b")],
                70,
                30,
            ),
            (
                "different epochs started at different points",
                vec![a1.clone(), e(2, 41, "a")],
                60,
                vec![a1.clone(), e(3, 38, "b")],
                70,
                37,
            ),
            (
                "same epoch number, different owner",
                vec![a1.clone(), e(2, 21, "a")],
                50,
                vec![a1.clone(), e(2, 21, "b")],
                40,
                20,
            ),
            (
                "same epoch and owner, different start",
                vec![a1.clone(), e(2, 21, "a")],
                50,
                vec![a1.clone(), e(2, 25, "a")],
                40,
                20,
            ),
            (
                "diverged in the very first epoch",
                vec![e(1, 1, "a")],
                50,
                vec![e(1, 1, "b")],
                40,
                0,
            ),
            ("no marks on either side", vec![], 30, vec![], 50, 30),
            ("two empty stores", vec![], 0, vec![], 0, 0),
            (
                "marks on one side only",
                vec![e(1, 11, "a")],
                30,
                vec![],
                20,
                10,
            ),
            (
                "marks on one side only, the other shorter",
                vec![e(1, 11, "a")],
                30,
                vec![],
                5,
                5,
            ),
            (
                "marked from the first batch against an empty store",
                vec![a1.clone()],
                10,
                vec![],
                0,
                0,
            ),
            (
                "several shared epochs, then a fork",
                vec![a1.clone(), e(2, 10, "b"), e(3, 20, "a"), e(5, 30, "a")],
                35,
                vec![a1.clone(), e(2, 10, "b"), e(3, 20, "a"), e(4, 28, "b")],
                33,
                27,
            ),
        ];
        for (name, ours, our_last, theirs, their_last, expected) in cases {
            assert_eq!(
                common_prefix(ours, *our_last, theirs, *their_last),
                *expected,
                "{name}"
            );
            assert_eq!(
                common_prefix(theirs, *their_last, ours, *our_last),
                *expected,
                "{name}, sides swapped"
            );
        }
    }

    #[tokio::test]
    async fn marks_make_the_history_and_position() {
        let store = MemoryStore::new();
        assert_eq!(position(&store).expect("position"), Position::default());
        assert!(history(&store).expect("history").is_empty());

        store.commit(Batch::new()).await.expect("commit");
        let mut batch = Batch::new();
        mark_epoch(&mut batch, 1, 2, "server-a");
        assert_eq!(store.commit(batch).await.expect("commit"), 2);
        store.commit(Batch::new()).await.expect("commit");
        let mut batch = Batch::new();
        mark_epoch(&mut batch, 7, 4, "sérveur-b");
        batch.put(Cf::Messages, b"m".to_vec(), b"x".to_vec());
        assert_eq!(store.commit(batch).await.expect("commit"), 4);

        assert_eq!(
            history(&store).expect("history"),
            [e(1, 2, "server-a"), e(7, 4, "sérveur-b")]
        );
        assert_eq!(
            position(&store).expect("position"),
            Position {
                epoch: 7,
                sequence: 4
            }
        );
        // Other Meta keys next to the history are not part of it.
        assert_eq!(
            store.get(Cf::Meta, META_EPOCH).expect("get"),
            Some(7u64.to_be_bytes().to_vec())
        );
    }

    #[test]
    fn positions_order_by_epoch_first() {
        let p = |epoch, sequence| Position { epoch, sequence };
        assert!(p(2, 1) > p(1, 100));
        assert!(p(2, 5) > p(2, 4));
        assert_eq!(p(3, 3).max(p(3, 2)), p(3, 3));
    }

    #[tokio::test]
    async fn corrupt_entries_are_reported_not_panicked_on() {
        let cases: &[(&str, Vec<u8>, Vec<u8>)] = &[
            ("short value", epoch_key(1), vec![0, 0, 1]),
            ("owner not UTF-8", epoch_key(1), {
                let mut v = 1u64.to_be_bytes().to_vec();
                v.extend_from_slice(&[0xff, 0xfe]);
                v
            }),
            ("short key", b"epochs/\x01".to_vec(), encode_start(1, "a")),
            (
                "long key",
                b"epochs/123456789".to_vec(),
                encode_start(1, "a"),
            ),
        ];
        for (name, key, value) in cases {
            let store = MemoryStore::new();
            let mut batch = Batch::new();
            batch.put(Cf::Meta, key.clone(), value.clone());
            store.commit(batch).await.expect("commit");
            let err = history(&store).expect_err(name);
            assert!(matches!(err, Error::Corrupt(_)), "{name}: {err:?}");
        }
        let store = MemoryStore::new();
        let mut batch = Batch::new();
        batch.put(Cf::Meta, META_EPOCH, vec![1, 2, 3]);
        store.commit(batch).await.expect("commit");
        let err = position(&store).expect_err("short epoch");
        assert!(err.to_string().contains("epoch of 3 bytes"), "{err}");
    }

    #[test]
    fn an_owner_may_be_empty() {
        let decoded = decode_start(3, &encode_start(9, "")).expect("decode");
        assert_eq!(decoded, e(3, 9, ""));
    }
}
