#!/usr/bin/env bash
# Starts a FerroMQ server on a profile (FioranoMQ's fmq.sh).
#
#   scripts/fmq.sh [-profile NAME|DIR] [-dbPath DIR] [-nobackground] [FMQ ARGS...]
#   scripts/fmq.sh [-profile NAME|DIR] -status
#
# -profile NAME|DIR  profile to run (default $FMQ_PROFILE, else FerroMQ). A name
#                    is looked up like `fmq` does: $FMQ_PROFILES/NAME,
#                    ./profiles/NAME, then profiles/NAME beside or above the
#                    binary (and in this checkout); a value with a `/` is a
#                    directory holding fmq.toml.
# -dbPath DIR        store directory, overriding the profile's store.db_path.
# -nobackground      exec fmq in the foreground (systemd, containers, debugging);
#                    it still writes the pid file.
# -status            report whether the profile's server runs (pid file and
#                    `fmq status`); exit 0 running, 1 dead with a pid file,
#                    3 not running (the LSB status codes).
# Other arguments are passed to fmq unchanged.
#
# In the background (the default) fmq's console output goes to RUNDIR/fmq.out
# (the previous run's to fmq.out.1) and its pid to RUNDIR/fmq.pid, where RUNDIR
# is $FMQ_RUN_DIR or <profile dir>/run. The script refuses to start when the
# pid file names a live fmq process, waits until the server answers on its
# client and admin ports (at most $FMQ_START_TIMEOUT s, default 60), and prints
# its pid; if the server exits first it prints the end of fmq.out and fails.
#
# The binary is $FMQ_BIN, else target/release/fmq of the checkout holding this
# script, else bin/fmq beside scripts/ (installed layout), else fmq on PATH.
#
# Exit status: 0 started (or running, for -status), 1 failed to start or bad
# usage, 2 already running.
#
# shutdown-fmq.sh sources this file for its helper functions; sourcing runs
# nothing.

FMQ_SH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FMQ_SH_HOME=$(cd "$FMQ_SH_DIR/.." && pwd)

fmq_die() {
    echo "fmq.sh: $*" >&2
    exit 1
}

# Prints the fmq binary to use, or fails with how to build it.
fmq_find_bin() {
    local cand
    if [[ -n "${FMQ_BIN:-}" ]]; then
        if [[ -x "$FMQ_BIN" ]]; then
            echo "$FMQ_BIN"
            return 0
        fi
        echo "fmq.sh: FMQ_BIN=$FMQ_BIN is not an executable file" >&2
        return 1
    fi
    for cand in "$FMQ_SH_HOME/target/release/fmq" "$FMQ_SH_HOME/bin/fmq"; do
        if [[ -x "$cand" ]]; then
            echo "$cand"
            return 0
        fi
    done
    if cand=$(command -v fmq 2>/dev/null) && [[ -n "$cand" ]]; then
        echo "$cand"
        return 0
    fi
    echo "fmq.sh: no fmq binary found (tried \$FMQ_BIN, $FMQ_SH_HOME/target/release/fmq, $FMQ_SH_HOME/bin/fmq and PATH)." >&2
    echo "fmq.sh: build it with: cargo build --release -p fmq-server   (or set FMQ_BIN)" >&2
    return 1
}

# fmq_profile_dir NAME BIN: prints the absolute profile directory, searched in
# the same order as `fmq` itself (crates/fmq-server/src/profile.rs).
fmq_profile_dir() {
    local name=$1 bin=$2 dir base
    if [[ "$name" == */* || -d "$name" ]]; then
        if [[ -f "$name/fmq.toml" ]]; then
            (cd "$name" && pwd)
            return 0
        fi
        if [[ -f "$name" && "$(basename "$name")" == fmq.toml ]]; then
            (cd "$(dirname "$name")" && pwd)
            return 0
        fi
    fi
    local -a bases=()
    [[ -n "${FMQ_PROFILES:-}" ]] && bases+=("$FMQ_PROFILES")
    bases+=("profiles")
    if [[ -n "$bin" ]]; then
        # Resolve symlinks like current_exe() does.
        dir=$(dirname "$(readlink -f "$bin" 2>/dev/null || echo "$bin")")
        for _ in 1 2 3 4; do
            bases+=("${dir%/}/profiles")
            base=$(dirname "$dir")
            [[ "$base" == "$dir" ]] && break
            dir=$base
        done
    fi
    bases+=("$FMQ_SH_HOME/profiles")
    local tried=()
    for base in "${bases[@]}"; do
        if [[ -f "$base/$name/fmq.toml" ]]; then
            (cd "$base/$name" && pwd)
            return 0
        fi
        tried+=("$base/$name")
    done
    if [[ -e "$name" ]]; then
        echo "fmq.sh: profile '$name': $name has no fmq.toml" >&2
    else
        local list
        list=$(printf ', %s' "${tried[@]}")
        echo "fmq.sh: profile '$name' not found; looked for fmq.toml in: ${list#, }" >&2
    fi
    return 1
}

# fmq_profile_key FILE SECTION KEY DEFAULT: a scalar from fmq.toml (numbers and
# plain strings, which is all this script needs).
fmq_profile_key() {
    local v
    v=$(awk -v want_sec="$2" -v want_key="$3" '
        /^[[:space:]]*\[/ {
            s = $0; gsub(/^[[:space:]]*\[[[:space:]]*|[[:space:]]*\].*$/, "", s); sec = s; next
        }
        sec == want_sec {
            line = $0; sub(/#.*/, "", line)
            if (match(line, "^[[:space:]]*" want_key "[[:space:]]*=")) {
                v = substr(line, RLENGTH + 1)
                gsub(/^[[:space:]]+|[[:space:]]+$/, "", v); gsub(/"/, "", v)
                print v; exit
            }
        }' "$1")
    echo "${v:-$4}"
}

# Address to connect to for a bind address.
fmq_connect_host() {
    case "$1" in
        "" | 0.0.0.0) echo 127.0.0.1 ;;
        :: | "[::]") echo ::1 ;;
        *) echo "$1" ;;
    esac
}

# fmq_load_profile NAME: sets FMQ_BIN_PATH (may be empty if the binary is not
# needed yet), PROFILE_DIR, RUN_DIR, PID_FILE, OUT_FILE, CLIENT_HOST,
# CLIENT_PORT, ADMIN_HOST, ADMIN_PORT.
fmq_load_profile() {
    local toml
    PROFILE_DIR=$(fmq_profile_dir "$1" "${FMQ_BIN_PATH:-}") || return 1
    toml="$PROFILE_DIR/fmq.toml"
    RUN_DIR=${FMQ_RUN_DIR:-$PROFILE_DIR/run}
    PID_FILE=$RUN_DIR/fmq.pid
    OUT_FILE=$RUN_DIR/fmq.out
    CLIENT_HOST=$(fmq_connect_host "$(fmq_profile_key "$toml" network bind_address 127.0.0.1)")
    CLIENT_PORT=$(fmq_profile_key "$toml" network port 1856)
    ADMIN_HOST=$(fmq_connect_host "$(fmq_profile_key "$toml" network admin_bind_address 127.0.0.1)")
    ADMIN_PORT=$(fmq_profile_key "$toml" network admin_port 1858)
}

# True if PID is a live process (a zombie is not: it has exited).
fmq_alive() {
    local state=""
    kill -0 "$1" 2>/dev/null || [[ -d /proc/$1 ]] || return 1
    if [[ -r /proc/$1/stat ]]; then
        state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
        [[ "${state:0:1}" != Z ]] || return 1
    fi
    return 0
}

# True if PID is a live process running an fmq binary.
fmq_pid_is_fmq() {
    local pid=$1 cmd
    [[ "$pid" =~ ^[0-9]+$ && "$pid" -gt 0 ]] || return 1
    fmq_alive "$pid" || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
        # A zombie has an empty command line: not running any more.
        [[ -n "$cmd" ]] || return 1
    else
        cmd=$(ps -p "$pid" -o args= 2>/dev/null) || return 1
    fi
    # The program, or the script an interpreter runs, must be an fmq: a
    # recycled pid of some other program is not ours to report or signal.
    local -a words
    read -r -a words <<<"$cmd"
    [[ "$(basename -- "${words[0]:-}")" == fmq* || "$(basename -- "${words[1]:-}")" == fmq ]]
}

# Prints the pid from PID_FILE if it names a live fmq process.
fmq_running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    read -r pid <"$PID_FILE" 2>/dev/null || return 1
    fmq_pid_is_fmq "$pid" || return 1
    echo "$pid"
}

# True if something accepts TCP connections on HOST PORT.
fmq_port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

fmq_usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
}

fmq_status() {
    local pid
    if pid=$(fmq_running_pid); then
        echo "FerroMQ is running with pid $pid (profile $PROFILE_DIR)"
        if [[ -n "$FMQ_BIN_PATH" ]]; then
            timeout 10 "$FMQ_BIN_PATH" status --admin-host "$ADMIN_HOST" --admin-port "$ADMIN_PORT" ||
                echo "fmq.sh: the admin port $ADMIN_HOST:$ADMIN_PORT does not answer" >&2
        fi
        return 0
    fi
    if [[ -n "$FMQ_BIN_PATH" ]] &&
        timeout 10 "$FMQ_BIN_PATH" status --admin-host "$ADMIN_HOST" --admin-port "$ADMIN_PORT" 2>/dev/null; then
        echo "FerroMQ answers on admin port $ADMIN_PORT but $PID_FILE names no live fmq process (started without fmq.sh?)"
        return 0
    fi
    if [[ -f "$PID_FILE" ]]; then
        echo "FerroMQ is not running (stale pid file $PID_FILE)"
        return 1
    fi
    echo "FerroMQ is not running (profile $PROFILE_DIR)"
    return 3
}

fmq_main() {
    set -uo pipefail
    local profile=${FMQ_PROFILE:-FerroMQ} db_path="" background=1 status=0
    local -a extra=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -profile | --profile)
                [[ $# -ge 2 ]] || fmq_die "$1 needs a profile name or directory"
                profile=$2
                shift 2
                ;;
            -profile=* | --profile=*)
                profile=${1#*=}
                shift
                ;;
            -dbPath | --db-path)
                [[ $# -ge 2 ]] || fmq_die "$1 needs a directory"
                db_path=$2
                shift 2
                ;;
            -nobackground | --nobackground | --foreground) background=0; shift ;;
            -status | --status) status=1; shift ;;
            -h | -help | --help) fmq_usage; exit 0 ;;
            *) extra+=("$1"); shift ;;
        esac
    done

    if [[ $status -eq 1 ]]; then
        FMQ_BIN_PATH=$(fmq_find_bin 2>/dev/null) || FMQ_BIN_PATH=""
        fmq_load_profile "$profile" || exit 4
        fmq_status
        exit $?
    fi

    FMQ_BIN_PATH=$(fmq_find_bin) || exit 1
    fmq_load_profile "$profile" || exit 1
    mkdir -p "$RUN_DIR" || fmq_die "cannot create run directory $RUN_DIR"

    local pid
    if pid=$(fmq_running_pid); then
        echo "FerroMQ already running with pid $pid (pid file $PID_FILE)" >&2
        exit 2
    fi
    if [[ -f "$PID_FILE" ]]; then
        echo "fmq.sh: removing stale pid file $PID_FILE"
        rm -f "$PID_FILE"
    fi

    local -a cmd=("$FMQ_BIN_PATH" -profile "$PROFILE_DIR")
    [[ -n "$db_path" ]] && cmd+=(-dbPath "$db_path")
    cmd+=("${extra[@]}")

    if [[ $background -eq 0 ]]; then
        # exec keeps this pid, so the pid file stays right.
        echo $$ >"$PID_FILE"
        exec "${cmd[@]}"
    fi

    # Fail fast if another server holds the port: the wait below would
    # otherwise mistake it for ours.
    if fmq_port_open "$CLIENT_HOST" "$CLIENT_PORT"; then
        fmq_die "client port $CLIENT_HOST:$CLIENT_PORT is already in use (another server running? change network.port in $PROFILE_DIR/fmq.toml)"
    fi

    [[ -f "$OUT_FILE" ]] && mv -f "$OUT_FILE" "$OUT_FILE.1"
    # setsid: the server gets its own session, so the terminal's Ctrl-C and
    # hang-up do not reach it. This shell is not interactive, so the child is
    # no process-group leader and setsid execs fmq in place ($! is fmq's pid).
    # NO_COLOR: plain text in fmq.out, no terminal colour codes.
    if command -v setsid >/dev/null; then
        NO_COLOR=${NO_COLOR:-1} setsid "${cmd[@]}" </dev/null >"$OUT_FILE" 2>&1 &
    else
        NO_COLOR=${NO_COLOR:-1} nohup "${cmd[@]}" </dev/null >"$OUT_FILE" 2>&1 &
    fi
    pid=$!
    echo "$pid" >"$PID_FILE"

    local timeout=${FMQ_START_TIMEOUT:-60} start=$SECONDS
    while :; do
        if ! fmq_alive "$pid"; then
            wait "$pid" 2>/dev/null
            local rc=$?
            echo "fmq.sh: FerroMQ exited during startup (status $rc); end of $OUT_FILE:" >&2
            tail -n 20 "$OUT_FILE" >&2
            rm -f "$PID_FILE"
            exit 1
        fi
        # The ports are bound before the store opens; the admin port answers
        # a status request only once the broker runs.
        if fmq_port_open "$CLIENT_HOST" "$CLIENT_PORT" &&
            timeout 10 "$FMQ_BIN_PATH" status --admin-host "$ADMIN_HOST" --admin-port "$ADMIN_PORT" >/dev/null 2>&1; then
            break
        fi
        if ((SECONDS - start >= timeout)); then
            echo "fmq.sh: FerroMQ (pid $pid) did not answer on $CLIENT_HOST:$CLIENT_PORT within ${timeout}s; it is left running. End of $OUT_FILE:" >&2
            tail -n 20 "$OUT_FILE" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "FerroMQ started with pid $pid: STOMP on $CLIENT_HOST:$CLIENT_PORT, admin on $ADMIN_HOST:$ADMIN_PORT (profile $PROFILE_DIR, output $OUT_FILE)"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    fmq_main "$@"
fi
