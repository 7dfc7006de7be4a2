//! Tuning knobs of [`RocksStore`](crate::RocksStore) and the RocksDB options
//! derived from them.

use fmq_store::Cf;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options};

const MIB: usize = 1024 * 1024;

/// Options for [`RocksStore::open`](crate::RocksStore::open).
///
/// The defaults suit a broker on a small server: durable by default, a
/// group size that bounds the latency one huge group adds to the commits
/// queued behind it, and memory use in the low hundreds of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RocksOptions {
    /// When true (the default), a group containing a batch that asked for a
    /// sync is written with an fsync of the write-ahead log before any of its
    /// commits resolve. When false, synced batches are only written to the
    /// OS: a process crash loses nothing, a power loss may lose the tail.
    /// Meant for tests and for operators who knowingly trade durability for
    /// throughput.
    pub sync: bool,
    /// Cap on the encoded size of one group of batches. The writer stops
    /// draining the queue once a group reaches it, so a burst of large
    /// messages cannot make one write (and its fsync) arbitrarily long. A
    /// single batch larger than the cap is still written, alone.
    pub max_group_bytes: usize,
    /// Memtable size of each column family. Messages are usually consumed
    /// soon after they are produced, so with a large memtable most message
    /// puts and their deletes meet in memory and never reach an SST file.
    pub write_buffer_bytes: usize,
    /// Cap on the memtables of all column families together, so nine
    /// column families cannot hold nine full write buffers at once.
    pub total_write_buffer_bytes: usize,
    /// Size of the block cache shared by all column families, used when a
    /// message has been flushed to disk before it is delivered.
    pub block_cache_bytes: usize,
    /// Number of most recent batches kept in the batch log ([`Cf::Log`]),
    /// from which a passive server catches up. The log may hold up to
    /// `max(log_retention / 8, 64)` more before it is pruned, which is done
    /// by one range delete every so many groups. 0 (the default) writes no
    /// log, so a standalone broker pays nothing for it; a log already on
    /// disk is still readable until the first commit, which discards it.
    pub log_retention: u64,
    /// Number of spent write-ahead-log files kept for reuse (0: none). A
    /// synced commit appends to the write-ahead log and fdatasyncs it. On a
    /// fresh file each append grows the file, so the fdatasync also commits
    /// the file system's journal; on a reused file the append overwrites
    /// blocks the file already has, and only the data goes to disk. On ext4
    /// that about halves a 4 KiB append + fdatasync, with one writer on the
    /// disk or two (see the probes in `docs/benchmarks.md`). The cost is
    /// disk space: each kept file is about one memtable of writes
    /// (`write_buffer_bytes`).
    /// Records left from a file's previous use carry its old number, so
    /// recovery after a crash stops where the new records end.
    pub recycle_wal_files: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            sync: true,
            max_group_bytes: 8 * MIB,
            write_buffer_bytes: 64 * MIB,
            total_write_buffer_bytes: 256 * MIB,
            block_cache_bytes: 64 * MIB,
            log_retention: 0,
            recycle_wal_files: 2,
        }
    }
}

impl RocksOptions {
    /// Database-wide options.
    pub(crate) fn db_options(&self) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // A store created by an older FerroMQ, or by a checkpoint, may lack a
        // column family added since: create it empty instead of refusing.
        opts.create_missing_column_families(true);
        // The broker runs on small machines next to its network threads: two
        // background threads for flushes and compactions are enough, and more
        // would compete with the writer thread for the cores.
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_db_write_buffer_size(self.total_write_buffer_bytes);
        // Column families written rarely (principals, ACLs) would otherwise
        // keep old WAL files alive, and recovery would replay all of them.
        // Past this size RocksDB flushes those families so the WAL can go.
        opts.set_max_total_wal_size(
            u64::try_from(self.total_write_buffer_bytes.saturating_mul(2)).unwrap_or(u64::MAX),
        );
        // After a crash the tail of the WAL may be torn. Point-in-time
        // recovery replays up to the last intact record, which is exactly
        // the set of batches whose commits could have resolved.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // RocksDB's own info log rotates; keep a few for post-mortems.
        opts.set_keep_log_file_num(8);
        // RocksDB reuses WAL files under point-in-time recovery (above); it
        // would refuse writes with the WAL disabled, which this store never
        // makes.
        opts.set_recycle_log_file_num(self.recycle_wal_files);
        // A write-ahead-log file is spent only once every column family
        // holding data from it has flushed. Flushed one by one, a rarely
        // written family (queues, principals) would keep every file alive
        // until `max_total_wal_size`, and no file would ever be reused.
        // Flushed together, the old file is spent at each flush.
        opts.set_atomic_flush(true);
        opts
    }

    /// One descriptor per FerroMQ column family, all sharing `cache`.
    pub(crate) fn column_families(&self, cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        // Deliveries and acks look messages up by id: a bloom filter spares
        // a disk read for every level that cannot hold the key.
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);

        Cf::ALL
            .iter()
            .map(|cf| {
                let mut opts = Options::default();
                opts.set_block_based_table_factory(&table);
                // lz4 costs little CPU and headers and JSON bodies compress
                // well; already-compressed payloads cost a failed attempt.
                opts.set_compression_type(DBCompressionType::Lz4);
                opts.set_bottommost_compression_type(DBCompressionType::Lz4);
                opts.set_write_buffer_size(self.write_buffer_bytes);
                opts.set_level_compaction_dynamic_level_bytes(true);
                ColumnFamilyDescriptor::new(cf.name(), opts)
            })
            .collect()
    }
}
