#!/usr/bin/env bash
# README's test command: installs what the build and the tests need (a no-op when it is there),
# then runs the whole suite in the project's one build profile (release).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# nats-server 2.15.1 from the Python package, ahead of any older one the system has.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
exec cargo test --release "$@"
