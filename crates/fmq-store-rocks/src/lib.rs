//! RocksDB store (being written).
