#!/usr/bin/env bash
# Builds every edgefn function for wasm32-wasip1 with Debian's rustc-web toolchain
# (std rebuilt from source; see ../shared/notes/toolchain.md) and copies the .wasm files
# into OUT (default: functions/out). Used by the README, the tests and the packaging.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
cd "$here"
RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  /usr/bin/cargo build --quiet --release --locked
target_dir="$(RUSTC=/usr/bin/rustc /usr/bin/cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
# Real functions go to OUT; the test fixtures (hostile and reference modules) to OUT/fixtures,
# so a functions_dir of OUT never serves them.
mkdir -p "$out/fixtures"
for f in "$target_dir"/wasm32-wasip1/release/*.wasm; do
  name="$(basename "$f" .wasm)"
  if [ -f "fixtures/src/bin/$name.rs" ]; then cp -u "$f" "$out/fixtures/"; else cp -u "$f" "$out/"; fi
done
echo "functions: $(cd "$out" && ls *.wasm | tr '\n' ' ')-> $out (fixtures in $out/fixtures)" >&2
