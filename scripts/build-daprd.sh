#!/usr/bin/env bash
# Builds the real daprd from github.com/dapr/dapr's Go module, pinned by tests/daprd/go.mod and
# go.sum (../shared/notes/go-modules.md), into a cache outside the clone. Prints the binary's
# path on stdout. Idempotent: a build for the same go.sum and script is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${EDGEFN_CACHE:-/var/cache/edgefn}
# The machine's Go (1.26) lives in /usr/local/go; a login shell may not have it on PATH.
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false
# The pinned dapr needs at most the machine's Go; never fetch another toolchain.
export GOTOOLCHAIN=local
stamp=$(cat tests/daprd/go.sum "$0" | sha256sum | cut -c1-16)
out="$CACHE/daprd/$stamp/daprd"
# --if-built: print the path only if the build is already there (the demo never waits on it).
if [ "${1:-}" = "--if-built" ]; then
  [ -x "$out" ] && echo "$out" && exit 0
  exit 1
fi
if [ ! -x "$out" ]; then
  version=$(sed -n "s#^require github.com/dapr/dapr \(v[0-9.]*\)#\1#p" tests/daprd/go.mod)
  echo "daprd: building github.com/dapr/dapr/cmd/daprd $version -tags stablecomponents (cold: downloads and compiles a large module graph)" >&2
  start=$(date +%s)
  mkdir -p "$(dirname "$out")"
  (cd tests/daprd && go mod download 2>&1 | sed 's/^/daprd: /' >&2)
  echo "daprd: modules ready after $(( $(date +%s) - start )) s; compiling (about 5 min on 2 cores)" >&2
  (cd tests/daprd && go build -tags stablecomponents -trimpath \
     -ldflags "-s -w -X github.com/dapr/dapr/pkg/buildinfo.version=${version#v}" -o "$out.part" \
     github.com/dapr/dapr/cmd/daprd 2>&1 | sed 's/^/daprd: /' >&2)
  mv "$out.part" "$out"
  echo "daprd: built in $(( $(date +%s) - start )) s -> $out" >&2
fi
echo "$out"
