#!/usr/bin/env bash
# Sets up whatever is missing to run Covey from this checkout, and nothing more:
#   1. the Debian packages the build needs (installed when run as root, named otherwise),
#   2. the virtual environment at .venv,
#   3. llama-cpp-python built from source with RPC on, native CPU flags off and Covey's
#      patches (patches/*.patch: the worker's private RPC socket) applied,
#   4. Covey itself (editable) with its test tools.
# A second run on a set-up machine only compares a few fingerprints and returns in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${COVEY_PYTHON:-python3}"
LLAMA_VERSION="0.3.36"
# GGML_NATIVE=off: the native build used AMX instructions and died with SIGILL on these CPUs.
# LLAVA_BUILD=off: Covey never loads the multimodal library; skipping it shortens the build.
LLAMA_CMAKE_ARGS="-DGGML_RPC=on -DGGML_NATIVE=off -DLLAVA_BUILD=off"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/covey"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

check_python() {
    command -v "$PY" >/dev/null || die "Python 3.11 or newer is needed (sudo apt-get install python3)."
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is needed; $PY is $("$PY" --version 2>&1)."
}

missing_debian_packages() {
    local missing=()
    # Debian ships ensurepip (which venv needs) in python3-venv, not with python3 itself.
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    # llama.cpp is C++ built with cmake (cmake and ninja come from PyPI); no Python headers.
    { command -v cc && command -v c++ && command -v make; } >/dev/null || missing+=(build-essential)
    # Covey's patches to llama.cpp (build-essential brings it, through dpkg-dev).
    command -v patch >/dev/null || missing+=(patch)
    # py-libp2p needs fastecdsa 2.3.2, which PyPI has only as source: a C extension over GMP.
    "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
    compgen -G "/usr/include/gmp.h" >/dev/null || compgen -G "/usr/include/*/gmp.h" >/dev/null \
        || missing+=(libgmp-dev)
    # The swarm's multi-node tests build network namespaces with `ip`.
    command -v ip >/dev/null || missing+=(iproute2)
    # The desktop app: Qt's own libraries come from PyPI, these from the system (the xcb ones
    # only matter for a real window on X11; the tests run Qt offscreen).
    # ldconfig's cache is read once into a variable and matched without a pipe: with
    # `ldconfig -p | grep -q` under pipefail, grep's early exit gave ldconfig a SIGPIPE and an
    # installed library counted as missing, at random, on a busy machine.
    local cache lib pkg
    cache="$(ldconfig -p 2>/dev/null || true)"
    while read -r lib pkg; do
        [[ "$cache" == *[[:space:]]"$lib ("* ]] || missing+=("$pkg")
    done <<'LIBS'
libEGL.so.1 libegl1
libGL.so.1 libgl1
libxkbcommon.so.0 libxkbcommon0
libfontconfig.so.1 libfontconfig1
libdbus-1.so.3 libdbus-1-3
libglib-2.0.so.0 libglib2.0-0
libxkbcommon-x11.so.0 libxkbcommon-x11-0
libxcb-cursor.so.0 libxcb-cursor0
libxcb-icccm.so.4 libxcb-icccm4
libxcb-image.so.0 libxcb-image0
libxcb-keysyms.so.1 libxcb-keysyms1
libxcb-randr.so.0 libxcb-randr0
libxcb-render-util.so.0 libxcb-render-util0
libxcb-shape.so.0 libxcb-shape0
libxcb-xfixes.so.0 libxcb-xfixes0
libxcb-xkb.so.1 libxcb-xkb1
LIBS
    echo "${missing[@]:-}"
}

install_debian_packages() {
    local missing
    missing="$(missing_debian_packages)"
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ]; then
        say "installing Debian packages: $missing"
        mkdir -p "$CACHE"
        # shellcheck disable=SC2086
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends $missing; } >"$CACHE/apt.log" 2>&1 \
            || { tail -n 20 "$CACHE/apt.log" >&2; die "installing $missing failed (log: $CACHE/apt.log)"; }
    else
        die "Covey needs these Debian packages: $missing
Install them as root, then run this command again:
    apt-get install $missing      (or: sudo apt-get install $missing)"
    fi
}

# One wheel per (version, flags, interpreter, machine, patches): a wheel built with other
# flags or patches is never picked up, and pip's own cache (which ignores CMAKE_ARGS) is never
# consulted.
llama_key() {
    printf '%s|%s|%s|%s|%s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" \
        "$("$VENV/bin/python" -c 'import sys; print(sys.implementation.cache_tag)')" "$(uname -m)" \
        "$("$VENV/bin/python" "$ROOT/scripts/llama_source.py" patch-hash)" \
        | sha256sum | cut -c1-16
}

# The patched source (scripts/llama_source.py), then the wheel built from it.
build_patched_wheel() {
    local out="$1" src="$2" source
    source="$("$VENV/bin/python" "$ROOT/scripts/llama_source.py" prepare "$LLAMA_VERSION" "$src")"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 "$VENV/bin/python" -m pip wheel -q \
        --no-cache-dir --no-deps -w "$out" "$source"
    rm -rf "$src"
}

build_llama_wheel() {
    local dir="$1" log="$1.log" tmp="$1.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    say "building llama-cpp-python $LLAMA_VERSION with RPC (first time only: 10-20 minutes on 2 cores)"
    say "build log: $log"
    build_patched_wheel "$tmp" "$1.src" >"$log" 2>&1 &
    local pid=$! start=$SECONDS next=60
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS - start >= next )) && kill -0 "$pid" 2>/dev/null; then
            say "  still building... $(( next / 60 )) min"
            next=$(( next + 60 ))
        fi
    done
    wait "$pid" || { tail -n 30 "$log" >&2; die "building llama-cpp-python failed (log: $log)"; }
    rm -rf "$dir" && mv "$tmp" "$dir"
}

install_llama() {
    local key dir wheel
    key="$(llama_key)"
    [ "$(cat "$VENV/.covey-llama-key" 2>/dev/null)" = "$key" ] && return 0
    dir="$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$key"
    wheel="$(ls "$dir"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        build_llama_wheel "$dir"
        wheel="$(ls "$dir"/llama_cpp_python-*.whl | head -n 1)"
    fi
    say "installing $(basename "$wheel")"
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
    "$VENV/bin/python" - <<'PY' || die "the installed llama_cpp lacks the RPC backend"
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
lib = pathlib.Path(spec.origin).parent / "lib" / "libggml-rpc.so.0"
sys.exit(not lib.exists())
PY
    echo "$key" >"$VENV/.covey-llama-key"
}

install_covey() {
    local key
    key="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
    [ "$(cat "$VENV/.covey-project-key" 2>/dev/null)" = "$key" ] && [ -x "$VENV/bin/covey" ] && return 0
    say "installing Covey and its Python dependencies into .venv"
    mkdir -p "$CACHE"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >"$CACHE/install.log" 2>&1 \
        || { tail -n 30 "$CACHE/install.log" >&2; die "installing Covey failed (log: $CACHE/install.log)"; }
    echo "$key" >"$VENV/.covey-project-key"
}

main() {
    check_python
    install_debian_packages
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment at .venv"
        # A half-made environment would be taken for a finished one next time: remove it.
        { "$PY" -m venv "$VENV" && "$VENV/bin/python" -m pip install -q --upgrade pip; } \
            || { rm -rf "$VENV"; die "could not create .venv (see the messages above)"; }
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # Build tools first: llama-cpp-python must never be built by pip as a side effect of
    # installing Covey, or it would come without RPC.
    install_llama
    install_covey
}

if [ "${1:-}" = "--missing-packages" ]; then  # the check alone, for tests and installers
    check_python
    missing_debian_packages
    exit 0
fi
main "$@"
