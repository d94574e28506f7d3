#!/usr/bin/env bash
# Builds every edgefn function into OUT (default: functions/out), test fixtures into
# OUT/fixtures (so a functions_dir of OUT never serves them; the demo skips them with
# --no-fixtures). Used by the README, the demo, the tests and the packaging. Three languages,
# each with what Debian or npm provides:
# - Rust (grayscale, classify): wasm32-wasip1 with Debian's rustc-web toolchain, std rebuilt
#   from source (../shared/notes/toolchain.md);
# - C (c/*.c, e.g. brightness): Debian's clang --target=wasm32-wasi with wasi-libc;
# - AssemblyScript (assemblyscript/*.ts, e.g. frameinfo): npm's assemblyscript and its WASI shim.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fixtures=1
[ "${1:-}" = --no-fixtures ] && { fixtures=""; shift; }
out="${1:-$here/out}"
cd "$here"
mkdir -p "$out/fixtures"

# Rust: the fixtures crate's binaries are fixtures. The flags are .cargo/config.toml's
# (+simd128 among them); cargo lets any of these variables replace them without a word.
for v in RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS; do
  [ -z "${!v:-}" ] || echo "functions/build.sh: ignoring $v=${!v}: the functions build with .cargo/config.toml's flags" >&2
  unset "$v"
done
crates=(--workspace)
[ -n "$fixtures" ] || crates+=(--exclude fixtures)
RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  /usr/bin/cargo build --release --locked "${crates[@]}"
target_dir="$(RUSTC=/usr/bin/rustc /usr/bin/cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
for f in "$target_dir"/wasm32-wasip1/release/*.wasm; do
  name="$(basename "$f" .wasm)"
  if [ -f "fixtures/src/bin/$name.rs" ]; then
    [ -z "$fixtures" ] || cp -u "$f" "$out/fixtures/"
  else
    cp -u "$f" "$out/"
  fi
done

# C: one file, one function. -lm for sqrt; strip, since names are of no use to a board.
build_c() { clang --target=wasm32-wasi --sysroot=/usr -O2 -Wall -Werror -Wl,--strip-all -o "$2" "$1" -lm; }
for f in c/*.c; do build_c "$f" "$out/$(basename "$f" .c).wasm"; done
[ -z "$fixtures" ] || for f in c/fixtures/*.c; do build_c "$f" "$out/fixtures/$(basename "$f" .c).wasm"; done

# AssemblyScript: the compiler comes pinned from assemblyscript/package-lock.json.
(
  cd assemblyscript
  [ -x node_modules/.bin/asc ] || npm ci --no-audit --no-fund --silent
  for f in *.ts; do node_modules/.bin/asc "$f" --config asconfig.json -o "$out/$(basename "$f" .ts).wasm"; done
  [ -z "$fixtures" ] || for f in fixtures/*.ts; do node_modules/.bin/asc "$f" --config asconfig.json -o "$out/fixtures/$(basename "$f" .ts).wasm"; done
)
echo "functions: $(cd "$out" && ls *.wasm | tr '\n' ' ')-> $out${fixtures:+ (fixtures in $out/fixtures)}" >&2
