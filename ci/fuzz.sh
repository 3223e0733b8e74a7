#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in fuzz/ and runs each for FUZZ_SECONDS
# (default 10) over its committed corpus and regression inputs, one at a time; any crash,
# panic, OOM or timeout fails the script (libFuzzer leaves the input in
# fuzz/artifacts/TARGET/). Long local runs and the figures: docs/FUZZING.md.
#   FUZZ_SECONDS=N       seconds per target (default 10)
#   FUZZ_SANITIZER=S     none (default here: the targets are safe Rust, and it builds
#                        faster) or address
#   FUZZ_BUILD=--dev     --dev (default: unoptimized, quick to build) or --release
#   FUZZ_TARGETS="a b"   a subset of the targets
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# cargo-fuzz passes nightly flags (-Z, sanitizers); the stable toolchain takes them so.
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-10}
sanitizer=${FUZZ_SANITIZER:-none}
build=${FUZZ_BUILD:---dev}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
started=$(date +%s)
cargo fuzz build "$build" -s "$sanitizer"
echo "ci/fuzz.sh: targets built in $(($(date +%s) - started)) s"
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The targets' temporary block stores live as long as the fuzzer: put them with the rest.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
for t in $targets; do
    # New inputs go to a scratch directory first: the committed corpus stays as it is.
    mkdir -p "$work/$t/new"
    dirs=("$work/$t/new")
    for d in "fuzz/corpus/$t" "fuzz/regressions/$t"; do
        if [ -d "$d" ]; then dirs+=("$root/$d"); fi
    done
    # With -jobs libFuzzer logs to fuzz-0.log in the working directory.
    if ! (cd "$work/$t" && cargo fuzz run --fuzz-dir "$root/fuzz" "$build" -s "$sanitizer" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$t/out.log" 2>&1); then
        tail -n 60 "$work/$t"/*.log
        echo "ci/fuzz.sh: $t FAILED (the input is in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    log=$(cat "$work/$t"/*.log)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' <<<"$log" | grep -o '[0-9]*$' | tail -n 1 || true)
    cov=$(grep -o 'cov: [0-9]*' <<<"$log" | tail -n 1 || true)
    echo "ci/fuzz.sh: $t ok: ${runs:-?} runs in $seconds s, ${cov:-cov: ?}"
done
echo "ci/fuzz.sh: fuzzing passed in $(($(date +%s) - started)) s"
