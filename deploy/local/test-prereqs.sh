#!/usr/bin/env bash
# Installs the tools the test suite drives besides PostgreSQL and RabbitMQ:
# Debian's chromium + chromedriver (dashboard browser test), promtool from
# the `prometheus` package (alert rules check), and schemathesis from PyPI in a
# venv under the target directory (the OpenAPI fuzz test). Uses what is there;
# installs with apt when root on Debian; else says what to install (the apt
# command only where there is apt).
set -euo pipefail

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "test tools present: chromium, chromedriver, promtool, python3-venv"
elif [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "Installing ${missing[*]} with apt..."
  apt-get update -q >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # The prometheus package starts a server we do not need.
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    (service prometheus stop || systemctl stop prometheus) >/dev/null 2>&1 || true
  fi
elif command -v apt-get >/dev/null; then
  echo "test-prereqs: missing ${missing[*]}. Run: sudo apt-get update && sudo apt-get install ${missing[*]}" >&2
  exit 1
else
  echo "test-prereqs: missing ${missing[*]} (Debian package names). Install with your system's package manager:" >&2
  echo "  Chromium and its chromedriver, promtool (part of Prometheus), and Python 3 with the venv module." >&2
  exit 1
fi
echo "schemathesis: $(bash "$(dirname "$0")/schemathesis.sh")"
