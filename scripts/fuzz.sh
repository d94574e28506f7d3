#!/usr/bin/env bash
# Runs every cargo-fuzz target in daemon/fuzz for a bounded time (EDGEFN_FUZZ_SECS, default 60)
# on its corpus (daemon/fuzz/corpus/<target>, kept in the repo, minimised with `cargo fuzz
# cmin`; new inputs go to a scratch dir, not into the clone), and prints runs per second. A crash fails the run and leaves its input in
# daemon/fuzz/artifacts/<target>/.
#
# Stable Rust: `--sanitizer none` needs no nightly flag (libFuzzer's coverage instrumentation
# is plain -C/-Cllvm-args). The instrumented build is cached under /var/cache/edgefn.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export CARGO_TARGET_DIR=/var/cache/edgefn/fuzz-target
secs="${EDGEFN_FUZZ_SECS:-60}"
# The http target serves the echo fixture (functions/build.sh); wasi_nn runs the real model.
export EDGEFN_FUZZ_FUNCTIONS="$PWD/functions/out/fixtures"
export EDGEFN_FUZZ_LITERT="${EDGEFN_LITERT_DIR:-/var/cache/edgefn/litert}/amd64/libLiteRt.so"
export EDGEFN_FUZZ_MODEL="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}/efficientnet_lite0.tflite"

cd daemon/fuzz
echo "fuzz: building the targets (instrumented; cached in $CARGO_TARGET_DIR)"
cargo fuzz build --sanitizer none --codegen-units 16
# `scripts/fuzz.sh build` only builds: tests/run.sh starts it beside the daemon tests.
[ "${1:-}" = build ] && exit 0
# One target per core at once: libFuzzer runs one process per target, so two cores fuzz two
# targets for the same time each in half the wall time.
fuzz_one() { # target: fuzzes it, and prints one line (or the failure's log)
  local target="$1" log found
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  found="$(mktemp -d)"
  if ! cargo fuzz run --sanitizer none --codegen-units 16 "$target" "$found" "corpus/$target" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz: $target FAILED: the input is in daemon/fuzz/artifacts/$target/" >&2
    rm -rf "$log" "$found"
    return 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
  echo "fuzz: $target: ${runs:-?} runs in ${secs} s ($(( ${runs:-0} / secs ))/s), corpus $(ls "corpus/$target" | wc -l) + $(ls "$found" | wc -l) new inputs, nothing found"
  rm -rf "$log" "$found"
}
jobs_max="$(nproc)"
failed=0
running=()
for target in $(cargo fuzz list); do
  fuzz_one "$target" & running+=($!)
  if [ ${#running[@]} -ge "$jobs_max" ]; then
    wait "${running[0]}" || failed=1
    running=("${running[@]:1}")
  fi
done
for pid in "${running[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || { echo "fuzz: a target failed (above)" >&2; exit 1; }
