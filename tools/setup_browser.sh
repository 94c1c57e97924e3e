#!/usr/bin/env bash
# Headless Chromium + chromedriver for the human-review browser test (tests/review/).
# Idempotent: does nothing when both are installed. Installs Debian's packages only when running
# as root with apt-get; otherwise says why and exits 0 (the browser test then skips, naming this
# script). Selenium itself is a pinned Python package in requirements.lock.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "setup_browser: chromium/chromedriver missing and not root with apt-get;" \
       "the browser test will skip (install the Debian packages chromium chromium-driver)." >&2
  exit 0
fi
echo "setup_browser: installing chromium and chromium-driver (Debian packages)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
