#!/usr/bin/env bash
# The release .debs for amd64 and arm64 as an operator gets them: lintian (Debian 12's) finds no
# error in either (its warnings are listed), the man pages render without a groff warning, and
# the bash completion completes the subcommands and their options.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "lintian: FAIL: $*" >&2; exit 1; }
ok() { echo "lintian: ok: $*"; }
x="$(mktemp -d)"; trap 'rm -rf "$x"' EXIT

EDGEFN_DEB_OUT="$x/debs" cross/build-deb.sh all >/dev/null
for deb in "$x"/debs/*.deb; do
  # lintian warns that it runs as root; that is CI's business, not the package's.
  report="$(lintian --no-tag-display-limit "$deb" 2>&1 | grep -v 'running with root privileges' || true)"
  errors="$(grep '^E:' <<<"$report" || true)"
  [ -z "$errors" ] || fail "$(basename "$deb"):"$'\n'"$errors"
  ok "$(basename "$deb"): no lintian errors; warnings: $(grep -c '^W:' <<<"$report" || true)"
  grep '^W:' <<<"$report" | sed 's/^/  /' || true
done

deb="$(ls "$x"/debs/*_amd64.deb)"
dpkg-deb -x "$deb" "$x/root"
pages=("$x"/root/usr/share/man/man1/*.1.gz)
[ ${#pages[@]} -ge 7 ] || fail "expected edgefn.1 and a page per subcommand, found ${#pages[@]}"
for page in "${pages[@]}"; do
  warnings="$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null || true)"
  [ -z "$warnings" ] || fail "$(basename "$page"): $warnings"
done
LC_ALL=C.UTF-8 MANWIDTH=80 man -l "$x/root/usr/share/man/man1/edgefn.1.gz" 2>/dev/null | grep -c 'edgefn-run(1)' >/dev/null \
  || fail "edgefn(1) does not name its subcommands' pages"
ok "${#pages[@]} man pages render cleanly"

complete_words() { # what bash completion offers for the words given (the last one being typed)
  bash -c 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
           _edgefn edgefn "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; echo "${COMPREPLY[*]}"' \
    _ "$x/root/usr/share/bash-completion/completions/edgefn" "$@"
}
subs="$(complete_words edgefn '')"
for s in run invoke compile check-config replay publish; do
  grep -qw -- "$s" <<<"$subs" || fail "completion of 'edgefn ' lacks $s: $subs"
done
grep -qw -- '--fps' <<<"$(complete_words edgefn publish --)" || fail "completion of 'edgefn publish --' lacks --fps"
ok "bash completion: subcommands and their options"
