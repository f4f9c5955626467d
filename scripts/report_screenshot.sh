#!/usr/bin/env bash
# Render a report.html in headless Chromium (Debian's `chromium` package) to a PNG, offline.
# usage: scripts/report_screenshot.sh OUT/<name>/report.html shot.png
set -euo pipefail
html=$(realpath "$1"); png=$(realpath -m "${2:-report.png}")
command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install -y chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1280,1400 --screenshot="$png" "file://$html" 2>/dev/null
echo "$png"
