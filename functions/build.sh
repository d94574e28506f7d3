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
mkdir -p "$out"
for f in "$target_dir"/wasm32-wasip1/release/*.wasm; do
  cp -u "$f" "$out/"
done
echo "functions: $(ls "$out" | tr '\n' ' ')-> $out" >&2
