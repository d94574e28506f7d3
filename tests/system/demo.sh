#!/usr/bin/env bash
# The README's demo command with the real daprd beside it: scripts/demo.sh on free ports must
# reach a live page first, then (the way a fresh machine takes, with daprd attached by a
# reload once it is built) one whose status shows the Dapr sidecar connected, and the demo cameras'
# results must reach the demo broker through daprd's `pubsub.mqtt3` (topic frames/gray).
set -euo pipefail
cd "$(dirname "$0")/../.."
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
export EDGEFN_DEMO_DAPR_LATE=1 EDGEFN_DEMO_DIR="$dir" EDGEFN_DEMO_PORT=$(free) EDGEFN_DEMO_MQTT_PORT=$(free) EDGEFN_DEMO_DAPR_PORT=$(free) \
       EDGEFN_DEMO_DAPR_GRPC_PORT=$(free) EDGEFN_DEMO_DAPR_METRICS_PORT=$(free)
unset DAPR_HTTP_PORT
scripts/build-daprd.sh >/dev/null
setsid scripts/demo.sh > "$dir/demo.out" 2>&1 &
demo=$!
trap 'kill -- -$demo 2>/dev/null || true; wait $demo 2>/dev/null || true; rm -rf "$dir"' EXIT
fail() { echo "demo test: $*"; tail -20 "$dir/demo.out"; tail -20 "$dir/daprd.log" 2>/dev/null; exit 1; }

# until LINE SECONDS WHAT: waits for the demo to print LINE, failing if it exits first.
until_line() {
  for _ in $(seq $(($2 * 2))); do
    grep -q "$1" "$dir/demo.out" && return 0
    kill -0 "$demo" 2>/dev/null || fail "the demo exited before $3"
    sleep 0.5
  done
  fail "not $3 after $2 s"
}
# The demo builds its own profile (cold in CI): bounded generously, since this is no timing test.
until_line "open http://" 1200 "its page was up"
url="http://127.0.0.1:$EDGEFN_DEMO_PORT"
# A fresh machine's path: the page is up before the sidecar; then daprd (built once by the
# test command, so no second build here) is started and the daemon reloaded with the Dapr
# sinks, by itself.
# Meanwhile the page carries the sidecar's progress as its notice (server.notice_file).
(while kill -0 "$demo" 2>/dev/null; do
   curl -fsS "$url/v1/status" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["operator_notice"])' || true
   sleep 0.2
 done) > "$dir/notices" 2>/dev/null & notices=$!
until_line "daprd attached" 120 "attaching daprd"
sleep 3; kill "$notices" 2>/dev/null || true
grep -q '^Dapr sidecar' "$dir/notices" || fail "the page never showed the sidecar's progress: $(sort -u "$dir/notices")"
[ "$(tail -n 1 "$dir/notices")" = None ] || fail "the page still shows a notice after daprd attached: $(tail -n 1 "$dir/notices")"
grep -q "no Dapr sidecar yet" "$dir/demo.out" || fail "the page did not come up before the sidecar"
grep -q "daprd started as edgefn's sidecar" "$dir/demo.out" || fail "the demo did not start daprd"

for _ in $(seq 60); do
  curl -fsS "$url/v1/status" | python3 -c 'import json,sys; d=json.load(sys.stdin)["dapr"]; sys.exit(0 if d=={"configured": True, "reachable": True} else 1)' && break
  sleep 0.5
done
# The demo cameras' results leave through daprd to the demo broker as CloudEvents.
event=$(timeout 60 mosquitto_sub -h 127.0.0.1 -p "$EDGEFN_DEMO_MQTT_PORT" -t frames/gray -C 1) || fail "no result upstream"
echo "$event" | python3 -c 'import json,sys; e=json.load(sys.stdin); assert e["type"]=="io.edgefn.result" and "/demo-gray/" in e["id"], e' \
  || fail "not an edgefn CloudEvent: ${event:0:200}"
status=$(curl -fsS "$url/v1/status")
echo "$status" | python3 -c 'import json,sys; d=json.load(sys.stdin)["dapr"]; assert d=={"configured": True, "reachable": True}, d' \
  || fail "the page does not show the sidecar as connected: $status"
echo "demo test: page live at $url, sidecar connected, results upstream through daprd"
