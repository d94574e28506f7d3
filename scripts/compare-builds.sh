#!/usr/bin/env bash
# Two edgefn binaries side by side (e.g. two build profiles), in one run on one machine, and
# their ratios: requests/s for an empty function and for grayscale over HTTP, each daemon in
# turn for ROUNDS rounds, and the time to compile classify. Loopback only, bounded, and it
# stops by itself. Needs `ab` (apt install apache2-utils) and functions/build.sh's output.
#   scripts/compare-builds.sh BASELINE CANDIDATE [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: scripts/compare-builds.sh BASELINE CANDIDATE [ROUNDS]" >&2; exit 2; }
command -v ab >/dev/null || { echo "compare-builds: needs ab (apt install apache2-utils)" >&2; exit 1; }
bins=("$(realpath "$1")" "$(realpath "$2")"); rounds="${3:-5}"
work=$(mktemp -d); pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/functions"
cp functions/out/fixtures/echo.wasm functions/out/grayscale.wasm "$work/functions/" \
  || { echo "compare-builds: run functions/build.sh first" >&2; exit 1; }
cp "${EDGEFN_ASSETS:-/var/cache/edgefn/assets}/chelsea.png" "$work/frame.png"
head -c 1000 /dev/urandom > "$work/small"
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ports=()
for i in 0 1; do
  port=$(free); mkdir -p "$work/$i"; ports+=("$port")
  printf '[server]\nlisten = "127.0.0.1:%s"\n[runtime]\nfunctions_dir = "%s"\ncache_dir = "%s"\nstate_dir = "%s"\n' \
    "$port" "$work/functions" "$work/$i/aot" "$work/$i/state" > "$work/$i/edgefn.toml"
  RUST_LOG=warn "${bins[$i]}" --config "$work/$i/edgefn.toml" run > "$work/$i/log" 2>&1 & pids+=($!)
done
for i in 0 1; do
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:${ports[$i]}/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done

rate() { # port body count function
  ab -q -k -n "$3" -c 2 -p "$2" -T application/octet-stream "http://127.0.0.1:$1/v1/functions/$4" \
    | awk '/Requests per second/ { print $4 }'
}
: > "$work/rates"
for r in $(seq "$rounds"); do
  for i in 0 1; do
    echo "$i echo $(rate "${ports[$i]}" "$work/small" 4000 echo)" >> "$work/rates"
    echo "$i grayscale $(rate "${ports[$i]}" "$work/frame.png" 150 grayscale)" >> "$work/rates"
  done
done
for r in 1 2 3; do
  for i in 0 1; do
    start=$(date +%s.%N)
    "${bins[$i]}" compile functions/out/classify.wasm -o "$work/classify.cwasm"
    echo "$i compile $(python3 -c "import sys; print(1 / (float(sys.argv[2]) - float(sys.argv[1])))" "$start" "$(date +%s.%N)")" >> "$work/rates"
  done
done
python3 - "$work/rates" "${bins[@]}" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    i, what, value = line.split()
    rates.setdefault(what, ([], []))[int(i)].append(float(value))
print(f"baseline  {sys.argv[2]}\ncandidate {sys.argv[3]}\n(medians; a ratio under 1 means the candidate is slower)")
for what, label in (("echo", "empty call, req/s"), ("grayscale", "grayscale, req/s"), ("compile", "compile classify, 1/s")):
    a, b = (statistics.median(v) for v in rates[what])
    print(f"{label:24} baseline {a:10.2f}  candidate {b:10.2f}  ratio {b / a:.2f}")
PY
