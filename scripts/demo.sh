#!/usr/bin/env bash
# Runs edgefn from this checkout for a newcomer: set-up (idempotent), the functions, the
# daemon on http://127.0.0.1:8080 with the bundled functions. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/setup.sh
functions/build.sh
cargo build --release --quiet --bin edgefn
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/edgefn"

state="${EDGEFN_DEMO_DIR:-$PWD/.demo}"
mkdir -p "$state"
export EDGEFN__RUNTIME__FUNCTIONS_DIR="$PWD/functions/out"
export EDGEFN__RUNTIME__CACHE_DIR="$state/aot"
assets="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}"

cat <<MSG
edgefn demo on http://127.0.0.1:8080
  curl -s --data-binary @$assets/chelsea.png http://127.0.0.1:8080/v1/functions/grayscale > gray.png
  curl -s http://127.0.0.1:8080/v1/functions
  curl -s http://127.0.0.1:8080/metrics
MSG
exec "$bin" --config config/edgefn.toml run
