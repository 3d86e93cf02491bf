#!/usr/bin/env bash
# README's run command: installs what the build needs (a no-op when it is there), then runs the
# broker with the default config.toml (127.0.0.1:1883). Extra arguments go to herald.
# Release is the one build profile of the project: tests, CI and benchmarks use it too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec cargo run --release --bin herald -- --config config.toml "$@"
