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
