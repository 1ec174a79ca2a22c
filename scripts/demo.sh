#!/usr/bin/env bash
# The main job on a small built-in example: make a key and a tiny model, build a signed bundle,
# verify it, and install it into a temporary prefix with the network cut off (when root can do that).
set -euo pipefail
cd "$(dirname "$0")/.."
AIRGAP_SETUP_NO_LLAMA=1 bash scripts/setup.sh  # the demo bundle carries no server: no compiler run
. .venv/bin/activate
work=$(mktemp -d /tmp/airgap-demo.XXXXXX)
mkdir -p .cache/demo
python scripts/make_tiny_gguf.py .cache/demo/tiny.gguf
airgap keygen "$work/keys/release" --no-passphrase
bundle=$(airgap build bundles/example.toml --key "$work/keys/release.key" -o "$work/dist" --quiet | tail -n 1)
airgap inspect "$bundle"
offline() { if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
              unshare -n sh -c 'ip link set lo up 2>/dev/null; exec "$@"' sh "$@"; else "$@"; fi; }
offline airgap verify "$bundle" --trust "$work/keys/release.pub"
offline airgap install "$bundle" --trust "$work/keys/release.pub" --prefix "$work/prefix"
airgap status --prefix "$work/prefix"
echo "demo done: bundle $bundle, installed under $work/prefix"
