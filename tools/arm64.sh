#!/usr/bin/env bash
# Run EdgeGuard's tests on an emulated arm64 Debian bookworm (Python 3.11, as Raspberry Pi OS bookworm), with the
# aarch64 wheels of onnxruntime and ai-edge-litert: a recipe measured by hand, made repeatable.
#
#   sudo bash tools/arm64.sh [PYTEST ARGS...]     default: tests/bundle tests/engine
#
# Idempotent: the root file system ($EDGEGUARD_ARM64_ROOT, default ${TMPDIR:-/tmp}/edgeguard-arm64-root) is built
# once (~10 minutes: debootstrap, apt, pip) and reused; each run copies the current working tree (tracked and
# untracked, not ignored files) into it, reinstalls only when pyproject.toml changed, and runs pytest there.
# Prints a summary line with pytest's result and the durations. Needs root (chroot, mounts, binfmt_misc).
#
# Measured on a 2-vCPU x86-64 machine shared with other test runs (load average ~10), 2026-11-29, niced:
#   first run, building the root: debootstrap 22.4 min, apt 5.7 min, pip install 3.5 min (~32 min before pytest;
#   the hand-run recipe took ~10 min on a quiet machine); later runs reach pytest in 1 s.
#   tests/bundle tests/engine (default): 243 passed in 284 s (4 min 47 s with the copy), both aarch64 profiles.
#   An earlier run of test_engine.py, test_profiles.py and test_suites.py under heavier load: 80 passed, 9
#   failed in 224 s, all 9 the raspberry-pi-4 profile's YOLOv8n engine tests, "cpu: run exceeded 5000 ms"
#   (that profile's run_timeout_ms; an emulated YOLOv8n inference takes seconds): load-dependent here.
#
# Environment: EDGEGUARD_ARM64_ROOT (root folder), EDGEGUARD_ARM64_MIRROR (Debian mirror; default: the one apt
# uses), QEMU_CPU (default cortex-a72: a Raspberry Pi 4's core, and ~17 % faster than qemu's default),
# EDGEGUARD_TEST_SLOWDOWN (passed through; unset, the tests measure the emulation's slowdown themselves).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${EDGEGUARD_ARM64_ROOT:-${TMPDIR:-/tmp}/edgeguard-arm64-root}"
src=/opt/edgeguard  # where the working tree lives inside the root
qemu_cpu="${QEMU_CPU:-cortex-a72}"
started=$(date +%s)

say() { printf '\033[1m==> [arm64 %4ss] %s\033[0m\n' "$(($(date +%s) - started))" "$*"; }
die() { echo "arm64.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts, binfmt_misc)"
[ "$#" -gt 0 ] || set -- tests/bundle tests/engine

mirror="${EDGEGUARD_ARM64_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' \
    /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

# 1. Host tools: qemu-user-static registers itself with binfmt_misc (flags PF: the interpreter is opened by the
#    kernel, so no qemu binary is needed inside the root).
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing host packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt_misc: qemu-aarch64 is not enabled"

# 2. The root file system (marker files make every stage run once).
mkdir -p "$root"
if [ ! -e "$root/.eg-debootstrap" ]; then
  say "debootstrap bookworm arm64 into $root (from $mirror)"
  debootstrap --arch=arm64 --foreign bookworm "$root" "$mirror" >/dev/null
  chroot "$root" /debootstrap/debootstrap --second-stage >/dev/null
  touch "$root/.eg-debootstrap"
fi

unmount_all() {
  for m in "$root/proc/cpuinfo" "$root/proc" "$root/sys" "$root/dev"; do
    mountpoint -q "$m" && umount -R -l "$m" || true
  done
}
trap unmount_all EXIT
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || { mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"; }
mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"; }
# Required: onnxruntime >= 1.28 crashes on import under qemu 7.2 when it reads the host's x86 /proc/cpuinfo next
# to /sys. An arm64 cpuinfo (one Cortex-A72 entry per host CPU) over the root's /proc/cpuinfo avoids it.
fake="$root/.eg-cpuinfo"
: >"$fake"
for ((i = 0; i < $(nproc); i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >>"$fake"
done
mountpoint -q "$root/proc/cpuinfo" || mount --bind "$fake" "$root/proc/cpuinfo"

in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb QEMU_CPU="$qemu_cpu" \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    ${EDGEGUARD_TEST_SLOWDOWN:+EDGEGUARD_TEST_SLOWDOWN="$EDGEGUARD_TEST_SLOWDOWN"} "$@"
}

if [ ! -e "$root/.eg-apt" ]; then
  say "apt: python3-venv python3-dev mosquitto (Python 3.11 as Raspberry Pi OS bookworm)"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # no services start inside the root
  chmod 755 "$root/usr/sbin/policy-rc.d"
  in_root apt-get update -qq
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-venv python3-dev mosquitto git ca-certificates >/dev/null
  # Required where egress goes through a proxy with its own CA: without it pip fails with a certificate error.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  in_root update-ca-certificates >/dev/null
  touch "$root/.eg-apt"
fi

# 3. The working tree: tracked and untracked files that git does not ignore, fresh each run.
say "copying the working tree into $src"
rm -rf "$root$src"
mkdir -p "$root$src"
(cd "$repo" && git ls-files -z -c -o --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf -) | tar -xf - -C "$root$src"

stamp=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$root/.eg-venv" 2>/dev/null)" != "$stamp" ]; then
  say "python venv /opt/venv: pip install -e '.[dev,tflite]' (aarch64 wheels only)"
  in_root python3 -m venv /opt/venv
  in_root /opt/venv/bin/pip install -q --upgrade pip
  in_root bash -c "cd $src && /opt/venv/bin/pip install -q --only-binary=:all: -e '.[dev,tflite]'"
  echo "$stamp" >"$root/.eg-venv"
fi  # else: the editable install points at $src, which was replaced by the same layout

# 4. The tests.
arch=$(in_root uname -m)
say "pytest $* (uname -m: $arch, QEMU_CPU=$qemu_cpu)"
test_started=$(date +%s)
set +e
in_root bash -c "cd $src && python -m pytest -q -p no:cacheprovider $(printf '%q ' "$@")" 2>&1 |
  tee "$root/.eg-last-run.log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -aE '[0-9]+ (passed|failed|error)' "$root/.eg-last-run.log" | tail -n1 || true)
echo
echo "arm64 summary: rc=$rc | ${summary:-no pytest summary} | tests $(($(date +%s) - test_started)) s," \
  "total $(($(date +%s) - started)) s | root $root"
exit "$rc"
