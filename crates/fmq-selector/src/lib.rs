//! fmq-selector
