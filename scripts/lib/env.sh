# Shared by scripts/start.sh and scripts/test.sh: installs what FerroMQ needs
# to build and test on a Debian machine, idempotently, and sets up the
# compile cache. Source it; it does not change directory.

FMQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export FMQ_ROOT

fmq_log() { printf '==> %s\n' "$*" >&2; }

fmq_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        fmq_log "need root for: $* (run as root or install sudo)"; return 1
    fi
}

# fmq_apt PACKAGE... : installs the packages that are missing.
fmq_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    fmq_log "installing Debian packages: ${missing[*]}"
    fmq_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    fmq_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

fmq_build_deps() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        fmq_log "cargo not found: FerroMQ needs Rust 1.89 or newer (rustup, https://rustup.rs)"
        return 1
    fi
    # RocksDB's bindings are generated with libclang; its C++ is built with g++.
    fmq_apt build-essential pkg-config libclang-dev clang sccache iproute2 procps
    # Cache compiles (RocksDB's C++ included, through the cc crate) across
    # clones on this machine: a warm rebuild takes about a minute instead of 15.
    if command -v sccache >/dev/null 2>&1 && [ -z "${FMQ_NO_SCCACHE:-}" ]; then
        export SCCACHE_DIR="${SCCACHE_DIR:-/var/cache/fmq-sccache}"
        export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-10G}"
        if mkdir -p "$SCCACHE_DIR" 2>/dev/null && sccache --start-server >/dev/null 2>&1 || sccache --show-stats >/dev/null 2>&1; then
            export RUSTC_WRAPPER=sccache
        else
            fmq_log "sccache is not usable here; building without a compile cache"
        fi
    fi
    export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
}

fmq_test_deps() {
    fmq_apt python3 python3-pip
    # stomp.py drives the interop test: a real third-party STOMP client.
    if ! python3 -c 'import stomp' >/dev/null 2>&1; then
        fmq_log "installing stomp.py from PyPI"
        python3 -m pip install --quiet --disable-pip-version-check 'stomp.py==8.2.0' 2>/dev/null \
            || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'stomp.py==8.2.0'
    fi
}
