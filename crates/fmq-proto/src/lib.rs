//! fmq-proto
