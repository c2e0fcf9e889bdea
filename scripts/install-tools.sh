#!/usr/bin/env bash
# Installs the system tools the tests drive for real: prometheus and promtool (Debian's package), and
# Debian's PostgreSQL server (fleet mode's shared state; tests start their own throwaway cluster with it), and
# Node.js with npm when node is missing (zenmux-emit-js and its tests; `make js` runs `npm ci`).
set -euo pipefail
packages=()
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  packages+=(prometheus)
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  packages+=(postgresql)
fi
if ! command -v node >/dev/null; then
  packages+=(nodejs npm)
elif ! command -v npm >/dev/null; then
  packages+=(npm)
fi
if [ "${#packages[@]}" = 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
