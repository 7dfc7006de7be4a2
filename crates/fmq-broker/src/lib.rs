//! fmq-broker
