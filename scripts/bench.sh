#!/usr/bin/env bash
# FerroMQ (standalone and replicated HA pair) vs ActiveMQ Classic vs RabbitMQ:
# persistent STOMP benchmarks on loopback.
#
#   scripts/bench.sh [--rounds R] [--settle S] [--messages N] [--messages-100 N] [--messages-16 N]
#                    [--warmup N] [--brokers ferromq,ferromq-rpl,activemq,rabbitmq] [--out FILE] [--no-build]
#                    [--no-install] [--no-strace] [--keep] [--serve] [--rpl-db DIR0,DIR1]
#
# --brokers (alias --only) selects the brokers; all four by default.
# ferromq-rpl is the replicated pair of profiles/FerroMQ_HA_rpl
# (`replication = "sync"`: a RECEIPT waits until the passive has the batch
# on disk too), both servers and their gateway on this machine, each with its
# own store; the load goes to the ACTIVE one.
#
# --rpl-db DIR0,DIR1 puts the pair's stores (HAPrimary's, HASecondary's) in a
# fresh directory under DIR0 and DIR1 instead of the run dir: on a machine
# with two disks, one store on each, as two hosts would have them. The report
# names the filesystem each store was on. A tmpfs directory (/dev/shm) takes
# a store's writes off the disk altogether: not durable, so only a way to see
# what the shared disk costs the pair, never a figure for the pair itself.
#
# --warmup N (default 200000) sends N messages through every broker before
# the rounds (a receipt every 100, consumed; not recorded), so each runs as
# it does after a while in service: FerroMQ's stores reuse their spent
# write-ahead-log files only after about two memtables of writes, the JVM
# has compiled its hot paths, and every broker has grown its files.
#
# --serve starts the brokers, prints their ports and waits (Ctrl-C stops them):
# handy for manual fmq-bench runs.
#
# Installs the peer brokers (Debian packages) if missing, builds fmq-bench and
# fmq-server, starts every broker as a child process of its own (setsid, own
# data dir, free loopback ports), then runs three scenarios against the
# brokers interleaved for R rounds (default 5), the first broker rotating from
# round to round, with `sync` and an S-second pause (default 2) before every
# run and fsync probes before each round (one writer, then two at once where
# the pair's two stores write; each on a growing file and on a reused one),
# and writes docs/benchmarks.md.
# After the rounds (unless --no-strace, or strace is missing) it runs each
# FerroMQ broker once more, untimed, under `strace -f -c -e fsync,fdatasync`
# (every server of the pair) and reports the syncs per message.
# Everything it started is stopped on exit and its temp dir removed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS="$ROOT/scripts/bench"
ROUNDS=5
SETTLE=2          # seconds of quiet disk before each run
MSG_EACH=5000      # receipt-each: messages (1 producer)
MSG_100=50000      # receipt-100: messages (1 producer)
MSG_16=1000        # producers-16: messages per producer (16 producers)
WARMUP=200000      # warm-up messages per broker (see --warmup)
SIZE=1024
PREFETCH=1000
ALL_BROKERS="ferromq ferromq-rpl activemq rabbitmq"
ONLY=${ALL_BROKERS// /,}
OUT="$ROOT/docs/benchmarks.md"
BUILD=1
INSTALL=1
KEEP=0
RUN_TIMEOUT=600    # per fmq-bench run, seconds
SERVE=0
STRACE=1           # count fsyncs per message of the FerroMQ servers after the rounds
RPL_DB=""          # DIR0,DIR1: parents of the pair's stores (default: the run dir)
CMDLINE="scripts/bench.sh${*:+ $*}"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --settle) SETTLE=$2; shift 2 ;;
        --messages) MSG_EACH=$2; shift 2 ;;
        --messages-100) MSG_100=$2; shift 2 ;;
        --messages-16) MSG_16=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --only|--brokers) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        --keep) KEEP=1; shift ;;
        --serve) SERVE=1; shift ;;
        --no-strace) STRACE=0; shift ;;
        --rpl-db) RPL_DB=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
for n in "$ROUNDS" "$SETTLE" "$MSG_EACH" "$MSG_100" "$MSG_16" "$WARMUP"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "bench.sh: '$n' is not a whole number (--rounds, --settle, --messages*, --warmup)" >&2; exit 2; }
done
RPL_DB_DIRS=()
if [[ -n "$RPL_DB" ]]; then
    IFS=, read -r -a RPL_DB_DIRS <<<"$RPL_DB"
    [[ ${#RPL_DB_DIRS[@]} == 2 ]] || { echo "bench.sh: --rpl-db wants two directories, DIR0,DIR1 (got '$RPL_DB')" >&2; exit 2; }
    for dir in "${RPL_DB_DIRS[@]}"; do
        [[ -d "$dir" && -w "$dir" ]] || { echo "bench.sh: --rpl-db: '$dir' is not a writable directory" >&2; exit 2; }
    done
fi

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"

# Brokers in interleaving order, filtered by --brokers.
BROKERS=()
for b in $ALL_BROKERS; do
    [[ ",$ONLY," == *",$b,"* ]] && BROKERS+=("$b")
done
for b in ${ONLY//,/ }; do
    [[ " $ALL_BROKERS " == *" $b "* ]] || die "--brokers: unknown broker '$b' (known: ${ALL_BROKERS// /,})"
done
[[ ${#BROKERS[@]} -gt 0 ]] || die "--brokers selects no broker"
want() { [[ " ${BROKERS[*]} " == *" $1 "* ]]; }
want_fmq() { want ferromq || want ferromq-rpl; }

# ---------------------------------------------------------------- install
RMQ_SBIN=""
find_rmq() {
    RMQ_SBIN=$(ls -d /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin 2>/dev/null | sort -V | tail -n1 || true)
}
if [[ $INSTALL == 1 ]]; then
    pkgs=()
    if want activemq && [[ ! -f /usr/share/activemq/bin/activemq.jar ]]; then pkgs+=(activemq); fi
    find_rmq
    if want rabbitmq && [[ -z "$RMQ_SBIN" ]]; then pkgs+=(rabbitmq-server); fi
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        log "installing ${pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then apt-get update -qq; fi
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
    fi
fi
find_rmq
if want activemq; then
    [[ -f /usr/share/activemq/bin/activemq.jar ]] || die "ActiveMQ not installed (apt-get install activemq)"
    command -v java >/dev/null || die "java not found"
fi
if want rabbitmq; then
    [[ -n "$RMQ_SBIN" ]] || die "RabbitMQ not installed (apt-get install rabbitmq-server)"
    command -v epmd >/dev/null || die "epmd not found"
fi
command -v python3 >/dev/null || die "python3 is needed (ports, fsync probe, report)"

# ---------------------------------------------------------------- build
TGT=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH_BIN="$TGT/release/fmq-bench"
FMQ_BIN="$TGT/release/fmq"
if [[ $BUILD == 1 ]]; then
    if command -v sccache >/dev/null; then
        export RUSTC_WRAPPER=${RUSTC_WRAPPER:-sccache}
        export SCCACHE_DIR=${SCCACHE_DIR:-/var/cache/fmq-sccache}
    fi
    if want_fmq; then
        log "building fmq-bench and fmq-server (release)"
        if ! (cd "$ROOT" && cargo build --release -p fmq-bench -p fmq-server); then
            log "WARNING: building fmq-server failed; building fmq-bench alone"
            (cd "$ROOT" && cargo build --release -p fmq-bench) || die "cargo build failed"
        fi
    else
        log "building fmq-bench (release)"
        (cd "$ROOT" && cargo build --release -p fmq-bench) || die "cargo build failed"
    fi
fi
[[ -x "$BENCH_BIN" ]] || die "$BENCH_BIN missing (build it or drop --no-build)"
[[ $BUILD == 1 ]] || warn_if_stale "$BENCH_BIN" "$FMQ_BIN"
if want_fmq && [[ ! -x "$FMQ_BIN" ]]; then
    log "SKIPPING FerroMQ: $FMQ_BIN does not exist (fmq-server not built yet)"
    SKIPPED_FERROMQ="FerroMQ skipped: $FMQ_BIN was missing"
    nb=(); for b in "${BROKERS[@]}"; do [[ $b == ferromq* ]] || nb+=("$b"); done
    BROKERS=("${nb[@]}")
    [[ ${#BROKERS[@]} -gt 0 ]] || die "no broker left to benchmark"
fi
SKIPPED_FERROMQ=${SKIPPED_FERROMQ:-}

# ---------------------------------------------------------------- run dir & cleanup
RUN=$(mktemp -d "${TMPDIR:-/tmp}/fmq-bench.XXXXXX")
mkdir -p "$RUN/results"
# Run from a snapshot of the binaries: others may rebuild target/ meanwhile.
{ read -r BENCH_BIN; read -r FMQ_BIN; } < <(snapshot_bins "$RUN/bin" "$BENCH_BIN" "$FMQ_BIN")
PGIDS=()     # process groups we started (setsid leaders)
RPL_STORES=() # --rpl-db: the store directories made for the pair, removed on exit
CHILD=""     # current foreground helper (fmq-bench run or sleep), stopped on exit
declare -A PIDOF=()

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
    if [[ -n "${PIDOF[ferromq]:-}" ]] && kill -0 "${PIDOF[ferromq]}" 2>/dev/null; then
        timeout 20 "$FMQ_BIN" shutdown --admin-port "$FMQ_ADMIN_PORT" >/dev/null 2>&1
    fi
    # The replicated pair: passive first, so no failover happens on the way.
    local n
    for n in "${RPL_PASSIVE_IDX:-1}" "$((1 - ${RPL_PASSIVE_IDX:-1}))"; do
        if [[ -n "${PIDOF[ferromq-rpl$n]:-}" ]] && kill -0 "${PIDOF[ferromq-rpl$n]}" 2>/dev/null; then
            timeout 20 "$FMQ_BIN" shutdown --admin-port "${RPL_ADMIN[$n]}" >/dev/null 2>&1
        fi
    done
    # Stop in reverse start order; epmd (started first, before RabbitMQ) goes last.
    local i
    for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do
        stop_group "${PGIDS[$i]%%:*}" "${PGIDS[$i]#*:}"
    done
    if [[ $KEEP == 1 ]]; then
        log "kept run dir $RUN"
        [[ ${#RPL_STORES[@]} -gt 0 ]] && log "kept the stores of the pair: ${RPL_STORES[*]}"
    else
        rm -rf "$RUN" "${RPL_STORES[@]}"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_is_free() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

wait_port() { # name pid port seconds logfile
    local name=$1 pid=$2 port=$3 secs=$4 logf=$5 t=0
    while ! port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; last log lines:"
            tail -n 30 "$logf" >&2 2>/dev/null || true
            return 1
        fi
        ((t++ >= secs * 2)) && { log "$name: port $port not open after ${secs}s"; tail -n 30 "$logf" >&2; return 1; }
        sleep 0.5
    done
}

start_child() { # name logfile cmd...  (new session; records pid)
    local name=$1 logf=$2; shift 2
    setsid "$@" >"$logf" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$RUN/$name.pid"
    PGIDS+=("$pid:$name")
    PIDOF[$name]=$pid
}

# ---------------------------------------------------------------- brokers
declare -A PORT=() LOGIN=() PASS=() VHOST=() VERSION=() STARTED=()

start_activemq() {
    local d="$RUN/activemq" p
    p=$(free_port)
    mkdir -p "$d/conf" "$d/data" "$d/tmp"
    sed -e "s|@PORT@|$p|g" -e "s|@DATA@|$d/data|g" "$HELPERS/activemq.xml.in" >"$d/conf/activemq.xml"
    sed -e "s|@LOG@|$d/activemq.log|g" "$HELPERS/log4j.properties" >"$d/conf/log4j.properties"
    local opens=(
        --add-opens=java.base/java.lang=ALL-UNNAMED
        --add-opens=java.base/java.util=ALL-UNNAMED
        --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
        --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
        --add-opens=java.base/java.net=ALL-UNNAMED
        --add-opens=java.base/java.security=ALL-UNNAMED
        --add-opens=java.naming/javax.naming.spi=ALL-UNNAMED
        --add-opens=java.rmi/sun.rmi.transport.tcp=ALL-UNNAMED
        --add-reads=java.xml=java.logging
    )
    port_is_free "$p" || die "port $p busy"
    start_child activemq "$d/stdout.log" \
        java -Xms512M -Xmx512M "${opens[@]}" \
        -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$d" -Dactivemq.conf="$d/conf" \
        -Dactivemq.data="$d/data" -Dactivemq.classpath="$d/conf" -Djava.io.tmpdir="$d/tmp" \
        -Dlog4j.configuration="file:$d/conf/log4j.properties" \
        -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$d/conf/activemq.xml"
    PORT[activemq]=$p; LOGIN[activemq]=""; PASS[activemq]=""; VHOST[activemq]=127.0.0.1
    VERSION[activemq]="ActiveMQ Classic $(dpkg-query -W -f='${Version}' activemq 2>/dev/null), KahaDB journalDiskSyncStrategy=always"
    wait_port activemq "${PIDOF[activemq]}" "$p" 120 "$d/stdout.log"
}

start_rabbitmq() {
    local d="$RUN/rabbitmq" p amqp dist epmd_port
    p=$(free_port); amqp=$(free_port); dist=$(free_port); epmd_port=$(free_port)
    for x in "$p" "$amqp" "$dist" "$epmd_port"; do port_is_free "$x" || die "port $x busy"; done
    mkdir -p "$d/home" "$d/mnesia" "$d/log"
    sed -e "s|@PORT@|$p|g" -e "s|@AMQP_PORT@|$amqp|g" "$HELPERS/rabbitmq.conf.in" >"$d/rabbitmq.conf"
    echo '[rabbitmq_stomp].' >"$d/enabled_plugins"
    : >"$d/rabbitmq-env.conf"
    python3 -c 'import secrets; print(secrets.token_hex(16).upper(), end="")' >"$d/home/.erlang.cookie"
    chmod 400 "$d/home/.erlang.cookie"
    # Our own epmd on its own loopback port, so we own (and stop) exactly it.
    start_child epmd "$d/epmd.log" epmd -port "$epmd_port" -address 127.0.0.1
    wait_port epmd "${PIDOF[epmd]}" "$epmd_port" 10 "$d/epmd.log"
    start_child rabbitmq "$d/stdout.log" env \
        HOME="$d/home" \
        ERL_EPMD_PORT="$epmd_port" ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
        RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_NODENAME="fmqbench$$@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp" \
        RABBITMQ_DIST_PORT="$dist" \
        "$RMQ_SBIN/rabbitmq-server"
    PORT[rabbitmq]=$p; LOGIN[rabbitmq]=guest; PASS[rabbitmq]=guest; VHOST[rabbitmq]=/
    VERSION[rabbitmq]="RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null), classic durable queues"
    wait_port rabbitmq "${PIDOF[rabbitmq]}" "$p" 180 "$d/stdout.log"
}

FMQ_ADMIN_PORT=""
start_ferromq() {
    local d="$RUN/ferromq" p a
    [[ -d "$ROOT/profiles/FerroMQ" ]] || { log "profiles/FerroMQ missing"; return 1; }
    p=$(free_port); a=$(free_port)
    for x in "$p" "$a"; do port_is_free "$x" || die "port $x busy"; done
    mkdir -p "$d/db"
    cp -r "$ROOT/profiles/FerroMQ" "$d/profile"
    sed -i -E -e "s/^([[:space:]]*)port[[:space:]]*=[[:space:]]*1856\b.*/\1port = $p/" \
        -e "s/^([[:space:]]*)admin_port[[:space:]]*=[[:space:]]*1858\b.*/\1admin_port = $a/" \
        "$d/profile/fmq.toml"
    grep -Eq "^[[:space:]]*port = $p\$" "$d/profile/fmq.toml" || { log "could not set port in fmq.toml"; return 1; }
    grep -Eq "^[[:space:]]*admin_port = $a\$" "$d/profile/fmq.toml" || { log "could not set admin_port in fmq.toml"; return 1; }
    FMQ_ADMIN_PORT=$a
    start_child ferromq "$d/stdout.log" "$FMQ_BIN" -profile "$d/profile" -dbPath "$d/db"
    PORT[ferromq]=$p; LOGIN[ferromq]="admin"; PASS[ferromq]="passwd"; VHOST[ferromq]=127.0.0.1
    VERSION[ferromq]="FerroMQ $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?') (release build of $(stat -c %y "$FMQ_BIN" | cut -d. -f1)), store $(grep -E '^[[:space:]]*sync[[:space:]]*=' "$d/profile/fmq.toml" | head -n1 | tr -s ' ' || echo 'sync = (default)')"
    wait_port ferromq "${PIDOF[ferromq]}" "$p" 60 "$d/stdout.log"
}

# The replicated pair: a gateway and two servers (0 = HAPrimary,
# 1 = HASecondary) from copies of profiles/FerroMQ_HA_rpl with free ports,
# each with a fresh store of its own (run/db under its profile copy, or
# under the --rpl-db directories).
declare -A RPL_PORT=() RPL_ADMIN=()
RPL_ACTIVE_IDX=""
RPL_PASSIVE_IDX=""
rpl_states() { # -> "state0/state1"
    echo "$(fmq_ha_state "$FMQ_BIN" "${RPL_ADMIN[0]}")/$(fmq_ha_state "$FMQ_BIN" "${RPL_ADMIN[1]}")"
}
rpl_wait_pair() { # seconds: until one server is ACTIVE and the other PASSIVE; sets RPL_ACTIVE_IDX
    local secs=$1 start=$SECONDS st
    while :; do
        st=$(rpl_states)
        case "$st" in
            ACTIVE/PASSIVE) RPL_ACTIVE_IDX=0; RPL_PASSIVE_IDX=1; return 0 ;;
            PASSIVE/ACTIVE) RPL_ACTIVE_IDX=1; RPL_PASSIVE_IDX=0; return 0 ;;
        esac
        if ((SECONDS - start >= secs)); then
            log "replicated pair not ACTIVE/PASSIVE after ${secs}s (states $st)"
            tail -n 20 "$RUN"/ferromq-rpl/HA*/run/fmq.out >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
}
start_ferromq_rpl() {
    local d="$RUN/ferromq-rpl" src="$ROOT/profiles/FerroMQ_HA_rpl" ports p0 p1 a0 a1 g i stores
    [[ -f "$src/HAPrimary/fmq.toml" && -f "$src/HASecondary/fmq.toml" ]] || { log "profiles/FerroMQ_HA_rpl missing"; return 1; }
    ports=$(fmq_pair_profiles "$src" "$d") || return 1
    read -r p0 p1 a0 a1 g <<<"$ports"
    RPL_PORT[0]=$p0; RPL_PORT[1]=$p1; RPL_ADMIN[0]=$a0; RPL_ADMIN[1]=$a1
    grep -Eq '^replication = "sync"' "$d/HAPrimary/fmq.toml" || log "WARNING: profiles/FerroMQ_HA_rpl does not set replication = \"sync\""
    start_child ferromq-rpl-gw "$d/run/gateway.out" "$FMQ_BIN" gateway --listen "127.0.0.1:$g"
    wait_port "replicated pair gateway" "${PIDOF[ferromq-rpl-gw]}" "$g" 10 "$d/run/gateway.out" || return 1
    for i in 0 1; do
        if [[ ${#RPL_DB_DIRS[@]} == 2 ]]; then
            RPL_STORES[i]=$(mktemp -d "${RPL_DB_DIRS[$i]}/fmq-bench-$(rpl_profile "$i").XXXXXX") || return 1
        fi
        rpl_start_server "$i" fmq.out
        wait_port "replicated $(rpl_profile "$i")" "${PIDOF[ferromq-rpl$i]}" "${RPL_ADMIN[$i]}" 60 \
            "$d/$(rpl_profile "$i")/run/fmq.out" || return 1
    done
    rpl_wait_pair 90 || return 1
    PORT[ferromq-rpl]=${RPL_PORT[$RPL_ACTIVE_IDX]}; LOGIN[ferromq-rpl]="admin"; PASS[ferromq-rpl]="passwd"; VHOST[ferromq-rpl]=127.0.0.1
    PIDOF[ferromq-rpl]=${PIDOF[ferromq-rpl$RPL_ACTIVE_IDX]}
    local role; role=$(rpl_profile "$RPL_ACTIVE_IDX")
    if [[ ${#RPL_STORES[@]} == 2 ]]; then
        stores="stores (--rpl-db): HAPrimary's on $(store_fs "${RPL_STORES[0]}"); HASecondary's on $(store_fs "${RPL_STORES[1]}")"
    else
        stores="both stores on the same disk ($(store_fs "$d"))"
    fi
    VERSION[ferromq-rpl]="FerroMQ $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?') (release build of $(stat -c %y "$FMQ_BIN" | cut -d. -f1)), replicated pair of profiles/FerroMQ_HA_rpl on this machine ($(grep -E '^replication[[:space:]]*=' "$d/HAPrimary/fmq.toml" | head -n1 | tr -s ' '), store $(grep -E '^[[:space:]]*sync[[:space:]]*=' "$d/HAPrimary/fmq.toml" | head -n1 | tr -s ' '), ping_interval $(grep -E '^ping_interval' "$d/HAPrimary/fmq.toml" | grep -Eo '[0-9]+') ms), load sent to the ACTIVE ($role), $stores"
}
rpl_profile() { # server index (0, 1) -> its profile name
    if [[ $1 == 0 ]]; then echo HAPrimary; else echo HASecondary; fi
}
rpl_start_server() { # server index, log file name: starts that server of the pair
    # on its profile copy, with its --rpl-db store if there is one
    local prof
    prof=$(rpl_profile "$1")
    start_child "ferromq-rpl$1" "$RUN/ferromq-rpl/$prof/run/$2" "$FMQ_BIN" -profile "$RUN/ferromq-rpl/$prof" \
        ${RPL_STORES[$1]:+-dbPath "${RPL_STORES[$1]}/db"}
}
store_fs() { # dir -> "DEVICE, FSTYPE", or "tmpfs, in memory: not durable"
    local src fstype
    read -r src fstype < <(df --output=source,fstype "$1" | tail -n 1)
    if [[ $fstype == tmpfs ]]; then
        echo "tmpfs, in memory: not durable"
    else
        echo "$src, $fstype"
    fi
}
stop_ferromq_rpl() { # after a failed start
    local n
    for n in ferromq-rpl1 ferromq-rpl0 ferromq-rpl-gw; do stop_group "${PIDOF[$n]:-}" "$n"; done
}

FAILED_START=()
for b in "${BROKERS[@]}"; do
    log "starting $b"
    if "start_${b//-/_}"; then
        STARTED[$b]=1
        log "$b listening on 127.0.0.1:${PORT[$b]} (pid ${PIDOF[$b]})"
    else
        FAILED_START+=("$b")
        log "WARNING: $b did not start; it is left out"
        if [[ $b == ferromq-rpl ]]; then stop_ferromq_rpl; else stop_group "${PIDOF[$b]:-}" "$b" || true; fi
    fi
done
ACTIVE=()
for b in "${BROKERS[@]}"; do [[ -n "${STARTED[$b]:-}" ]] && ACTIVE+=("$b"); done
[[ ${#ACTIVE[@]} -gt 0 ]] || die "no broker started"

if [[ $SERVE == 1 ]]; then
    for b in "${ACTIVE[@]}"; do
        echo "$b: --port ${PORT[$b]} --vhost ${VHOST[$b]}${LOGIN[$b]:+ --login ${LOGIN[$b]} --passcode ${PASS[$b]}}"
    done
    log "serving until interrupted (run dir $RUN)"
    while :; do sleep 3600 & CHILD=$!; wait $CHILD; done
fi

# ---------------------------------------------------------------- runs
# The replicated pair's HA view, one JSON line: per server (0 = HAPrimary)
# state, pid, since_ms (when it entered the state) and store sequence.
rpl_snapshot() {
    local i raw=()
    for i in 0 1; do
        raw+=("$(timeout 3 "$FMQ_BIN" status --admin-port "${RPL_ADMIN[$i]}" --json 2>/dev/null | tr -d '\n' || true)")
    done
    python3 - "${raw[@]}" <<'EOF'
import json, sys
res = []
for raw in sys.argv[1:]:
    try:
        j = json.loads(raw)
        ha = j.get("ha") or {}
        res.append({"state": ha.get("state"), "pid": j.get("pid"), "since_ms": ha.get("since_ms"),
                    "sequence": (ha.get("position") or {}).get("sequence")})
    except ValueError:
        res.append({"state": None})
print(json.dumps(res))
EOF
}

RPL_EVENTS=()   # servers of the pair found dead and restarted, failovers seen
rpl_before_run() { # restart a server that died (others share this machine), wait for ACTIVE/PASSIVE
    local i prof old=$RPL_ACTIVE_IDX
    for i in 0 1; do
        if ! kill -0 "${PIDOF[ferromq-rpl$i]}" 2>/dev/null; then
            prof=$(rpl_profile "$i")
            log "WARNING: replicated $prof (pid ${PIDOF[ferromq-rpl$i]}) is gone (killed from outside?); restarting it"
            RPL_EVENTS+=("$(date -u +%H:%M:%S) $prof pid ${PIDOF[ferromq-rpl$i]} found dead before a run; restarted")
            rpl_start_server "$i" "fmq.restart.$SECONDS.out"
        fi
    done
    rpl_wait_pair 90 || return 1
    if [[ $RPL_ACTIVE_IDX != "$old" ]]; then
        RPL_EVENTS+=("$(date -u +%H:%M:%S) the active moved from server $old to server $RPL_ACTIVE_IDX")
    fi
    PORT[ferromq-rpl]=${RPL_PORT[$RPL_ACTIVE_IDX]}
    PIDOF[ferromq-rpl]=${PIDOF[ferromq-rpl$RPL_ACTIVE_IDX]}
}

bench() { # broker scenario round extra-args...  -> results/<scenario>.<broker>.<round>.json
    local b=$1 sc=$2 r=$3; shift 3
    local ha_before="" ha_after=""
    if [[ $b == ferromq-rpl ]]; then
        rpl_before_run || log "WARNING: replicated pair not ACTIVE/PASSIVE before $sc round $r"
        ha_before=$(rpl_snapshot)
    fi
    local out="$RUN/results/$sc.$b.$r.json" args=(--host 127.0.0.1 --port "${PORT[$b]}" --vhost "${VHOST[$b]}")
    [[ -n "${LOGIN[$b]}" ]] && args+=(--login "${LOGIN[$b]}" --passcode "${PASS[$b]}")
    args+=(--destination "/queue/fmqbench.$sc.$r.$$.$RANDOM" --size "$SIZE" --persistent
        --ack client-individual --prefetch "$PREFETCH" --timeout "$RUN_TIMEOUT" --json "$@")
    local rc=0
    # In the background + wait, so Ctrl-C/SIGTERM reach the cleanup trap at once.
    "$BENCH_BIN" "${args[@]}" >"$out" 2>"$out.err" &
    CHILD=$!
    wait $CHILD || rc=$?
    CHILD=""
    [[ -s "$out" ]] || echo "{\"ok\": false, \"errors\": [\"fmq-bench exit $rc: $(tr -d '"\\\n' <"$out.err" | head -c 300)\"]}" >"$out"
    [[ $b == ferromq-rpl ]] && ha_after=$(rpl_snapshot)
    python3 - "$out" "$b" "$sc" "$r" "$rc" "$ha_before" "$ha_after" <<'EOF' >&2
import json, sys
j = json.load(open(sys.argv[1]))
note = ""
if sys.argv[6]:
    # Replicated pair: the run counts only if the same two processes were
    # ACTIVE and PASSIVE, without a state change, from before to after it.
    before, after = json.loads(sys.argv[6]), json.loads(sys.argv[7] or "[]")
    j["ha"] = {"before": before, "after": after}
    def pair(s):
        return sorted(x.get("state") or "-" for x in s) == ["ACTIVE", "PASSIVE"]
    # since_ms (entry into the state) is reported with a ms or two of jitter.
    stable = pair(before) and len(after) == 2 and pair(after) and all(
        (a.get("state"), a.get("pid")) == (b.get("state"), b.get("pid"))
        and abs((a.get("since_ms") or 0) - (b.get("since_ms") or 0)) < 100
        for a, b in zip(before, after))
    j["ha_stable"] = stable
    if not stable:
        j.setdefault("warnings", []).append(
            "HA pair not ACTIVE/PASSIVE throughout the run (before %s, after %s): excluded from the medians"
            % ("/".join(str(x.get("state")) for x in before), "/".join(str(x.get("state")) for x in after)))
        note = " HA-UNSTABLE"
    json.dump(j, open(sys.argv[1], "w"))
lat = j.get("latency_ms", {})
print(f"  {sys.argv[3]:<13} {sys.argv[2]:<11} round {sys.argv[4]}: {j.get('msg_per_sec', 0):9.0f} msg/s "
      f"p50 {lat.get('p50', 0):7.2f} ms p99 {lat.get('p99', 0):7.2f} ms lost {j.get('lost', '?')} "
      f"dup {j.get('duplicates', '?')} exit {sys.argv[5]}{note} {'; '.join(j.get('errors', []))}")
EOF
}

settle() { # flush dirty pages of the previous run, then pause
    sync
    sleep "$SETTLE"
}

# Warm-up to a steady state (see --warmup), not recorded.
if [[ $WARMUP -gt 0 ]]; then
    for b in "${ACTIVE[@]}"; do
        log "warm-up $b: $WARMUP messages"
        bench "$b" warmup 0 --messages "$WARMUP" --receipt-every 100 || true
    done
fi

# The two-writer probe writes where the pair's two stores are.
PROBE_PAIR=("$RUN/probe" "$RUN/probe")
[[ ${#RPL_DB_DIRS[@]} == 2 ]] && PROBE_PAIR=("${RPL_DB_DIRS[0]}/probe" "${RPL_DB_DIRS[1]}/probe")
echo -e "round\tfsync_median_ms\tfsync_p90_ms\ttwo_writers_median_ms\ttwo_writers_p90_ms\toverwrite_median_ms\toverwrite_p90_ms\ttwo_overwrite_median_ms\ttwo_overwrite_p90_ms" >"$RUN/fsync.tsv"
T0=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    probes=()
    for mode in append overwrite; do
        read -r med p90 < <(fsync_probe 200 "$mode" "$RUN/probe")
        read -r med2 p902 < <(fsync_probe 200 "$mode" "${PROBE_PAIR[@]}")
        probes+=("$med" "$p90" "$med2" "$p902")
        log "round $r/$ROUNDS: fsync probe ($mode) median $med ms, p90 $p90 ms; two writers at once: median $med2 ms, p90 $p902 ms"
    done
    (IFS=$'\t'; echo "$r${IFS}${probes[*]}") >>"$RUN/fsync.tsv"
    # Rotate which broker goes first, so none always runs right after the
    # same neighbour (whose background disk writes would then always land
    # on it), and let the disk settle before every run.
    ORDER=()
    for ((i = 0; i < ${#ACTIVE[@]}; i++)); do ORDER+=("${ACTIVE[$(((i + r - 1) % ${#ACTIVE[@]}))]}"); done
    for b in "${ORDER[@]}"; do settle; bench "$b" receipt-each "$r" --producers 1 --messages "$MSG_EACH" --receipt-every 1; done
    for b in "${ORDER[@]}"; do settle; bench "$b" receipt-100 "$r" --producers 1 --messages "$MSG_100" --receipt-every 100; done
    for b in "${ORDER[@]}"; do settle; bench "$b" producers-16 "$r" --producers 16 --messages "$MSG_16" --receipt-every 1; done
done
ELAPSED=$(($(date +%s) - T0))

# fsyncs per message of the FerroMQ servers (not timed: strace slows them).
# Writes fsyncs.tsv: broker scenario server messages syscall-count pair-in-sync.
strace_counts() { # broker scenario messages-per-producer producers receipt-every
    local b=$1 sc=$2 n=$3 np=$4 re=$5 pids=() names=() spids=() i f
    if [[ $b == ferromq ]]; then
        pids=("${PIDOF[ferromq]}"); names=(standalone)
    else
        rpl_before_run || return 0
        pids=("${PIDOF[ferromq-rpl$RPL_ACTIVE_IDX]}" "${PIDOF[ferromq-rpl$((1 - RPL_ACTIVE_IDX))]}")
        names=(active passive)
    fi
    for i in "${!pids[@]}"; do
        strace -f -c -e trace=fsync,fdatasync -o "$RUN/strace.$b.$sc.${names[$i]}" -p "${pids[$i]}" 2>/dev/null &
        spids+=($!)
    done
    sleep 1
    bench "$b" "strace-$sc" 0 --producers "$np" --messages "$n" --receipt-every "$re" || true
    sleep 0.5
    for i in "${!spids[@]}"; do kill -INT "${spids[$i]}" 2>/dev/null; wait "${spids[$i]}" 2>/dev/null || true; done
    for i in "${!pids[@]}"; do
        f="$RUN/strace.$b.$sc.${names[$i]}"
        echo -e "$b\t$sc\t${names[$i]}\t$((n * np))\t$(awk '$NF == "total" { print $4 }' "$f" 2>/dev/null || echo '?')\t$(python3 -c 'import json, sys
try: print({True: "yes", False: "no"}.get(json.load(open(sys.argv[1])).get("ha_stable"), "-"))
except (OSError, ValueError): print("-")' "$RUN/results/strace-$sc.$b.0.json")" >>"$RUN/fsyncs.tsv"
    done
}
if [[ $STRACE == 1 ]] && command -v strace >/dev/null; then
    for b in "${ACTIVE[@]}"; do
        [[ $b == ferromq* ]] || continue
        log "strace fsync counts: $b"
        strace_counts "$b" receipt-each 2000 1 1
        strace_counts "$b" receipt-100 5000 1 100
        strace_counts "$b" producers-16 200 16 1
    done
fi

# ---------------------------------------------------------------- report
{
    echo "command=$CMDLINE"
    echo "rounds=$ROUNDS"
    echo "settle=$SETTLE"
    echo "msg_each=$MSG_EACH"
    echo "msg_100=$MSG_100"
    echo "msg_16=$MSG_16"
    echo "warmup=$WARMUP"
    echo "size=$SIZE"
    echo "prefetch=$PREFETCH"
    echo "elapsed=$ELAPSED"
    echo "brokers=${ACTIVE[*]}"
    echo "failed_start=${FAILED_START[*]:-}"
    echo "skipped=$SKIPPED_FERROMQ"
    echo "rpl_events=$(IFS='|'; echo "${RPL_EVENTS[*]:-}")"
    echo "load=$(cut -d' ' -f1-3 /proc/loadavg)"
    for b in "${ACTIVE[@]}"; do echo "version.$b=${VERSION[$b]}"; done
    echo "nproc=$(nproc)"
    echo "mem=$(free -h | awk '/^Mem:/ {print $2}')"
    echo "kernel=$(uname -srm)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "java=$(java -version 2>&1 | head -n1)"
    echo "fs=$(store_fs "$RUN")"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
} >"$RUN/meta.txt"
mkdir -p "$(dirname "$OUT")"
python3 "$HELPERS/report.py" "$RUN" "$OUT"
log "wrote $OUT (rounds took ${ELAPSED}s)"
python3 - "$RUN/results" <<'EOF'
import glob, json, sys
bad = []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    if "/warmup." in f:
        continue
    j = json.load(open(f))
    if not j.get("ok"):
        bad.append(f.rsplit("/", 1)[1])
if bad:
    print("runs with loss, duplicates, errors or timeouts: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
