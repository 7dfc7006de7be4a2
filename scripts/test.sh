#!/usr/bin/env bash
# Runs every FerroMQ check: formatting, lints, unit, property, integration,
# multi-process fault-injection and stomp.py interop tests.
# Installs what it needs on a Debian machine; safe to run again.
set -euo pipefail
# shellcheck source=scripts/lib/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$FMQ_ROOT"
fmq_build_deps
fmq_test_deps
start=$(date +%s)
fmq_log "cargo fmt --check"
cargo fmt --all --check
# One build profile (release) for binaries, tests and lints, so RocksDB's C++
# is compiled once.
fmq_log "building (release)"
cargo build --release --locked --workspace --bins --examples
fmq_log "cargo clippy"
cargo clippy --release --locked --workspace --all-targets -- -D warnings
fmq_log "cargo test"
FMQ_BIN="$FMQ_ROOT/target/release/fmq" cargo test --release --locked --workspace -- --test-threads=2
fmq_log "all checks passed in $(( $(date +%s) - start )) s"
