//! fmq-server
