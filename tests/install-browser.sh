#!/usr/bin/env bash
# Install what the arena's browser test (tests/test_arena_web.py) needs from Debian/Ubuntu apt:
# chromium (Playwright drives it through executable_path; Playwright never downloads a browser)
# and a font with Hebrew glyphs (fonts-dejavu-core). `make test` runs it.
#
# Quiet and idempotent: prints nothing and changes nothing when everything is there. When
# something is missing and cannot be installed (no apt-get, not root and no password-less sudo),
# it fails with one clear line: the browser test must not be skipped without anyone noticing.
set -euo pipefail

packages=()
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
if ! command -v fc-list >/dev/null 2>&1 || [[ -z "$(fc-list :lang=he family 2>/dev/null)" ]]; then
    packages+=(fonts-dejavu-core)
fi
(( ${#packages[@]} == 0 )) && exit 0

fail() { echo "tests/install-browser.sh: error: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 \
    || fail "${packages[*]} missing and there is no apt-get here; install chromium (as /usr/bin/chromium) and a Hebrew font by hand"
sudo=()
if (( EUID != 0 )); then
    sudo -n true 2>/dev/null || fail "${packages[*]} missing; run as root or with password-less sudo: apt-get install -y ${packages[*]}"
    sudo=(sudo -n)
fi

log=$(mktemp -t hebtron-apt.XXXXXX)
echo "installing ${packages[*]} with apt-get (log: $log)" >&2
if ! { "${sudo[@]}" apt-get update -qq \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    fail "apt-get install ${packages[*]} failed (log: $log)"
fi
rm -f "$log"
[[ -x /usr/bin/chromium ]] || fail "apt-get installed ${packages[*]} but /usr/bin/chromium is still missing"
