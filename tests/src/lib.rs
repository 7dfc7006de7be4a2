//! Shared helpers for FerroMQ's multi-process tests.
