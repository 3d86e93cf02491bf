#!/usr/bin/env bash
# README's test command: installs what the build and the tests need (a no-op when it is there),
# then runs the whole suite in the project's one build profile (release).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec cargo test --release "$@"
