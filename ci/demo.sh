#!/usr/bin/env bash
# The main job: installs what is missing, builds cutline, and runs `cutline demo`:
# three guests checkpointed together, one killed, the cluster rolled back, the
# invariants checked. Exits 0 only when every invariant held.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/install.sh >&2
cargo build --release --locked --quiet -p coordinator --bin cutline
exec ./target/release/cutline demo "$@"
