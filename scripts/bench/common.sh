# shellcheck shell=bash
# Helpers shared by scripts/bench.sh and scripts/failover-bench.sh. Source it
# after defining log(); it defines functions only and runs nothing.
# STOP_WAIT (seconds, default 30) bounds how long stop_group waits after
# SIGTERM before SIGKILL.

stop_group() { # pid name: SIGTERM the process group, wait, then SIGKILL
    local pid=$1 name=$2 i
    [[ "$pid" =~ ^[0-9]+$ && "$pid" -gt 1 ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < ${STOP_WAIT:-30} * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    log "$name (pid $pid) still running after ${STOP_WAIT:-30} s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

warn_if_stale() { # binary...: a --no-build run must not credit an old binary
    # to the checkout it reports (git describe names the sources, not the
    # build). Cargo's dep-info file beside each binary lists the sources it
    # was built from; warn when one of them is newer than the binary.
    local b f newer
    for b in "$@"; do
        [[ -x "$b" && -f "$b.d" ]] || continue
        newer=""
        for f in $(cut -d: -f2- "$b.d"); do
            [[ -f "$f" && "$f" -nt "$b" ]] && { newer=$f; break; }
        done
        if [[ -n "$newer" ]]; then
            log "WARNING: $b is older than its source $newer (--no-build runs it as it is; rebuild, or set CARGO_TARGET_DIR to the target dir you built in)"
        fi
    done
}

fsync_probe() { # count mode path...: one writer process per path, all at
    # once (as the replicated pair's two stores write), each writing 4 KiB +
    # fdatasync count times to a file of its own beside path; prints the
    # median and p90 in ms of all the writes. Mode append grows a fresh file
    # (a new write-ahead-log file); overwrite writes over a file written and
    # synced beforehand (a reused one, as FerroMQ's store writes once it has
    # written a few hundred MiB)
    python3 - "$@" <<'EOF'
import multiprocessing, os, sys, time, statistics

def probe(path, n, mode, out):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = b"\0" * 4096
    if mode == "overwrite":
        os.write(fd, buf * n)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, buf)
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1000)
    os.close(fd)
    os.unlink(path)
    out.put(lat)

n, mode, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if mode not in ("append", "overwrite"):
    sys.exit(f"fsync_probe: mode must be append or overwrite, not {mode!r}")
out = multiprocessing.Queue()
procs = [multiprocessing.Process(target=probe, args=(f"{p}.fsync-probe.{i}", n, mode, out))
         for i, p in enumerate(paths)]
for p in procs:
    p.start()
lat = sorted(x for _ in procs for x in out.get())
for p in procs:
    p.join()
print(f"{statistics.median(lat):.3f} {lat[int(len(lat) * 0.9)]:.3f}")
EOF
}

free_port() { # -> a port free on 127.0.0.1 right now
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

port_open() { # port: true when something accepts on 127.0.0.1:port
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

free_ports() { # n -> n distinct ports free on 127.0.0.1 right now, one line
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

# fmq_pair_profiles SRC DIR: copies SRC/HAPrimary/fmq.toml and
# SRC/HASecondary/fmq.toml (profiles/FerroMQ_HA_shared or FerroMQ_HA_rpl)
# to DIR/HAPrimary and DIR/HASecondary with every shipped port (client
# 1856/1956, admin 1858/1859, HA 2000/3000, gateway 7007) replaced by a free
# one, and creates DIR/lock/lock.dat (empty), DIR/run and DIR/HA*/run, so
# relative store paths (../run/db shared, run/db replicated) land in DIR.
# Prints "client0 client1 admin0 admin1 gateway" (0 = primary); returns 1
# (with a message on stderr) if a port could not be rewritten.
fmq_pair_profiles() {
    local src=$1 dir=$2 p0 p1 a0 a1 h0 h1 g f
    read -r p0 p1 a0 a1 h0 h1 g < <(free_ports 7)
    mkdir -p "$dir/lock" "$dir/run"
    : >"$dir/lock/lock.dat"
    for f in HAPrimary HASecondary; do
        mkdir -p "$dir/$f/run"
        cp "$src/$f/fmq.toml" "$dir/$f/fmq.toml" || return 1
    done
    sed -i -E -e "s/^port = 1856\$/port = $p0/" -e "s/^port = 1956\$/port = $p1/" \
        -e "s/^admin_port = 1858\$/admin_port = $a0/" -e "s/^admin_port = 1859\$/admin_port = $a1/" \
        -e "s/^port = 2000\$/port = $h0/" -e "s/^port = 3000\$/port = $h1/" \
        -e "s/^backup_ha_port = 2000\$/backup_ha_port = $h0/" -e "s/^backup_ha_port = 3000\$/backup_ha_port = $h1/" \
        -e "s/^backup_server_port = 1856\$/backup_server_port = $p0/" -e "s/^backup_server_port = 1956\$/backup_server_port = $p1/" \
        -e "s/^backup_rmi_server_port = 1858\$/backup_rmi_server_port = $a0/" -e "s/^backup_rmi_server_port = 1859\$/backup_rmi_server_port = $a1/" \
        -e "s/^gateway_server_port = 7007\$/gateway_server_port = $g/" \
        "$dir/HAPrimary/fmq.toml" "$dir/HASecondary/fmq.toml"
    for f in HAPrimary HASecondary; do
        if grep -Eq '^(port|admin_port|backup_ha_port|backup_server_port|backup_rmi_server_port) = (1856|1956|1858|1859|2000|3000)$|^gateway_server_port = 7007$' "$dir/$f/fmq.toml"; then
            echo "could not rewrite every port in $dir/$f/fmq.toml" >&2
            return 1
        fi
    done
    echo "$p0 $p1 $a0 $a1 $g"
}

fmq_ha_state() { # fmq-binary admin-port -> ACTIVE, PASSIVE, STANDALONE, ... or nothing
    timeout 3 "$1" status --admin-port "$2" --json 2>/dev/null |
        python3 -c 'import json,sys
try: print(json.load(sys.stdin)["ha"]["state"])
except Exception: pass' || true
}

# snapshot_bins DIR BIN...: hard-links (or copies) each binary into DIR and
# prints the new paths, one a line, so a concurrent `cargo build` (which
# replaces target/release/*) cannot swap a binary under a running benchmark.
snapshot_bins() {
    local dir=$1 b; shift
    mkdir -p "$dir"
    for b in "$@"; do
        [[ -x "$b" ]] || { echo "$b"; continue; }
        ln "$b" "$dir/" 2>/dev/null || cp "$b" "$dir/" || return 1
        echo "$dir/$(basename "$b")"
    done
}
