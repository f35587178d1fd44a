#!/bin/sh
# Install EdgeGuard as a systemd service on a device (run as root from the repository root):
#   sh firmware_hooks/install.sh [--venv /opt/edgeguard/venv]
# Creates the edgeguard user, the venv, /etc/edgeguard (config, keys, tokens, hooks), the unit and udev rules.
# Idempotent: existing config, keys and tokens are never overwritten.
set -eu

venv=/opt/edgeguard/venv
[ "${1:-}" = "--venv" ] && venv=$2
src=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 2; }
command -v systemctl >/dev/null || { echo "install.sh: systemd is required" >&2; exit 2; }

id edgeguard >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgeguard --shell /usr/sbin/nologin edgeguard
getent group dialout >/dev/null && usermod -a -G dialout edgeguard

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "$src[tflite]"

install -d -m 0750 -o root -g edgeguard /etc/edgeguard /etc/edgeguard/hooks.d
[ -e /etc/edgeguard/edgeguard.toml ] || install -m 0640 -o root -g edgeguard "$src/examples/edgeguard.toml" /etc/edgeguard/
for hook in "$src"/firmware_hooks/hooks.d/*; do
  [ -e "/etc/edgeguard/hooks.d/$(basename "$hook")" ] || install -m 0750 -o root -g edgeguard "$hook" /etc/edgeguard/hooks.d/
done
if [ ! -e /etc/edgeguard/device.key ]; then
  "$venv/bin/edgeguard" keygen device --out /etc/edgeguard
  echo "install.sh: device public key: /etc/edgeguard/device.pub (give it to the model publisher)"
fi
if [ ! -e /etc/edgeguard/api-tokens ]; then
  umask 077
  printf 'app infer,status %s\nops admin,status %s\n' "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" \
    "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" > /etc/edgeguard/api-tokens
  echo "install.sh: API tokens written to /etc/edgeguard/api-tokens"
fi

install -m 0644 "$src/firmware_hooks/udev/60-edgeguard.rules" /etc/udev/rules.d/
udevadm control --reload-rules && udevadm trigger || true
sed "s#/opt/edgeguard/venv#$venv#g" "$src/firmware_hooks/edgeguard.service" > /etc/systemd/system/edgeguard.service
systemctl daemon-reload
"$venv/bin/edgeguard" run --check -c /etc/edgeguard/edgeguard.toml || {
  echo "install.sh: edit /etc/edgeguard/edgeguard.toml, then: systemctl enable --now edgeguard" >&2; exit 0; }
systemctl enable --now edgeguard
