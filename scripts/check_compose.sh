#!/usr/bin/env bash
# Validates docker-compose.yml with the real docker-compose (`config -q`: schema, keys, types and
# variable interpolation against .env.example), since no machine here or in CI runs a Docker engine.
# Installs Debian's docker-compose when it is missing and this is root with apt-get; otherwise it says
# why it skips, and under CI=true a skip is a failure (CI must check the file, not skip it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

skip() {
  echo "check_compose: skipped: $1" >&2
  case "${CI:-}" in
    true | 1) echo "check_compose: CI=${CI} requires the check; failing" >&2; exit 1 ;;
  esac
  exit 0
}

install_compose() {
  export DEBIAN_FRONTEND=noninteractive
  # --no-install-recommends: the package recommends docker.io (an engine), which is not wanted.
  local install=(apt-get install -y -qq --no-install-recommends docker-compose)
  local log
  log=$(mktemp)
  if "${install[@]}" >"$log" 2>&1; then rm -f "$log"; return 0; fi
  # Package lists may be missing or stale on a fresh machine: refresh once and retry.
  if apt-get update -qq >"$log" 2>&1 && "${install[@]}" >>"$log" 2>&1; then rm -f "$log"; return 0; fi
  echo "check_compose: apt-get could not install docker-compose:" >&2
  tail -n 5 "$log" >&2
  rm -f "$log"
  return 1
}

if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    skip "docker-compose is not installed and this is not root (install it: apt-get install docker-compose)"
  elif ! command -v apt-get >/dev/null 2>&1; then
    skip "docker-compose is not installed and there is no apt-get to install it with"
  fi
  echo "check_compose: installing docker-compose with apt-get" >&2
  install_compose || skip "docker-compose could not be installed"
fi

docker-compose --env-file .env.example -f docker-compose.yml config -q
echo "check_compose: docker-compose.yml is valid ($(docker-compose version --short))"
