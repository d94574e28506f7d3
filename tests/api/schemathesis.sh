#!/usr/bin/env bash
# Checks a running daemon against its own OpenAPI description (GET /openapi.json) with
# schemathesis (PyPI, in a venv cached under /var/cache/edgefn): every status it answers is
# documented for that operation, every body matches its schema and content type, a 500 is only
# one of the documented kinds (trap, memory_limit, output_too_large), and a known path with
# another method gets 405 with Allow. The event stream is left out: it never ends.
#
# Usage: tests/api/schemathesis.sh EDGEFN_BINARY
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$1"
venv=${EDGEFN_CACHE:-/var/cache/edgefn}/venv
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'schemathesis==4.32.5'
fi
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$tmp/edgefn.toml" <<CONF
[server]
listen = "127.0.0.1:$port"

[runtime]
functions_dir = "$PWD/functions/out"
cache_dir = "$tmp/cache"
state_dir = "$tmp/state"

[[pipeline]]
name = "gray"
functions = ["grayscale"]
sinks = [{ file = { path = "$tmp/results.jsonl" } }]
CONF
"$bin" --config "$tmp/edgefn.toml" run 2>"$tmp/daemon.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 300); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

status=0
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --checks status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,unsupported_method,allow_header_conformance \
  --exclude-path /v1/events \
  --phases examples,coverage,fuzzing --max-examples 25 --seed 1 --workers 1 \
  --request-timeout 30 --max-time 120 --warnings off || status=$?
if ! kill -0 $pid 2>/dev/null; then
  echo "schemathesis: the daemon died under the API checks:"; tail -30 "$tmp/daemon.log"; exit 1
fi
if grep -q ' ERROR ' "$tmp/daemon.log"; then echo "daemon errors during the run:"; grep ' ERROR ' "$tmp/daemon.log" | head -5; fi
exit $status
