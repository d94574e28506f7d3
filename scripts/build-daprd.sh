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
version=$(sed -n "s#^require github.com/dapr/dapr \(v[0-9.]*\)#\1#p" tests/daprd/go.mod)
build_flags=(-tags stablecomponents -trimpath -ldflags "-s -w -X github.com/dapr/dapr/pkg/buildinfo.version=${version#v}")
# The build is keyed by what goes into the binary, not by this script's text (its progress
# reports change nothing in daprd).
stamp=$(cat tests/daprd/go.mod tests/daprd/go.sum <(echo "${build_flags[*]}") | sha256sum | cut -c1-16)
out="$CACHE/daprd/$stamp/daprd"
# --if-built: print the path only if the build is already there (the demo never waits on it).
if [ "${1:-}" = "--if-built" ]; then
  [ -x "$out" ] && echo "$out" && exit 0
  exit 1
fi
# EDGEFN_DAPRD_PROGRESS=FILE: keep a one-line account of the build there (the demo's page
# shows it while the sidecar builds).
progress() { [ -z "${EDGEFN_DAPRD_PROGRESS:-}" ] || echo "$*" > "$EDGEFN_DAPRD_PROGRESS"; }
if [ ! -x "$out" ]; then
  echo "daprd: building github.com/dapr/dapr/cmd/daprd $version -tags stablecomponents (cold: downloads and compiles a large module graph)" >&2
  start=$(date +%s)
  mkdir -p "$(dirname "$out")"
  progress "Dapr sidecar $version: downloading its Go modules (a few minutes on a cold machine)"
  (cd tests/daprd && go mod download 2>&1 | sed 's/^/daprd: /' >&2)
  total=$(cd tests/daprd && go list -deps -tags stablecomponents github.com/dapr/dapr/cmd/daprd 2>/dev/null | wc -l)
  echo "daprd: modules ready after $(( $(date +%s) - start )) s; compiling $total packages (about 5 min on 2 cores)" >&2
  progress "Dapr sidecar $version: compiling, 0 of $total packages"
  # -v names each package as it compiles (cached ones are not named): that is the progress.
  (cd tests/daprd && go build -v "${build_flags[@]}" -o "$out.part" github.com/dapr/dapr/cmd/daprd 2>&1 | {
       n=0
       while IFS= read -r line; do
         case "$line" in
           *" "*|"#"*) echo "daprd: $line" >&2 ;; # not a package name: a compiler message
           *) n=$((n + 1)); [ $((n % 20)) -ne 0 ] || progress "Dapr sidecar $version: compiling, $n of $total packages ($((100 * n / (total > 0 ? total : 1))) %)" ;;
         esac
       done
     })
  [ -x "$out.part" ] || { echo "daprd: the build failed" >&2; exit 1; }
  progress "Dapr sidecar $version: linked; starting it"
  mv "$out.part" "$out"
  echo "daprd: built in $(( $(date +%s) - start )) s -> $out" >&2
fi
progress "Dapr sidecar: built; starting it"
echo "$out"
