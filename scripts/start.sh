#!/usr/bin/env bash
# Builds FerroMQ and runs a server in the foreground on the shipped
# standalone profile (client port 1856, admin port 1858). Ctrl-C stops it.
# Installs what it needs on a Debian machine; safe to run again.
#   bash scripts/start.sh [-profile NAME] [fmq options...]
set -euo pipefail
# shellcheck source=scripts/lib/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$FMQ_ROOT"
fmq_build_deps
fmq_log "building fmq (release; the first build compiles RocksDB: ~15 minutes on 2 cores)"
cargo build --release --locked -p fmq-server
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-profile FerroMQ)
fmq_log "starting: target/release/fmq ${args[*]}   (logs in profiles/FerroMQ/run/logs)"
exec target/release/fmq "${args[@]}"
