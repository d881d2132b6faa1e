#!/usr/bin/env bash
# Set up a ComfyUI checkout plus its own virtual environment for tests/test_comfyui_integration.py.
#
# ComfyUI is not a package: CI cannot install it, so the integration test only runs where
# COMFYUI_DIR points at a checkout (and COMFYUI_PYTHON at the interpreter of its venv).
# Nothing is put inside this repository.
#
#   scripts/setup_comfyui.sh [COMFYUI_DIR] [VENV_DIR]     # defaults: ../comfyui ../comfyui-venv
#   COMFYUI_DIR=... COMFYUI_PYTHON=.../bin/python python -m pytest -q tests/test_comfyui_integration.py
#
# Environment knobs:
#   COMFYUI_REPO  git URL to clone when COMFYUI_DIR does not exist yet (default: the Comfy-Org repository)
#   COMFYUI_REF   commit to check out (default: the one the pack is tested against, ComfyUI 0.3.64)
#   TORCH_SPEC    torch packages for the venv (default: a set known to work with ComfyUI 0.3.64 on CPU;
#                 torchaudio is left out: only ComfyUI's audio nodes need it)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "$0")/.." && pwd)"
COMFYUI_DIR="$(realpath -m "${1:-$PACK_DIR/../comfyui}")"
VENV_DIR="$(realpath -m "${2:-$PACK_DIR/../comfyui-venv}")"
COMFYUI_REPO="${COMFYUI_REPO:-https://github.com/Comfy-Org/ComfyUI.git}"
COMFYUI_REF="${COMFYUI_REF:-a125cd84b054a57729b5eecab930ca9408719832}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

case "$COMFYUI_DIR/" in "$PACK_DIR"/*) echo "error: put ComfyUI outside the pack ($PACK_DIR)" >&2; exit 2 ;; esac

# 1. ComfyUI itself, outside the pack.
if [ ! -f "$COMFYUI_DIR/main.py" ]; then
    git clone "$COMFYUI_REPO" "$COMFYUI_DIR"
    git -C "$COMFYUI_DIR" checkout --detach "$COMFYUI_REF"
fi
echo "ComfyUI: $COMFYUI_DIR ($(git -C "$COMFYUI_DIR" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'), \
$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_DIR/comfyui_version.py"))"

# 2. Its own venv: torch first, then ComfyUI's requirements without the torch packages, plus
#    `requests` (imported by ComfyUI's frontend manager but missing from its requirements.txt),
#    the pack's runtime requirements and what the integration test itself uses.
if [ ! -x "$VENV_DIR/bin/python" ]; then
    python3 -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip install -q)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_SPEC
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
grep -v -E '^(torch|torchvision|torchaudio)([<>=~! ].*)?$' "$COMFYUI_DIR/requirements.txt" > "$REQS"
"${PIP[@]}" -r "$REQS" requests -r "$PACK_DIR/requirements.txt" pytest websocket-client

# 3. Smoke test: ComfyUI starts and loads its nodes without the pack (exits by itself).
(cd "$COMFYUI_DIR" && "$VENV_DIR/bin/python" main.py --cpu --listen 127.0.0.1 --port 8199 \
    --database-url sqlite:///:memory: --quick-test-for-ci)

cat <<EOF

ComfyUI is ready. Run the integration test with:
  cd $PACK_DIR && COMFYUI_DIR=$COMFYUI_DIR COMFYUI_PYTHON=$VENV_DIR/bin/python python -m pytest -q tests/test_comfyui_integration.py
EOF
