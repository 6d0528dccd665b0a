#!/usr/bin/env bash
# Chromium for the browser tests of the web consoles (tests/e2e/test_console_browser.py), which
# drive the system's Chromium through Playwright (Playwright never downloads a browser here).
# Uses one that is there ($FEDGOV_CHROMIUM, chromium, chromium-browser); else installs Debian's
# 'chromium' package where it may (as root, with apt-get). Never fails the build: when it cannot
# install one it says so, and the browser tests are then skipped with the same message.
set -u
for c in "${FEDGOV_CHROMIUM:-}" chromium chromium-browser; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then
    echo "browser tests: Chromium at $(command -v "$c")"
    exit 0
  fi
done
why="not root, or no apt-get"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "browser tests: installing Debian's chromium package (apt-get install chromium)"
  log=$(mktemp)
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1 \
     && command -v chromium >/dev/null 2>&1; then
    echo "browser tests: Chromium at $(command -v chromium)"
    rm -f "$log"
    exit 0
  fi
  why="apt-get failed: $(tail -n 3 "$log" | tr '\n' ' ')"
  rm -f "$log"
fi
echo "WARNING: could not install Chromium ($why): the browser tests of the web consoles will be SKIPPED." >&2
echo "         Install it (Debian: apt-get install chromium) or set FEDGOV_CHROMIUM=/path/to/chromium." >&2
exit 0
