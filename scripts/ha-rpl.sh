#!/usr/bin/env bash
# Runs the replicated HA pair of profiles/FerroMQ_HA_rpl on this machine, in
# the background: the gateway responder, the primary and the secondary, each
# with its own store (seed §5.1.1). Same actions and options as
# scripts/ha-shared.sh, which does the work:
#
#   scripts/ha-rpl.sh [start]   start, wait for ACTIVE/PASSIVE, print statuses
#   scripts/ha-rpl.sh status    `fmq status` of both servers
#   scripts/ha-rpl.sh stop      stop both (PASSIVE first) and the gateway
#
# Layout (under profiles/FerroMQ_HA_rpl, or $FMQ_HA_HOME): HAPrimary and
# HASecondary, each with its store in run/db, and the lock file
# lock/lock.dat. See docs/ha.md.

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export FMQ_HA_HOME=${FMQ_HA_HOME:-$(cd "$SCRIPT_DIR/.." && pwd)/profiles/FerroMQ_HA_rpl}
export FMQ_HA_SCRIPT=ha-rpl.sh
exec "$SCRIPT_DIR/ha-shared.sh" "$@"
