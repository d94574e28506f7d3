#!/usr/bin/env bash
# Runs every edgefn test on a fresh Debian bookworm machine: set-up (idempotent), the wasm
# functions, then the Rust tests, which start real daemons on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/setup.sh
functions/build.sh
# The real daprd that the Dapr tests run against (built by setup.sh, cached outside the clone).
DAPRD_BIN="$(scripts/build-daprd.sh)"
export DAPRD_BIN

echo "== grayscale and classify, native unit tests"
host="$(rustc -vV | sed -n 's/^host: //p')"
(cd functions/grayscale && cargo test --release --quiet --target "$host")
(cd functions/classify && cargo test --release --quiet --lib --target "$host")

echo "== daemon tests"
cargo test --release --workspace

echo "== fuzzing: every parser that takes outside bytes, a minute each (cargo-fuzz)"
scripts/fuzz.sh

echo "== soak: 3 minutes of MQTT load with the sidecar, the broker and the config failing under it"
EDGEFN_SOAK_SECS=180 cargo bench --bench soak

echo "== API: a running daemon against its OpenAPI description (schemathesis)"
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
tests/api/schemathesis.sh "$target/release/edgefn"

echo "== demo: scripts/demo.sh with the real daprd as its sidecar"
tests/system/demo.sh

echo "== system: the amd64 .deb on a real systemd (nspawn)"
tests/system/deb-in-nspawn.sh

echo "== system: both .debs through lintian (no errors), their man pages and bash completion"
tests/system/lintian.sh

echo "== system: aarch64 (arm64 .deb, cross-AOT parity, tests under qemu)"
tests/system/aarch64.sh
