#!/usr/bin/env bash
# Builds edgefn .deb packages from this checkout: cross/build-deb.sh amd64|arm64|all
#
# For each architecture: builds the daemon (arm64 is cross-built with Debian's rustc-web and
# gcc-aarch64-linux-gnu, see ../shared/notes/toolchain.md), builds the wasm functions, AOT-compiles
# them on this host for the package's architecture (so a board never compiles), and packages
# with cargo-deb, adding LiteRT for the package's architecture and the classify model.
# Packages land in packaging/out/ (EDGEFN_DEB_OUT to change).
#
# EDGEFN_FEATURES=test-hooks builds the test-only variant used by tests/system.
# EDGEFN_DEB_VERSION=0.1.1-1 overrides the package version (the upgrade test uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

case "${1:-}" in
  amd64|arm64) arches=("$1") ;;
  all) arches=(amd64 arm64) ;;
  *) echo "usage: cross/build-deb.sh amd64|arm64|all" >&2; exit 2 ;;
esac
out="${EDGEFN_DEB_OUT:-$PWD/packaging/out}"
features=()
[ -n "${EDGEFN_FEATURES:-}" ] && features=(--features "$EDGEFN_FEATURES")
version=()
[ -n "${EDGEFN_DEB_VERSION:-}" ] && version=(--deb-version "$EDGEFN_DEB_VERSION")
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet

functions/build.sh
# The host's edgefn does the cross-AOT compile.
cargo build --release --quiet --bin edgefn
host_target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
edgefn="$host_target/release/edgefn"
mkdir -p "$out"
# The man pages and bash completion, from the CLI's own definition (the same for every arch).
docs=packaging/staging/docs
rm -rf "$docs"
cargo run --release --quiet --example docs -- "$docs"
gzip -9n "$docs"/*.1

for arch in "${arches[@]}"; do
  case "$arch" in
    amd64)
      # This host is amd64: its own release build is the package's binary.
      triple=x86_64-unknown-linux-gnu
      cargo build --release --quiet --bin edgefn "${features[@]}"
      target=()
      strip=(--strip)
      ;;
    arm64)
      triple=aarch64-unknown-linux-gnu
      # Debian's toolchain: the only one here with an aarch64 std.
      RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
      CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
        /usr/bin/cargo build --release --quiet --target "$triple" --bin edgefn "${features[@]}"
      # Symbols too, as cargo-deb --strip does for amd64 (lintian: unstripped-binary-or-object).
      aarch64-linux-gnu-strip --strip-unneeded --remove-section=.comment "$host_target/$triple/release/edgefn"
      target=(--target "$triple")
      strip=(--no-strip)
      ;;
  esac
  staging=packaging/staging/functions
  rm -rf "$staging" && mkdir -p "$staging"
  for wasm in functions/out/*.wasm; do
    name="$(basename "$wasm" .wasm)"
    "$edgefn" compile "$wasm" -o "$staging/$name.cwasm" --target "$triple"
  done
  # The package vouches for its native code: the daemon maps a .cwasm only if the root-owned
  # list beside it names its digest (runtime/aot.rs).
  (cd "$staging" && sha256sum -- *.cwasm > SHA256SUMS)
  # LiteRT for this architecture and the model, both fetched and pinned by scripts/setup.sh.
  litert="${EDGEFN_LITERT_DIR:-/var/cache/edgefn/litert}/$arch/libLiteRt.so"
  model="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}/efficientnet_lite0.tflite"
  [ -f "$litert" ] && [ -f "$model" ] || { echo "build-deb: missing $litert or $model: run scripts/setup.sh" >&2; exit 1; }
  rm -rf packaging/staging/litert packaging/staging/models
  mkdir -p packaging/staging/litert packaging/staging/models
  cp "$litert" packaging/staging/litert/
  cp "$model" packaging/staging/models/
  cargo deb --no-build --quiet -p edgefn "${target[@]}" "${strip[@]}" "${version[@]}" -o "$out/"
done
ls -l "$out"/*.deb
