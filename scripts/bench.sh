#!/usr/bin/env bash
# FerroMQ vs ActiveMQ Classic vs RabbitMQ: persistent STOMP benchmarks on loopback.
#
#   scripts/bench.sh [--rounds R] [--settle S] [--messages N] [--messages-100 N] [--messages-16 N]
#                    [--only ferromq,activemq,rabbitmq] [--out FILE] [--no-build]
#                    [--no-install] [--keep] [--serve]
#
# --serve starts the brokers, prints their ports and waits (Ctrl-C stops them):
# handy for manual fmq-bench runs.
#
# Installs the peer brokers (Debian packages) if missing, builds fmq-bench and
# fmq-server, starts every broker as a child process of its own (setsid, own
# data dir, free loopback ports), then runs three scenarios against the
# brokers interleaved for R rounds (default 5), the first broker rotating from
# round to round, with `sync` and an S-second pause (default 2) before every
# run and an fsync probe before each round, and writes docs/benchmarks.md.
# Everything it started is stopped on exit and its temp dir removed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS="$ROOT/scripts/bench"
ROUNDS=5
SETTLE=2          # seconds of quiet disk before each run
MSG_EACH=5000      # receipt-each: messages (1 producer)
MSG_100=50000      # receipt-100: messages (1 producer)
MSG_16=1000        # producers-16: messages per producer (16 producers)
SIZE=1024
PREFETCH=1000
ONLY="ferromq,activemq,rabbitmq"
OUT="$ROOT/docs/benchmarks.md"
BUILD=1
INSTALL=1
KEEP=0
RUN_TIMEOUT=600    # per fmq-bench run, seconds
SERVE=0
CMDLINE="scripts/bench.sh $*"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --settle) SETTLE=$2; shift 2 ;;
        --messages) MSG_EACH=$2; shift 2 ;;
        --messages-100) MSG_100=$2; shift 2 ;;
        --messages-16) MSG_16=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        --keep) KEEP=1; shift ;;
        --serve) SERVE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"

# Brokers in interleaving order, filtered by --only.
BROKERS=()
for b in ferromq activemq rabbitmq; do
    [[ ",$ONLY," == *",$b,"* ]] && BROKERS+=("$b")
done
for b in ${ONLY//,/ }; do
    case "$b" in ferromq|activemq|rabbitmq) ;; *) die "--only: unknown broker '$b'" ;; esac
done
[[ ${#BROKERS[@]} -gt 0 ]] || die "--only selects no broker"
want() { [[ " ${BROKERS[*]} " == *" $1 "* ]]; }

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
    if want ferromq; then
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
if want ferromq && [[ ! -x "$FMQ_BIN" ]]; then
    log "SKIPPING FerroMQ: $FMQ_BIN does not exist (fmq-server not built yet)"
    SKIPPED_FERROMQ="FerroMQ skipped: $FMQ_BIN was missing"
    nb=(); for b in "${BROKERS[@]}"; do [[ $b == ferromq ]] || nb+=("$b"); done
    BROKERS=("${nb[@]}")
    [[ ${#BROKERS[@]} -gt 0 ]] || die "no broker left to benchmark"
fi
SKIPPED_FERROMQ=${SKIPPED_FERROMQ:-}

# ---------------------------------------------------------------- run dir & cleanup
RUN=$(mktemp -d "${TMPDIR:-/tmp}/fmq-bench.XXXXXX")
mkdir -p "$RUN/results"
PGIDS=()     # process groups we started (setsid leaders)
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
    # Stop in reverse start order; epmd (started first, before RabbitMQ) goes last.
    local i
    for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do
        stop_group "${PGIDS[$i]%%:*}" "${PGIDS[$i]#*:}"
    done
    if [[ $KEEP == 1 ]]; then
        log "kept run dir $RUN"
    else
        rm -rf "$RUN"
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
    VERSION[ferromq]="FerroMQ $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?') (release build), store $(grep -E '^[[:space:]]*sync[[:space:]]*=' "$d/profile/fmq.toml" | head -n1 | tr -s ' ' || echo 'sync = (default)')"
    wait_port ferromq "${PIDOF[ferromq]}" "$p" 60 "$d/stdout.log"
}

FAILED_START=()
for b in "${BROKERS[@]}"; do
    log "starting $b"
    if "start_$b"; then
        STARTED[$b]=1
        log "$b listening on 127.0.0.1:${PORT[$b]} (pid ${PIDOF[$b]})"
    else
        FAILED_START+=("$b")
        log "WARNING: $b did not start; it is left out"
        stop_group "${PIDOF[$b]:-}" "$b" || true
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
bench() { # broker scenario round extra-args...  -> results/<scenario>.<broker>.<round>.json
    local b=$1 sc=$2 r=$3; shift 3
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
    python3 - "$out" "$b" "$sc" "$r" "$rc" <<'EOF' >&2
import json, sys
j = json.load(open(sys.argv[1]))
lat = j.get("latency_ms", {})
print(f"  {sys.argv[3]:<13} {sys.argv[2]:<9} round {sys.argv[4]}: {j.get('msg_per_sec', 0):9.0f} msg/s "
      f"p50 {lat.get('p50', 0):7.2f} ms p99 {lat.get('p99', 0):7.2f} ms lost {j.get('lost', '?')} "
      f"dup {j.get('duplicates', '?')} exit {sys.argv[5]} {'; '.join(j.get('errors', []))}")
EOF
}

settle() { # flush dirty pages of the previous run, then pause
    sync
    sleep "$SETTLE"
}

fsync_probe() { # round -> prints ms per 4 KiB write+fdatasync (median, p90)
    python3 - "$RUN/probe" <<'EOF'
import os, sys, time, statistics
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = b"\0" * 4096
lat = []
for _ in range(200):
    t = time.perf_counter()
    os.write(fd, buf)
    os.fdatasync(fd)
    lat.append((time.perf_counter() - t) * 1000)
os.close(fd)
os.unlink(sys.argv[1])
lat.sort()
print(f"{statistics.median(lat):.3f} {lat[int(len(lat) * 0.9)]:.3f}")
EOF
}

# Warm-up (JIT, queue creation paths), not recorded.
for b in "${ACTIVE[@]}"; do
    log "warm-up $b"
    bench "$b" warmup 0 --messages 2000 --receipt-every 10 || true
done

echo -e "round\tfsync_median_ms\tfsync_p90_ms" >"$RUN/fsync.tsv"
T0=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    read -r fmed fp90 < <(fsync_probe)
    echo -e "$r\t$fmed\t$fp90" >>"$RUN/fsync.tsv"
    log "round $r/$ROUNDS: fsync probe median $fmed ms, p90 $fp90 ms"
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

# ---------------------------------------------------------------- report
{
    echo "command=$CMDLINE"
    echo "rounds=$ROUNDS"
    echo "settle=$SETTLE"
    echo "msg_each=$MSG_EACH"
    echo "msg_100=$MSG_100"
    echo "msg_16=$MSG_16"
    echo "size=$SIZE"
    echo "prefetch=$PREFETCH"
    echo "elapsed=$ELAPSED"
    echo "brokers=${ACTIVE[*]}"
    echo "failed_start=${FAILED_START[*]:-}"
    echo "skipped=$SKIPPED_FERROMQ"
    for b in "${ACTIVE[@]}"; do echo "version.$b=${VERSION[$b]}"; done
    echo "nproc=$(nproc)"
    echo "mem=$(free -h | awk '/^Mem:/ {print $2}')"
    echo "kernel=$(uname -srm)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "java=$(java -version 2>&1 | head -n1)"
    echo "fs=$(df -hT "$RUN" | awk 'NR==2 {print $1" "$2}')"
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
