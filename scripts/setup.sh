#!/usr/bin/env bash
# Prepare a fresh machine: the Debian tools the tests and the demo use, and a virtualenv with airgap.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in openssl:openssl zstd:zstd ip:iproute2 unshare:util-linux systemd-analyze:systemd \
            /usr/bin/time:time cmake:cmake g++:g++ jq:jq ninja:ninja-build readelf:binutils \
            nsenter:util-linux pgrep:procps /usr/sbin/sshd:openssh-server ssh:openssh-client haproxy:haproxy; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "setup: please install these Debian packages: ${need[*]}" >&2
  fi
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.airgap-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
# llama-cpp-python for the serving tests and benchmarks, built once by airgap's own cached builder
# (the same GGML_NATIVE=OFF wheel that bundles carry), then installed offline from that wheel; and llama-server
# for this host's CPU, the engine the tests' bundles carry (both compiled once per machine, then cached)
if [ -z "${AIRGAP_SETUP_NO_LLAMA:-}" ]; then
  .venv/bin/python scripts/dev_llama.py
fi
