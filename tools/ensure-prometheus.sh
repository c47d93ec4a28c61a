#!/usr/bin/env bash
# Makes sure the prometheus and promtool binaries are on PATH, installing Debian's package
# when they are missing (as root, or through sudo). The tests and `make demo` run the real
# Prometheus server; nothing here starts it.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus is not installed and apt-get is missing: install Prometheus 2.x so that 'prometheus' and 'promtool' are on PATH" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "prometheus is not installed: run 'apt-get install -y prometheus' as root" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "installing Debian's prometheus package (for the real Prometheus server the tests start)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
