#!/usr/bin/env bash
# The fleet simulation: BOARDS daemons (default 20) on loopback, each with its own state dir,
# port and camera feed, one docker-registry and one mosquitto as the fleet channel. A good
# version goes out in waves of 10, 50 and 100 %, then a bad one (it traps on half its calls)
# at 10 %. Prints one JSON line: convergence (median, max), how long the bad rollout took to
# stop, and frames in against results out. The test command runs the same with 3 boards
# (daemon/tests/fleet_channel.rs).
#
#   scripts/fleet-sim.sh [BOARDS]
set -euo pipefail
cd "$(dirname "$0")/.."
boards="${1:-20}"
[ -f functions/out/fixtures/flaky.wasm ] || bash functions/build.sh >/dev/null
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
EDGEFN_SIM_BOARDS="$boards" cargo test --release -p edgefn --test fleet_channel fleet_simulation -- \
  --ignored --nocapture --exact >"$out" 2>&1 || status=$?
grep -E '^\{"boards"|^edgefn: rollout' "$out" || true
[ "$status" = 0 ] || { tail -80 "$out"; exit "$status"; }
