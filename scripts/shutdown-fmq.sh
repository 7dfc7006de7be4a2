#!/usr/bin/env bash
# Stops a FerroMQ server (FioranoMQ's shutdown-fmq.sh).
#
#   scripts/shutdown-fmq.sh [-rmiPort N] [-profile NAME|DIR] [-pidFile FILE]
#                           [-timeout S] [-force]
#
# -rmiPort N         the server's admin port (the seed's RMI port). Default:
#                    the profile's network.admin_port with -profile, else 1858.
# -profile NAME|DIR  the profile the server runs (found like fmq.sh finds it);
#                    gives the admin port and the pid file RUNDIR/fmq.pid
#                    (RUNDIR = $FMQ_RUN_DIR or <profile dir>/run).
# -pidFile FILE      pid file to use instead.
# -timeout S         how long to wait for the process to exit (default
#                    $FMQ_STOP_TIMEOUT, else 30 s).
# -force             SIGKILL the server if it is still running after that.
#
# Asks the server to stop with `fmq shutdown --admin-port N` (credentials from
# FMQ_ADMIN_USER / FMQ_ADMIN_PASSWORD, default admin/passwd). If that fails and
# the server's pid is known (pid file, or the fmq process listening on the
# admin port), sends it SIGTERM, which is a graceful shutdown too. Then waits
# until the process has exited and removes the pid file.
#
# Exit status: 0 stopped; 1 not running (nothing answers on the admin port and
# no live pid); 2 still running after the timeout; 3 the admin port refused the
# shutdown (e.g. wrong credentials) and no pid is known to signal; 4 bad usage
# or no fmq binary.

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=fmq.sh
source "$SCRIPT_DIR/fmq.sh"
set -uo pipefail

die() {
    echo "shutdown-fmq.sh: $*" >&2
    exit 4
}

# Prints the pid of an fmq process listening on TCP PORT, if `ss` can tell.
pid_on_port() {
    local pid
    command -v ss >/dev/null || return 1
    pid=$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1)
    pid=${pid#pid=}
    fmq_pid_is_fmq "$pid" || return 1
    echo "$pid"
}

admin_port="" profile="" pid_file="" timeout=${FMQ_STOP_TIMEOUT:-30} force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -rmiPort | --rmi-port | -adminPort | --admin-port)
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a port number"
            admin_port=$2
            shift 2
            ;;
        -profile | --profile)
            [[ $# -ge 2 ]] || die "$1 needs a profile name or directory"
            profile=$2
            shift 2
            ;;
        -pidFile | --pid-file)
            [[ $# -ge 2 ]] || die "$1 needs a file"
            pid_file=$2
            shift 2
            ;;
        -timeout | --timeout)
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs seconds"
            timeout=$2
            shift 2
            ;;
        -force | --force) force=1; shift ;;
        -h | -help | --help)
            awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument '$1' (see -help)" ;;
    esac
done

FMQ_BIN_PATH=$(fmq_find_bin) || exit 4
ADMIN_HOST=127.0.0.1
if [[ -n "$profile" ]]; then
    fmq_load_profile "$profile" || exit 4
    # shellcheck disable=SC2153 # set by fmq_load_profile
    [[ -n "$admin_port" ]] || admin_port=$ADMIN_PORT
fi
[[ -n "$admin_port" ]] || admin_port=1858
[[ -n "$pid_file" ]] && PID_FILE=$pid_file
PID_FILE=${PID_FILE:-}

# Find the pid before asking: the admin port closes as the server stops.
pid=""
if [[ -n "$PID_FILE" ]]; then
    pid=$(fmq_running_pid) || pid=""
fi
if [[ -z "$pid" ]] && pid=$(pid_on_port "$admin_port"); then
    # Found by port: its pid file is the one fmq.sh wrote for the profile on
    # its command line (fmq.sh passes an absolute profile directory).
    if [[ -z "$PID_FILE" && -r /proc/$pid/cmdline ]]; then
        mapfile -d '' -t args <"/proc/$pid/cmdline"
        for ((i = 1; i + 1 < ${#args[@]}; i++)); do
            if [[ "${args[i]}" == -profile || "${args[i]}" == --profile ]] &&
                [[ "${args[i + 1]}" == /* && -f "${args[i + 1]}/fmq.toml" ]]; then
                PID_FILE=${FMQ_RUN_DIR:-${args[i + 1]}/run}/fmq.pid
                break
            fi
        done
    fi
fi

remove_pid_file() {
    local old=""
    [[ -n "$PID_FILE" && -f "$PID_FILE" ]] || return 0
    read -r old <"$PID_FILE" 2>/dev/null
    if [[ -z "$1" || "$old" == "$1" ]] || ! fmq_pid_is_fmq "$old"; then
        rm -f "$PID_FILE"
    fi
}

if answer=$(timeout 40 "$FMQ_BIN_PATH" shutdown --admin-host "$ADMIN_HOST" --admin-port "$admin_port" 2>&1); then
    echo "FerroMQ on admin port $admin_port is shutting down (${answer:-ok})"
else
    if [[ -n "$pid" || "$answer" != *"no FerroMQ server answers"* ]]; then
        echo "shutdown-fmq.sh: ${answer:-fmq shutdown failed}" >&2
    fi
    if [[ -n "$pid" ]]; then
        echo "shutdown-fmq.sh: sending SIGTERM to pid $pid"
        kill -TERM "$pid" 2>/dev/null
    elif [[ "$answer" == *"no FerroMQ server answers"* ]]; then
        remove_pid_file ""
        echo "FerroMQ is not running (nothing answers on admin port $admin_port)"
        exit 1
    else
        echo "shutdown-fmq.sh: the server on admin port $admin_port refused to shut down and its pid is unknown (give -profile or -pidFile, or check FMQ_ADMIN_USER/FMQ_ADMIN_PASSWORD)" >&2
        exit 3
    fi
fi

start=$SECONDS
if [[ -n "$pid" ]]; then
    while fmq_alive "$pid"; do
        if ((SECONDS - start >= timeout)); then
            if [[ $force -eq 1 ]]; then
                echo "shutdown-fmq.sh: pid $pid still running after ${timeout}s; sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null
                sleep 1
                fmq_alive "$pid" && exit 2
                remove_pid_file "$pid"
                echo "FerroMQ (pid $pid) killed"
                exit 0
            fi
            echo "shutdown-fmq.sh: FerroMQ (pid $pid) is still running after ${timeout}s (-force kills it)" >&2
            exit 2
        fi
        sleep 0.2
    done
    remove_pid_file "$pid"
    echo "FerroMQ (pid $pid) stopped"
    exit 0
fi

# No pid known: wait until the admin port closes (the store may still be
# closing then; say so).
while fmq_port_open "$ADMIN_HOST" "$admin_port"; do
    if ((SECONDS - start >= timeout)); then
        echo "shutdown-fmq.sh: admin port $admin_port still open after ${timeout}s" >&2
        exit 2
    fi
    sleep 0.2
done
remove_pid_file ""
echo "FerroMQ stopped (admin port $admin_port closed; pid unknown, so the exit of the process itself was not watched)"
exit 0
