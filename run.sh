#!/usr/bin/env bash
# ./run.sh [gateway flags]   start ocigate on 127.0.0.1:8080 with rules/ (installs into .venv first if needed)
# ./run.sh web [flags]        the same with mitmweb's UI (on 127.0.0.1:8081), each flow explained
# ./run.sh test [pytest args] install what the tests need and run the whole suite
# ./run.sh matrix             write README.md's client matrix from the last full test run's results
# ./run.sh demo               a first look: a pull through the gateway from a throwaway mirror, on this machine alone
# ./run.sh bench [flags]      the benchmark (bench/README.md): tables, bench/results/<date>.json and charts
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
venv="$here/.venv"

say() { printf 'run.sh: %s\n' "$*" >&2; }

# The newest Python >= 3.11 wins: mitmproxy 12 needs >= 3.12. pyenv shims for versions that are not
# activated fail when run, so every candidate is asked for its version instead of trusted by name.
pick_python() {
    local best="" best_version=0 candidate version
    local candidates=(python3.14 python3.13 python3.12 python3.11 python3)
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for candidate in "$pyenv_root"/versions/3.*/bin/python3; do
        [ -x "$candidate" ] && candidates+=("$candidate")
    done
    for candidate in "${candidates[@]}"; do
        version=$("$candidate" -c 'import sys; print(sys.version_info[0] * 100 + sys.version_info[1])' 2>/dev/null) || continue
        if [ "$version" -ge 311 ] && [ "$version" -gt "$best_version" ]; then
            best=$candidate best_version=$version
        fi
    done
    [ -n "$best" ] || { say "no Python >= 3.11 found (tried ${candidates[*]})"; exit 1; }
    command -v "$best" 2>/dev/null || echo "$best"
}

# Installs into .venv when pyproject.toml or the wanted extras changed since the last install; otherwise
# does nothing, so a second start is quick.
ensure_venv() {
    local extras=$1 stamp="$venv/.ocigate-installed" want
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        local python
        python=$(pick_python)
        say "creating .venv with $python"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    local hash installed
    hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
    want="$hash $extras"
    installed=$(cat "$stamp" 2>/dev/null || true)
    # An install with the test extras serves a plain start and the benchmark too (test holds the bench extra).
    if [ "$installed" != "$want" ] && [ "$installed" != "$hash test" ]; then
        say "installing ocigate${extras:+[$extras]} into .venv"
        # This machine's pip configuration names package directories that may not exist; those warnings are noise.
        if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}" 2>&1 |
            { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; then
            say "pip install failed"
            exit 1
        fi
        echo "$want" >"$stamp"
    fi
}

# Debian packages the end-to-end tests drive: a real registry (distribution 2.8), the real clients, and a browser
# for mitmweb's page.
ensure_test_packages() {
    local missing=() package
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v skopeo >/dev/null || missing+=(skopeo)
    command -v containerd >/dev/null || missing+=(containerd)
    command -v runc >/dev/null || missing+=(runc)
    command -v podman >/dev/null || missing+=(podman)
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v unshare >/dev/null || missing+=(util-linux)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v chromium >/dev/null || missing+=(chromium)
    [ ${#missing[@]} -eq 0 ] && return 0
    install_debian_packages "the tests need" "${missing[@]}"
}

# What ./run.sh demo drives: a real registry as the mirror, skopeo as the client.
ensure_demo_packages() {
    local missing=()
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v skopeo >/dev/null || missing+=(skopeo)
    [ ${#missing[@]} -eq 0 ] && return 0
    install_debian_packages "the demo needs" "${missing[@]}"
}

# install_debian_packages WHO PACKAGE...: as root with apt-get; otherwise stops, saying which packages WHO needs.
install_debian_packages() {
    local who=$1 package
    shift
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        say "$who the Debian packages: $* (install them as root: apt-get install $*)"
        exit 1
    fi
    say "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq "$@" >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq "$@"
    fi
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || { say "Debian package $package did not install"; exit 1; }
    done
}

run_tests() {
    ensure_venv test
    ensure_test_packages
    local sources=(addons tests)
    [ -d bench ] && sources+=(bench)
    "$venv/bin/ruff" check "${sources[@]}"
    "$venv/bin/ruff" format --check "${sources[@]}"
    # The files and the strictness are in pyproject.toml's [tool.mypy]: every module of addons/ is checked.
    "$venv/bin/mypy" --config-file pyproject.toml
    # The end-to-end tests use names like upstream.test that must never reach a resolver: as root, the
    # suite runs in a private network namespace that has nothing but loopback.
    if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
        exec unshare -n sh -c 'ip link set lo up && exec "$0" -m pytest "$@"' "$venv/bin/python" "$@"
    fi
    say "not root or no network namespaces: running without a private network namespace"
    exec "$venv/bin/python" -m pytest "$@"
}

if [ "${1:-}" = "test" ]; then
    shift
    run_tests "$@"
fi

if [ "${1:-}" = "demo" ]; then
    ensure_venv ""
    ensure_demo_packages
    exec "$venv/bin/python" -m tests.support.demo
fi

if [ "${1:-}" = "bench" ]; then
    shift
    ensure_venv bench
    ensure_demo_packages # the benchmark's registries are Debian's docker-registry
    # As the tests: as root, a private network namespace with loopback only, so no made-up name reaches a resolver
    # and no other traffic shares the interface.
    if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
        exec unshare -n sh -c 'ip link set lo up && exec "$0" -m bench "$@"' "$venv/bin/python" "$@"
    fi
    say "not root or no network namespaces: the benchmark runs on the host's loopback"
    exec "$venv/bin/python" -m bench "$@"
fi

if [ "${1:-}" = "matrix" ]; then
    ensure_venv test
    exec "$venv/bin/python" -m tests.support.matrix
fi

ensure_venv ""
mode=()
if [ "${1:-}" = "web" ]; then
    mode=(web)
    shift
fi
defaults=(--listen-host "${OCIGATE_HOST:-127.0.0.1}" --listen-port "${OCIGATE_PORT:-8080}")
# mitmproxy refuses an option set twice, so the default rules apply only when the command line names none.
case " $* " in
*" --rules"* | *"ocigate_rules="*) ;;
*) defaults+=(--rules "${OCIGATE_RULES:-$here/rules}") ;;
esac
exec "$venv/bin/ocigate" "${mode[@]}" "${defaults[@]}" "$@"
