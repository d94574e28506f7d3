#!/usr/bin/env bash
# The edgefn demo from this checkout, for a newcomer on a fresh machine: set-up (idempotent),
# the functions, a local mosquitto, the daemon, and three simulated cameras publishing the
# sample images: front-door through grayscale (Rust), kitchen through classify (Rust,
# EfficientNet-Lite0 on LiteRT), porch through brightness (C, a covered-lens alarm). Prints the
# page's URL; Ctrl-C stops everything.
#
# The demo runs the real daprd beside the daemon as edgefn's sidecar, with a `pubsub.mqtt3`
# named `upstream` on the demo's broker: results also go there (topics frames/gray and
# frames/classified), and the page shows the sidecar as connected. When daprd is not built yet
# (a fresh machine), the page comes up without it while daprd builds in the background; then
# the demo starts it and reloads the daemon with the Dapr sinks. A sidecar already running
# (DAPR_HTTP_PORT set and answering) is used instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

state="${EDGEFN_DEMO_DIR:-$PWD/.demo}"
mkdir -p "$state"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

scripts/setup.sh demo
# The daemon's build is the long pole; the functions' build and the downloads run beside it,
# on the cores and the network it leaves idle (their logs in $state, shown if they fail).
functions/build.sh --no-fixtures > "$state/functions-build.log" 2>&1 & functions_build=$!; pids+=($!)
scripts/assets.sh > "$state/assets.log" 2>&1 & fetch=$!; pids+=($!)
echo "demo: building the functions (log: $state/functions-build.log) and fetching the sample images and the model (log: $state/assets.log) while cargo builds the daemon"
cargo build --profile demo --bin edgefn
settle() { # pid log: the job's result, its log's end if it failed
  wait "$1" || { echo "demo: failed, the end of $2:" >&2; tail -n 30 "$2" >&2; exit 1; }
}
settle "$functions_build" "$state/functions-build.log"
settle "$fetch" "$state/assets.log"
tail -n 1 "$state/functions-build.log"
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target/demo/edgefn"

port="${EDGEFN_DEMO_PORT:-8080}"
mqtt_port="${EDGEFN_DEMO_MQTT_PORT:-18830}"
assets="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}"
mkdir -p "$state/mosquitto"

cat > "$state/mosquitto/mosquitto.conf" <<CONF
listener $mqtt_port 127.0.0.1
allow_anonymous true
user root
persistence true
persistence_location $state/mosquitto/
log_dest file $state/mosquitto/mosquitto.log
CONF
mosquitto -c "$state/mosquitto/mosquitto.conf" & pids+=($!)

# daprd as edgefn's sidecar, with a `pubsub.mqtt3` named `upstream` on the demo's broker.
start_daprd() { # daprd binary
  export DAPR_HTTP_PORT="${EDGEFN_DEMO_DAPR_PORT:-3500}"
  mkdir -p "$state/dapr"
  cat > "$state/dapr/pubsub.yaml" <<YAML
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: upstream
spec:
  type: pubsub.mqtt3
  version: v1
  metadata:
    - name: url
      value: "tcp://127.0.0.1:$mqtt_port"
    - name: qos
      value: "1"
    - name: consumerID
      value: "edgefn-demo-sidecar"
YAML
  "$1" --app-id edgefn --app-port "$port" --app-protocol http --dapr-http-port "$DAPR_HTTP_PORT" \
    --dapr-grpc-port "${EDGEFN_DEMO_DAPR_GRPC_PORT:-50001}" --metrics-port "${EDGEFN_DEMO_DAPR_METRICS_PORT:-9091}" \
    --resources-path "$state/dapr" --log-level warn > "$state/daprd.log" 2>&1 & pids+=($!)
  daprd_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$DAPR_HTTP_PORT/v1.0/healthz/outbound" >/dev/null 2>&1 && break; sleep 0.1
  done
  echo "demo: daprd started as edgefn's sidecar on port $DAPR_HTTP_PORT (log: $state/daprd.log)"
}

sidecar_up() { [ -n "${DAPR_HTTP_PORT:-}" ] && curl -fsS "http://127.0.0.1:$DAPR_HTTP_PORT/v1.0/healthz/outbound" >/dev/null 2>&1; }

# EDGEFN_DEMO_DAPR_LATE=1 takes the path of a machine without daprd even when it is built (the
# demo test uses it, so CI builds daprd once): the page first, the sidecar later.
late_dapr=""
if [ -z "${DAPR_HTTP_PORT:-}" ]; then
  if [ -z "${EDGEFN_DEMO_DAPR_LATE:-}" ] && daprd="$(scripts/build-daprd.sh --if-built)"; then
    start_daprd "$daprd"
  else
    late_dapr=1
  fi
fi

write_config() { # with the Dapr sinks when the sidecar answers
  local sinks="{ file = { path = \"$state/results.jsonl\" } }, { mqtt = { topic = \"results/{camera}/{pipeline}\" } }"
  local labels="$sinks" dapr=""
  if sidecar_up; then
    dapr="[dapr]
url = \"http://127.0.0.1:$DAPR_HTTP_PORT\""
    sinks="{ dapr = { pubsub = \"upstream\", topic = \"frames/gray\" } }, $sinks"
    labels="{ dapr = { pubsub = \"upstream\", topic = \"frames/classified\" } }, $labels"
  fi
  cat > "$state/edgefn.toml.new" <<CONF
$dapr

[server]
listen = "127.0.0.1:$port"
notice_file = "$state/notice"

[runtime]
functions_dir = "$PWD/functions/out"
cache_dir = "$state/aot"
state_dir = "$state/state"
litert = "${EDGEFN_LITERT_DIR:-/var/cache/edgefn/litert}/$(dpkg --print-architecture)/libLiteRt.so"

[models.efficientnet-lite0]
path = "$assets/efficientnet_lite0.tflite"
threads = 2

[functions.classify]
dirs = { "/models" = "$assets" }
env = { MODEL_FILE = "/models/efficientnet_lite0.tflite" }

[mqtt]
url = "mqtt://127.0.0.1:$mqtt_port"
client_id = "edgefn-demo"

[[pipeline]]
name = "demo-gray"
source.mqtt = "cameras/+/frames"
functions = ["grayscale"]
sinks = [$sinks]

[[pipeline]]
name = "demo-classify"
source.mqtt = "labels/+/frames"
functions = ["classify"]
sinks = [$labels]

[[pipeline]]
name = "demo-tamper"
source.mqtt = "tamper/+/frames"
functions = ["brightness"]
sinks = [{ file = { path = "$state/results.jsonl" } }]
CONF
  mv "$state/edgefn.toml.new" "$state/edgefn.toml"
}
write_config
if sidecar_up; then
  echo "demo: Dapr sidecar found on port $DAPR_HTTP_PORT"
else
  echo "demo: no Dapr sidecar yet; results go to $state/results.jsonl and MQTT results/<camera>/<pipeline>"
fi

"$bin" --config "$state/edgefn.toml" run & pids+=($!)
edgefn_pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" publish --broker "mqtt://127.0.0.1:$mqtt_port" --topic cameras/front-door/frames --fps 2 --count 0 \
  "$assets/chelsea.png" "$assets/coffee.png" & pids+=($!)
"$bin" publish --broker "mqtt://127.0.0.1:$mqtt_port" --topic labels/kitchen/frames --fps 1 --count 0 \
  "$assets/coffee.png" "$assets/chelsea.png" & pids+=($!)
"$bin" publish --broker "mqtt://127.0.0.1:$mqtt_port" --topic tamper/porch/frames --fps 1 --count 0 \
  "$assets/chelsea.png" "$assets/coffee.png" & pids+=($!)

# No daprd yet: build it now, niced, beside the running demo (about 8 minutes cold on 2
# cores), then start it and reload the daemon with the Dapr sinks: the page turns "Dapr
# connected" by itself.
attach_dapr() {
  echo "demo: building the Dapr sidecar in the background (log: $state/daprd-build.log); the page shows it once it is up"
  local built
  # The page shows the build's progress from this file (server.notice_file).
  echo "Dapr sidecar: building it in the background; the page turns \"Dapr reachable\" when it is up" > "$state/notice"
  if ! built="$(EDGEFN_DAPRD_PROGRESS="$state/notice" nice -n 19 scripts/build-daprd.sh 2> "$state/daprd-build.log")"; then
    echo "Dapr sidecar: the build failed (see $state/daprd-build.log); results go to the file and MQTT sinks" > "$state/notice"
    echo "demo: building daprd failed, the demo goes on without it; the end of $state/daprd-build.log:" >&2
    tail -n 20 "$state/daprd-build.log" >&2
    return 0
  fi
  start_daprd "$built"
  # This runs in a subshell: daprd is its child, and goes when it goes.
  trap 'kill "$daprd_pid" 2>/dev/null' EXIT INT TERM
  echo "Dapr sidecar: up; reloading edgefn with the Dapr sinks" > "$state/notice"
  write_config
  kill -HUP "$edgefn_pid"
  # The note goes once the new generation serves with the sidecar configured.
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$port/v1/status" 2>/dev/null | grep -c '"configured":true' >/dev/null && break
    sleep 0.1
  done
  rm -f "$state/notice"
  echo "demo: daprd attached: edgefn reloaded with the Dapr sinks"
  wait "$daprd_pid"
}
if [ -n "$late_dapr" ]; then
  attach_dapr & pids+=($!)
fi

echo
echo "edgefn demo: open http://127.0.0.1:$port/   (Ctrl-C stops it)"
wait "$edgefn_pid"
