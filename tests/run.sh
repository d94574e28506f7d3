#!/usr/bin/env bash
# Runs every edgefn test on a fresh Debian bookworm machine: set-up (idempotent), the wasm
# functions, then the Rust tests, which start real daemons on loopback ports. Prints each
# stage's wall time at the end, pass or fail, so every run shows where its time went.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

timings=()
started=$SECONDS
report() {
  local rc=$?
  echo "== stage wall times"
  for t in "${timings[@]}"; do echo "  $t"; done
  echo "  total: $((SECONDS - started)) s (rc $rc)"
}
trap report EXIT
# stage NAME CMD...: runs CMD, and records how long it took.
stage() {
  local name="$1" t0=$SECONDS
  shift
  echo "== $name"
  "$@"
  timings+=("$(printf '%5d s  %s' $((SECONDS - t0)) "$name")")
}

# Two builds start beside the stages that leave the cores idle part of the time, so a cold run
# is not all compiling in a row: the daemon's tests beside the set-up (apt and Go downloads;
# the build needs only rustup's toolchain and the machine's gcc), the instrumented fuzz
# targets beside the daemon tests (niced: the tests' daemons go first). A build that fails
# here is built again, and fails loudly, in its own stage.
early="$(mktemp -d)"
waited() { # PID LOG: waits for an early build; if it failed, shows why and goes on
  wait "$1" || { echo "early build failed (its stage builds again):"; tail -20 "$2"; }
}
cargo test --release --workspace --no-run >"$early/tests.log" 2>&1 &
tests_built=$!
stage "set-up (apt, assets, daprd)" scripts/setup.sh
stage "wasm functions" functions/build.sh
# The real daprd that the Dapr tests run against (built by setup.sh, cached outside the clone).
DAPRD_BIN="$(scripts/build-daprd.sh)"
export DAPRD_BIN

host="$(rustc -vV | sed -n 's/^host: //p')"
unit_tests() {
  (cd functions/grayscale && cargo test --release --quiet --target "$host")
  (cd functions/classify && cargo test --release --quiet --lib --target "$host")
}
stage "grayscale and classify, native unit tests" unit_tests
stage "daemon test build (begun beside the set-up)" waited "$tests_built" "$early/tests.log"
nice -n 19 scripts/fuzz.sh build >"$early/fuzz.log" 2>&1 &
fuzz_built=$!
stage "daemon tests" cargo test --release --workspace
stage "fuzz build (begun beside the daemon tests)" waited "$fuzz_built" "$early/fuzz.log"
stage "fuzzing: every parser that takes outside bytes, a minute each (cargo-fuzz)" scripts/fuzz.sh
stage "soak: 3 minutes of MQTT load with the sidecar, the broker and the config failing under it" \
  env EDGEFN_SOAK_SECS=180 cargo bench --bench soak
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
stage "API: a running daemon against its OpenAPI description (schemathesis)" tests/api/schemathesis.sh "$target/release/edgefn"
stage "demo: scripts/demo.sh with the real daprd as its sidecar" tests/system/demo.sh
stage "system: the amd64 .deb on a real systemd (nspawn)" tests/system/deb-in-nspawn.sh
stage "system: both .debs through lintian (no errors), their man pages and bash completion" tests/system/lintian.sh
stage "system: aarch64 (arm64 .deb, cross-AOT parity, tests under qemu)" tests/system/aarch64.sh
