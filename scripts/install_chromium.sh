#!/usr/bin/env bash
# Install headless Chromium for the browser tests (tests/test_chat_page.py) and the README's
# screenshot (make screenshot): Debian's chromium and chromium-driver packages. Idempotent: does
# nothing when chromium is already there. Playwright drives this browser; it downloads none.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium is installed: $(command -v chromium)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "installing chromium needs root: sudo $0" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "installed chromium chromium-driver"
