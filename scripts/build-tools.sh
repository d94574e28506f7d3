#!/usr/bin/env bash
# Builds the real cosign and oras that the fleet tests sign, verify, push and pull with, from
# their Go modules pinned by tests/tools/go.mod and go.sum, into a cache outside the clone.
# Prints the directory holding both on stdout. Idempotent: a build for the same go.sum is
# reused.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${EDGEFN_CACHE:-/var/cache/edgefn}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
build_flags=(-trimpath -ldflags "-s -w")
stamp=$(cat tests/tools/go.mod tests/tools/go.sum <(echo "${build_flags[*]}") | sha256sum | cut -c1-16)
out="$CACHE/tools/$stamp"
for tool in github.com/sigstore/cosign/v2/cmd/cosign oras.land/oras/cmd/oras; do
  name=${tool##*/}
  [ -x "$out/$name" ] && continue
  echo "tools: building $tool $(sed -n "s#^\t${tool%/cmd/*} \(v[^ ]*\).*#\1#p" tests/tools/go.mod)" >&2
  start=$(date +%s)
  mkdir -p "$out"
  (cd tests/tools && go build "${build_flags[@]}" -o "$out/$name.part" "$tool")
  mv "$out/$name.part" "$out/$name"
  echo "tools: $name built in $(( $(date +%s) - start )) s" >&2
done
echo "$out"
