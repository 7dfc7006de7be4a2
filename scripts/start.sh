#!/usr/bin/env bash
# Builds FerroMQ and starts the shared-storage HA pair on this machine: the
# gateway responder, the primary (STOMP 127.0.0.1:1856, admin 1858) and the
# secondary (STOMP 127.0.0.1:1956, admin 1859) of profiles/FerroMQ_HA_shared,
# in the background. Prints both servers' status, then runs the failover
# demo (`scripts/ha-shared.sh demo`): a durable producer and consumer send
# and receive through the pair while the ACTIVE is killed with SIGKILL; it
# prints how long the failover took and that no message was lost or
# duplicated, and restarts the killed server. FMQ_DEMO=0 skips the demo.
# `bash scripts/ha-shared.sh stop` stops the pair.
# Installs what it needs on a Debian machine; safe to run again.
#
#   bash scripts/start.sh                    the HA pair (default)
#   bash scripts/start.sh -profile FerroMQ   one standalone server, foreground
set -euo pipefail
# shellcheck source=scripts/lib/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$FMQ_ROOT"
fmq_build_deps
fmq_log "building fmq (release; the first build compiles RocksDB: ~15 minutes on 2 cores)"
cargo build --release --locked -p fmq-server
export FMQ_BIN="$FMQ_ROOT/target/release/fmq"
if [ $# -gt 0 ]; then
    fmq_log "starting: target/release/fmq $*"
    exec "$FMQ_BIN" "$@"
fi
if [ "${FMQ_DEMO:-1}" = 0 ]; then
    exec bash scripts/ha-shared.sh start
fi
fmq_log "building the failover demo client (release)"
cargo build --release --locked -p fmq-client --example failover_demo
bash scripts/ha-shared.sh start
echo
fmq_log "failover demo: a producer and a consumer through the pair while the ACTIVE is killed"
exec bash scripts/ha-shared.sh demo
