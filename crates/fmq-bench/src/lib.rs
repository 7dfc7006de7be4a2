//! fmq-bench
