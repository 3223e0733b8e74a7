#!/usr/bin/env bash
# The test command: installs what is missing, builds the test guest image,
# then runs lints and every test (unit tests and integration tests against real QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/install.sh --with-garage
started=$(date +%s)
cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
cargo run --quiet --locked -p cutline-tests --bin cutline-guest-image
./ci/fuzz.sh
coordinator/model/check.sh
cargo nextest run --workspace --locked --profile ci
echo "ci/test.sh: suite passed in $(( $(date +%s) - started )) s"
