#!/bin/sh
# The browser tests/test_webui.py drives: Debian's chromium at /usr/bin/chromium (Playwright's own download,
# `playwright install`, is not used). Installs it with apt-get when it is missing and this user can.
set -e
BROWSER=${GALLAMA_TEST_BROWSER:-/usr/bin/chromium}
if [ -x "$BROWSER" ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium with apt-get (for tests/test_webui.py)"
    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }
    [ -x "$BROWSER" ] && exit 0
fi
echo "tests/install_browser.sh: no browser at $BROWSER. Install Debian's chromium as root" \
     "(apt-get install -y chromium), or set GALLAMA_TEST_BROWSER to a Chromium executable." >&2
exit 1
