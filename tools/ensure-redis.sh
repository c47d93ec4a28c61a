#!/usr/bin/env bash
# Makes sure the redis-server binary (Redis 7.x) is on PATH, installing Debian's package when it
# is missing (as root, or through sudo). The tests and `make demo` start the real Redis server
# themselves (lab/localredis.py); nothing here starts it, and the package's own service is
# not needed.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  # XAUTOCLAIM (pull-mode reclaim) and XINFO's entries-read need Redis 7.
  major=$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
  if [ -n "$major" ] && [ "$major" -ge 7 ]; then
    exit 0
  fi
  echo "redis-server on PATH is version ${major:-unknown}; the job queue needs Redis 7 or newer" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "redis-server is not installed and apt-get is missing: install Redis 7.x so that 'redis-server' is on PATH" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "redis-server is not installed: run 'apt-get install -y redis-server' as root" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "installing Debian's redis-server package (for the real Redis server the tests start)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
  || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
