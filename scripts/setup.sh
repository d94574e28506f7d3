#!/usr/bin/env bash
# One-time machine set-up for building and testing edgefn on Debian bookworm.
# Idempotent: every step checks before it installs. Used by the README commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
for p in rustc-web cargo-web rust-web-src wasi-libc lld python3-pip curl mosquitto mosquitto-clients openssl chromium; do
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
    libstd-rust-web-dev:arm64 libc6-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
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
echo "setup: ok (assets in $ASSETS)"
