#!/usr/bin/env bash
# Failover time of HA pairs: FerroMQ shared-storage and replicated (sync)
# pairs vs ActiveMQ Classic (shared-file master/slave), kill -9 of the
# active, on loopback.
#
#   scripts/failover-bench.sh [--runs N] [--pre S] [--post S] [--rate R]
#                             [--amq-lock-sleep MS]
#                             [--brokers ferromq,ferromq-rpl,activemq]
#                             [--no-build] [--no-install] [--no-docs] [--keep]
#
# --brokers (alias --only) selects the pairs; all three by default.
# Starts the pairs as child processes of its own (setsid, temp dir, free
# 127.0.0.1 ports): FerroMQ's gateway + HAPrimary + HASecondary (copies of
# profiles/FerroMQ_HA_shared with rewritten ports, one shared store), the
# same for the replicated pair (profiles/FerroMQ_HA_rpl, a store per server,
# replication = "sync", its own gateway), and two ActiveMQ brokers on one
# KahaDB directory (scripts/bench/activemq-shared.xml.in, lock retry
# --amq-lock-sleep ms, default 1000). Then N runs per pair (default 10),
# interleaved (shared, replicated, ActiveMQ, shared, ...). Each run: a Python/stomp.py
# producer sends 1 KiB persistent messages with a receipt each at R/s
# (default 100) to a fresh queue on the active; after S s (--pre, default 3)
# the active's process gets SIGKILL; the producer retries both ports every
# 20 ms and resends the unreceipted message; failover time = first RECEIPT
# from the new active minus the kill time. After --post s (default 2) more
# it drains the queue and counts lost (receipted, not drained) and duplicate
# sequence numbers. The killed broker is restarted (it becomes the standby)
# before the next run. Writes docs/failover.md and the section between
# <!-- failover:begin --> and <!-- failover:end --> of docs/benchmarks.md.
# Everything it started is stopped on exit and its temp dir removed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS="$ROOT/scripts/bench"
RUNS=10
PRE=3
POST=2
RATE=100
SIZE=1024
AMQ_LOCK_SLEEP=1000
ALL_BROKERS="ferromq ferromq-rpl activemq"
ONLY=${ALL_BROKERS// /,}
BUILD=1
INSTALL=1
DOCS=1
KEEP=0
CMDLINE="scripts/failover-bench.sh${*:+ $*}"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --pre) PRE=$2; shift 2 ;;
        --post) POST=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --amq-lock-sleep) AMQ_LOCK_SLEEP=$2; shift 2 ;;
        --only|--brokers) ONLY=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        --no-docs) DOCS=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "failover-bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[failover %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"
STOP_WAIT=10

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
command -v python3 >/dev/null || die "python3 is needed"
if [[ $INSTALL == 1 ]]; then
    if want activemq && [[ ! -f /usr/share/activemq/bin/activemq.jar ]]; then
        log "installing activemq"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-cache show activemq >/dev/null 2>&1; then apt-get update -qq; fi
        apt-get install -y -qq --no-install-recommends activemq >&2
    fi
    if ! python3 -c 'import stomp' 2>/dev/null; then
        log "installing stomp.py 8.2.0 (pip)"
        python3 -m pip install -q stomp.py==8.2.0 >&2 ||
            python3 -m pip install -q --break-system-packages stomp.py==8.2.0 >&2
    fi
fi
python3 -c 'import stomp' 2>/dev/null || die "stomp.py missing (python3 -m pip install stomp.py==8.2.0)"
if want activemq; then
    [[ -f /usr/share/activemq/bin/activemq.jar ]] || die "ActiveMQ not installed (apt-get install activemq)"
    command -v java >/dev/null || die "java not found"
fi

# ---------------------------------------------------------------- build
TGT=${CARGO_TARGET_DIR:-$ROOT/target}
FMQ_BIN="$TGT/release/fmq"
if [[ $BUILD == 1 ]] && want_fmq; then
    if command -v sccache >/dev/null; then
        export RUSTC_WRAPPER=${RUSTC_WRAPPER:-sccache}
        export SCCACHE_DIR=${SCCACHE_DIR:-/var/cache/fmq-sccache}
    fi
    log "building fmq-server (release)"
    (cd "$ROOT" && cargo build --release -p fmq-server) || die "cargo build failed"
fi
if want_fmq; then [[ -x "$FMQ_BIN" ]] || die "$FMQ_BIN missing (build it or drop --no-build)"; fi
if want_fmq && [[ $BUILD == 0 ]]; then warn_if_stale "$FMQ_BIN"; fi

# ---------------------------------------------------------------- run dir & cleanup
RUN=$(mktemp -d "${TMPDIR:-/tmp}/fmq-failover.XXXXXX")
mkdir -p "$RUN/results"
# Run (and restart) from a snapshot of the binary: others may rebuild target/.
if want_fmq; then FMQ_BIN=$(snapshot_bins "$RUN/bin" "$FMQ_BIN"); fi
declare -A PIDOF=()   # name -> pid of the live child (setsid leader)
CHILD=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
    # Standbys first (so no failover happens while stopping), gateway last.
    local n
    for n in amq1 amq0 rpl1 rpl0 gateway-rpl fmq1 fmq0 gateway; do
        stop_group "${PIDOF[$n]:-}" "$n"
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

start_child() { # name logfile cmd...  (new session; records pid)
    local name=$1 logf=$2; shift 2
    setsid "$@" >>"$logf" 2>&1 </dev/null &
    PIDOF[$name]=$!
}

# ---------------------------------------------------------------- FerroMQ pairs
# Two kinds: ferromq (shared store, profiles/FerroMQ_HA_shared) and
# ferromq-rpl (a store per server, profiles/FerroMQ_HA_rpl). Each lives in
# $RUN/<kind>: HAPrimary, HASecondary, lock/lock.dat (empty), run (the
# gateway's output; the shared store run/db), and has its own gateway.
# Processes: fmq0/fmq1/gateway (shared), rpl0/rpl1/gateway-rpl (replicated);
# index 0 is HAPrimary. Arrays are keyed "<kind>:<index>".
declare -A FPORT=() FADMIN=() FGW=()
fmq_name() { # kind index -> process name
    if [[ $1 == ferromq ]]; then echo "fmq$2"; else echo "rpl$2"; fi
}
setup_fmq_pair() { # kind
    local k=$1 src ports p0 p1 a0 a1 g gw=gateway
    src="$ROOT/profiles/FerroMQ_HA_shared"
    if [[ $k == ferromq-rpl ]]; then src="$ROOT/profiles/FerroMQ_HA_rpl"; gw=gateway-rpl; fi
    ports=$(fmq_pair_profiles "$src" "$RUN/$k") || die "cannot set up the $k pair from $src"
    read -r p0 p1 a0 a1 g <<<"$ports"
    FPORT[$k:0]=$p0; FPORT[$k:1]=$p1; FADMIN[$k:0]=$a0; FADMIN[$k:1]=$a1; FGW[$k]=$g
    start_child "$gw" "$RUN/$k/run/gateway.out" "$FMQ_BIN" gateway --listen "127.0.0.1:$g"
    local t=0
    until port_open "$g"; do ((t++ < 50)) || die "gateway does not listen on $g"; sleep 0.1; done
}

start_fmq() { # kind index
    local k=$1 i=$2 prof=HAPrimary
    [[ $i == 1 ]] && prof=HASecondary
    start_child "$(fmq_name "$k" "$i")" "$RUN/$k/$prof/run/fmq.out" "$FMQ_BIN" -profile "$RUN/$k/$prof"
}

fmq_state() { # kind index -> ACTIVE, PASSIVE, ... or nothing
    fmq_ha_state "$FMQ_BIN" "${FADMIN[$1:$2]}"
}

# Waits until one server is ACTIVE and the other PASSIVE (a replicated
# passive is PASSIVE only once it has caught up); sets ACTIVE_IDX.
wait_fmq_pair() { # kind
    local k=$1 start=$SECONDS s0 s1
    while :; do
        s0=$(fmq_state "$k" 0); s1=$(fmq_state "$k" 1)
        if [[ $s0 == ACTIVE && $s1 == PASSIVE ]]; then ACTIVE_IDX=0; return 0; fi
        if [[ $s0 == PASSIVE && $s1 == ACTIVE ]]; then ACTIVE_IDX=1; return 0; fi
        ((SECONDS - start < 60)) || { log "$k pair not ACTIVE/PASSIVE after 60 s ($s0/$s1)"; tail -n 20 "$RUN/$k"/HA*/run/fmq.out >&2; return 1; }
        sleep 0.2
    done
}

# ---------------------------------------------------------------- ActiveMQ pair
AX="$RUN/activemq"
declare -A APORT=() ASTARTS=()
AMQ_OPENS=(
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
setup_activemq() {
    local i d
    mkdir -p "$AX/kahadb"
    for i in 0 1; do
        d="$AX/b$i"
        APORT[$i]=$(free_port)
        ASTARTS[$i]=0
        mkdir -p "$d/conf" "$d/data" "$d/tmp"
        sed -e "s|@PORT@|${APORT[$i]}|g" -e "s|@DATA@|$d/data|g" -e "s|@KAHADB@|$AX/kahadb|g" \
            -e "s|@LOCK_SLEEP_MS@|$AMQ_LOCK_SLEEP|g" "$HELPERS/activemq-shared.xml.in" >"$d/conf/activemq.xml"
    done
}

start_amq() { # index; each start logs to its own file (b<i>/activemq.<n>.log)
    local i=$1 d="$AX/b$1"
    ASTARTS[$i]=$((ASTARTS[$i] + 1))
    sed -e "s|@LOG@|$d/activemq.${ASTARTS[$i]}.log|g" "$HELPERS/log4j.properties" >"$d/conf/log4j.properties"
    start_child "amq$i" "$d/stdout.log" \
        java -Xms256M -Xmx512M "${AMQ_OPENS[@]}" \
        -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$d" -Dactivemq.conf="$d/conf" \
        -Dactivemq.data="$d/data" -Dactivemq.classpath="$d/conf" -Djava.io.tmpdir="$d/tmp" \
        -Dlog4j.configuration="file:$d/conf/log4j.properties" \
        -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$d/conf/activemq.xml"
}

amq_log() { echo "$AX/b$1/activemq.${ASTARTS[$1]}.log"; }

# Waits until one broker listens (master) and the other logs that it waits
# for the lock (slave); sets ACTIVE_IDX.
wait_amq_pair() {
    local start=$SECONDS i o
    while :; do
        for i in 0 1; do
            o=$((1 - i))
            if kill -0 "${PIDOF[amq$i]}" 2>/dev/null && port_open "${APORT[$i]}" &&
                kill -0 "${PIDOF[amq$o]}" 2>/dev/null &&
                grep -qs 'slave mode' "$(amq_log "$o")" && ! port_open "${APORT[$o]}"; then
                ACTIVE_IDX=$i
                return 0
            fi
        done
        ((SECONDS - start < 120)) || { log "ActiveMQ pair not master/slave after 120 s"; tail -n 20 "$AX"/b*/stdout.log >&2; return 1; }
        sleep 0.3
    done
}

# ---------------------------------------------------------------- prober
cat >"$RUN/failover_run.py" <<'EOF'
"""One failover run: produce with receipts, kill -9 the active, reconnect, drain."""
import argparse, json, os, signal, sys, threading, time
import stomp

ap = argparse.ArgumentParser()
ap.add_argument("--ports", required=True)          # active first
ap.add_argument("--kill-pid", type=int, required=True)
ap.add_argument("--login", default=None)
ap.add_argument("--passcode", default=None)
ap.add_argument("--queue", required=True)
ap.add_argument("--rate", type=float, default=100)
ap.add_argument("--size", type=int, default=1024)
ap.add_argument("--pre", type=float, default=3)
ap.add_argument("--post", type=float, default=2)
ap.add_argument("--give-up", type=float, default=60)
ap.add_argument("--out", required=True)
a = ap.parse_args()
PORTS = [int(p) for p in a.ports.split(",")]
now = time.monotonic


class L(stomp.ConnectionListener):
    def __init__(self):
        self.cv = threading.Condition()
        self.receipts = {}
        self.dead = False
        self.msgs = []
        self.last_msg = now()

    def on_receipt(self, frame):
        with self.cv:
            self.receipts[frame.headers.get("receipt-id")] = now()
            self.cv.notify_all()

    def on_error(self, frame):
        with self.cv:
            self.dead = True
            self.cv.notify_all()

    def on_disconnected(self):
        with self.cv:
            self.dead = True
            self.cv.notify_all()

    def on_message(self, frame):
        with self.cv:
            self.msgs.append(frame.headers.get("seq"))
            self.last_msg = now()


def try_connect(port):
    """CONNECT to one port; (conn, listener) or None. Never blocks long."""
    lis = L()
    c = stomp.Connection12([("127.0.0.1", port)], reconnect_attempts_max=1,
                           reconnect_sleep_initial=0, reconnect_sleep_increase=0,
                           reconnect_sleep_jitter=0, heartbeats=(0, 0))
    c.set_listener("l", lis)
    try:
        c.connect(a.login, a.passcode, wait=False, with_connect_command=True,
                  headers={"host": "127.0.0.1"})
    except Exception:
        return None
    deadline = now() + 2
    while now() < deadline:
        if c.is_connected():
            return c, lis
        if c.transport.connection_error or lis.dead or not c.transport.running:
            break
        time.sleep(0.002)
    close(c)
    return None


def close(c):
    # Not transport.stop(): it waits for the receiver thread, which a socket
    # without timeout only leaves once the socket is shut down.
    c.transport.running = False
    try:
        c.transport.disconnect_socket()
    except Exception:
        pass


def connect_any(deadline):
    i = 0
    while now() < deadline:
        port = PORTS[i % len(PORTS)]
        r = try_connect(port)
        if r:
            return r + (port, now())
        i += 1
        if i % len(PORTS) == 0:
            time.sleep(0.02)
    raise SystemExit("could not reconnect within %.0f s" % a.give_up)


body = "x" * a.size
t_start = now()
conn, lis, port, t_conn = connect_any(t_start + 10)
first_port = port
receipted = {}       # seq -> receipt time
sends = 0
resends = 0
reconnects = 0
t_kill = None
t_first_new = None
new_port = None
kill_done = threading.Event()


def killer():
    global t_kill
    time.sleep(a.pre)
    t_kill = now()
    os.kill(a.kill_pid, signal.SIGKILL)
    kill_done.set()


threading.Thread(target=killer, daemon=True).start()
seq = 0
interval = 1.0 / a.rate
next_at = now()
t_stop = None
while True:
    seq += 1
    if t_stop is not None and now() >= t_stop:
        break
    delay = next_at - now()
    if delay > 0:
        time.sleep(delay)
    next_at = max(next_at + interval, now())
    rid = "r%d" % seq
    while True:  # until this seq is receipted
        ok = False
        try:
            conn.send("/queue/" + a.queue, body, content_type="text/plain",
                      headers={"persistent": "true", "receipt": rid, "seq": str(seq)})
            sends += 1
            with lis.cv:
                lis.cv.wait_for(lambda: rid in lis.receipts or lis.dead, timeout=5)
                ok = rid in lis.receipts
        except Exception:
            ok = False
        if ok:
            tr = lis.receipts[rid]
            receipted[seq] = tr
            if t_kill is not None and t_conn > t_kill and t_first_new is None:
                t_first_new = tr
                new_port = port
                t_stop = tr + a.post
            break
        # Connection lost (or no receipt in 5 s): reconnect, resend the same seq.
        close(conn)
        if now() - t_start > a.pre + a.give_up:
            raise SystemExit("gave up")
        kill_done.wait(timeout=a.pre + 5)  # a lost connection before the kill is unexpected
        conn, lis, port, t_conn = connect_any(now() + a.give_up)
        reconnects += 1
        resends += 1
last_seq = seq - 1

# Drain on the new active.
drain = L()
dc = None
for _ in range(100):
    r = try_connect(new_port)
    if r:
        dc, drain = r
        break
    time.sleep(0.1)
close(conn)
if dc is None:
    raise SystemExit("cannot connect to drain")
dc.subscribe("/queue/" + a.queue, id="d", ack="auto", headers={"activemq.prefetchSize": "1000"})
t0 = now()
while True:
    time.sleep(0.1)
    with drain.cv:
        idle = now() - drain.last_msg
        n = len(drain.msgs)
    if (n > 0 and idle > 1.5) or (n == 0 and now() - t0 > 10):
        break
print("drain: %d frames, dead=%s" % (n, drain.dead), file=sys.stderr)
close(dc)

got = [int(s) for s in drain.msgs if s is not None]
counts = {}
for s in got:
    counts[s] = counts.get(s, 0) + 1
before = [s for s, t in receipted.items() if t < t_kill]
lost_before = sorted(s for s in before if s not in counts)
lost_any = sorted(s for s in receipted if s not in counts)
dups = sum(c - 1 for c in counts.values() if c > 1)
res = {
    "failover_ms": (t_first_new - t_kill) * 1000,
    "first_port": first_port, "new_port": new_port,
    "receipted": len(receipted), "receipted_before_kill": len(before),
    "sends": sends, "resends": resends, "reconnects": reconnects,
    "drained": len(got), "lost": len(lost_before), "lost_any": len(lost_any),
    "lost_seqs": lost_any[:20], "duplicates": dups,
    "unreceipted_drained": len([s for s in counts if s not in receipted]),
    "last_seq": last_seq,
}
json.dump(res, open(a.out, "w"))
print(json.dumps(res))
EOF

# ---------------------------------------------------------------- start
for k in ferromq ferromq-rpl; do
    want "$k" || continue
    log "starting FerroMQ $k pair (gateway, HAPrimary, HASecondary)"
    setup_fmq_pair "$k"
    start_fmq "$k" 0
    sleep 1   # let the primary take the lock first
    start_fmq "$k" 1
    wait_fmq_pair "$k" || die "FerroMQ $k pair did not come up"
    log "FerroMQ $k: active index $ACTIVE_IDX, ports ${FPORT[$k:0]}/${FPORT[$k:1]}, admin ${FADMIN[$k:0]}/${FADMIN[$k:1]}, gateway ${FGW[$k]}"
done
if want activemq; then
    log "starting ActiveMQ shared-file pair (lock retry ${AMQ_LOCK_SLEEP} ms)"
    setup_activemq
    start_amq 0
    t=0
    until port_open "${APORT[0]}"; do
        kill -0 "${PIDOF[amq0]}" 2>/dev/null || { tail -n 30 "$AX/b0/stdout.log" >&2; die "ActiveMQ 0 exited"; }
        ((t++ < 240)) || die "ActiveMQ 0 not listening after 120 s"
        sleep 0.5
    done
    start_amq 1
    wait_amq_pair || die "ActiveMQ pair did not come up"
    log "ActiveMQ: active index $ACTIVE_IDX, ports ${APORT[0]}/${APORT[1]}"
fi

one_run() { # broker run
    local b=$1 r=$2 ai oi pid ports out rc=0 args=()
    if [[ $b == ferromq* ]]; then
        wait_fmq_pair "$b" || return 1
        ai=$ACTIVE_IDX; oi=$((1 - ai)); pid=${PIDOF[$(fmq_name "$b" "$ai")]}
        ports="${FPORT[$b:$ai]},${FPORT[$b:$oi]}"
        args=(--login admin --passcode passwd)
    else
        wait_amq_pair || return 1
        ai=$ACTIVE_IDX; oi=$((1 - ai)); pid=${PIDOF[amq$ai]}
        ports="${APORT[$ai]},${APORT[$oi]}"
    fi
    out="$RUN/results/$b.$r.json"
    local fs
    read -r fs _ < <(fsync_probe 100 append "$RUN/probe")
    sync
    sleep 1
    timeout 180 python3 "$RUN/failover_run.py" --ports "$ports" --kill-pid "$pid" "${args[@]}" \
        --queue "failover.$b.$r.$$" --rate "$RATE" --size "$SIZE" --pre "$PRE" --post "$POST" \
        --out "$out" >"$out.log" 2>&1 &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    # The killed broker is dead (SIGKILL) unless the prober failed early.
    if [[ $b == ferromq* ]]; then
        stop_group "${PIDOF[$(fmq_name "$b" "$ai")]}" "$(fmq_name "$b" "$ai")"
        start_fmq "$b" "$ai"
    else
        stop_group "${PIDOF[amq$ai]}" "amq$ai"
        start_amq "$ai"
    fi
    if [[ $rc != 0 || ! -s "$out" ]]; then
        log "  $b run $r FAILED (exit $rc): $(tail -n 3 "$out.log" | tr '\n' ' ')"
        echo "{\"error\": \"exit $rc\", \"fsync_ms\": $fs, \"killed\": $ai}" >"$out"
        return 0
    fi
    python3 - "$out" "$fs" "$ai" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
j["fsync_ms"] = float(sys.argv[2]); j["killed"] = int(sys.argv[3])
json.dump(j, open(sys.argv[1], "w"))
EOF
    python3 - "$out" "$b" "$r" <<'EOF' >&2
import json, sys
j = json.load(open(sys.argv[1]))
print(f"  {sys.argv[2]:<11} run {sys.argv[3]:>2}: failover {j['failover_ms']:7.0f} ms, receipted {j['receipted']} "
      f"(before kill {j['receipted_before_kill']}), drained {j['drained']}, lost {j['lost']}/{j['lost_any']}, "
      f"dup {j['duplicates']}, fsync {j['fsync_ms']} ms")
EOF
}

T0=$(date +%s)
for ((r = 1; r <= RUNS; r++)); do
    for b in "${BROKERS[@]}"; do one_run "$b" "$r"; done
done
ELAPSED=$(($(date +%s) - T0))
# The last restart: wait until each pair is healthy again (checks the restart works).
for k in ferromq ferromq-rpl; do
    if want "$k"; then wait_fmq_pair "$k" || log "WARNING: FerroMQ $k pair not healthy after the last restart"; fi
done
if want activemq; then wait_amq_pair || log "WARNING: ActiveMQ pair not healthy after the last restart"; fi

# ---------------------------------------------------------------- report
{
    echo "command=$CMDLINE"
    echo "runs=$RUNS"
    echo "pre=$PRE"
    echo "post=$POST"
    echo "rate=$RATE"
    echo "size=$SIZE"
    echo "amq_lock_sleep=$AMQ_LOCK_SLEEP"
    echo "elapsed=$ELAPSED"
    echo "brokers=${BROKERS[*]}"
    fmq_build="FerroMQ $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?') (release build${FMQ_BIN:+ of $(stat -c %y "$FMQ_BIN" 2>/dev/null | cut -d. -f1)})"
    timings() { # profile dir -> "ping N ms, lock A/P ms" as shipped
        local f="$ROOT/profiles/$1/HAPrimary/fmq.toml" k
        local -A v
        for k in ping_interval active_lock_reacquisition_interval passive_lock_reacquisition_interval; do
            v[$k]=$(grep -E "^${k}[[:space:]]*=" "$f" 2>/dev/null | grep -Eo '[0-9]+' | head -n1)
        done
        echo "ping ${v[ping_interval]:-?} ms, lock ${v[active_lock_reacquisition_interval]:-?}/${v[passive_lock_reacquisition_interval]:-?} ms"
    }
    echo "version.ferromq=$fmq_build, shared pair, profiles/FerroMQ_HA_shared timings ($(timings FerroMQ_HA_shared))"
    echo "version.ferromq-rpl=$fmq_build, replicated pair, profiles/FerroMQ_HA_rpl timings ($(timings FerroMQ_HA_rpl)), $(grep -Eh '^replication =' "$ROOT/profiles/FerroMQ_HA_rpl/HAPrimary/fmq.toml" 2>/dev/null | head -n1), a store per server on the same disk"
    echo "version.activemq=ActiveMQ Classic $(dpkg-query -W -f='${Version}' activemq 2>/dev/null || echo '?'), shared-file-locker lockAcquireSleepInterval=$AMQ_LOCK_SLEEP ms, KahaDB journalDiskSyncStrategy=always"
    echo "stomp=stomp.py $(python3 -c 'import stomp; print(stomp.__version__)' 2>/dev/null)"
    echo "nproc=$(nproc)"
    echo "mem=$(free -h | awk '/^Mem:/ {print $2}')"
    echo "kernel=$(uname -srm)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    # shellcheck disable=SC1091
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "java=$(java -version 2>&1 | head -n1)"
    echo "fs=$(df -hT "$RUN" | awk 'NR==2 {print $1" "$2}')"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
} >"$RUN/meta.txt"

python3 - "$RUN" "$ROOT/docs" "$DOCS" <<'EOF'
import glob, json, os, re, statistics, sys
run, docs, write = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
meta = dict(l.rstrip("\n").split("=", 1) for l in open(run + "/meta.txt") if "=" in l)
names = {"ferromq": "FerroMQ shared", "ferromq-rpl": "FerroMQ replicated (sync)", "activemq": "ActiveMQ"}
order = ("ferromq", "ferromq-rpl", "activemq")
res = {}
for f in sorted(glob.glob(run + "/results/*.json")):
    b, r = os.path.basename(f).split(".")[:2]
    res.setdefault(b, {})[int(r)] = json.load(open(f))
L = []
w = L.append
w("## Failover time (kill -9 of the active)")
w("")
w(f"Generated by `scripts/failover-bench.sh` on {meta['date']}; command: `{meta['command']}`.")
w("")
w(f"Each run: one stomp.py producer sends {meta['size']}-byte persistent messages, each with a receipt "
  f"(waiting for it before the next), at ~{meta['rate']}/s to a fresh queue on the active; after "
  f"{meta['pre']} s the active's process gets SIGKILL. The producer then tries both ports every 20 ms "
  f"and resends the unreceipted message. **Failover time = first RECEIPT from the new active minus the "
  f"kill time.** {meta['post']} s later it drains the queue on the new active: *lost* = receipted "
  f"before the kill but not drained, *duplicates* = sequence numbers drained more than once. The killed "
  f"broker is then restarted as the standby. {meta['runs']} runs per broker, interleaved.")
w("")
w("| broker | runs | median failover ms | max failover ms | min ms | lost (receipted, not drained) | duplicates | failed runs |")
w("|---|---|---|---|---|---|---|---|")
summary = {}
for b in order:
    if b not in res:
        continue
    rs = res[b]
    ok = [j for j in rs.values() if "failover_ms" in j]
    fo = [j["failover_ms"] for j in ok]
    lost = sum(j["lost"] for j in ok)
    lost_any = sum(j["lost_any"] for j in ok)
    dup = sum(j["duplicates"] for j in ok)
    failed = len(rs) - len(ok)
    med = statistics.median(fo) if fo else float("nan")
    mx = max(fo) if fo else float("nan")
    summary[b] = (med, mx, failed)
    w(f"| {names[b]} | {len(ok)} | {med:.0f} | {mx:.0f} | {min(fo) if fo else float('nan'):.0f} | "
      f"{lost} ({lost_any} incl. after the kill) | {dup} | {failed} |")
w("")
w("Per run (ms; lost/duplicates per run):")
w("")
bs = [b for b in order if b in res]
w("| run | " + " | ".join(names[b] for b in bs) + " |")
w("|---|" + "---|" * len(bs))
for r in range(1, int(meta["runs"]) + 1):
    cells = []
    for b in bs:
        j = res[b].get(r, {})
        if "failover_ms" in j:
            cells.append(f"{j['failover_ms']:.0f} (lost {j['lost']}, dup {j['duplicates']}, fsync {j['fsync_ms']} ms)")
        else:
            cells.append("failed: " + j.get("error", "missing"))
    w(f"| {r} | " + " | ".join(cells) + " |")
w("")
fpairs = [b for b in ("ferromq", "ferromq-rpl") if b in summary]
if fpairs:
    w("### FerroMQ targets")
    w("")
    w("| target | measured | status |")
    w("|---|---|---|")
    for b in fpairs:
        med, mx, failed = summary[b]
        lost = sum(j["lost"] for j in res[b].values() if "failover_ms" in j)
        pair = "" if len(fpairs) == 1 and b == "ferromq" else f" ({names[b]})"
        w(f"| median failover < 1 s{pair} | {med:.0f} ms | {'met' if med < 1000 and failed == 0 else 'not met'} |")
        w(f"| max failover < 2 s{pair} | {mx:.0f} ms | {'met' if mx < 2000 and failed == 0 else 'not met'} |")
        w(f"| no receipted message lost{pair} | {lost} lost | {'met' if lost == 0 and failed == 0 else 'not met'} |")
    w("")
w("### Setup and machine")
w("")
for b in bs:
    w(f"- {meta['version.' + b]}")
w(f"- client: {meta['stomp']}, Python {sys.version.split()[0]}; everything on 127.0.0.1; "
  f"fsync probe (4 KiB write + fdatasync, median of 100) before every run, in the per-run table")
w(f"- {meta['cpu']}, {meta['nproc']} vCPU, {meta['mem']} RAM; {meta['os']}, {meta['kernel']}; "
  f"{meta['java']}; temp dir on {meta['fs']}")
w(f"- runs took {meta['elapsed']} s")
w("")
w("Notes: FerroMQ's shared pair runs with the shipped `profiles/FerroMQ_HA_shared` timings (see the setup "
  "above) on copies of the profiles with free ports, with its own "
  "`fmq gateway`. The replicated pair likewise from `profiles/FerroMQ_HA_rpl` (its own shipped timings, "
  "`replication = \"sync\"`, each server its own store, its own gateway): the passive sees the HA link "
  "drop (or 3 missed pings), confirms it holds the lock and reaches the gateway, and serves STANDALONE "
  "from its own store; the killed server, restarted, catches up from the new active's batch log and the "
  "pair is ACTIVE/PASSIVE again before its next run. ActiveMQ's slave polls the KahaDB lock every `lockAcquireSleepInterval` (default "
  "10 s; 1 s here, `--amq-lock-sleep`), then starts its transport. A duplicate is the message in "
  "flight at the kill: stored, but its receipt lost, so the producer resends it.")
w("")
w("Run it: `scripts/failover-bench.sh` (options: `--runs N --pre S --post S --rate R "
  "--amq-lock-sleep MS --brokers ferromq,ferromq-rpl,activemq --no-build --no-install --no-docs --keep`).")
text = "\n".join(L) + "\n"
print(text)
if write:
    with open(docs + "/failover.md", "w") as f:
        f.write("# FerroMQ failover benchmark\n\n" + text.replace("## Failover time", "## Failover time", 1))
    bm = docs + "/benchmarks.md"
    cur = open(bm).read() if os.path.exists(bm) else ""
    block = "<!-- failover:begin -->\n" + text + "<!-- failover:end -->\n"
    pat = re.compile(r"<!-- failover:begin -->.*?<!-- failover:end -->\n?", re.S)
    if pat.search(cur):
        cur = pat.sub(lambda m: block, cur)
    else:
        cur = cur.rstrip("\n") + "\n\n" + block
    with open(bm, "w") as f:
        f.write(cur)
    print(f"wrote {docs}/failover.md and the failover section of {bm}", file=sys.stderr)
EOF
