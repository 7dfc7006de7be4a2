#!/usr/bin/env bash
# CPU time per message of running FerroMQ servers over one fmq-bench run,
# per process and per thread (user and system), from /proc/PID/task/*/stat.
#
#   scripts/bench/cpu.sh --port PORT [--producers P] [--messages M]
#                        [--receipt-every R] [--size BYTES] PID...
#
# PORT is the STOMP port the load goes to (the ACTIVE of a pair); PID... are
# the servers to account for (both servers of a pair, to see what the
# passive costs). Start the servers with `scripts/bench.sh --serve`, which
# prints the ports, and find the PIDs with `pgrep -af 'fmq -profile'`.
# Clock ticks are 10 ms, so runs of 30,000 messages or more give figures to
# about 1 us per message. The threads' figures include everything they did
# during the run (HA pings, status refreshes), which is noise next to the
# load. Login costs (argon2, tens of ms per connection) are in them too: use
# enough messages per producer that they do not matter.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=${FMQ_BENCH:-${CARGO_TARGET_DIR:-$ROOT/target}/release/fmq-bench}
PORT=""
PRODUCERS=1
MESSAGES=30000
RECEIPT_EVERY=100
SIZE=1024
PIDS=()

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) PORT=$2; shift 2 ;;
        --producers) PRODUCERS=$2; shift 2 ;;
        --messages) MESSAGES=$2; shift 2 ;;
        --receipt-every) RECEIPT_EVERY=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "cpu.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) PIDS+=("$1"); shift ;;
    esac
done
[[ -n "$PORT" ]] || { echo "cpu.sh: --port is required" >&2; usage >&2; exit 2; }
[[ ${#PIDS[@]} -gt 0 ]] || { echo "cpu.sh: name at least one server PID" >&2; exit 2; }
[[ -x "$BENCH" ]] || { echo "cpu.sh: $BENCH not built (cargo build --release -p fmq-bench)" >&2; exit 1; }
for pid in "${PIDS[@]}"; do
    [[ -r /proc/$pid/stat ]] || { echo "cpu.sh: no process $pid" >&2; exit 1; }
done

snapshot() { # -> lines "pid/tid/comm utime stime"
    local pid t
    for pid in "${PIDS[@]}"; do
        for t in /proc/"$pid"/task/*; do
            # comm may hold spaces: fields after the closing parenthesis.
            awk -v id="$pid/${t##*/}/$(tr ' ' _ < "$t"/comm)" \
                '{ sub(/^.*\) /, ""); print id, $12, $13 }' "$t"/stat 2>/dev/null || true
        done
    done | sort
}

before=$(snapshot)
"$BENCH" --host 127.0.0.1 --port "$PORT" --vhost 127.0.0.1 --login admin --passcode passwd \
    --destination "/queue/cpu.$$.$RANDOM" --size "$SIZE" --persistent --ack client-individual \
    --prefetch 1000 --timeout 300 --json --producers "$PRODUCERS" --messages "$MESSAGES" \
    --receipt-every "$RECEIPT_EVERY" 2>/dev/null |
    python3 -c 'import json, sys; j = json.load(sys.stdin); print("%d msg/s, lost %d, duplicates %d" % (j["msg_per_sec"], j["lost"], j["duplicates"]))'
after=$(snapshot)

total=$((PRODUCERS * MESSAGES))
tick_us=$((1000000 / $(getconf CLK_TCK)))
join <(echo "$before") <(echo "$after") | awk -v n="$total" -v tick="$tick_us" '
    {
        split($1, id, "/"); u = ($4 - $2) * tick / n; s = ($5 - $3) * tick / n
        proc[id[1]] += u + s
        if (u + s > 0) printf "  %-7s %-7s %-16s user %6.1f us/msg  sys %6.1f us/msg\n", id[1], id[2], id[3], u, s
    }
    END { for (p in proc) printf "pid %s: %.1f us of CPU per message\n", p, proc[p] }'
