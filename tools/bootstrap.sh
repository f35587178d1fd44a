#!/usr/bin/env bash
# EdgeGuard set-up for a fresh Debian, Ubuntu or Raspberry Pi OS machine. Idempotent: run it again at will.
#
#   bash tools/bootstrap.sh demo [ARGS]   install EdgeGuard into ./.venv and run `edgeguard demo`
#   bash tools/bootstrap.sh test [ARGS]   install the test needs (mosquitto too) and run ruff, mypy, pytest,
#                                         then the compatibility legs (tools/legs.py, venvs in .venv-legs/)
#
# It installs Debian packages only when something is missing (python3-venv, mosquitto, chromium), with sudo when
# not root.
set -euo pipefail

mode="${1:-}"
case "$mode" in
  demo|test) shift ;;
  *) echo "usage: bash tools/bootstrap.sh demo|test [ARGS...]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${EDGEGUARD_VENV:-$root/.venv}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "missing $* and no apt-get here: install it with your package manager" >&2; exit 1
  fi
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
  echo "EdgeGuard needs Python >= 3.10 (found $(python3 --version 2>&1))" >&2; exit 1; }
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

if [ "$mode" = test ] && ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  # The tests start their own brokers on free ports; Debian also starts a system one, which they never use.
  apt_install mosquitto
fi

if [ "$mode" = test ] && [ ! -x /usr/bin/chromium ]; then
  # The dashboard's browser tests drive Debian's chromium through Playwright (never `playwright install`).
  apt_install chromium chromium-driver
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
extras=tflite
[ "$mode" = test ] && extras=dev
say "installing edgeguard[$extras] into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"

if [ "$mode" = demo ]; then
  say "edgeguard demo"
  exec "$venv/bin/edgeguard" demo "$@"
fi

say "ruff"
"$venv/bin/ruff" check edgeguard tests tools
say "mypy"
"$venv/bin/mypy"
say "pytest"
"$venv/bin/pytest" "$@"
# The same core on the library versions boards have (tflite-runtime, onnxruntime 1.23, lower bounds).
exec "$venv/bin/python" tools/legs.py
