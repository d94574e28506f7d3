#!/usr/bin/env bash
# Machine set-up for edgefn on Debian bookworm, by need: `scripts/setup.sh demo` installs only
# what the demo runs (the toolchains that build the functions and the daemon, and mosquitto;
# the demo fetches its images and model with scripts/assets.sh while it builds);
# `scripts/setup.sh` (or `test`) adds what the tests use (chromium, redis, the arm64 cross
# toolchain and qemu, nspawn, lintian, promtool, the real daprd, every asset). Idempotent:
# every step checks before it installs.
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
# AssemblyScript with node), the sample camera's broker, and pip for scripts/assets.sh.
apt_install rustc-web cargo-web rust-web-src wasi-libc lld clang libclang-rt-dev-wasm32 libstb-dev \
  python3-pip curl mosquitto mosquitto-clients
command -v npm >/dev/null || apt_install nodejs npm
# The demo and the tests start their own brokers on free ports; the packaged one is not needed.
if systemctl is-active --quiet mosquitto 2>/dev/null; then $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
export PATH="$HOME/.cargo/bin:$PATH"

[ "$need" = demo ] && { echo "setup: ok for the demo (scripts/assets.sh fetches its images and model)"; exit 0; }

# ---- the tests only from here ----
apt_install openssl chromium redis-server redis-tools python3-venv faketime prometheus \
  debootstrap systemd-container lintian file docker-registry apache2-utils strace
# The tests start their own redis-server and registry (and promtool needs no server).
for unit in redis-server prometheus docker-registry; do
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
if ! qemu-aarch64 --version 2>/dev/null | grep -cE 'version (9|[1-9][0-9])\.' >/dev/null; then
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
# The images, the model and LiteRT for this host and for arm64 (the arm64 package, qemu tests).
scripts/assets.sh all
# The real Dapr sidecar, built from its Go module (tests/daprd pins the release).
scripts/build-daprd.sh >/dev/null
# cosign and oras, for the fleet tests' interop (tests/tools pins them).
scripts/build-tools.sh >/dev/null
echo "setup: ok"
