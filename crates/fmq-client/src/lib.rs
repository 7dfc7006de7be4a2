//! fmq-client
