#!/usr/bin/env bash
# Runs a shared-storage HA pair on this machine, in the background: the
# gateway responder, the primary and the secondary of
# profiles/FerroMQ_HA_shared (seed §5.1.2). See docs/ha.md.
#
#   scripts/ha-shared.sh [start]   start what is not running, wait until one
#                                  server is ACTIVE and the other PASSIVE,
#                                  print both statuses and how to fail over
#   scripts/ha-shared.sh status    `fmq status` of both servers
#   scripts/ha-shared.sh stop      stop both servers (PASSIVE first, so no
#                                  failover happens) and the gateway
#   scripts/ha-shared.sh demo      start the pair if needed, run the durable
#                                  client's failover demo through it (a
#                                  producer and a consumer), kill -9 the
#                                  ACTIVE mid-run, restart it, and print how
#                                  long the failover took and whether any
#                                  message was lost or duplicated
#
# Layout (all under profiles/FerroMQ_HA_shared, or $FMQ_HA_HOME):
#   HAPrimary/fmq.toml     STOMP 1856, admin 1858, HA port 2000
#   HASecondary/fmq.toml   STOMP 1956, admin 1859, HA port 3000
#   run/db                 the shared store (both profiles' store.db_path)
#   lock/lock.dat          the lock file (must exist; an empty file)
#   HAPrimary/run/fmq.pid, HAPrimary/run/fmq.out       (likewise HASecondary)
#   run/gateway.pid, run/gateway.out                   the gateway
# The gateway listens where the primary's [ha] gateway_server_ip_address and
# gateway_server_port say (127.0.0.1:7007 as shipped). If something already
# answers there (a gateway started by hand, an echo service), it is used.
#
# The servers are started with scripts/fmq.sh and stopped with
# scripts/shutdown-fmq.sh, so $FMQ_BIN, FMQ_ADMIN_USER/FMQ_ADMIN_PASSWORD and
# $FMQ_START_TIMEOUT work as there. $FMQ_HA_TIMEOUT (default 30) bounds the
# wait for the ACTIVE/PASSIVE pair, in seconds.
#
# The same script runs the replicated pair (profiles/FerroMQ_HA_rpl, through
# scripts/ha-rpl.sh, which sets $FMQ_HA_HOME): the mode is read from the
# primary profile's ha.mode.
#
# Exit status: 0 done; 1 failed (the output says what); 4 bad usage.

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=fmq.sh disable=SC1091 # followed with shellcheck -x
source "$SCRIPT_DIR/fmq.sh"
set -uo pipefail

HA_HOME=${FMQ_HA_HOME:-$FMQ_SH_HOME/profiles/FerroMQ_HA_shared}
PROFILES=(HAPrimary HASecondary)
GW_PID_FILE=$HA_HOME/run/gateway.pid
GW_OUT=$HA_HOME/run/gateway.out

ME=${FMQ_HA_SCRIPT:-ha-shared.sh}

die() {
    echo "$ME: $*" >&2
    exit 1
}

# The HA state (ACTIVE, PASSIVE, ACTIVATING, ...) of the server on admin port
# $1, or nothing if it does not answer.
ha_state() {
    timeout 5 "$FMQ_BIN_PATH" status --admin-port "$1" --json 2>/dev/null |
        grep -o '"state": *"[A-Z_]*"' | head -n 1 | grep -o '[A-Z_]*"$' | tr -d '"'
}

admin_port_of() {
    fmq_profile_key "$HA_HOME/$1/fmq.toml" network admin_port ""
}

gateway_addr() {
    local toml=$HA_HOME/HAPrimary/fmq.toml
    GW_HOST=$(fmq_profile_key "$toml" ha gateway_server_ip_address 127.0.0.1)
    GW_PORT=$(fmq_profile_key "$toml" ha gateway_server_port 7)
}

gateway_pid() {
    local pid
    [[ -f "$GW_PID_FILE" ]] || return 1
    read -r pid <"$GW_PID_FILE" 2>/dev/null || return 1
    fmq_pid_is_fmq "$pid" || return 1
    echo "$pid"
}

start_gateway() {
    local pid start
    gateway_addr
    if pid=$(gateway_pid); then
        echo "gateway already running with pid $pid on $GW_HOST:$GW_PORT"
        return 0
    fi
    rm -f "$GW_PID_FILE"
    if fmq_port_open "$GW_HOST" "$GW_PORT"; then
        echo "something already answers on $GW_HOST:$GW_PORT: using it as the gateway"
        return 0
    fi
    mkdir -p "$HA_HOME/run" || die "cannot create $HA_HOME/run"
    [[ -f "$GW_OUT" ]] && mv -f "$GW_OUT" "$GW_OUT.1"
    # setsid: the gateway outlives this shell and the terminal's Ctrl-C. The
    # shell is not interactive, so setsid execs in place and $! is its pid.
    if command -v setsid >/dev/null; then
        setsid "$FMQ_BIN_PATH" gateway --listen "$GW_HOST:$GW_PORT" </dev/null >"$GW_OUT" 2>&1 &
    else
        nohup "$FMQ_BIN_PATH" gateway --listen "$GW_HOST:$GW_PORT" </dev/null >"$GW_OUT" 2>&1 &
    fi
    pid=$!
    echo "$pid" >"$GW_PID_FILE"
    start=$SECONDS
    until fmq_port_open "$GW_HOST" "$GW_PORT"; do
        if ! fmq_alive "$pid"; then
            rm -f "$GW_PID_FILE"
            tail -n 20 "$GW_OUT" >&2
            die "the gateway exited during start-up"
        fi
        ((SECONDS - start < 10)) || die "the gateway (pid $pid) does not listen on $GW_HOST:$GW_PORT after 10 s"
        sleep 0.1
    done
    echo "gateway started with pid $pid on $GW_HOST:$GW_PORT (output $GW_OUT)"
}

stop_gateway() {
    local pid start
    if ! pid=$(gateway_pid); then
        rm -f "$GW_PID_FILE"
        echo "gateway is not running (no live pid in $GW_PID_FILE)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    start=$SECONDS
    while fmq_alive "$pid"; do
        if ((SECONDS - start >= 10)); then
            echo "$ME: gateway (pid $pid) still running after 10 s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$GW_PID_FILE"
    echo "gateway (pid $pid) stopped"
}

print_status() {
    local p port
    for p in "${PROFILES[@]}"; do
        port=$(admin_port_of "$p")
        echo "----- $p (admin port $port)"
        timeout 10 "$FMQ_BIN_PATH" status --admin-port "$port" 2>&1 ||
            echo "(not answering on admin port $port)"
    done
}

cmd_start() {
    local p rc start active="" passive="" s0 s1
    [[ -f "$HA_HOME/lock/lock.dat" ]] ||
        die "the lock file $HA_HOME/lock/lock.dat is missing: create it (an empty file) with: touch $HA_HOME/lock/lock.dat"
    if [[ $MODE == shared ]]; then
        mkdir -p "$HA_HOME/run/db" || die "cannot create the shared store directory $HA_HOME/run/db"
    fi
    start_gateway
    for p in "${PROFILES[@]}"; do
        "$SCRIPT_DIR/fmq.sh" -profile "$HA_HOME/$p"
        rc=$?
        # 2: already running, which is fine.
        [[ $rc -eq 0 || $rc -eq 2 ]] || die "$p did not start (see $HA_HOME/$p/run/fmq.out)"
    done
    local timeout=${FMQ_HA_TIMEOUT:-30}
    local a0 a1
    a0=$(admin_port_of "${PROFILES[0]}")
    a1=$(admin_port_of "${PROFILES[1]}")
    start=$SECONDS
    while :; do
        s0=$(ha_state "$a0")
        s1=$(ha_state "$a1")
        if [[ "$s0" == ACTIVE && "$s1" == PASSIVE ]]; then
            active=${PROFILES[0]} passive=${PROFILES[1]}
            break
        fi
        if [[ "$s0" == PASSIVE && "$s1" == ACTIVE ]]; then
            active=${PROFILES[1]} passive=${PROFILES[0]}
            break
        fi
        if ((SECONDS - start >= timeout)); then
            print_status
            die "no ACTIVE/PASSIVE pair after ${timeout}s (${PROFILES[0]}: ${s0:-no answer}, ${PROFILES[1]}: ${s1:-no answer}); see $HA_HOME/*/run/fmq.out"
        fi
        sleep 0.2
    done
    echo
    echo "HA pair up: $active is ACTIVE, $passive is PASSIVE"
    echo
    print_status
    local rel_home=${HA_HOME#"$PWD"/}
    local TAKEOVER="ACTIVATING, then ACTIVE," COMEBACK=PASSIVE
    if [[ $MODE == replicated ]]; then
        TAKEOVER=STANDALONE COMEBACK="PASSIVE_SYNC, catches up, then PASSIVE"
    fi
    cat <<EOF

Clients: STOMP on 127.0.0.1:$(fmq_profile_key "$HA_HOME/$active/fmq.toml" network port 1856) (the ACTIVE);
the PASSIVE's port answers CONNECT with an ERROR naming PASSIVE.

Watch a failover:
  watch -n 0.5 $FMQ_BIN_PATH status --admin-port $(admin_port_of "$passive")     # in another terminal
  kill -9 \$(cat $rel_home/$active/run/fmq.pid)                        # the ACTIVE dies
  # $passive goes $TAKEOVER within about a second
  # (logs: $rel_home/$passive/run/fmq.out)
  $SCRIPT_DIR/fmq.sh -profile $rel_home/$active    # comes back $COMEBACK
Stop everything:
  $SCRIPT_DIR/$ME stop
EOF
}

# The demo: target/release/examples/failover_demo (or $FMQ_DEMO_BIN) sends
# $FMQ_DEMO_COUNT (default 3000) numbered persistent messages, one every 2 ms,
# through a durable connection to both servers while a consumer on it
# receives and acknowledges them; the ACTIVE is killed with SIGKILL after
# 2 s. Exit status 1 if a message was lost or duplicated.
cmd_demo() {
    local demo=${FMQ_DEMO_BIN:-$FMQ_SH_HOME/target/release/examples/failover_demo}
    [[ -x "$demo" ]] ||
        die "$demo not found: build it with cargo build --release -p fmq-client --example failover_demo"
    local started
    started=$(cmd_start 2>&1) || { printf '%s\n' "$started" >&2; die "the pair did not start"; }
    local a0 a1 p0 p1 active="" pid out count=${FMQ_DEMO_COUNT:-3000}
    a0=$(admin_port_of "${PROFILES[0]}")
    a1=$(admin_port_of "${PROFILES[1]}")
    p0=$(fmq_profile_key "$HA_HOME/${PROFILES[0]}/fmq.toml" network port 1856)
    p1=$(fmq_profile_key "$HA_HOME/${PROFILES[1]}/fmq.toml" network port 1956)
    out=$(mktemp "${TMPDIR:-/tmp}/fmq-demo.XXXXXX")
    local buffer
    buffer=$(mktemp -d "${TMPDIR:-/tmp}/fmq-demo-buffer.XXXXXX")
    echo "failover demo ($MODE pair): $count messages through 127.0.0.1:$p0,127.0.0.1:$p1; the ACTIVE is killed with SIGKILL after 2 s"
    "$demo" --addr "127.0.0.1:$p0,127.0.0.1:$p1" --count "$count" --interval-ms 2 \
        --login "${FMQ_ADMIN_USER:-admin}" --passcode "${FMQ_ADMIN_PASSWORD:-passwd}" \
        --buffer-dir "$buffer" --client-id "fmq-demo-$$" \
        --destination "/queue/fmq-demo.$$.$RANDOM" >"$out" 2>&1 &
    local demo_pid=$! start=$SECONDS
    sleep 2
    if [[ "$(ha_state "$a0")" == ACTIVE ]]; then
        active=${PROFILES[0]}
    elif [[ "$(ha_state "$a1")" == ACTIVE ]]; then
        active=${PROFILES[1]}
    fi
    if [[ -n "$active" ]] && read -r pid <"$HA_HOME/$active/run/fmq.pid" && fmq_pid_is_fmq "$pid"; then
        echo "killing the ACTIVE server $active (pid $pid) with SIGKILL"
        kill -KILL "$pid"
    else
        echo "$ME: no ACTIVE server found to kill" >&2
    fi
    local rc=0
    while kill -0 "$demo_pid" 2>/dev/null; do
        if ((SECONDS - start > 300)); then
            kill -TERM "$demo_pid" 2>/dev/null
            echo "$ME: the demo did not finish in 300 s" >&2
            rc=1
            break
        fi
        sleep 0.5
    done
    wait "$demo_pid" || rc=1
    echo "--- client events ---"
    grep -E 'connected to|failed over|skipped|buffered sends replayed|disconnected|resubscribed' "$out" | head -n 20
    echo "--- result ---"
    grep -E '^(sent|received) ' "$out"
    local failover received
    failover=$(grep -o 'failed over from [^ ]* to [^ ]* in [0-9]* ms' "$out" | head -n 1)
    received=$(grep -E '^received ' "$out" | head -n 1)
    if [[ $rc -ne 0 || "$received" != *" 0 missing, 0 duplicates"* ]]; then
        tail -n 20 "$out" >&2
        rc=1
    fi
    rm -rf "$out" "$buffer"
    if [[ -n "$active" ]]; then
        echo "restarting $active"
        cmd_start >/dev/null 2>&1 || rc=1
    fi
    if [[ $rc -eq 0 ]]; then
        echo "FAILOVER DEMO PASSED: ${failover:-no failover seen}; $count messages, none lost, none duplicated"
    else
        echo "FAILOVER DEMO FAILED (see above)" >&2
    fi
    return "$rc"
}

cmd_stop() {
    local p port s rc=0
    local -a order=() later=()
    FMQ_BIN_PATH=${FMQ_BIN_PATH:-}
    # PASSIVE (or unresponsive) servers first: stopping the ACTIVE first
    # would make the other take over just to be stopped.
    for p in "${PROFILES[@]}"; do
        port=$(admin_port_of "$p")
        s=$(ha_state "$port")
        case "$s" in
            ACTIVE | ACTIVATING | ACTIVE_SYNC | STANDALONE) later+=("$p") ;;
            *) order+=("$p") ;;
        esac
    done
    for p in "${order[@]}" "${later[@]}"; do
        echo "stopping $p"
        "$SCRIPT_DIR/shutdown-fmq.sh" -profile "$HA_HOME/$p" -force
        case $? in
            0 | 1) ;;
            *) rc=1 ;;
        esac
    done
    stop_gateway
    return $rc
}

main() {
    local action=${1:-start}
    case "$action" in
        -h | -help | --help)
            awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        start | stop | status | demo) ;;
        *)
            echo "$ME: unknown action '$action' (start, stop, status or demo; see -help)" >&2
            exit 4
            ;;
    esac
    [[ -d "$HA_HOME/HAPrimary" && -d "$HA_HOME/HASecondary" ]] ||
        die "$HA_HOME has no HAPrimary and HASecondary profiles"
    FMQ_BIN_PATH=$(fmq_find_bin) || exit 1
    MODE=$(fmq_profile_key "$HA_HOME/HAPrimary/fmq.toml" ha mode shared)
    case "$action" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) print_status ;;
        demo) cmd_demo ;;
    esac
}

main "$@"
