#!/usr/bin/env bash
# aarch64, from this x86_64 host: the arm64 .deb's contents, a grayscale .cwasm cross-compiled
# here giving the same output bytes on aarch64 as on x86_64, the packaged classify on the
# packaged aarch64 LiteRT, and the cross-built daemon's test suites whose outcome can differ on
# aarch64, all under `qemu-aarch64 -L /`.
#
# Needs Debian's rustc-web with the arm64 std, gcc-aarch64-linux-gnu and qemu-user 9 or later
# (scripts/setup.sh installs them; recipe in ../shared/notes/toolchain.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
T=aarch64-unknown-linux-gnu
fail() { echo "aarch64: FAIL: $*" >&2; exit 1; }
ok() { echo "aarch64: ok: $*"; }

# The arm64 package: an aarch64 ELF and aarch64 .cwasm files inside.
EDGEFN_DEB_OUT="$PWD/packaging/out" cross/build-deb.sh arm64 >/dev/null
deb="$(ls -t packaging/out/edgefn_*_arm64.deb | head -n1)"
listing="$(dpkg-deb -c "$deb")"
grep -q './usr/bin/edgefn$' <<<"$listing" || fail "no usr/bin/edgefn in $deb"
grep -q './usr/lib/edgefn/functions/grayscale.cwasm$' <<<"$listing" || fail "no grayscale.cwasm in $deb"
x="$(mktemp -d)"; trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$deb" "$x"
file "$x/usr/bin/edgefn" | grep -c 'ARM aarch64' >/dev/null || fail "usr/bin/edgefn is not aarch64: $(file "$x/usr/bin/edgefn")"
for c in "$x"/usr/lib/edgefn/functions/*.cwasm; do
  file "$c" | grep -c 'ARM aarch64' >/dev/null || fail "$c is not aarch64: $(file "$c")"
done
file "$x/usr/lib/edgefn/libLiteRt.so" | grep -c 'ARM aarch64' >/dev/null || fail "libLiteRt.so is not aarch64"
[ -s "$x/usr/share/edgefn/models/efficientnet_lite0.tflite" ] || fail "no model in $deb"
ok "$(basename "$deb") ($(stat -c %s "$deb") bytes) holds an aarch64 ELF, aarch64 .cwasm files and an aarch64 libLiteRt.so"

# Cross-AOT parity: the packaged aarch64 grayscale.cwasm under qemu vs x86_64 from the .wasm.
arm_bin="$x/usr/bin/edgefn"
host_bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/edgefn"
img="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}/chelsea.png"
printf '[runtime]\nfunctions_dir = "%s"\ncache_dir = "%s/cache-arm"\n' "$x/usr/lib/edgefn/functions" "$x" > "$x/arm.toml"
printf '[runtime]\nfunctions_dir = "%s"\ncache_dir = "%s/cache-x86"\n' "$PWD/functions/out" "$x" > "$x/x86.toml"
RUST_LOG=warn qemu-aarch64 -L / "$arm_bin" --config "$x/arm.toml" invoke grayscale < "$img" > "$x/arm.png"
RUST_LOG=warn "$host_bin" --config "$x/x86.toml" invoke grayscale < "$img" > "$x/x86.png"
[ -s "$x/arm.png" ] && cmp -s "$x/arm.png" "$x/x86.png" || fail "aarch64 and x86_64 outputs differ"
ok "grayscale.cwasm cross-compiled on x86_64: identical output bytes on aarch64 ($(stat -c %s "$x/arm.png") bytes)"

# The packaged classify, model and libLiteRt.so on aarch64 (XNNPACK's arm kernels).
m="$x/usr/share/edgefn/models"
printf '[runtime]\nfunctions_dir = "%s"\ncache_dir = "%s/cache-arm"\nlitert = "%s"\n\n[models.efficientnet-lite0]\npath = "%s"\n\n[functions.classify]\ndirs = { "/models" = "%s" }\ndeadline = "60s"\n' \
  "$x/usr/lib/edgefn/functions" "$x" "$x/usr/lib/edgefn/libLiteRt.so" "$m/efficientnet_lite0.tflite" "$m" > "$x/arm-nn.toml"
for want in "chelsea.png Egyptian cat 0.816" "coffee.png espresso 0.879"; do
  read -r file expected <<<"$want"
  out="$(RUST_LOG=warn qemu-aarch64 -L / "$arm_bin" --config "$x/arm-nn.toml" invoke classify \
    < "${EDGEFN_ASSETS:-/var/cache/edgefn/assets}/$file")" || fail "classify $file on aarch64 failed"
  python3 - "$out" "$expected" <<'PY' || fail "classify on aarch64: $out"
import json, sys
j = json.loads(sys.argv[1]); label, ref = sys.argv[2].rsplit(" ", 1)
assert j["label"] == label and abs(j["score"] - float(ref)) <= 0.03, j
PY
  ok "classify $file on aarch64: $(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["label"], j["score"])' "$out")"
done

# The test suites whose outcome can differ on aarch64, built for it and run under qemu (the
# daemons they start too): native code (the AOT cache, compiling under emulation, traps and
# deadlines in the sandbox, the seed's pixels), and the host side of wasi-nn on the aarch64
# LiteRT. The rest of http_api and classify is the same logic on either arch, and under
# emulation it costs minutes per suite; the x86_64 run covers it. The AOT tests keep their own
# caches; the others share one (EDGEFN_TEST_AOT_CACHE), or each daemon would compile every
# function at emulated speed.
whole=(--test aot --test sandbox --test seed_parity)
picked=(photo_round_trip_is_gray_and_same_everywhere listens_on_loopback_by_default_and_stops_on_sigterm
        chelsea_and_coffee_match_the_reference_and_native_exactly misusing_wasi_nn_gets_an_error_and_leaves_the_pool_whole)
qemu_test() {
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /" \
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
  EDGEFN_TEST_RUNNER="qemu-aarch64 -L /" EDGEFN_TEST_AOT_CACHE="$x/test-aot" \
    /usr/bin/cargo test --release --target "$T" -p edgefn "$@"
}
# What may be mapped as native code is decided by digests and file modes, the same on either
# arch; under qemu its test would compile modules at emulated speed for four minutes. Under
# qemu-user a daemon's RSS is qemu's (its translated-code cache grows with what ran), so the
# memory a compile leaves behind is measured on the x86_64 run only.
qemu_test "${whole[@]}" -- --skip native_code_is_mapped_only_from_the_own_cache_or_a_listed_cwasm \
  --skip a_start_that_compiled_keeps_no_more_memory_than_one_from_the_cache
qemu_test --test http_api --test classify -- --exact "${picked[@]}" 2>&1 | tee "$x/picked.log"
for t in "${picked[@]}"; do
  grep -q "^test $t \.\.\. ok$" "$x/picked.log" || fail "$t did not run and pass under qemu (renamed?)"
done
ok "AOT, sandbox and seed-parity suites and ${#picked[@]} HTTP and classify tests pass on aarch64 under qemu"
